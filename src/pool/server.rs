//! One authenticated connection to a PostgreSQL server, used as raw bytes.
//!
//! tokio-postgres decodes every row, so the data path keeps its own connection type:
//! the startup and authentication exchange is done here, after which the proxy only
//! forwards frames. The connection remembers what the proxy has put on it (session
//! settings, prepared statements) so that the next client can reuse it safely.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256,
};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::NodeAddress;
use crate::protocol::backend::{Authentication, Backend, first_column};
use crate::protocol::messages::{self as msg, ErrorFields};
use crate::protocol::settings::Settings;
use crate::protocol::{MAX_SERVER_MESSAGE, MessageReader, ProtocolError};
use crate::tls::stream::{ServerRead, ServerWrite};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    Timeout(String),
    #[error("{addr} refused the login: {fields}")]
    Auth { addr: String, fields: ErrorFields },
    #[error("{addr}: {reason}")]
    Unsupported { addr: String, reason: String },
    #[error("{addr}: {source}")]
    Protocol { addr: String, source: ProtocolError },
}

impl BackendError {
    /// The SQLSTATE a client should see for this failure.
    pub fn sqlstate(&self) -> &str {
        match self {
            BackendError::Auth { fields, .. } if !fields.code.is_empty() => &fields.code,
            _ => "08006",
        }
    }

    /// A copy for another waiter (io errors are not `Clone`; kind and text survive).
    pub fn duplicate(&self) -> BackendError {
        match self {
            BackendError::Connect { addr, source } => BackendError::Connect {
                addr: addr.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            BackendError::Timeout(what) => BackendError::Timeout(what.clone()),
            BackendError::Auth { addr, fields } => BackendError::Auth {
                addr: addr.clone(),
                fields: fields.clone(),
            },
            BackendError::Unsupported { addr, reason } => BackendError::Unsupported {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            BackendError::Protocol { addr, source } => BackendError::Connect {
                addr: addr.clone(),
                source: std::io::Error::other(source.to_string()),
            },
        }
    }
}

/// Login data for one node and one user.
#[derive(Debug, Clone)]
pub struct LoginInfo {
    /// Shared by all the connections of a pool (cancel routing compares it cheaply).
    pub addr: std::sync::Arc<NodeAddress>,
    pub database: String,
    pub user: String,
    /// Plain password or an md5 hash (`md5...`); a SCRAM verifier cannot log in.
    pub password: String,
    /// SCRAM keys learned from a client's proof, for users without a plain password.
    pub scram_keys: Option<crate::protocol::auth::ScramKeys>,
    /// More startup parameters (`replication`, `options`, `application_name`).
    pub extra_params: Vec<(String, String)>,
}

/// A server connection: its sockets and what the proxy knows of its protocol state.
/// The state's fields read as the connection's own (`conn.pid`, `conn.prepared`):
/// `ServerConn` dereferences to it. The session core works on the state alone.
pub struct ServerConn {
    pub reader: MessageReader<ServerRead>,
    pub writer: ServerWrite,
    /// The server's tls-server-end-point hash when the connection is TLS.
    pub channel_binding: Option<Vec<u8>>,
    /// When the connection was opened (server_lifetime_ms).
    pub opened: std::time::Instant,
    pub state: ServerState,
}

/// What the proxy knows of a server connection's protocol state, apart from its
/// sockets.
#[derive(Debug)]
pub struct ServerState {
    pub addr: std::sync::Arc<NodeAddress>,
    /// Key the server gave for CancelRequest.
    pub pid: i32,
    pub secret: i32,
    /// Latest ParameterStatus values reported by the server.
    pub params: Vec<(String, String)>,
    /// Session settings the proxy has applied on top of the server's defaults.
    pub settings: Settings,
    /// Ids of proxy-named prepared statements that exist on this server.
    pub prepared: HashSet<u64>,
    /// Set when the connection can no longer be trusted; the pool then drops it.
    pub broken: bool,
    /// Holds session state of a previous client (pinned or session mode): reset first.
    pub needs_reset: bool,
    /// Registry id of the statement this server holds as its unnamed prepared
    /// statement, when the proxy knows it: a Parse of the same statement can then be
    /// answered without sending it. A simple Query or Close of it forgets it (as the
    /// server does), and so does any error (the proxy cannot tell what survived).
    pub unnamed: Option<u64>,
}

impl ServerState {
    pub fn new(addr: std::sync::Arc<NodeAddress>) -> ServerState {
        ServerState {
            addr,
            pid: 0,
            secret: 0,
            params: Vec::new(),
            settings: Settings::default(),
            prepared: HashSet::new(),
            broken: false,
            needs_reset: false,
            unnamed: None,
        }
    }

    /// Keeps the value a ParameterStatus frame reports.
    /// Keeps a value the server reported (a ParameterStatus already decoded).
    pub fn set_parameter(&mut self, name: &[u8], value: &[u8]) {
        if name.is_empty() {
            return;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let value = String::from_utf8_lossy(value).into_owned();
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.params.push((name, value)),
        }
    }
}

impl std::ops::Deref for ServerConn {
    type Target = ServerState;
    fn deref(&self) -> &ServerState {
        &self.state
    }
}

impl std::ops::DerefMut for ServerConn {
    fn deref_mut(&mut self) -> &mut ServerState {
        &mut self.state
    }
}

impl ServerConn {
    pub async fn connect(
        login: &LoginInfo,
        timeout: Duration,
        keepalive: &crate::keepalive::Keepalive,
    ) -> Result<ServerConn, BackendError> {
        match tokio::time::timeout(timeout, Self::connect_inner(login, keepalive)).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Timeout(login.addr.to_string())),
        }
    }

    async fn connect_inner(
        login: &LoginInfo,
        keepalive: &crate::keepalive::Keepalive,
    ) -> Result<ServerConn, BackendError> {
        let addr = login.addr.to_string();
        let stream = TcpStream::connect((login.addr.host.as_str(), login.addr.port))
            .await
            .map_err(|source| BackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        keepalive.apply(&stream);
        let (read, write, channel_binding) = Self::negotiate_tls(stream, login).await?;
        let mut conn = ServerConn {
            reader: MessageReader::new(read, MAX_SERVER_MESSAGE),
            writer: write,
            channel_binding,
            opened: std::time::Instant::now(),
            state: ServerState::new(login.addr.clone()),
        };
        let protocol = |source| BackendError::Protocol {
            addr: addr.clone(),
            source,
        };
        let mut buf = BytesMut::new();
        let mut params = vec![("user", login.user.as_str()), ("database", &login.database)];
        params.extend(
            login
                .extra_params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        msg::startup_message(&mut buf, &params);
        conn.send(&buf).await.map_err(protocol)?;
        conn.authenticate(login).await?;
        loop {
            let frame = conn.reader.read_frame().await.map_err(protocol)?;
            match Backend::decode(&frame) {
                Backend::ParameterStatus { name, value } => conn.set_parameter(name, value),
                Backend::BackendKeyData { pid, secret } => {
                    conn.pid = pid;
                    conn.secret = secret;
                }
                Backend::ReadyForQuery(_) => return Ok(conn),
                Backend::Error(report) => {
                    return Err(BackendError::Auth {
                        addr,
                        fields: report.to_fields(),
                    });
                }
                Backend::Malformed(tag) => {
                    return Err(protocol(ProtocolError::Violation(format!(
                        "malformed '{}' message",
                        crate::protocol::framing::printable_tag(tag)
                    ))));
                }
                _ => {} // notices
            }
        }
    }

    /// libpq's sslmode: an SSLRequest unless `disable`; 'S' is followed by the TLS
    /// handshake (the certificate checked as the mode says), 'N' is accepted only by
    /// `prefer`.
    async fn negotiate_tls(
        mut stream: TcpStream,
        login: &LoginInfo,
    ) -> Result<(ServerRead, ServerWrite, Option<Vec<u8>>), BackendError> {
        let addr = login.addr.to_string();
        let settings = &login.addr.tls;
        let unsupported = |reason: String| BackendError::Unsupported {
            addr: addr.clone(),
            reason,
        };
        let Some(config) = settings.cached_client_config().map_err(unsupported)? else {
            let (read, write) = crate::tls::stream::plain(stream);
            return Ok((read, write, None));
        };
        let io = |source| BackendError::Connect {
            addr: addr.clone(),
            source,
        };
        let mut request = BytesMut::new();
        msg::ssl_request(&mut request);
        stream.write_all(&request).await.map_err(io)?;
        let answer = stream.read_u8().await.map_err(io)?;
        match answer {
            b'S' => {}
            b'N' if !settings.mode.requires_tls() => {
                let (read, write) = crate::tls::stream::plain(stream);
                return Ok((read, write, None));
            }
            b'N' => {
                return Err(unsupported(
                    "the server does not support TLS, but the node's URI requires it (sslmode)"
                        .into(),
                ));
            }
            other => {
                return Err(unsupported(format!(
                    "unexpected answer {other:#04x} to SSLRequest"
                )));
            }
        }
        let name = crate::tls::connect::server_name(&login.addr.host).map_err(unsupported)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| unsupported(format!("TLS handshake failed: {e}")))?;
        let channel_binding = crate::tls::peer_end_point(tls.get_ref().1);
        let (read, write) = crate::tls::stream::tls(tls);
        Ok((read, write, channel_binding))
    }

    async fn authenticate(&mut self, login: &LoginInfo) -> Result<(), BackendError> {
        let addr = login.addr.to_string();
        let protocol = |source| BackendError::Protocol {
            addr: addr.clone(),
            source,
        };
        let unsupported = |reason: &str| BackendError::Unsupported {
            addr: addr.clone(),
            reason: reason.to_string(),
        };
        let mut scram: Option<ScramSha256> = None;
        let mut key_client: Option<crate::protocol::auth::ScramKeyClient> = None;
        let policy = crate::protocol::auth_policy::AuthPolicy {
            require_auth: login.addr.require_auth.as_ref(),
            encrypted: self.channel_binding.is_some(),
        };
        let mut asked = false;
        loop {
            let frame = self.reader.read_frame().await.map_err(protocol)?;
            let request = match Backend::decode(&frame) {
                Backend::Authentication(request) => request,
                Backend::Error(report) => {
                    return Err(BackendError::Auth {
                        addr,
                        fields: report.to_fields(),
                    });
                }
                _ => {
                    return Err(protocol(ProtocolError::Violation(format!(
                        "expected authentication request, got '{}'",
                        crate::protocol::framing::printable_tag(frame[0])
                    ))));
                }
            };
            policy
                .check(request.code(), asked)
                .map_err(|reason| unsupported(&reason))?;
            asked = true;
            let mut out = BytesMut::new();
            match request {
                Authentication::Ok => return Ok(()),
                Authentication::CleartextPassword => {
                    if !crate::protocol::auth::is_plain_password(&login.password) {
                        return Err(unsupported(
                            "the server asks for the clear-text password, but only a hash is configured for this user",
                        ));
                    }
                    let mut pw = login.password.as_bytes().to_vec();
                    pw.push(0);
                    msg::password_message(&mut out, &pw);
                }
                Authentication::Md5Password { salt } => {
                    let response = md5_response(&login.user, &login.password, salt)
                        .ok_or_else(|| unsupported("the server asks for md5, but only a SCRAM verifier is configured for this user"))?;
                    let mut pw = response.into_bytes();
                    pw.push(0);
                    msg::password_message(&mut out, &pw);
                }
                Authentication::Sasl(mechanisms) => {
                    // Over TLS, bound to the server's certificate when it offers that.
                    let plus =
                        self.channel_binding.is_some() && mechanisms.offers(SCRAM_SHA_256_PLUS);
                    if !plus && !mechanisms.offers(SCRAM_SHA_256) {
                        let offered: Vec<&str> = mechanisms.names().collect();
                        return Err(unsupported(&format!(
                            "no supported SASL mechanism in {offered:?}"
                        )));
                    }
                    if !crate::protocol::auth::is_plain_password(&login.password) {
                        // SCRAM passthrough: the keys a client's proof revealed.
                        let Some(keys) = login.scram_keys.clone() else {
                            return Err(unsupported(
                                "the server asks for SCRAM: the proxy needs the plain password in proxy.toml, or a client of this user to have logged in with SCRAM first",
                            ));
                        };
                        let end_point = self.channel_binding.as_deref().filter(|_| plus);
                        let client = crate::protocol::auth::ScramKeyClient::new(
                            keys,
                            end_point,
                            self.channel_binding.is_some(),
                        );
                        let mechanism = if end_point.is_some() {
                            SCRAM_SHA_256_PLUS
                        } else {
                            SCRAM_SHA_256
                        };
                        msg::sasl_initial_response(
                            &mut out,
                            mechanism,
                            client.first_message().as_bytes(),
                        );
                        key_client = Some(client);
                        self.send(&out).await.map_err(protocol)?;
                        continue;
                    }
                    let (mechanism, binding) = match &self.channel_binding {
                        Some(end_point) if plus => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(end_point.clone()),
                        ),
                        // "y": could bind, but the server did not offer it.
                        Some(_) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                        None => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    let client = ScramSha256::new(login.password.as_bytes(), binding);
                    msg::sasl_initial_response(&mut out, mechanism, client.message());
                    scram = Some(client);
                }
                Authentication::SaslContinue(data) if key_client.is_some() => {
                    let Some(client) = key_client.as_mut() else {
                        continue;
                    };
                    let last = client
                        .final_message(data)
                        .map_err(|e| protocol(ProtocolError::Violation(format!("SCRAM: {e:?}"))))?;
                    msg::password_message(&mut out, last.as_bytes());
                }
                Authentication::SaslFinal(data) if key_client.is_some() => {
                    if let Some(client) = &key_client {
                        client.verify_server(data).map_err(|e| {
                            protocol(ProtocolError::Violation(format!(
                                "SCRAM server signature: {e:?}"
                            )))
                        })?;
                    }
                    continue;
                }
                Authentication::SaslContinue(data) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| unsupported("SASL continue without start"))?;
                    client
                        .update(data)
                        .map_err(|e| protocol(ProtocolError::Violation(format!("SCRAM: {e}"))))?;
                    msg::password_message(&mut out, client.message());
                }
                Authentication::SaslFinal(data) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| unsupported("SASL final without start"))?;
                    client.finish(data).map_err(|e| {
                        protocol(ProtocolError::Violation(format!(
                            "SCRAM server signature: {e}"
                        )))
                    })?;
                    continue;
                }
                Authentication::Other(code) => {
                    return Err(unsupported(&format!(
                        "authentication method {code} is not supported"
                    )));
                }
            }
            self.send(&out).await.map_err(protocol)?;
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Runs a simple query whose answer is one value (a replay position) on an idle
    /// connection. Any surprise leaves the connection marked broken.
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>, ProtocolError> {
        let mut out = bytes::BytesMut::new();
        crate::protocol::messages::query(&mut out, sql);
        self.broken = true;
        self.unnamed = None;
        self.send(&out).await?;
        let mut value = None;
        loop {
            let frame = self.reader.read_frame().await?;
            match Backend::decode(&frame) {
                Backend::DataRow(row) => {
                    value = first_column(row).map(|v| String::from_utf8_lossy(v).into_owned());
                }
                Backend::Error(report) => tracing::debug!("control query failed: {report}"),
                Backend::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        self.broken = false;
        Ok(value)
    }

    /// Cheap liveness check for an idle connection: a closed socket or unsolicited
    /// data (a FATAL from an administrator's shutdown) both mean it is unusable.
    pub fn check_idle(&mut self) -> bool {
        if self.broken || self.reader.buffered() > 0 {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(
            self.reader.get_mut().try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> Option<String> {
    if crate::protocol::auth::ScramVerifier::parse(password).is_some() {
        return None;
    }
    if crate::protocol::auth::is_md5_hash(password) {
        return crate::protocol::auth::md5_salted_response(password, salt);
    }
    Some(postgres_protocol::authentication::md5_hash(
        user.as_bytes(),
        password.as_bytes(),
        salt,
    ))
}
