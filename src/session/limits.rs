//! How many clients may be connected at once: `max_client_conn` for the whole proxy,
//! `max_clients` per project and per user (0: no limit). A client over a limit gets
//! 53300 at once. Seats are counted while a client is connected and given back when its
//! task ends, whatever the way out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::session::Context;

#[derive(Default)]
pub struct ClientLimits {
    connected: AtomicUsize,
    /// Clients connected per project and per user. A seat holds its two counters, so
    /// that a connected client keeps no copy of the names; a name's entry stays once
    /// made (there are only as many as projects and users that ever logged in).
    per_project: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    per_user: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// Refusals by limit: max_client_conn, a project's, a user's.
    pub refused_total: AtomicU64,
    pub refused_project: AtomicU64,
    pub refused_user: AtomicU64,
    /// Refusals by either login limit, per project (SHOW STATS).
    refused_in_project: Mutex<HashMap<String, u64>>,
    /// Sessions ended, or queries cancelled, by a timeout.
    pub timeouts: TimeoutCounts,
}

/// How often each session timeout ran out.
#[derive(Default)]
pub struct TimeoutCounts {
    pub client_idle: AtomicU64,
    pub idle_transaction: AtomicU64,
    pub query: AtomicU64,
    pub client_write: AtomicU64,
}

/// Which limit a client hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    Project(usize),
    User(usize),
}

/// A connection's place under max_client_conn.
pub struct ConnectionSeat(Arc<Context>);

impl Drop for ConnectionSeat {
    fn drop(&mut self) {
        self.0.limits.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A logged-in client's place under its project's and user's limits.
pub struct LoginSeat {
    project: Arc<AtomicUsize>,
    user: Arc<AtomicUsize>,
}

impl Drop for LoginSeat {
    fn drop(&mut self) {
        self.project.fetch_sub(1, Ordering::Relaxed);
        self.user.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ClientLimits {
    /// A seat for a new connection, or the limit when the proxy is full.
    pub fn connection(shared: &Arc<Context>) -> Result<ConnectionSeat, usize> {
        let max = shared.config.load().proxy.max_client_conn;
        let limits = &shared.limits;
        let before = limits.connected.fetch_add(1, Ordering::Relaxed);
        if max != 0 && before >= max {
            limits.connected.fetch_sub(1, Ordering::Relaxed);
            limits.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(max);
        }
        Ok(ConnectionSeat(shared.clone()))
    }

    /// A seat for `user` in `project`, or the limit the login would exceed.
    pub fn login(shared: &Arc<Context>, project: &str, user: &str) -> Result<LoginSeat, Limit> {
        let config = shared.config.load();
        let project_max = config.projects.get(project).map_or(0, |p| p.max_clients);
        let user_max = config.user(user).map_or(0, |u| u.max_clients);
        let limits = &shared.limits;
        let (Ok(mut projects), Ok(mut users)) = (limits.per_project.lock(), limits.per_user.lock())
        else {
            // A poisoned lock means a panic elsewhere: do not add a limit of our own.
            return Ok(LoginSeat {
                project: Arc::new(AtomicUsize::new(1)),
                user: Arc::new(AtomicUsize::new(1)),
            });
        };
        // Counted under both locks: two logins cannot both take the last seat.
        let count = |map: &HashMap<String, Arc<AtomicUsize>>, key: &str| {
            map.get(key).map_or(0, |n| n.load(Ordering::Relaxed))
        };
        let in_project = count(&projects, project);
        let as_user = count(&users, user);
        let refusal = if project_max != 0 && in_project >= project_max {
            limits.refused_project.fetch_add(1, Ordering::Relaxed);
            Limit::Project(project_max)
        } else if user_max != 0 && as_user >= user_max {
            limits.refused_user.fetch_add(1, Ordering::Relaxed);
            Limit::User(user_max)
        } else {
            let seat = |map: &mut HashMap<String, Arc<AtomicUsize>>, key: &str| {
                let n = match map.get(key) {
                    Some(n) => n.clone(),
                    None => map.entry(key.to_string()).or_default().clone(),
                };
                n.fetch_add(1, Ordering::Relaxed);
                n
            };
            return Ok(LoginSeat {
                project: seat(&mut projects, project),
                user: seat(&mut users, user),
            });
        };
        drop((projects, users));
        if let Ok(mut refused) = limits.refused_in_project.lock() {
            *refused.entry(project.to_string()).or_default() += 1;
        }
        Err(refusal)
    }

    /// Clients of `project` now, and those refused by its or its users' limits.
    pub fn project_counts(&self, project: &str) -> (usize, u64) {
        let now = self
            .per_project
            .lock()
            .ok()
            .and_then(|m| m.get(project).map(|n| n.load(Ordering::Relaxed)))
            .unwrap_or(0);
        let refused = self
            .refused_in_project
            .lock()
            .ok()
            .and_then(|m| m.get(project).copied())
            .unwrap_or(0);
        (now, refused)
    }
}
