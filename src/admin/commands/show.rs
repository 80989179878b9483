//! The console's SHOW commands: each renders a part of the status snapshot (or the
//! live config, or the registries) as rows.

use super::*;

pub(super) fn show_failover(shared: &Shared) -> Reply {
    let status = Status::collect(shared);
    let out = status
        .projects
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.primary.clone().unwrap_or_default(),
                p.failover.mode.clone(),
                p.failover.state.clone(),
                p.failover.last_event.clone().unwrap_or_default(),
                p.failover.automatic.to_string(),
                p.failover.manual.to_string(),
            ]
        })
        .collect();
    rows(
        vec![
            "project",
            "primary",
            "mode",
            "state",
            "last_event",
            "automatic",
            "manual",
        ],
        out,
    )
}

/// One row per instance of the fleet; every row also says what this instance sees
/// (topology generations, whether etcd answers).
pub(super) fn show_fleet(shared: &Shared) -> Reply {
    let columns = vec![
        "instance",
        "address",
        "role",
        "last_heartbeat",
        "this_instance",
        "generation",
        "etcd_reachable",
        "writes",
    ];
    let Some(fleet) = &shared.fleet else {
        return rows(
            columns,
            vec![vec![
                "(single instance)".into(),
                shared.config.load().proxy.listen.clone(),
                "leader".into(),
                String::new(),
                "true".into(),
                String::new(),
                "not used".into(),
                "allowed".into(),
            ]],
        );
    };
    let view = fleet.view();
    let generation = view
        .generations
        .iter()
        .map(|(project, g)| format!("{project}={g}"))
        .collect::<Vec<_>>()
        .join(",");
    let writes = match &view.why_no_writes {
        None => "allowed".to_string(),
        Some(why) => format!("held: {why}"),
    };
    let mut members = view.members.clone();
    if !members.iter().any(|m| m.this_instance) {
        // Not registered (etcd unreachable): still say who this is.
        members.push(crate::fleet::MemberView {
            instance: view.instance.clone(),
            address: fleet.settings.advertise.clone(),
            role: if view.is_leader { "leader" } else { "follower" }.into(),
            last_heartbeat: 0,
            this_instance: true,
        });
    }
    let out = members
        .into_iter()
        .map(|m| {
            vec![
                m.instance,
                m.address,
                m.role,
                m.last_heartbeat.to_string(),
                m.this_instance.to_string(),
                generation.clone(),
                view.etcd_reachable.to_string(),
                writes.clone(),
            ]
        })
        .collect();
    rows(columns, out)
}

pub const SYNC_COLUMNS: [&str; 8] = [
    "rule",
    "snapshot",
    "snapshot_rows",
    "inserted",
    "updated",
    "deleted",
    "position",
    "duration_ms",
];

pub fn sync_row(r: &crate::cdc::stats::RunReport) -> Vec<String> {
    vec![
        r.rule.clone(),
        r.snapshot.to_string(),
        r.snapshot_rows.to_string(),
        r.inserted.to_string(),
        r.updated.to_string(),
        r.deleted.to_string(),
        r.position.clone(),
        r.duration_ms.to_string(),
    ]
}

pub(super) fn rows(columns: Vec<&'static str>, rows: Vec<Vec<String>>) -> Reply {
    Reply::Rows {
        columns,
        rows: rows
            .into_iter()
            .map(|r| r.into_iter().map(Some).collect())
            .collect(),
        tag: "SELECT",
    }
}

pub(super) fn show_replicas(shared: &Shared) -> Reply {
    let status = Status::collect(shared);
    rows(
        status::REPLICA_COLUMNS.to_vec(),
        status::replica_rows(&status),
    )
}

pub(super) fn show_pools(shared: &Shared) -> Reply {
    let status = Status::collect(shared);
    let mut out = Vec::new();
    for p in &status.projects {
        for n in &p.nodes {
            for pool in &n.pools {
                out.push(vec![
                    p.name.clone(),
                    n.name.clone(),
                    pool.user.clone(),
                    pool.active.to_string(),
                    pool.idle.to_string(),
                    pool.connections.to_string(),
                    pool.size.to_string(),
                ]);
            }
        }
    }
    rows(
        vec![
            "project",
            "node",
            "user",
            "active",
            "idle",
            "connections",
            "pool_size",
        ],
        out,
    )
}

pub(super) fn show_clients(shared: &Shared) -> Reply {
    let now = SystemTime::now();
    let out = shared
        .clients
        .snapshot()
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.user.to_string(),
                c.project.to_string(),
                c.peer.to_string(),
                c.state().as_str().to_string(),
                c.pinned().unwrap_or("").to_string(),
                c.statements().to_string(),
                now.duration_since(c.connected_at)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    .to_string(),
            ]
        })
        .collect();
    rows(
        vec![
            "id",
            "user",
            "project",
            "address",
            "state",
            "pinned",
            "statements",
            "connected_seconds",
        ],
        out,
    )
}

pub(super) fn show_stats(shared: &Shared) -> Reply {
    let status = Status::collect(shared);
    let out = status
        .projects
        .iter()
        .map(|p| {
            let reads: u64 = p.nodes.iter().map(|n| n.reads).sum();
            let (clients, refused) = shared.limits.project_counts(&p.name);
            let writes: u64 = p.nodes.iter().map(|n| n.writes).sum();
            let replica_reads: u64 = p
                .nodes
                .iter()
                .filter(|n| n.role == "replica")
                .map(|n| n.reads)
                .sum();
            vec![
                p.name.clone(),
                p.read_routing.clone(),
                p.read_your_writes.to_string(),
                reads.to_string(),
                replica_reads.to_string(),
                writes.to_string(),
                p.fallback_reads.to_string(),
                p.causal_primary_reads.to_string(),
                clients.to_string(),
                refused.to_string(),
            ]
        })
        .collect();
    rows(
        vec![
            "project",
            "read_routing",
            "read_your_writes",
            "reads",
            "reads_on_replicas",
            "writes",
            "fallback_reads",
            "causal_primary_reads",
            "clients",
            "clients_refused",
        ],
        out,
    )
}

/// The running configuration, each value with where it comes from: `proxy.toml`, a
/// `default`, or (fleet mode) the runtime change stored in etcd that set it.
pub(super) fn show_config(shared: &Shared) -> Reply {
    let config = shared.config.load();
    let mut out = Vec::new();
    if let Ok(value) = toml::Value::try_from(&**config) {
        flatten("", &value, &mut out);
    }
    let mut in_file = Vec::new();
    if let Some(path) = &shared.config_path
        && let Ok(text) = std::fs::read_to_string(path)
        && let Ok(table) = text.parse::<toml::Table>()
    {
        flatten("", &toml::Value::Table(table), &mut in_file);
    }
    let file_value = |key: &str| in_file.iter().find(|r| r[0] == key).map(|r| r[1].as_str());
    let changes = shared
        .fleet
        .as_ref()
        .map(|f| f.runtime_changes())
        .unwrap_or_default();
    for row in &mut out {
        let from_fleet = changes
            .iter()
            .rev()
            .find(|e| row[0].starts_with(&format!("projects.{}.", e.change.project())));
        let source = match (file_value(&row[0]), from_fleet) {
            _ if shared.config_path.is_none() => "no config file".to_string(),
            (Some(value), _) if value == row[1] => "proxy.toml".to_string(),
            (_, Some(entry)) => format!("etcd: {} (by {})", entry.change.describe(), entry.by),
            (Some(_), None) => "proxy.toml (as applied)".to_string(),
            (None, None) => "default".to_string(),
        };
        row.push(source);
    }
    rows(vec!["key", "value", "source"], out)
}

/// Dotted keys with their values; passwords never leave the proxy.
pub(super) fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<Vec<String>>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::Array(items) if items.iter().all(|i| i.is_table()) && !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        toml::Value::String(s) => {
            let shown = if crate::config::secrets::is_secret_key(prefix) {
                "********".to_string()
            } else {
                crate::config::mask_passwords(s)
            };
            out.push(vec![prefix.to_string(), shown]);
        }
        other => out.push(vec![prefix.to_string(), other.to_string()]),
    }
}
