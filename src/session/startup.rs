//! The first moments of a client connection: SSL/GSS negotiation (declined), cancel
//! requests, the startup packet, and password authentication against `[[users]]`.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::tls::stream::{ClientRead, ClientWrite};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::config::{ClientTls, allow};
use crate::protocol::auth::{Binding, ScramKeys, ScramServer, Secret, md5_response_matches};
use crate::protocol::frontend::{PasswordMessage, SaslInitial, StartupPacket, StartupParams};
use crate::protocol::messages as msg;
use crate::protocol::{MessageReader, ProtocolError};
use crate::session::Context;
use crate::users::UserEntry;

pub enum Startup {
    Login(Login),
    Cancel { pid: i32, secret: i32 },
}

pub struct Login {
    pub user: Arc<UserEntry>,
    pub database: String,
    /// Startup parameters as sent, minus `user` and `database`.
    pub params: Vec<(String, String)>,
}

/// A failure that ends the connection, with what the client is told.
#[derive(Debug)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ProtocolError> for Refusal {
    fn from(e: ProtocolError) -> Self {
        Refusal::new("08P01", e.to_string())
    }
}

pub async fn handshake(
    reader: &mut MessageReader<ClientRead>,
    writer: &mut ClientWrite,
    shared: &Context,
    peer: SocketAddr,
    channel_binding: Option<&[u8]>,
    full: Option<usize>,
) -> Result<Startup, Refusal> {
    let packet = reader.read_startup_packet().await?;
    let params = match StartupPacket::decode(&packet) {
        StartupPacket::EncryptionRequest => {
            // Negotiation happened before (tls::negotiate): one now comes inside TLS or
            // after too many.
            return Err(Refusal::new(
                "08P01",
                "unexpected encryption negotiation request",
            ));
        }
        StartupPacket::Cancel { pid, secret } => return Ok(Startup::Cancel { pid, secret }),
        StartupPacket::Login { minor, params } => {
            let params = startup_params(params)?;
            if minor != 0 {
                negotiate_version(writer, &params).await?;
            }
            params
        }
        StartupPacket::Unsupported { code } if code == msg::CANCEL_REQUEST => {
            return Err(Refusal::new("08P01", "malformed cancel request"));
        }
        StartupPacket::Unsupported { code } => {
            return Err(Refusal::new(
                "08P01",
                format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0",
                    code >> 16,
                    code & 0xffff
                ),
            ));
        }
    };
    if let Some(max) = full {
        return Err(Refusal::new(
            "53300",
            format!("sorry, too many clients already (max_client_conn = {max})"),
        ));
    }
    let user_name = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| {
            Refusal::new(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            )
        })?;
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map(|(_, v)| v.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user_name.clone());
    if params
        .iter()
        .any(|(k, v)| k == "replication" && !matches!(v.as_str(), "false" | "0" | "off" | "no"))
    {
        return Err(Refusal::new(
            "0A000",
            "replication connections are not supported through the proxy",
        ));
    }
    if channel_binding.is_none() && shared.config.load().proxy.client_tls() == ClientTls::Require {
        return Err(Refusal::new(
            "28000",
            format!(
                "the proxy accepts only encrypted connections (client_tls = \"require\"): host \"{}\", user \"{user_name}\", no encryption; connect with sslmode=require",
                peer.ip()
            ),
        ));
    }
    let users = shared.users.load();
    let mut user = users.get(&user_name).cloned();
    // Not in proxy.toml: the project's database may know it ([auth] query).
    if user.is_none() && database != crate::config::ADMIN_DATABASE {
        user = shared
            .auth_query
            .lookup(shared, &database, &user_name)
            .await
            .map_err(|e| {
                tracing::warn!(user = %user_name, "auth_query failed: {e}");
                Refusal::new(
                    "08006",
                    format!("cannot look up user \"{user_name}\": the user lookup failed"),
                )
            })?;
    }
    // Addresses first, as pg_hba does: a client outside a list gets no exchange.
    let project_allow = shared
        .config
        .load()
        .projects
        .get(&database)
        .map(|p| p.allow.clone())
        .unwrap_or_default();
    let user_allow = user.as_ref().map(|u| u.allow.as_slice()).unwrap_or(&[]);
    if !allow::allows(&project_allow, peer.ip()) || !allow::allows(user_allow, peer.ip()) {
        return Err(Refusal::new(
            "28000",
            format!(
                "no allow entry for host \"{}\", user \"{user_name}\", database \"{database}\"",
                peer.ip()
            ),
        ));
    }
    let secret = match &user {
        Some(u) => u.secret.clone(),
        None => users.unknown(&user_name),
    };
    drop(users);
    let keys = authenticate(
        reader,
        writer,
        &user_name,
        &secret,
        user.is_some(),
        channel_binding,
    )
    .await?;
    let user = user.ok_or_else(|| auth_failed(&user_name))?;
    if let Some(keys) = keys {
        user.learn_keys(keys);
    }
    let params = params
        .into_iter()
        .filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_"))
        .collect();
    Ok(Startup::Login(Login {
        user,
        database,
        params,
    }))
}

/// The startup parameters, owned (they stay with the session), at most 64.
pub(crate) fn startup_params(params: StartupParams) -> Result<Vec<(String, String)>, Refusal> {
    let mut owned = Vec::new();
    for pair in params.pairs() {
        let (name, value) = pair?;
        owned.push((name.to_string(), value.to_string()));
        if owned.len() > 64 {
            return Err(Refusal::new("08P01", "too many startup parameters"));
        }
    }
    Ok(owned)
}

/// Answers a 3.x (x > 0) client with NegotiateProtocolVersion: we speak 3.0.
async fn negotiate_version(
    writer: &mut ClientWrite,
    params: &[(String, String)],
) -> Result<(), Refusal> {
    use bytes::BufMut;
    let unknown: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    let mut body = BytesMut::new();
    body.put_i32(0);
    body.put_i32(unknown.len() as i32);
    for name in unknown {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
    }
    let mut buf = BytesMut::new();
    buf.put_u8(b'v');
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(&body);
    send(writer, &buf).await?;
    Ok(())
}

fn auth_failed(user: &str) -> Refusal {
    Refusal::new(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

/// Runs the exchange for `secret`; `known` is false for a name that is not a user,
/// whose exchange runs the same way and then fails as a wrong password would.
async fn authenticate(
    reader: &mut MessageReader<ClientRead>,
    writer: &mut ClientWrite,
    user_name: &str,
    secret: &Secret,
    known: bool,
    channel_binding: Option<&[u8]>,
) -> Result<Option<ScramKeys>, Refusal> {
    let mut keys = None;
    let mut out = BytesMut::new();
    match secret {
        Secret::Md5 { hash } => {
            let salt: [u8; 4] = rand::random();
            msg::authentication(&mut out, 5, &salt);
            send(writer, &out).await?;
            let frame = read_password(reader).await?;
            let response = PasswordMessage::of_frame(&frame).password()?;
            if !known || !md5_response_matches(hash, salt, response) {
                return Err(auth_failed(user_name));
            }
        }
        Secret::Scram(verifier) => {
            let verifier = verifier.clone();
            // Over TLS, SCRAM-SHA-256-PLUS first: channel_binding=require needs it.
            let mechanisms: &[u8] = if channel_binding.is_some() {
                b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
            } else {
                b"SCRAM-SHA-256\0\0"
            };
            msg::authentication(&mut out, 10, mechanisms);
            send(writer, &out).await?;
            let frame = read_password(reader).await?;
            let SaslInitial { mechanism, data } =
                PasswordMessage::of_frame(&frame).sasl_initial()?;
            let plus = match mechanism {
                "SCRAM-SHA-256" => false,
                "SCRAM-SHA-256-PLUS" if channel_binding.is_some() => true,
                _ => {
                    return Err(Refusal::new(
                        "28000",
                        format!("unsupported SASL mechanism \"{mechanism}\""),
                    ));
                }
            };
            let binding = Binding {
                plus,
                end_point: channel_binding,
            };
            let (server, first) =
                ScramServer::start(verifier, data, binding).map_err(|e| match e {
                    crate::protocol::auth::ScramError::Malformed(m) => {
                        Refusal::new("08P01", format!("malformed SCRAM message: {m}"))
                    }
                    crate::protocol::auth::ScramError::WrongProof => auth_failed(user_name),
                })?;
            out.clear();
            msg::authentication(&mut out, 11, first.as_bytes());
            send(writer, &out).await?;
            let frame = read_password(reader).await?;
            let (final_message, client_keys) = server
                .finish(PasswordMessage::of_frame(&frame).sasl_response())
                .map_err(|_| auth_failed(user_name))?;
            keys = Some(client_keys);
            if !known {
                return Err(auth_failed(user_name));
            }
            out.clear();
            msg::authentication(&mut out, 12, final_message.as_bytes());
            send(writer, &out).await?;
        }
    }
    out.clear();
    msg::authentication(&mut out, 0, &[]);
    send(writer, &out).await?;
    Ok(keys)
}

/// Writes a message during login and pushes it out (TLS may hold it back otherwise).
async fn send(writer: &mut ClientWrite, bytes: &[u8]) -> Result<(), Refusal> {
    writer.write_all(bytes).await.map_err(ProtocolError::from)?;
    writer.flush().await.map_err(ProtocolError::from)?;
    Ok(())
}

async fn read_password(reader: &mut MessageReader<ClientRead>) -> Result<BytesMut, Refusal> {
    let frame = reader.read_frame().await?;
    if frame[0] != msg::PASSWORD {
        return Err(Refusal::new(
            "08P01",
            format!(
                "expected password response, got message '{}'",
                crate::protocol::framing::printable_tag(frame[0])
            ),
        ));
    }
    Ok(frame)
}
