//! `GET /metrics`: the Prometheus text format, rendered at scrape time from the
//! counters the data path and the monitor keep (atomics), through prometheus-client's
//! encoder. Nothing here runs per statement.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::cluster::NodeState;
use crate::state::Shared;

#[derive(Debug)]
struct ProxyCollector {
    shared: Weak<Shared>,
}

type Labels = Vec<(&'static str, String)>;

pub fn render(shared: &Arc<Shared>) -> String {
    let mut registry = Registry::with_prefix("replicator");
    registry.register_collector(Box::new(ProxyCollector {
        shared: Arc::downgrade(shared),
    }));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        tracing::warn!("metrics encoding failed: {e}");
    }
    text
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let topology = shared.topology.load();
        let mut queries = Vec::new();
        let mut connect_errors = Vec::new();
        let mut parses_saved = Vec::new();
        let mut failed_checks = Vec::new();
        let mut lag_ms = Vec::new();
        let mut lag_bytes = Vec::new();
        let mut up = Vec::new();
        let mut in_rotation = Vec::new();
        let mut pool = Vec::new();
        let mut fallback = Vec::new();
        let mut causal = Vec::new();
        let mut histograms = Vec::new();
        let mut failovers = Vec::new();
        let mut failover_ms = Vec::new();
        let mut paused = Vec::new();
        for project in topology.projects.values() {
            let p = || ("project", project.name.clone());
            fallback.push((vec![p()], project.fallback_reads.load(Ordering::Relaxed)));
            causal.push((
                vec![p()],
                project.causal_primary_reads.load(Ordering::Relaxed),
            ));
            let f = &project.failover;
            failovers.push((
                vec![p(), ("kind", "automatic".to_string())],
                f.automatic.load(Ordering::Relaxed),
            ));
            failovers.push((
                vec![p(), ("kind", "manual".to_string())],
                f.manual.load(Ordering::Relaxed),
            ));
            failover_ms.push((vec![p()], f.last_duration_ms.load(Ordering::Relaxed) as i64));
            paused.push((
                vec![p()],
                i64::from(f.writes_paused.load(Ordering::Relaxed)),
            ));
            for node in &project.nodes {
                let labels: Labels = vec![
                    p(),
                    ("node", node.name.clone()),
                    ("role", node.role().as_str().to_string()),
                ];
                let with = |k: &'static str, v: &str| {
                    let mut l = labels.clone();
                    l.push((k, v.to_string()));
                    l
                };
                queries.push((
                    with("kind", "read"),
                    node.stats.reads.load(Ordering::Relaxed),
                ));
                queries.push((
                    with("kind", "write"),
                    node.stats.writes.load(Ordering::Relaxed),
                ));
                connect_errors.push((
                    labels.clone(),
                    node.stats.connect_errors.load(Ordering::Relaxed),
                ));
                parses_saved.push((
                    labels.clone(),
                    node.stats.parses_saved.load(Ordering::Relaxed),
                ));
                failed_checks.push((labels.clone(), node.health.checks_failed()));
                lag_ms.push((labels.clone(), node.health.lag_ms() as i64));
                lag_bytes.push((labels.clone(), node.health.lag_bytes() as i64));
                let state = node.health.state();
                up.push((
                    labels.clone(),
                    i64::from(state != NodeState::Down && node.is_up()),
                ));
                in_rotation.push((labels.clone(), i64::from(node.serves_reads())));
                for (user, connections, idle) in node.pool_states() {
                    let mut l = labels.clone();
                    l.push(("user", user));
                    let mut active = l.clone();
                    active.push(("state", "active".into()));
                    l.push(("state", "idle".into()));
                    pool.push((active, connections.saturating_sub(idle) as i64));
                    pool.push((l, idle as i64));
                }
                histograms.push((labels, node.clone()));
            }
        }
        counter(
            &mut encoder,
            "queries",
            "Requests routed, per node and kind (read or write).",
            &queries,
        )?;
        counter(
            &mut encoder,
            "fallback_reads",
            "Reads sent to the primary because no replica was healthy and within its lag tolerance.",
            &fallback,
        )?;
        counter(
            &mut encoder,
            "causal_primary_reads",
            "Reads sent to the primary because no replica had replayed the client's last write.",
            &causal,
        )?;
        counter(
            &mut encoder,
            "connect_errors",
            "Failed attempts to open a server connection.",
            &connect_errors,
        )?;
        counter(
            &mut encoder,
            "parses_saved",
            "Parse messages of unnamed statements answered by the proxy because the server already held that statement.",
            &parses_saved,
        )?;
        counter(
            &mut encoder,
            "failed_health_checks",
            "Health checks that failed or timed out.",
            &failed_checks,
        )?;
        gauge(
            &mut encoder,
            "replica_lag_milliseconds",
            "How far behind the primary a node is, in time.",
            &lag_ms,
        )?;
        gauge(
            &mut encoder,
            "replica_lag_bytes",
            "How far behind the primary a node is, in WAL bytes.",
            &lag_bytes,
        )?;
        gauge(
            &mut encoder,
            "node_up",
            "1 if the node answers its health checks.",
            &up,
        )?;
        gauge(
            &mut encoder,
            "node_serves_reads",
            "1 if the node is in the read rotation now.",
            &in_rotation,
        )?;
        gauge(
            &mut encoder,
            "pool_connections",
            "Server connections per node, user and state (active or idle).",
            &pool,
        )?;
        counter(
            &mut encoder,
            "failovers",
            "Promotions of a replica: automatic failovers and requested ones (PROMOTE).",
            &failovers,
        )?;
        gauge(
            &mut encoder,
            "failover_last_duration_milliseconds",
            "Time the last promotion took, from the decision to traffic moving.",
            &failover_ms,
        )?;
        gauge(
            &mut encoder,
            "writes_paused",
            "1 while a planned switchover holds new writes back.",
            &paused,
        )?;
        counter(
            &mut encoder,
            "config_reloads",
            "Reloads of proxy.toml, applied or rejected (a rejected file changes nothing).",
            &[
                (
                    vec![("result", "applied".to_string())],
                    shared.reloads.succeeded.load(Ordering::Relaxed),
                ),
                (
                    vec![("result", "rejected".to_string())],
                    shared.reloads.failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        gauge(
            &mut encoder,
            "clients",
            "Connected clients.",
            &[(vec![], shared.active_clients.load(Ordering::Relaxed) as i64)],
        )?;
        let limits = &shared.limits;
        let refused = [
            ("max_client_conn", &limits.refused_total),
            ("project", &limits.refused_project),
            ("user", &limits.refused_user),
        ]
        .map(|(limit, count)| {
            (
                vec![("limit", limit.to_string())],
                count.load(Ordering::Relaxed),
            )
        });
        counter(
            &mut encoder,
            "clients_refused",
            "Clients refused with 53300 by max_client_conn, a project's or a user's max_clients.",
            &refused,
        )?;
        let timeouts = &limits.timeouts;
        let timed_out = [
            ("client_idle_timeout_ms", &timeouts.client_idle),
            ("idle_transaction_timeout_ms", &timeouts.idle_transaction),
            ("query_timeout_ms", &timeouts.query),
            ("client_write_timeout_ms", &timeouts.client_write),
        ]
        .map(|(timeout, count)| {
            (
                vec![("timeout", timeout.to_string())],
                count.load(Ordering::Relaxed),
            )
        });
        counter(
            &mut encoder,
            "client_timeouts",
            "Clients disconnected (or, for query_timeout_ms, queries cancelled) by a timeout.",
            &timed_out,
        )?;
        gauge(
            &mut encoder,
            "statement_memory_bytes",
            "Bytes of statement text held by the routing-decision cache and the prepared-statement registry (both bounded).",
            &[
                (
                    vec![("holder", "decision_cache".to_string())],
                    shared.cache.bytes() as i64,
                ),
                (
                    vec![("holder", "statement_registry".to_string())],
                    shared.statements.bytes() as i64,
                ),
            ],
        )?;
        counter(
            &mut encoder,
            "large_statements",
            "Statements too large to parse on the data path, routed to the primary by a lexical scan.",
            &[(vec![], shared.cache.large_statements())],
        )?;
        encode_rules(&mut encoder, &shared.cdc.views(&shared.topology.load()))?;
        if let Some(fleet) = &shared.fleet {
            encode_fleet(&mut encoder, &fleet.view())?;
        }
        let mut family = encoder.encode_descriptor(
            "query_duration_seconds",
            "Time from sending a request to a server until its ReadyForQuery.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, node) in &histograms {
            let latency = &node.stats.latency;
            family.encode_family(labels)?.encode_histogram::<Labels>(
                latency.sum_seconds(),
                latency.count(),
                &latency.cumulative_buckets(),
                None,
            )?;
        }
        Ok(())
    }
}

/// Per CDC rule: rows by operation, errors, lag and whether the rule is healthy.
fn encode_rules(
    encoder: &mut DescriptorEncoder,
    rules: &[crate::cdc::RuleView],
) -> Result<(), std::fmt::Error> {
    let rule = |r: &crate::cdc::RuleView| vec![("rule", r.name.clone())];
    let mut rows = Vec::new();
    for r in rules {
        for (op, n) in [
            ("insert", r.inserted),
            ("update", r.updated),
            ("delete", r.deleted),
            ("snapshot", r.snapshot_rows),
        ] {
            let mut labels = rule(r);
            labels.push(("op", op.to_string()));
            rows.push((labels, n));
        }
    }
    counter(
        encoder,
        "cdc_rows",
        "Source rows a CDC rule has written to its target, by operation.",
        &rows,
    )?;
    counter(
        encoder,
        "cdc_errors",
        "Failed CDC runs (each retried with backoff).",
        &rules
            .iter()
            .map(|r| (rule(r), r.errors))
            .collect::<Vec<_>>(),
    )?;
    counter(
        encoder,
        "cdc_skipped_writes",
        "Target writes turned away because the target held a newer or foreign document.",
        &rules
            .iter()
            .map(|r| (rule(r), r.skipped))
            .collect::<Vec<_>>(),
    )?;
    gauge(
        encoder,
        "cdc_lag_bytes",
        "WAL between the source primary's position and the rule's confirmed position.",
        &rules
            .iter()
            .map(|r| (rule(r), r.lag_bytes as i64))
            .collect::<Vec<_>>(),
    )?;
    gauge(
        encoder,
        "cdc_lag_ms",
        "Time since the rule was last caught up with the source (0 when it is).",
        &rules
            .iter()
            .map(|r| (rule(r), r.lag_ms as i64))
            .collect::<Vec<_>>(),
    )?;
    gauge(
        encoder,
        "cdc_up",
        "1 when the rule's last run succeeded, 0 while it is failing or refused.",
        &rules
            .iter()
            .map(|r| (rule(r), i64::from(r.last_error.is_none())))
            .collect::<Vec<_>>(),
    )?;
    Ok(())
}

fn encode_fleet(
    encoder: &mut DescriptorEncoder,
    view: &crate::fleet::FleetView,
) -> Result<(), std::fmt::Error> {
    let me = || ("instance", view.instance.clone());
    gauge(
        encoder,
        "fleet_leader",
        "1 while this instance is the fleet's leader.",
        &[(vec![me()], i64::from(view.is_leader))],
    )?;
    gauge(
        encoder,
        "fleet_etcd_reachable",
        "1 while this instance's etcd lease is certainly alive.",
        &[(vec![me()], i64::from(view.etcd_reachable))],
    )?;
    gauge(
        encoder,
        "fleet_writes_allowed",
        "1 while this instance may send writes (topology read, etcd in contact).",
        &[(vec![me()], i64::from(view.writes_allowed))],
    )?;
    let generations: Vec<(Labels, i64)> = view
        .generations
        .iter()
        .map(|(project, g)| (vec![me(), ("project", project.clone())], *g as i64))
        .collect();
    gauge(
        encoder,
        "fleet_topology_generation",
        "The generation of each project's topology applied here.",
        &generations,
    )?;
    counter(
        encoder,
        "fleet_etcd_errors",
        "etcd calls that failed or timed out.",
        &[(vec![me()], view.etcd_errors)],
    )?;
    gauge(
        encoder,
        "fleet_members",
        "Instances registered in the fleet.",
        &[(vec![me()], view.members.len() as i64)],
    )
}
