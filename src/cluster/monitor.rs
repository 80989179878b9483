//! The lag and health monitor: one task per project on the control plane. Every
//! `lag_check_interval_ms` it asks every node, concurrently and with a timeout, for its
//! WAL position (the primary's current one, each replica's replay position), turns the
//! differences into lag in bytes and milliseconds, and moves each node between up,
//! lagging and down. Sessions only read the results (atomics), so a slow or dead node
//! never blocks the data path.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tracing::{debug, info, warn};

use super::NodeRole;
use super::health::{self, NodeState, Observation, WalHistory};
use super::{Node, Project};

/// Longest a control connection may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Who the monitor logs in as.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// Who promotes replicas and streams CDC changes: `[failover] user`/`password` when
    /// set, else the user the monitor logs in as.
    pub fn control_plane(config: &crate::config::Config) -> Option<Credentials> {
        match (&config.failover.user, &config.failover.password) {
            (Some(user), Some(password)) => Some(Credentials {
                user: user.clone(),
                password: password.clone(),
            }),
            _ => Credentials::from_config(config),
        }
    }

    /// The control plane logs in as the first admin user with a plain-text password in
    /// proxy.toml, else the first such user (a SCRAM verifier or md5 hash cannot log in
    /// to a server with tokio-postgres).
    pub fn from_config(config: &crate::config::Config) -> Option<Credentials> {
        let plain = |u: &&crate::config::User| {
            crate::protocol::auth::ScramVerifier::parse(&u.password).is_none()
                && !crate::protocol::auth::is_md5_hash(&u.password)
        };
        let user = config
            .users
            .iter()
            .filter(plain)
            .find(|u| u.admin)
            .or_else(|| config.users.iter().find(plain))?;
        Some(Credentials {
            user: user.name.clone(),
            password: user.password.clone(),
        })
    }
}

/// Runs the monitor of `project` until the project leaves the topology or the proxy
/// shuts down.
pub fn spawn(
    project: &Arc<Project>,
    credentials: Option<Credentials>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let weak = Arc::downgrade(project);
    // Often enough for both the lag figures and the failover checks.
    let interval = project
        .lag_check_interval
        .min(project.failover.settings.check_interval);
    let name = project.name.clone();
    let Some(credentials) = credentials else {
        warn!(project = %name, "no user with a plain-text password in proxy.toml: lag and health monitoring is off for this project");
        return None;
    };
    Some(tokio::spawn(async move {
        let mut monitor = Monitor::new(weak, credentials, interval);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            // A shutdown seen now starts no promotion; one under way when it came is
            // finished (the proxy waits for this task).
            let stopping = *shutdown.borrow();
            if stopping || !monitor.tick().await {
                break;
            }
        }
        debug!(project = %name, "monitor stopped");
    }))
}

struct Probe {
    node: Weak<Node>,
    client: Option<Client>,
    good_streak: u32,
}

/// One answer from a node: is it in recovery, and its WAL position.
struct Position {
    in_recovery: bool,
    lsn: u64,
    /// Out of recovery: the timeline it writes on.
    timeline: Option<u64>,
}

struct Monitor {
    project: Weak<Project>,
    credentials: Credentials,
    timeout: Duration,
    probes: Vec<Probe>,
    history: WalHistory,
    detector: super::failover::Detector,
}

impl Monitor {
    fn new(project: Weak<Project>, credentials: Credentials, interval: Duration) -> Monitor {
        let probes = project
            .upgrade()
            .map(|p| {
                p.nodes
                    .iter()
                    .map(|n| Probe {
                        node: Arc::downgrade(n),
                        client: None,
                        good_streak: 0,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Monitor {
            project,
            credentials,
            timeout: health::check_timeout(interval),
            probes,
            history: WalHistory::default(),
            detector: super::failover::Detector::default(),
        }
    }

    /// One round of checks. False once the project is gone.
    async fn tick(&mut self) -> bool {
        let Some(project) = self.project.upgrade() else {
            return false;
        };
        if project.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let credentials = &self.credentials;
        let timeout = self.timeout;
        let results = futures_util::future::join_all(
            self.probes
                .iter_mut()
                .map(|probe| probe.check(credentials, timeout)),
        )
        .await;
        let now = Instant::now();
        // The primary first: replica lag is measured against what it reported.
        let mut primary_reachable = false;
        for (probe, result) in self.probes.iter().zip(&results) {
            if let (Some(node), Ok(position)) = (probe.node.upgrade(), result)
                && node.role() == NodeRole::Primary
            {
                if position.in_recovery {
                    warn!(project = %project.name, node = %node.name, "the primary is in recovery (a standby); no writes can succeed");
                } else {
                    primary_reachable = true;
                    self.history.record(now, position.lsn);
                    if let Some(timeline) = position.timeline {
                        node.health.set_timeline(timeline);
                    }
                }
            }
        }
        for (probe, result) in self.probes.iter_mut().zip(results) {
            let Some(node) = probe.node.upgrade() else {
                continue;
            };
            let observation = match result {
                Ok(position) => {
                    node.health.advance_lsn(position.lsn);
                    node.health.clear_error();
                    if node.role() == NodeRole::Replica {
                        let (ms, bytes) = self.history.lag(now, node.health.lsn());
                        node.health.set_lag(ms, bytes);
                        if primary_reachable {
                            node.health.set_lag_at_primary_seen_ms(ms);
                        }
                    }
                    Observation::Reachable {
                        lag_ms: node.health.lag_ms(),
                    }
                }
                Err(error) => {
                    node.health.record_failure(error);
                    Observation::Unreachable
                }
            };
            let tolerance = match node.role() {
                NodeRole::Replica => node.lag_tolerance_ms,
                NodeRole::Primary | NodeRole::Fenced => u64::MAX,
            };
            let before = node.health.state();
            let after = health::next_state(before, observation, tolerance, &mut probe.good_streak);
            if before != after {
                node.health.set_state(after);
                report_change(&project.name, &node, before, after);
            }
        }
        super::failover::after_checks(&project, &mut self.detector, primary_reachable).await;
        true
    }
}

fn report_change(project: &str, node: &Node, before: NodeState, after: NodeState) {
    let (from, to) = (before.as_str(), after.as_str());
    let lag_ms = node.health.lag_ms();
    match after {
        NodeState::Up if before == NodeState::Unknown => {
            debug!(project, node = %node.name, "node is up")
        }
        NodeState::Up => {
            info!(project, node = %node.name, from, to, lag_ms, "node is back in the rotation")
        }
        NodeState::Lagging => warn!(
            project, node = %node.name, from, to, lag_ms,
            tolerance_ms = node.lag_tolerance_ms,
            "replica is behind its lag tolerance; it gets no reads until it catches up"
        ),
        NodeState::Down => warn!(
            project, node = %node.name, from, to,
            error = node.health.last_error().unwrap_or_default(),
            "node failed its health check"
        ),
        NodeState::Unknown => {}
    }
}

impl Probe {
    async fn check(
        &mut self,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Position, String> {
        let Some(node) = self.node.upgrade() else {
            return Err("node removed".into());
        };
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            // Logging in (SCRAM) takes longer than a query; a refused connection still
            // fails at once. The check itself is held to the interval below.
            let login_timeout = timeout.max(LOGIN_TIMEOUT);
            let login = control_connection(&node, credentials, login_timeout, "replicator-monitor");
            match tokio::time::timeout(login_timeout, login).await {
                Ok(Ok(client)) => self.client = Some(client),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(format!("no login within {} ms", login_timeout.as_millis()));
                }
            }
        }
        match tokio::time::timeout(timeout, self.query()).await {
            Ok(Ok(position)) => Ok(position),
            Ok(Err(e)) => {
                self.client = None;
                Err(e)
            }
            Err(_) => {
                self.client = None;
                Err(format!("no answer within {} ms", timeout.as_millis()))
            }
        }
    }

    async fn query(&mut self) -> Result<Position, String> {
        let Some(client) = self.client.as_ref() else {
            return Err("no connection".into());
        };
        let messages = client
            .simple_query(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() \
                 THEN coalesce(pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(), '0/0') \
                 ELSE pg_current_wal_lsn() END, CASE WHEN NOT pg_is_in_recovery() \
                 THEN substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END",
            )
            .await
            .map_err(|e| e.to_string())?;
        for message in messages {
            if let SimpleQueryMessage::Row(row) = message {
                let in_recovery = row.get(0) == Some("t");
                let lsn = row
                    .get(1)
                    .and_then(health::parse_lsn)
                    .ok_or("unreadable WAL position")?;
                // The WAL file name starts with the timeline, in hex.
                let timeline = row.get(2).and_then(|t| u64::from_str_radix(t, 16).ok());
                return Ok(Position {
                    in_recovery,
                    lsn,
                    timeline,
                });
            }
        }
        Err("empty answer".into())
    }
}

/// A tokio-postgres connection to `node` for the control plane (checks, promotion).
pub async fn control_connection(
    node: &Node,
    credentials: &Credentials,
    timeout: Duration,
    application_name: &str,
) -> Result<Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .user(&credentials.user)
        .password(&credentials.password)
        .dbname(&node.database)
        .application_name(application_name);
    guarded_connect(
        &config,
        &node.addr.host,
        node.addr.port,
        &crate::config::conninfo::ServerSecurity {
            tls: node.addr.tls.clone(),
            require_auth: node.addr.require_auth.clone(),
        },
        timeout,
    )
    .await
    .map_err(|e| format!("cannot connect to {}: {e}", node.addr))
}

/// Connects tokio-postgres to `host:port` with `config`'s login, encrypted as the
/// node's `sslmode` says, answering only the authentication requests the policy
/// allows (no clear-text password over an unencrypted connection unless
/// `require_auth` says so).
pub async fn guarded_connect(
    config: &tokio_postgres::Config,
    host: &str,
    port: u16,
    security: &crate::config::conninfo::ServerSecurity,
    timeout: Duration,
) -> Result<Client, String> {
    use crate::protocol::auth_policy::{AuthGuard, Guarded};
    use tokio_postgres::config::SslMode as PgSslMode;
    use tokio_postgres::tls::MakeTlsConnect;
    let tls_config = security.tls.cached_client_config()?;
    let connect = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let require_auth = security.require_auth.clone();
        let mut config = config.clone();
        let client = match tls_config {
            None => {
                config.ssl_mode(PgSslMode::Disable);
                let stream = Guarded::new(stream, AuthGuard::new(require_auth, false, false));
                let (client, connection) = config
                    .connect_raw(stream, NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                spawn_connection(connection);
                client
            }
            Some(tls_config) => {
                config.ssl_mode(if security.tls.mode.requires_tls() {
                    PgSslMode::Require
                } else {
                    PgSslMode::Prefer
                });
                let stream =
                    Guarded::new(stream, AuthGuard::new(require_auth.clone(), false, true));
                let mut make =
                    crate::tls::connect::MakeRustlsConnect::guarded(tls_config, require_auth);
                let tls = <crate::tls::connect::MakeRustlsConnect as MakeTlsConnect<
                    Guarded<tokio::net::TcpStream>,
                >>::make_tls_connect(&mut make, host)
                .map_err(|e| e.to_string())?;
                let (client, connection) = config
                    .connect_raw(stream, tls)
                    .await
                    .map_err(|e| e.to_string())?;
                spawn_connection(connection);
                client
            }
        };
        Ok::<Client, String>(client)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("timed out after {} ms", timeout.as_millis()))?
}

fn spawn_connection<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("control connection ended: {e}");
        }
    });
}
