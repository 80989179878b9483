//! Which authentication requests the proxy answers when it logs in to a server: a
//! server that asks for the clear-text password gets it only over an encrypted
//! connection, unless its node URI allows it with libpq's `require_auth` (PostgreSQL
//! 16's list of accepted methods: `password`, `md5`, `scram-sha-256`, `gss`, `sspi`,
//! `none`, or all but some with a leading `!`). A host slipped into the configuration
//! therefore cannot collect users' passwords by asking for them.
//!
//! [`AuthGuard`] applies the same rules to connections tokio-postgres makes (monitor,
//! failover, CDC), by watching the bytes the server sends until login completes.

/// The methods as libpq names them, with the authentication request codes that ask
/// for each.
const METHODS: &[(&str, &[i32])] = &[
    ("password", &[3]),
    ("md5", &[5]),
    ("gss", &[7, 8]),
    ("sspi", &[9]),
    ("scram-sha-256", &[10, 11, 12]),
];

/// `require_auth` from a node URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequireAuth {
    /// The listed methods (`none` included).
    methods: Vec<String>,
    /// `!`: every method but the listed ones.
    negated: bool,
}

impl RequireAuth {
    pub fn parse(value: &str) -> Result<RequireAuth, String> {
        let mut methods = Vec::new();
        let mut negated = None;
        for word in value.split(',').map(str::trim) {
            let (neg, name) = match word.strip_prefix('!') {
                Some(name) => (true, name),
                None => (false, word),
            };
            if negated.is_some_and(|n| n != neg) {
                return Err(format!(
                    "require_auth \"{value}\": negative and positive methods cannot be mixed"
                ));
            }
            negated = Some(neg);
            if name != "none" && !METHODS.iter().any(|(m, _)| *m == name) {
                return Err(format!(
                    "require_auth \"{value}\": unknown method \"{name}\" (password, md5, scram-sha-256, gss, sspi, none)"
                ));
            }
            methods.push(name.to_string());
        }
        Ok(RequireAuth {
            methods,
            negated: negated.unwrap_or(false),
        })
    }

    fn allows(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method) != self.negated
    }
}

/// The rules for one login.
#[derive(Debug, Clone, Copy)]
pub struct AuthPolicy<'a> {
    pub require_auth: Option<&'a RequireAuth>,
    /// The connection to the server is TLS.
    pub encrypted: bool,
}

impl AuthPolicy<'_> {
    /// Whether to answer authentication request `code` (`0`, AuthenticationOk, asks
    /// nothing: it is checked when no request came before it, as `none`).
    pub fn check(&self, code: i32, asked_before: bool) -> Result<(), String> {
        let method = if code == 0 {
            if asked_before {
                return Ok(());
            }
            "none"
        } else {
            METHODS
                .iter()
                .find(|(_, codes)| codes.contains(&code))
                .map(|(m, _)| *m)
                .unwrap_or("unknown")
        };
        match self.require_auth {
            Some(required) if !required.allows(method) => Err(format!(
                "the server asked for authentication method \"{method}\", which require_auth in its URI does not allow"
            )),
            Some(_) => Ok(()),
            None if method == "password" && !self.encrypted => Err(
                "the server asked for the password in clear text over an unencrypted connection; \
                 refused (use TLS, sslmode=require, or allow it with require_auth=password in the node's URI)"
                    .to_string(),
            ),
            None => Ok(()),
        }
    }
}

/// Follows a server's first messages (after an optional one-byte SSLRequest answer)
/// until AuthenticationOk, checking every authentication request against a policy.
#[derive(Debug)]
pub struct AuthGuard {
    require_auth: Option<RequireAuth>,
    encrypted: bool,
    state: GuardState,
    asked: bool,
}

#[derive(Debug)]
enum GuardState {
    /// The one-byte answer to an SSLRequest comes first.
    SslAnswer,
    /// A message header (tag + length) being read.
    Header { bytes: [u8; 5], have: usize },
    /// The request code of an authentication message being read; `rest` follows it.
    Code {
        bytes: [u8; 4],
        have: usize,
        rest: usize,
    },
    /// The rest of a message being skipped.
    Skip(usize),
    /// Login finished (or TLS started, which another guard watches): pass all.
    Done,
}

const HEADER: GuardState = GuardState::Header {
    bytes: [0; 5],
    have: 0,
};

impl AuthGuard {
    /// `ssl_request`: the client sends an SSLRequest first, so the server's first byte
    /// is its one-byte answer.
    pub fn new(require_auth: Option<RequireAuth>, encrypted: bool, ssl_request: bool) -> Self {
        AuthGuard {
            require_auth,
            encrypted,
            state: if ssl_request {
                GuardState::SslAnswer
            } else {
                HEADER
            },
            asked: false,
        }
    }

    /// Looks at bytes the server sent; an error ends the connection before the client
    /// answers what it refuses.
    pub fn inspect(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            match &mut self.state {
                GuardState::Done => return Ok(()),
                GuardState::SslAnswer => {
                    // 'S': encrypted from here, the TLS stream's own guard takes over.
                    self.state = if data[0] == b'S' {
                        GuardState::Done
                    } else {
                        HEADER
                    };
                    data = &data[1..];
                }
                GuardState::Header { bytes, have } => {
                    let take = (5 - *have).min(data.len());
                    bytes[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have < 5 {
                        continue;
                    }
                    let tag = bytes[0];
                    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
                    if len < 4 {
                        return Err(format!("the server sent a message with length {len}"));
                    }
                    self.state = if tag == b'R' {
                        if len < 8 {
                            return Err("the server sent a truncated authentication request".into());
                        }
                        GuardState::Code {
                            bytes: [0; 4],
                            have: 0,
                            rest: len - 8,
                        }
                    } else {
                        // An error, NegotiateProtocolVersion, a notice (or anything a
                        // client would refuse): skipped whole, never answered.
                        GuardState::Skip(len - 4)
                    };
                }
                GuardState::Code { bytes, have, rest } => {
                    let take = (4 - *have).min(data.len());
                    bytes[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have < 4 {
                        continue;
                    }
                    let code = i32::from_be_bytes(*bytes);
                    let rest = *rest;
                    let policy = AuthPolicy {
                        require_auth: self.require_auth.as_ref(),
                        encrypted: self.encrypted,
                    };
                    policy.check(code, self.asked)?;
                    if code == 0 {
                        self.state = GuardState::Done;
                        continue;
                    }
                    self.asked = true;
                    self.state = GuardState::Skip(rest);
                }
                GuardState::Skip(left) => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    data = &data[take..];
                }
            }
            if matches!(self.state, GuardState::Skip(0)) {
                self.state = HEADER;
            }
        }
        Ok(())
    }
}

/// A server connection whose incoming bytes pass an [`AuthGuard`] first (for
/// connections tokio-postgres drives, which answers any request it can).
pub struct Guarded<S> {
    inner: S,
    guard: AuthGuard,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, guard: AuthGuard) -> Self {
        Guarded { inner, guard }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                if let Err(reason) = this.guard.inspect(&buf.filled()[before..]) {
                    tracing::warn!("server login refused: {reason}");
                    return std::task::Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        reason,
                    )));
                }
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_request(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut out = vec![b'R'];
        out.extend_from_slice(&((8 + extra.len()) as u32).to_be_bytes());
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(extra);
        out
    }

    #[test]
    fn clear_text_only_over_tls_or_when_allowed() {
        let plain = AuthPolicy {
            require_auth: None,
            encrypted: false,
        };
        assert!(plain.check(3, false).is_err());
        assert!(plain.check(5, false).is_ok() && plain.check(10, false).is_ok());
        assert!(plain.check(0, false).is_ok());
        let tls = AuthPolicy {
            require_auth: None,
            encrypted: true,
        };
        assert!(tls.check(3, false).is_ok());
        let allowed = RequireAuth::parse("password,scram-sha-256").unwrap();
        let listed = AuthPolicy {
            require_auth: Some(&allowed),
            encrypted: false,
        };
        assert!(listed.check(3, false).is_ok());
        assert!(listed.check(5, false).is_err(), "md5 is not listed");
        assert!(listed.check(0, false).is_err(), "none is not listed");
        assert!(listed.check(0, true).is_ok());
        let not_password = RequireAuth::parse("!password").unwrap();
        let negated = AuthPolicy {
            require_auth: Some(&not_password),
            encrypted: true,
        };
        assert!(negated.check(3, false).is_err() && negated.check(10, false).is_ok());
        assert!(RequireAuth::parse("password,!md5").is_err());
        assert!(RequireAuth::parse("kerberos").is_err());
    }

    #[test]
    fn the_guard_stops_a_clear_text_request_split_across_reads() {
        let mut stream = vec![b'N'];
        stream.extend(auth_request(3, &[]));
        for split in 0..stream.len() {
            let mut guard = AuthGuard::new(None, false, true);
            let first = guard.inspect(&stream[..split]);
            let second = guard.inspect(&stream[split..]);
            assert!(first.is_err() || second.is_err(), "split at {split}");
        }
        // SCRAM, then Ok, then anything at all: allowed.
        let mut stream = auth_request(10, b"SCRAM-SHA-256\0\0");
        stream.extend(auth_request(11, b"r=abc"));
        stream.extend(auth_request(12, b"v=xyz"));
        stream.extend(auth_request(0, &[]));
        stream.extend(auth_request(3, &[]));
        let mut guard = AuthGuard::new(None, false, false);
        for byte in &stream {
            guard.inspect(std::slice::from_ref(byte)).unwrap();
        }
        // Messages of any length before the request (a notice with no body, a long
        // one) do not make the guard lose its place.
        let mut stream = vec![b'N', 0, 0, 0, 4];
        stream.extend([b'N', 0, 0, 0, 9, 1, 2, 3, 4, 5]);
        stream.extend(auth_request(3, &[]));
        for split in 0..stream.len() {
            let mut guard = AuthGuard::new(None, false, false);
            let first = guard.inspect(&stream[..split]);
            let second = guard.inspect(&stream[split..]);
            assert!(first.is_err() || second.is_err(), "split at {split}");
        }
        // An unknown message before the request is skipped, not taken for the end of
        // the login.
        let mut stream = vec![b'S', 0, 0, 0, 6, b'a', 0];
        stream.extend(auth_request(3, &[]));
        assert!(AuthGuard::new(None, false, false).inspect(&stream).is_err());
        // After 'S' the bytes are TLS records: not this guard's to read.
        let mut guard = AuthGuard::new(None, false, true);
        guard.inspect(b"S\x16\x03\x03garbage").unwrap();
    }
}
