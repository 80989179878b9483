//! Users the database knows and proxy.toml does not list (`[auth]`, as PgBouncer's
//! auth_user/auth_query): the query runs on the project's primary as the auth user and
//! returns the login's stored secret, a SCRAM verifier or an md5 hash. The client is
//! checked against it; towards servers the proxy logs in with the md5 hash, or with
//! the SCRAM keys the client's own proof reveals (SCRAM passthrough), so no plain
//! password is ever needed. Lookups, found or not, are kept for `cache_ttl_ms`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::monitor::{Credentials, control_connection};
use crate::protocol::auth::{ScramVerifier, Secret, is_md5_hash};
use crate::session::Context;
use crate::users::UserEntry;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct AuthQueryCache {
    entries: Mutex<HashMap<(String, String), Cached>>,
}

struct Cached {
    at: Instant,
    user: Option<Arc<UserEntry>>,
}

/// Lookups kept at most; past it the oldest half goes (names tried by a stranger
/// must not grow memory without bound).
const MAX_ENTRIES: usize = 10_000;

impl AuthQueryCache {
    /// The user `name` of project `project` as the database knows it; `None` when
    /// there is no `[auth]`, no such login, or it has no usable secret.
    pub async fn lookup(
        &self,
        shared: &Context,
        project: &str,
        name: &str,
    ) -> Result<Option<Arc<UserEntry>>, String> {
        let config = shared.config.load_full();
        let Some(auth) = &config.auth else {
            return Ok(None);
        };
        let ttl = Duration::from_millis(auth.cache_ttl_ms);
        let key = (project.to_string(), name.to_string());
        if let Ok(entries) = self.entries.lock()
            && let Some(cached) = entries.get(&key)
            && cached.at.elapsed() < ttl
        {
            return Ok(cached.user.clone());
        }
        let topology = shared.topology.load_full();
        let Some(project_state) = topology.projects.get(project) else {
            return Ok(None);
        };
        let primary = project_state
            .primary()
            .cloned()
            .ok_or_else(|| format!("project {project} has no primary to ask"))?;
        let credentials = Credentials {
            user: auth.user.clone(),
            password: auth.password.clone(),
        };
        let client = control_connection(
            &primary,
            &credentials,
            LOOKUP_TIMEOUT,
            "replicator-auth-query",
        )
        .await?;
        let rows = tokio::time::timeout(LOOKUP_TIMEOUT, client.query(&auth.query, &[&name]))
            .await
            .map_err(|_| "the auth query did not answer in time".to_string())?
            .map_err(|e| match e.as_db_error() {
                Some(db) => format!("the auth query failed: {}", db.message()),
                None => format!("the auth query failed: {e}"),
            })?;
        let stored: Option<String> = rows
            .first()
            .map(|row| row.try_get::<_, Option<String>>(1))
            .transpose()
            .map_err(|e| format!("the auth query must return (name, secret): {e}"))?
            .flatten();
        let user = stored
            .and_then(|secret| entry_for(name, &secret))
            .map(Arc::new);
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_ENTRIES {
                let mut ages: Vec<Instant> = entries.values().map(|c| c.at).collect();
                ages.sort();
                let cutoff = ages[ages.len() / 2];
                entries.retain(|_, c| c.at > cutoff);
            }
            entries.insert(
                key,
                Cached {
                    at: Instant::now(),
                    user: user.clone(),
                },
            );
        }
        Ok(user)
    }

    /// Forgets every lookup (a reload may have changed `[auth]`).
    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.clear();
        }
    }
}

/// A user entry for a stored secret; `None` for anything the proxy cannot check
/// (no password, a plain text one from a very old server).
fn entry_for(name: &str, stored: &str) -> Option<UserEntry> {
    let secret = if let Some(verifier) = ScramVerifier::parse(stored) {
        Secret::Scram(verifier)
    } else if is_md5_hash(stored) {
        Secret::Md5 {
            hash: stored.to_string(),
        }
    } else {
        return None;
    };
    Some(UserEntry::new(name, secret, stored, false))
}
