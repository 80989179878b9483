//! Setups that work but are weak, for `replicator check` and the log at start: an
//! admin surface reachable from the network without a token or without TLS, clients
//! or servers talked to in clear text across the network, a short token, secrets in a
//! file others can read.

use std::net::{IpAddr, SocketAddr};

use super::{ClientTls, Config, NodeAddress};

/// One warning: the key it is about and what is weak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub text: String,
}

fn warning(key: &str, text: impl Into<String>) -> Warning {
    Warning {
        key: key.to_string(),
        text: text.into(),
    }
}

fn is_loopback_listen(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every weak spot of `config`; `file_mode` is the config file's permission bits.
pub fn weak_setups(config: &Config, file_mode: Option<u32>) -> Vec<Warning> {
    let mut out = Vec::new();
    let proxy = &config.proxy;
    let token = proxy.admin_token();
    let tls = proxy.tls_cert_file.is_some() && proxy.client_tls() != ClientTls::Disable;
    if !proxy.admin_listen.is_empty() && !is_loopback_listen(&proxy.admin_listen) {
        if token.is_none() {
            out.push(warning(
                "proxy.admin_listen",
                "reachable from the network and no admin_token: /status and every change over HTTP are refused; set admin_token (or REPLICATOR_ADMIN_TOKEN)",
            ));
        } else if !tls {
            out.push(warning(
                "proxy.admin_listen",
                "reachable from the network without TLS: the admin token would cross it in clear text; set tls_cert_file and tls_key_file",
            ));
        }
    }
    if token.as_ref().is_some_and(|t| t.len() < 16) {
        out.push(warning(
            "proxy.admin_token",
            "shorter than 16 characters: easy to guess",
        ));
    }
    if !is_loopback_listen(&proxy.listen) && proxy.client_tls() == ClientTls::Disable {
        out.push(warning(
            "proxy.listen",
            "reachable from the network and client TLS is off: logins and rows cross it unencrypted; set tls_cert_file and tls_key_file",
        ));
    }
    for (name, project) in &config.projects {
        for (i, replica) in project.replicas.iter().enumerate() {
            let Ok(addr) = NodeAddress::parse(&replica.uri) else {
                continue;
            };
            if is_loopback_host(&addr.host) {
                continue;
            }
            let key = format!("projects.{name}.replicas[{i}].uri");
            use crate::tls::connect::SslMode;
            match addr.tls.mode {
                SslMode::Disable | SslMode::Prefer => out.push(warning(
                    &key,
                    format!(
                        "{} across the network may be unencrypted (sslmode={}); use sslmode=verify-full with sslrootcert",
                        addr,
                        if addr.tls.mode == SslMode::Disable { "disable" } else { "prefer" }
                    ),
                )),
                SslMode::Require if addr.tls.root_cert.is_none() => out.push(warning(
                    &key,
                    format!("{addr}: encrypted but the server is not verified (sslmode=require without sslrootcert); use verify-full"),
                )),
                _ => {}
            }
        }
    }
    if let Some(mode) = file_mode
        && mode & 0o077 != 0
        && (config.users.iter().any(|u| !u.password.is_empty())
            || config.auth.is_some()
            || !proxy.admin_token.is_empty())
    {
        out.push(warning(
            "",
            format!(
                "the file holds passwords and others may read it (mode {:o}); chmod 600",
                mode & 0o777
            ),
        ));
    }
    out
}
