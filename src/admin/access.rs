//! Who may use the admin HTTP endpoints. Anyone who can change the replica list can put
//! a host of their choosing in the read rotation (and so be sent logins), so every
//! change and `/status` need the bearer token from `[proxy] admin_token` or the
//! `REPLICATOR_ADMIN_TOKEN` environment variable; `/health` stays open for load
//! balancers, `/metrics` for scrapers unless `metrics_auth = true`.

use sha2::{Digest, Sha256};

pub use crate::config::ADMIN_TOKEN_ENV as TOKEN_ENV;
use crate::config::ProxySettings;

/// The largest request body the admin endpoints read (a node URI, nothing bigger).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The token requests must present: the environment's, else proxy.toml's.
pub fn configured_token(proxy: &ProxySettings) -> Option<String> {
    proxy.admin_token()
}

/// What an endpoint asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Nothing,
    Token,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token is configured, so nobody may use the endpoint (403).
    NotConfigured,
    /// The request has no token or the wrong one (401).
    BadToken,
}

impl Refusal {
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::NotConfigured => {
                "this endpoint needs an admin token, and none is configured: set [proxy] \
                 admin_token in proxy.toml (or REPLICATOR_ADMIN_TOKEN in the proxy's \
                 environment) and send it as 'Authorization: Bearer <token>'"
            }
            Refusal::BadToken => {
                "missing or wrong admin token: send 'Authorization: Bearer <token>' with \
                 the proxy's admin_token (the CLI reads it from --config or \
                 REPLICATOR_ADMIN_TOKEN)"
            }
        }
    }
}

/// Decides a request: `presented` is the value of its Authorization header.
pub fn check(
    need: Need,
    configured: Option<&str>,
    presented: Option<&[u8]>,
) -> Result<(), Refusal> {
    if need == Need::Nothing {
        return Ok(());
    }
    let Some(configured) = configured else {
        return Err(Refusal::NotConfigured);
    };
    let presented = presented
        .and_then(|h| {
            h.strip_prefix(b"Bearer ")
                .or_else(|| h.strip_prefix(b"bearer "))
        })
        .map(|t| t.trim_ascii());
    match presented {
        Some(token) if same_secret(token, configured.as_bytes()) => Ok(()),
        _ => Err(Refusal::BadToken),
    }
}

/// Compares digests so that the time taken says nothing about how much of the token
/// was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_endpoints_need_nothing() {
        assert_eq!(check(Need::Nothing, None, None), Ok(()));
    }

    #[test]
    fn without_a_configured_token_nobody_gets_in() {
        assert_eq!(
            check(Need::Token, None, Some(b"Bearer anything")),
            Err(Refusal::NotConfigured)
        );
    }

    #[test]
    fn only_the_configured_bearer_token_gets_in() {
        let ok = check(Need::Token, Some("s3cret"), Some(b"Bearer s3cret"));
        assert_eq!(ok, Ok(()));
        for wrong in [
            None,
            Some(&b"Bearer s3cre"[..]),
            Some(b"Bearer s3cret2"),
            Some(b"Basic s3cret"),
            Some(b"s3cret"),
            Some(b"Bearer "),
        ] {
            assert_eq!(
                check(Need::Token, Some("s3cret"), wrong),
                Err(Refusal::BadToken),
                "{wrong:?}"
            );
        }
    }
}
