//! Users allowed to log in, with what the proxy needs to check them and to log in to
//! servers on their behalf, and how it answers a name it does not know.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::protocol::auth::{LoginSecret, ScramKeys, ScramVerifier, Secret};

pub struct UserEntry {
    pub name: String,
    pub secret: Secret,
    /// What the proxy presents to servers: the configured password as written.
    pub backend_password: String,
    pub admin: bool,
    /// Client addresses this user may connect from (empty: any).
    pub allow: Vec<String>,
    /// The SCRAM keys a client's proof revealed (SCRAM passthrough): how the proxy
    /// logs in to servers for a user it has only a verifier for.
    pub learned_keys: std::sync::OnceLock<ScramKeys>,
}

impl UserEntry {
    pub fn new(name: &str, secret: Secret, backend_password: &str, admin: bool) -> UserEntry {
        UserEntry {
            name: name.to_string(),
            secret,
            backend_password: backend_password.to_string(),
            admin,
            allow: Vec::new(),
            learned_keys: std::sync::OnceLock::new(),
        }
    }

    /// Keeps the keys of the first client that proved it knows the password (every
    /// later proof yields the same keys: they depend only on password and salt).
    pub fn learn_keys(&self, keys: ScramKeys) {
        if matches!(self.secret, Secret::Scram(_)) {
            let _ = self.learned_keys.set(keys);
        }
    }

    /// The keys to log in to servers with, when there is no plain password to use.
    pub fn backend_keys(&self) -> Option<ScramKeys> {
        self.backend_keys_ref().cloned()
    }

    /// As `backend_keys`, without a copy (compared on every checkout).
    pub fn backend_keys_ref(&self) -> Option<&ScramKeys> {
        if crate::protocol::auth::is_plain_password(&self.backend_password) {
            None
        } else {
            self.learned_keys.get()
        }
    }
}

/// Every configured user, and the secret that makes up salts.
pub struct Users {
    by_name: HashMap<String, Arc<UserEntry>>,
    login_secret: LoginSecret,
    /// Unknown names get md5 when most listed users have md5 hashes, else SCRAM:
    /// what most real users get, so the method says little about who exists.
    unknown_gets_md5: bool,
}

impl Users {
    pub fn get(&self, name: &str) -> Option<&Arc<UserEntry>> {
        self.by_name.get(name)
    }

    /// The secret to run the exchange against for a name that is not a user: one no
    /// password matches, with the method and (for SCRAM) the salt a real user would get.
    pub fn unknown(&self, name: &str) -> Secret {
        if self.unknown_gets_md5 {
            // An md5 hash no password produces (not hex), so the check always fails.
            Secret::Md5 {
                hash: format!("md5{}", "x".repeat(32)),
            }
        } else {
            Secret::Scram(ScramVerifier::unmatchable(&self.login_secret, name))
        }
    }
}

/// The secrets that seed made-up salts: everything secret in the config.
pub fn login_secret(config: &Config) -> LoginSecret {
    let passwords = config.users.iter().map(|u| u.password.as_str());
    let failover = config.failover.password.as_deref().into_iter();
    let auth = config
        .auth
        .as_ref()
        .map(|a| a.password.as_str())
        .into_iter();
    LoginSecret::from_secrets(
        passwords
            .chain(failover)
            .chain(auth)
            .chain(std::iter::once(config.proxy.admin_token.as_str())),
    )
}

pub fn from_config(config: &Config) -> Users {
    let login_secret = login_secret(config);
    let by_name: HashMap<String, Arc<UserEntry>> = config
        .users
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                Arc::new(UserEntry {
                    allow: u.allow.clone(),
                    ..UserEntry::new(
                        &u.name,
                        Secret::from_config(&u.name, &u.password, &login_secret),
                        &u.password,
                        u.admin,
                    )
                }),
            )
        })
        .collect();
    let md5 = by_name
        .values()
        .filter(|u| matches!(u.secret, Secret::Md5 { .. }))
        .count();
    Users {
        unknown_gets_md5: md5 * 2 > by_name.len(),
        by_name,
        login_secret,
    }
}
