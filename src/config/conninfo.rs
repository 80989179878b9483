//! The libpq words about security in a node's or target's URI that tokio-postgres does
//! not know (`sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`, `sslkey`,
//! `require_auth`), taken out of the URI and parsed; the rest of the URI is left for
//! tokio-postgres. Both URIs (`postgresql://...?sslmode=verify-full&sslrootcert=...`)
//! and key=value strings (`host=... sslmode=require`).

use crate::protocol::auth_policy::RequireAuth;
use crate::tls::connect::{ServerTlsSettings, SslMode};

/// What a URI says about encryption and accepted authentication methods.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSecurity {
    pub tls: ServerTlsSettings,
    pub require_auth: Option<RequireAuth>,
}

const WORDS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "require_auth",
];

/// `uri` without the words above, and what they say.
pub fn split(uri: &str) -> Result<(String, ServerSecurity), String> {
    let mut found: Vec<(String, String)> = Vec::new();
    let rest = if uri.starts_with("postgres://") || uri.starts_with("postgresql://") {
        match uri.split_once('?') {
            None => uri.to_string(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        if WORDS.contains(&key) {
                            found.push((key.to_string(), percent_decode(value)));
                            false
                        } else {
                            true
                        }
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let kept: Vec<&str> = uri
            .split_whitespace()
            .filter(|word| {
                let (key, value) = word.split_once('=').unwrap_or((word, ""));
                if WORDS.contains(&key) {
                    found.push((key.to_string(), value.trim_matches('\'').to_string()));
                    false
                } else {
                    true
                }
            })
            .collect();
        kept.join(" ")
    };
    let mut security = ServerSecurity::default();
    for (key, value) in found {
        match key.as_str() {
            "sslmode" => security.tls.mode = SslMode::parse(&value)?,
            "sslrootcert" => security.tls.root_cert = Some(value),
            "sslcert" => security.tls.cert = Some(value),
            "sslkey" => security.tls.key = Some(value),
            _ => security.require_auth = Some(RequireAuth::parse(&value)?),
        }
    }
    Ok((rest, security))
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_words_leave_the_uri_and_are_read() {
        let (rest, s) = split(
            "postgresql://u:p@db:5432/app?application_name=x&sslmode=verify-full&sslrootcert=/etc/ca%20dir/ca.pem&require_auth=scram-sha-256",
        )
        .unwrap();
        assert_eq!(rest, "postgresql://u:p@db:5432/app?application_name=x");
        assert_eq!(s.tls.mode, SslMode::VerifyFull);
        assert_eq!(s.tls.root_cert.as_deref(), Some("/etc/ca dir/ca.pem"));
        assert!(s.require_auth.is_some());
        let (rest, s) =
            split("host=db port=5433 sslmode=require sslcert=/c.pem sslkey=/c.key").unwrap();
        assert_eq!(rest, "host=db port=5433");
        assert_eq!(s.tls.mode, SslMode::Require);
        assert_eq!(s.tls.cert.as_deref(), Some("/c.pem"));
        let (rest, s) = split("postgresql://db/app").unwrap();
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(s, ServerSecurity::default());
        assert_eq!(s.tls.mode, SslMode::Prefer, "libpq's default");
        assert!(split("postgresql://db/app?sslmode=maybe").is_err());
        // A % before multibyte characters is kept as it is, not a panic.
        let (_, s) = split("postgresql://db/app?sslrootcert=/tmp/%é%zz%4").unwrap();
        assert_eq!(s.tls.root_cert.as_deref(), Some("/tmp/%é%zz%4"));
    }
}
