//! The admin console: the database `replicator` on the proxy's own port, for users with
//! `admin = true`. It speaks the simple query protocol (what psql uses) and answers
//! every command with ordinary result sets, so any Postgres client can read them.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::tls::stream::{ClientRead, ClientWrite};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::commands::{self, Reply};
use crate::protocol::MessageReader;
use crate::protocol::frontend::Frontend;
use crate::protocol::messages as msg;
use crate::session::startup::Login;
use crate::state::Shared;

/// What the console reports as its server version: psql picks its catalog queries by
/// it, and the console accepts none of them anyway.
const SERVER_VERSION: &str = "15.0 (replicator admin console)";

pub async fn serve(
    shared: Arc<Shared>,
    mut reader: MessageReader<ClientRead>,
    mut writer: ClientWrite,
    login: Login,
    peer: SocketAddr,
) {
    let mut out = BytesMut::with_capacity(4096);
    if !login.user.admin {
        warn!(%peer, user = %login.user.name, "admin console refused: not an admin user");
        msg::error_response(
            &mut out,
            "FATAL",
            "42501",
            &format!(
                "user \"{}\" may not use the admin console (set admin = true in proxy.toml)",
                login.user.name
            ),
        );
        let _ = writer.write_all(&out).await;
        let _ = writer.shutdown().await;
        return;
    }
    info!(%peer, user = %login.user.name, "admin console session started");
    let client = shared
        .clients
        .register(&login.user.name, crate::config::ADMIN_DATABASE, peer);
    for (name, value) in [
        ("server_version", SERVER_VERSION),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        msg::parameter_status(&mut out, name, value);
    }
    msg::backend_key_data(&mut out, 0, 0);
    msg::ready_for_query(&mut out, msg::TxStatus::Idle);
    let mut failed_batch = false;
    loop {
        if !out.is_empty() {
            if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
                break;
            }
            out.clear();
        }
        let frame = match reader.read_frame().await {
            Ok(frame) => frame,
            Err(_) => break,
        };
        match frame[0] {
            msg::QUERY => {
                let text = match Frontend::decode(&frame) {
                    Ok(Frontend::Query { sql }) => String::from_utf8_lossy(sql).into_owned(),
                    _ => String::new(),
                };
                run_query(&shared, &text, &mut out).await;
                msg::ready_for_query(&mut out, msg::TxStatus::Idle);
            }
            msg::TERMINATE => break,
            msg::SYNC => {
                failed_batch = false;
                msg::ready_for_query(&mut out, msg::TxStatus::Idle);
            }
            msg::PARSE | msg::BIND | msg::DESCRIBE | msg::EXECUTE | msg::CLOSE | msg::FLUSH => {
                if !failed_batch {
                    failed_batch = true;
                    msg::error_response(
                        &mut out,
                        "ERROR",
                        "0A000",
                        "the admin console speaks the simple query protocol only",
                    );
                }
            }
            other => {
                msg::error_response(
                    &mut out,
                    "FATAL",
                    "08P01",
                    &format!(
                        "invalid frontend message type '{}'",
                        crate::protocol::framing::printable_tag(other)
                    ),
                );
                let _ = writer.write_all(&out).await;
                break;
            }
        }
    }
    let _ = writer.shutdown().await;
    shared.clients.unregister(client.id);
}

/// Runs each `;`-separated command of a simple query, as Postgres would.
async fn run_query(shared: &Arc<Shared>, text: &str, out: &mut BytesMut) {
    let statements = commands::split_statements(text);
    if statements.is_empty() {
        msg::empty_message(out, msg::EMPTY_QUERY);
        return;
    }
    for statement in statements {
        match commands::execute(shared, &statement).await {
            Ok(Reply::Rows { columns, rows, tag }) => {
                msg::row_description(out, &columns);
                for row in &rows {
                    let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
                    msg::data_row(out, &values);
                }
                msg::command_complete(out, &format!("{tag} {}", rows.len()));
            }
            Ok(Reply::Done { tag }) => msg::command_complete(out, &tag),
            Err(e) => {
                msg::error_response(out, "ERROR", e.code, &e.message);
                // Like a failed implicit transaction: the rest is not run.
                return;
            }
        }
    }
}
