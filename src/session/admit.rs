//! From a client's first byte to its session: encryption, the startup packet and
//! authentication (`startup.rs`), the limits on clients, the project it asks for; then
//! the session, built outside any await so that only it stays in the client's task.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::startup::{self, Login, Refusal, Startup};
use super::{HANDSHAKE_TIMEOUT, Session, limits};
use crate::cluster::Project;
use crate::protocol::messages as msg;
use crate::protocol::{MAX_CLIENT_MESSAGE, MessageReader};
use crate::session::Context;
use crate::tls::stream::{ClientRead, ClientWrite};

/// What a client that passed the handshake goes on to.
pub enum Admission {
    /// A project's session (see [`serve`]).
    Session(Admitted),
    /// The admin console (database `replicator`), served by `admin::console`.
    Console {
        reader: MessageReader<ClientRead>,
        writer: ClientWrite,
        login: Login,
    },
}

/// The session of an admitted client, then its cleanup. The session is built before
/// the future is: a future keeps its arguments for its whole life, and the client's
/// task keeps the future for the client's.
/// `guard` is kept until the session has ended (the client's place under
/// `max_client_conn`).
pub fn serve<G: Send + 'static>(
    shared: Arc<Context>,
    admitted: Admitted,
    peer: SocketAddr,
    guard: G,
) -> impl std::future::Future<Output = ()> + Send {
    let mut session = Session::start(shared, admitted, peer);
    async move {
        let end = session.run().await;
        Box::pin(session.finish(end)).await;
        session.leave();
        drop(guard);
    }
}

/// A client that logged in to a project: what its session is made of.
pub struct Admitted {
    pub(super) reader: MessageReader<ClientRead>,
    pub(super) writer: ClientWrite,
    pub(super) login: Login,
    pub(super) project: Arc<Project>,
    /// Its place under the project's and the user's client limits.
    pub(super) _login_seat: limits::LoginSeat,
}

/// Negotiates encryption, reads the startup packet and authenticates. A cancel
/// request and a refusal end here (None). `full`: the proxy is at max_client_conn (the
/// client is refused after its startup packet).
pub async fn admit(
    shared: &Arc<Context>,
    stream: TcpStream,
    peer: SocketAddr,
    full: Option<usize>,
) -> Option<Admission> {
    let _ = stream.set_nodelay(true);
    crate::keepalive::Keepalive::from_settings(&shared.config.load().proxy).apply(&stream);
    let started = tokio::time::Instant::now();
    let tls = shared.tls.load_full();
    let negotiated = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        crate::tls::negotiate::negotiate(stream, tls.as_deref()),
    )
    .await
    {
        Ok(Ok(negotiated)) => negotiated,
        Ok(Err(failed)) => {
            debug!(%peer, "connection ended during encryption negotiation: {}", failed.0);
            return None;
        }
        Err(_) => {
            warn!(%peer, "client did not finish encryption negotiation in time");
            return None;
        }
    };
    let crate::tls::negotiate::Negotiated {
        read,
        write: mut writer,
        prefix,
        channel_binding,
    } = negotiated;
    let mut reader = MessageReader::with_prefix(read, crate::protocol::MAX_LOGIN_MESSAGE, &prefix);
    // Boxed, as the console below: a client's task keeps the space of its largest
    // await point for its whole life, and these two are large and short-lived.
    let startup = tokio::time::timeout_at(
        started + HANDSHAKE_TIMEOUT,
        Box::pin(startup::handshake(
            &mut reader,
            &mut writer,
            shared,
            peer,
            channel_binding.as_deref(),
            full,
        )),
    )
    .await;
    let login = match startup {
        Err(_) => {
            warn!(%peer, "client did not finish the startup handshake in time");
            refuse(&mut writer, "08P01", "timeout during startup").await;
            return None;
        }
        Ok(Err(Refusal { code, message })) => {
            if code == "08P01" && message.contains("closed by peer") {
                debug!(%peer, "client closed the connection during startup");
            } else {
                warn!(%peer, code, "login refused: {message}");
                refuse(&mut writer, code, &message).await;
            }
            return None;
        }
        Ok(Ok(Startup::Cancel { pid, secret })) => {
            if let Some(peers) = &shared.peers
                && peers.forward_cancel(pid, secret).await
            {
                return None;
            }
            shared.cancels.cancel(pid, secret).await;
            return None;
        }
        Ok(Ok(Startup::Login(login))) => login,
    };
    reader.set_max_len(MAX_CLIENT_MESSAGE);
    if login.database == crate::config::ADMIN_DATABASE {
        return Some(Admission::Console {
            reader,
            writer,
            login,
        });
    }
    let Some(project) = shared
        .topology
        .load()
        .projects
        .get(&login.database)
        .cloned()
    else {
        let message = format!("database \"{}\" does not exist", login.database);
        warn!(%peer, user = %login.user.name, "login refused: {message}");
        refuse(&mut writer, "3D000", &message).await;
        return None;
    };
    let login_seat = match limits::ClientLimits::login(shared, &project.name, &login.user.name) {
        Ok(seat) => seat,
        Err(limit) => {
            let message = match limit {
                limits::Limit::Project(n) => format!(
                    "too many clients of project \"{}\" already (max_clients = {n})",
                    project.name
                ),
                limits::Limit::User(n) => format!(
                    "too many clients of user \"{}\" already (max_clients = {n})",
                    login.user.name
                ),
            };
            warn!(%peer, user = %login.user.name, "login refused: {message}");
            refuse(&mut writer, "53300", &message).await;
            return None;
        }
    };
    Some(Admission::Session(Admitted {
        reader,
        writer,
        login,
        project,
        _login_seat: login_seat,
    }))
}

async fn refuse(writer: &mut ClientWrite, code: &str, message: &str) {
    let mut buf = BytesMut::new();
    msg::error_response(&mut buf, "FATAL", code, message);
    let _ = writer.write_all(&buf).await;
    let _ = writer.shutdown().await;
}
