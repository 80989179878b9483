//! Failover: deciding that the primary is gone, choosing the replica that loses the
//! least, promoting it, recording the decision, moving traffic and re-pointing the other
//! replicas. Also the planned switchover behind `PROMOTE` on a healthy primary.
//!
//! The safety rules, in order: the primary is declared down only after
//! `failure_threshold` failed checks `health_check_interval_ms` apart *and* once no
//! replica still streams from it (so a network problem between proxy and primary does
//! not promote anything); a replica that was further behind than its
//! `lag_tolerance_ms` when the primary was last seen is never chosen (0: it must have
//! everything the primary was last seen with); the new primary is written to the state
//! file before any traffic moves to it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::{error, info, warn};

use super::health::{self, NodeState};
use super::monitor::Credentials;
use super::state_file::{self, ProjectState};
use super::{Node, NodeRole, Project};
use crate::config::FailoverMode;

const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a promoted server may take to leave recovery.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FailoverSettings {
    pub mode: FailoverMode,
    pub check_interval: Duration,
    pub failure_threshold: u32,
    pub write_wait: Duration,
    pub credentials: Option<Credentials>,
    pub state_path: PathBuf,
}

/// A project's failover machinery: settings, what it is doing, and its counters.
pub struct Failover {
    pub settings: FailoverSettings,
    status: Mutex<FailoverStatus>,
    /// One promotion at a time per project (automatic or requested).
    promoting: tokio::sync::Mutex<()>,
    /// A planned switchover holds new writes back while it runs.
    pub writes_paused: AtomicBool,
    pub automatic: AtomicU64,
    pub manual: AtomicU64,
    /// Duration of the last promotion, from the decision to traffic moving.
    pub last_duration_ms: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub struct FailoverStatus {
    /// What the failover logic thinks right now, in words.
    pub state: String,
    /// The last promotion (or refusal to promote), for operators.
    pub last_event: Option<String>,
}

impl Failover {
    pub fn new(settings: FailoverSettings) -> Failover {
        Failover {
            settings,
            status: Mutex::new(FailoverStatus {
                state: "primary healthy".into(),
                last_event: None,
            }),
            promoting: tokio::sync::Mutex::new(()),
            writes_paused: AtomicBool::new(false),
            automatic: AtomicU64::new(0),
            manual: AtomicU64::new(0),
            last_duration_ms: AtomicU64::new(0),
        }
    }

    /// Keeps the history of a project's failovers across a reload.
    pub fn carry_counters(&self, previous: &Failover) {
        for (to, from) in [
            (&self.automatic, &previous.automatic),
            (&self.manual, &previous.manual),
            (&self.last_duration_ms, &previous.last_duration_ms),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let (Ok(mut to), Ok(from)) = (self.status.lock(), previous.status.lock()) {
            to.last_event = from.last_event.clone();
        }
    }

    pub fn status(&self) -> FailoverStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set_state(&self, state: impl Into<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.state = state.into();
        }
    }

    fn event(&self, event: impl Into<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.last_event = Some(event.into());
        }
    }
}

/// Per-monitor memory of the primary's failed checks.
#[derive(Default)]
pub struct Detector {
    failures: u32,
    last_counted: Option<Instant>,
    /// The refusal already logged for this outage (logged once, not every check).
    reported: Option<String>,
}

/// Called by the monitor after every round of checks.
pub async fn after_checks(
    project: &Arc<Project>,
    detector: &mut Detector,
    primary_reachable: bool,
    primary_last_lsn: u64,
) {
    let failover = &project.failover;
    let Some(primary) = project.primary().cloned() else {
        return;
    };
    if primary_reachable {
        if detector.failures > 0 {
            info!(project = %project.name, node = %primary.name, "primary answers again");
        }
        *detector = Detector::default();
        failover.set_state("primary healthy");
        return;
    }
    let now = Instant::now();
    // Failures count once per health-check interval, however often the monitor runs.
    let spaced = detector
        .last_counted
        .is_none_or(|t| now.duration_since(t) >= failover.settings.check_interval.mul_f32(0.9));
    if spaced {
        detector.failures += 1;
        detector.last_counted = Some(now);
    }
    let threshold = failover.settings.failure_threshold;
    if detector.failures < threshold {
        failover.set_state(format!(
            "primary {} failed {} of {threshold} checks",
            primary.name, detector.failures
        ));
        return;
    }
    let refusal = match failover.settings.mode {
        FailoverMode::Manual => Some(format!(
            "primary {} is down; failover mode is manual: run PROMOTE {} <replica>",
            primary.name, project.name
        )),
        FailoverMode::Auto => match confirm_down(project, &failover.settings).await {
            Err(reason) => Some(reason),
            Ok(()) => match choose(project, &failover.settings, primary_last_lsn).await {
                Err(reason) => Some(reason),
                Ok(candidate) => {
                    let started = Instant::now();
                    let result = promote(project, &candidate, "automatic failover", started).await;
                    match result {
                        Ok(()) => {
                            failover.automatic.fetch_add(1, Ordering::Relaxed);
                            *detector = Detector::default();
                            None
                        }
                        Err(e) => Some(format!("promoting {} failed: {e}", candidate.name)),
                    }
                }
            },
        },
    };
    if let Some(reason) = refusal {
        failover.set_state(reason.clone());
        if detector.reported.as_deref() != Some(reason.as_str()) {
            error!(project = %project.name, "no failover: {reason}");
            failover.event(format!("no failover: {reason}"));
            detector.reported = Some(reason);
        }
    }
}

/// The primary is really gone only if no replica still streams from it.
async fn confirm_down(project: &Project, settings: &FailoverSettings) -> Result<(), String> {
    let replicas: Vec<Arc<Node>> = project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Replica)
        .cloned()
        .collect();
    let mut asked = 0;
    for node in &replicas {
        let Ok(client) = control(node, settings).await else {
            continue;
        };
        asked += 1;
        let rows = query(&client, "SELECT status FROM pg_stat_wal_receiver").await;
        if let Ok(rows) = rows
            && rows
                .iter()
                .any(|r| r.first().map(String::as_str) == Some("streaming"))
        {
            return Err(format!(
                "the proxy cannot reach the primary, but replica {} still streams from it",
                node.name
            ));
        }
    }
    if asked == 0 {
        return Err("no replica answers, so the primary's failure cannot be confirmed".into());
    }
    Ok(())
}

/// The eligible replica with the most WAL.
async fn choose(
    project: &Project,
    settings: &FailoverSettings,
    primary_last_lsn: u64,
) -> Result<Arc<Node>, String> {
    let mut best: Option<(u64, Arc<Node>)> = None;
    let mut why_not = Vec::new();
    for node in project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Replica)
    {
        let (position, replayed) = match replica_position(node, settings).await {
            Ok(p) => p,
            Err(e) => {
                why_not.push(format!("{}: {e}", node.name));
                continue;
            }
        };
        let lag_when_seen = node.health.lag_at_primary_seen_ms();
        // Tolerance 0: everything the primary was last seen with is already replayed
        // (received is not enough: replay may be paused on purpose).
        let eligible = if node.lag_tolerance_ms == 0 {
            replayed >= primary_last_lsn
        } else {
            lag_when_seen <= node.lag_tolerance_ms
        };
        if !eligible {
            why_not.push(format!(
                "{}: was {lag_when_seen} ms behind when the primary was last seen (tolerance {} ms)",
                node.name, node.lag_tolerance_ms
            ));
            continue;
        }
        if best.as_ref().is_none_or(|(p, _)| position > *p) {
            best = Some((position, node.clone()));
        }
    }
    match best {
        Some((position, node)) => {
            info!(project = %project.name, candidate = %node.name, position = %health::format_lsn(position), "failover candidate chosen");
            Ok(node)
        }
        None => Err(format!(
            "no eligible replica ({})",
            if why_not.is_empty() {
                "none configured".to_string()
            } else {
                why_not.join("; ")
            }
        )),
    }
}

/// What a replica will have once promoted (everything it received), and what it has
/// replayed so far.
async fn replica_position(node: &Node, settings: &FailoverSettings) -> Result<(u64, u64), String> {
    let client = control(node, settings).await?;
    let rows = query(
        &client,
        "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_receive_lsn(), '0/0'), \
         coalesce(pg_last_wal_replay_lsn(), '0/0')",
    )
    .await?;
    let row = rows.first().ok_or("empty answer")?;
    if row.first().map(String::as_str) != Some("t") {
        return Err("not in recovery".into());
    }
    let lsn = |i: usize| row.get(i).and_then(|v| health::parse_lsn(v)).unwrap_or(0);
    Ok((lsn(1).max(lsn(2)), lsn(2)))
}

/// Promotes `candidate`, records it, moves traffic, re-points the other replicas.
pub async fn promote(
    project: &Arc<Project>,
    candidate: &Arc<Node>,
    reason: &str,
    started: Instant,
) -> Result<(), String> {
    let failover = &project.failover;
    let _one_at_a_time = failover.promoting.lock().await;
    let settings = &failover.settings;
    let old_primary = project.primary().cloned();
    failover.set_state(format!("promoting {}", candidate.name));
    warn!(project = %project.name, candidate = %candidate.name, old = ?old_primary.as_ref().map(|n| &n.name), reason, "promoting a replica");

    let client = control(candidate, settings).await?;
    let promoted = query(&client, "SELECT pg_promote(true, 60)").await?;
    if promoted.first().and_then(|r| r.first()).map(String::as_str) != Some("t") {
        return Err("pg_promote() did not finish".into());
    }
    let deadline = Instant::now() + PROMOTE_TIMEOUT;
    loop {
        let rows = query(&client, "SELECT pg_is_in_recovery()").await?;
        if rows.first().and_then(|r| r.first()).map(String::as_str) == Some("f") {
            break;
        }
        if Instant::now() > deadline {
            return Err("still in recovery after pg_promote()".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Durable first, then traffic: a proxy restarted from here on knows the new primary.
    let mut fenced: Vec<String> = project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Fenced)
        .map(|n| n.name.clone())
        .collect();
    if let Some(old) = &old_primary {
        fenced.push(old.name.clone());
    }
    fenced.retain(|n| *n != candidate.name);
    fenced.sort();
    fenced.dedup();
    let record = ProjectState {
        primary: candidate.name.clone(),
        fenced,
        promoted_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        reason: reason.to_string(),
    };
    state_file::record(&settings.state_path, &project.name, record)?;
    if let Some(old) = &old_primary {
        old.set_role(NodeRole::Fenced);
    }
    candidate.set_role(NodeRole::Primary);
    candidate.health.set_state(NodeState::Up);
    candidate.health.set_lag(0, 0);
    let took = started.elapsed();
    failover
        .last_duration_ms
        .store(took.as_millis() as u64, Ordering::Relaxed);
    let event = format!(
        "{} promoted to primary ({reason}) in {} ms{}",
        candidate.name,
        took.as_millis(),
        old_primary
            .as_ref()
            .map(|o| format!("; {} fenced", o.name))
            .unwrap_or_default()
    );
    warn!(project = %project.name, "{event}");
    failover.event(event);
    failover.set_state("primary healthy");

    for node in project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Replica)
    {
        if let Err(e) = repoint(node, candidate, settings).await {
            warn!(project = %project.name, node = %node.name, "could not re-point replica to the new primary: {e}");
        } else {
            info!(project = %project.name, node = %node.name, primary = %candidate.name, "replica now follows the new primary");
        }
    }
    Ok(())
}

/// Planned switchover to `candidate` while the primary is healthy: hold new writes,
/// wait for the primary's transactions to finish and for the candidate to replay
/// everything, then promote. Nothing acknowledged is lost.
pub async fn switchover(project: &Arc<Project>, candidate: &Arc<Node>) -> Result<(), String> {
    let failover = &project.failover;
    let settings = &failover.settings;
    let Some(old) = project.primary().cloned() else {
        return Err("the project has no primary".into());
    };
    let started = Instant::now();
    let deadline = started + settings.write_wait;
    failover.writes_paused.store(true, Ordering::SeqCst);
    let result = async {
        failover.set_state(format!("switchover to {}: draining writes", candidate.name));
        loop {
            let (connections, idle) = old.connection_counts();
            if connections == idle {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} server connection(s) on the primary stayed busy (open transactions or pinned sessions); switchover abandoned",
                    connections - idle
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let primary = control(&old, settings).await?;
        // Nothing written through the proxy from here on; protect against writers that
        // bypass it as well.
        let _ = query(
            &primary,
            "ALTER SYSTEM SET default_transaction_read_only = on",
        )
        .await;
        let _ = query(&primary, "SELECT pg_reload_conf()").await;
        let rows = query(&primary, "SELECT pg_current_wal_lsn()").await?;
        let target = rows
            .first()
            .and_then(|r| r.first())
            .and_then(|v| health::parse_lsn(v))
            .ok_or("unreadable WAL position")?;
        failover.set_state(format!(
            "switchover to {}: waiting for it to replay {}",
            candidate.name,
            health::format_lsn(target)
        ));
        let replica = control(candidate, settings).await?;
        loop {
            let rows = query(&replica, "SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')").await?;
            let replayed = rows
                .first()
                .and_then(|r| r.first())
                .and_then(|v| health::parse_lsn(v))
                .unwrap_or(0);
            if replayed >= target {
                break;
            }
            if Instant::now() > deadline {
                let _ = query(&primary, "ALTER SYSTEM RESET default_transaction_read_only").await;
                let _ = query(&primary, "SELECT pg_reload_conf()").await;
                return Err(format!(
                    "{} did not replay the primary's last position in time; switchover abandoned",
                    candidate.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        promote(project, candidate, "planned switchover", started).await
    }
    .await;
    failover.writes_paused.store(false, Ordering::SeqCst);
    if let Err(e) = &result {
        failover.set_state("primary healthy");
        failover.event(format!("switchover to {} failed: {e}", candidate.name));
    }
    result
}

/// `PROMOTE project replica`: a switchover when the primary answers, else a failover
/// to that replica (the operator's choice overrides the automatic eligibility rules,
/// but not the need for a reachable replica in recovery).
pub async fn promote_on_request(project: &Arc<Project>, replica: &str) -> Result<String, String> {
    let Some(candidate) = project.nodes.iter().find(|n| n.name == replica).cloned() else {
        return Err(format!(
            "project \"{}\" has no node \"{replica}\"",
            project.name
        ));
    };
    if candidate.role() != NodeRole::Replica {
        return Err(format!(
            "\"{replica}\" is {}, not a replica",
            candidate.role().as_str()
        ));
    }
    let primary_up = match project.primary() {
        Some(p) => control(p, &project.failover.settings).await.is_ok(),
        None => false,
    };
    if primary_up {
        switchover(project, &candidate).await?;
    } else {
        replica_position(&candidate, &project.failover.settings).await?;
        promote(project, &candidate, "promoted on request", Instant::now()).await?;
    }
    project.failover.manual.fetch_add(1, Ordering::Relaxed);
    Ok(project.failover.status().last_event.unwrap_or_default())
}

/// Points a replica's WAL receiver at `primary` (ALTER SYSTEM + reload; it follows the
/// new timeline by itself).
async fn repoint(node: &Node, primary: &Node, settings: &FailoverSettings) -> Result<(), String> {
    let client = control(node, settings).await?;
    let rows = query(&client, "SHOW primary_conninfo").await?;
    let current = rows
        .first()
        .and_then(|r| r.first())
        .cloned()
        .unwrap_or_default();
    let conninfo = with_host_port(&current, &primary.addr.host, primary.addr.port);
    let sql = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    );
    query(&client, &sql).await?;
    query(&client, "SELECT pg_reload_conf()").await?;
    Ok(())
}

/// A libpq conninfo string with its host and port replaced (other settings kept).
pub fn with_host_port(conninfo: &str, host: &str, port: u16) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = conninfo.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '\'' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    parts.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts.retain(|p| {
        let key = p.split('=').next().unwrap_or("").trim();
        !matches!(key, "host" | "hostaddr" | "port")
    });
    parts.push(format!("host={host}"));
    parts.push(format!("port={port}"));
    parts.join(" ")
}

async fn control(node: &Node, settings: &FailoverSettings) -> Result<Client, String> {
    let Some(credentials) = &settings.credentials else {
        return Err("no control-plane credentials (set failover.user and failover.password, or give a user a plain-text password)".into());
    };
    let connect = super::monitor::control_connection(
        node,
        credentials,
        CONTROL_TIMEOUT,
        "replicator-failover",
    );
    tokio::time::timeout(CONTROL_TIMEOUT, connect)
        .await
        .map_err(|_| format!("{}: no answer", node.addr))?
}

/// Rows of text values.
async fn query(client: &Client, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let messages = tokio::time::timeout(PROMOTE_TIMEOUT, client.simple_query(sql))
        .await
        .map_err(|_| format!("{sql}: no answer"))?
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{sql}: {}", db.message()),
            None => format!("{sql}: {e}"),
        })?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_gets_the_new_host_and_keeps_the_rest() {
        let old = "user=postgres passfile='/root/my pass' channel_binding=prefer host=127.0.0.1 port=15432 sslmode=prefer";
        assert_eq!(
            with_host_port(old, "10.0.0.2", 5433),
            "user=postgres passfile='/root/my pass' channel_binding=prefer sslmode=prefer host=10.0.0.2 port=5433"
        );
        assert_eq!(with_host_port("", "h", 1), "host=h port=1");
    }
}
