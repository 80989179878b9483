//! One snapshot of what the proxy knows, shared by every status surface: the admin
//! console's SHOW commands, `GET /status` (as JSON) and `replicator status` (which reads
//! the JSON back), so that they can never disagree.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::cluster::{Node, Project, health};
use crate::state::Shared;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub clients: usize,
    pub reloads: ReloadView,
    pub projects: Vec<ProjectStatus>,
    /// CDC rules.
    #[serde(default)]
    pub rules: Vec<crate::cdc::RuleView>,
    /// Fleet mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadView {
    pub succeeded: u64,
    pub failed: u64,
    pub last: Option<crate::reload::LastReload>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectStatus {
    pub name: String,
    pub database: String,
    pub read_routing: String,
    pub read_your_writes: bool,
    pub causal_wait_ms: u64,
    /// Reads that went to the primary because no replica was healthy and close enough.
    pub fallback_reads: u64,
    /// Reads that went to the primary because no replica had the client's last write.
    pub causal_primary_reads: u64,
    /// The node taking writes now (after a failover, not necessarily proxy.toml's).
    pub primary: Option<String>,
    pub failover: FailoverView,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverView {
    pub mode: String,
    /// What the failover logic thinks now ("primary healthy", "no eligible replica: ...").
    pub state: String,
    pub last_event: Option<String>,
    pub automatic: u64,
    pub manual: u64,
    pub last_duration_ms: u64,
    pub writes_paused: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: String,
    pub address: String,
    pub state: String,
    pub lag_ms: u64,
    pub lag_bytes: u64,
    /// Replay position (replicas) or current WAL position (primary), as last seen.
    pub lsn: String,
    pub lag_tolerance_ms: u64,
    pub weight: u32,
    pub active_connections: u32,
    pub idle_connections: u32,
    pub reads: u64,
    pub writes: u64,
    pub connect_errors: u64,
    pub failed_checks: u64,
    pub avg_latency_ms: f64,
    pub last_error: Option<String>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub user: String,
    pub connections: u32,
    pub active: u32,
    pub idle: u32,
    pub size: u32,
}

impl Status {
    pub fn collect(shared: &Shared) -> Status {
        let topology = shared.topology.load();
        let mut projects: Vec<ProjectStatus> =
            topology.projects.values().map(|p| project(p)).collect();
        projects.sort_by(|a, b| a.name.cmp(&b.name));
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: SystemTime::now()
                .duration_since(shared.started_at)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            clients: shared.active_clients.load(Ordering::Relaxed),
            reloads: ReloadView {
                succeeded: shared.reloads.succeeded.load(Ordering::Relaxed),
                failed: shared.reloads.failed.load(Ordering::Relaxed),
                last: shared.reloads.last(),
            },
            projects,
            rules: shared.cdc.views(&shared.topology.load()),
            fleet: shared.fleet.as_ref().map(|f| f.view()),
        }
    }
}

fn project(p: &Project) -> ProjectStatus {
    ProjectStatus {
        name: p.name.clone(),
        database: p.database.clone(),
        read_routing: p.read_routing().as_str().to_string(),
        read_your_writes: p.read_your_writes,
        causal_wait_ms: p.causal_wait.as_millis() as u64,
        fallback_reads: p.fallback_reads.load(Ordering::Relaxed),
        causal_primary_reads: p.causal_primary_reads.load(Ordering::Relaxed),
        primary: p.primary().map(|n| n.name.clone()),
        failover: {
            let f = &p.failover;
            let status = f.status();
            FailoverView {
                mode: match f.settings.mode {
                    crate::config::FailoverMode::Auto => "auto".into(),
                    crate::config::FailoverMode::Manual => "manual".into(),
                },
                state: status.state,
                last_event: status.last_event,
                automatic: f.automatic.load(Ordering::Relaxed),
                manual: f.manual.load(Ordering::Relaxed),
                last_duration_ms: f.last_duration_ms.load(Ordering::Relaxed),
                writes_paused: f.writes_paused.load(Ordering::Relaxed),
            }
        },
        nodes: p.nodes.iter().map(|n| node(n)).collect(),
    }
}

fn node(n: &Node) -> NodeStatus {
    let pools: Vec<PoolStatus> = n
        .pool_states()
        .into_iter()
        .map(|(user, connections, idle)| PoolStatus {
            user,
            connections,
            active: connections.saturating_sub(idle),
            idle,
            size: n.pool_size(),
        })
        .collect();
    let (connections, idle) = pools
        .iter()
        .fold((0, 0), |(c, i), p| (c + p.connections, i + p.idle));
    let latency = &n.stats.latency;
    let count = latency.count();
    // A node a connection attempt just failed on is down whatever the monitor last saw.
    let state = if n.is_up() {
        n.health.state().as_str()
    } else {
        "down"
    };
    NodeStatus {
        name: n.name.clone(),
        role: n.role().as_str().to_string(),
        address: n.addr.to_string(),
        state: state.to_string(),
        lag_ms: n.health.lag_ms(),
        lag_bytes: n.health.lag_bytes(),
        lsn: health::format_lsn(n.health.lsn()),
        lag_tolerance_ms: n.lag_tolerance_ms,
        weight: n.weight,
        active_connections: connections.saturating_sub(idle),
        idle_connections: idle,
        reads: n.stats.reads.load(Ordering::Relaxed),
        writes: n.stats.writes.load(Ordering::Relaxed),
        connect_errors: n.stats.connect_errors.load(Ordering::Relaxed),
        failed_checks: n.health.checks_failed(),
        avg_latency_ms: if count == 0 {
            0.0
        } else {
            (latency.sum_seconds() * 1000.0 / count as f64 * 1000.0).round() / 1000.0
        },
        last_error: n.health.last_error(),
        pools,
    }
}

/// The replica table as rows of text, shared by `SHOW REPLICAS` and `replicator status`.
pub const REPLICA_COLUMNS: [&str; 13] = [
    "project",
    "name",
    "role",
    "state",
    "lag_ms",
    "lag_bytes",
    "lsn",
    "active",
    "idle",
    "reads",
    "writes",
    "weight",
    "address",
];

pub fn replica_rows(status: &Status) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for p in &status.projects {
        for n in &p.nodes {
            rows.push(vec![
                p.name.clone(),
                n.name.clone(),
                n.role.clone(),
                n.state.clone(),
                n.lag_ms.to_string(),
                n.lag_bytes.to_string(),
                n.lsn.clone(),
                n.active_connections.to_string(),
                n.idle_connections.to_string(),
                n.reads.to_string(),
                n.writes.to_string(),
                n.weight.to_string(),
                n.address.clone(),
            ]);
        }
    }
    rows
}

/// Aligned plain-text table (for the command line).
pub fn render_table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(columns.to_vec());
    out.push('\n');
    out.push_str(&line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

pub const RULE_COLUMNS: [&str; 13] = [
    "rule",
    "source",
    "target",
    "state",
    "last_run",
    "position",
    "inserted",
    "updated",
    "deleted",
    "snapshot_rows",
    "errors",
    "lag",
    "rows_per_s",
];

/// One row per CDC rule, for SHOW RULES and `replicator status`.
pub fn rule_rows(status: &Status) -> Vec<Vec<String>> {
    status
        .rules
        .iter()
        .map(|r| {
            let mut state = r.state.clone();
            if let Some(p) = &r.snapshot {
                state = format!(
                    "{state} ({}: {} rows, table {}/{})",
                    p.table,
                    p.rows_copied,
                    p.tables_done + 1,
                    p.tables_total
                );
            }
            if let Some(e) = &r.last_error {
                state = format!("{state}: {e}");
            }
            vec![
                r.name.clone(),
                r.source.clone(),
                r.target.clone(),
                state,
                last_run(r.last_run_started_ms, r.last_run_finished_ms),
                r.position.clone(),
                r.inserted.to_string(),
                r.updated.to_string(),
                r.deleted.to_string(),
                r.snapshot_rows.to_string(),
                r.errors.to_string(),
                format!("{} B / {} ms", r.lag_bytes, r.lag_ms),
                format!("{:.0}", r.rows_per_second),
            ]
        })
        .collect()
}

/// "12 s ago", "running for 3 s" (a following rule's run lasts until it stops) or "never".
fn last_run(started_ms: u64, finished_ms: u64) -> String {
    let now = crate::cdc::stats::now_ms();
    if started_ms == 0 {
        "never".into()
    } else if finished_ms >= started_ms {
        format!("{} s ago", now.saturating_sub(finished_ms) / 1000)
    } else {
        format!("running for {} s", now.saturating_sub(started_ms) / 1000)
    }
}
