//! Change data capture: `[[rules]]` that mirror tables of a project into MongoDB or
//! Postgres from the source primary's WAL (logical decoding with pgoutput).
//!
//! Each rule runs in its own task, away from the data path: every `interval_ms` it
//! streams what changed since its last confirmed position and stops once caught up; with
//! `interval_ms = 0` it follows the WAL continuously. `SYNC <rule>` runs it now. The
//! runtime here starts, stops and restarts those tasks as the config changes, and turns
//! their figures into the status views.
//!
//! Modules: `walsender` (replication connection), `pgoutput` (message decoding),
//! `schema` (tables, keys, publication), `snapshot` (initial copy), `change` (batches),
//! `values` (text to BSON), `sink` (MongoDB, Postgres), `run` (one run), `stats`.

pub mod change;
pub mod pgoutput;
pub mod run;
pub mod schema;
pub mod sink;
pub mod snapshot;
pub mod stats;
pub mod values;
pub mod walsender;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::Topology;
use crate::cluster::health::format_lsn;
use crate::config::Rule;
use crate::session::Context;
use crate::state::Shared;
use run::{Mode, Runner, SyncRequest};
use stats::{RuleStats, RunReport, SnapshotProgress, now_ms};

/// Longest wait between retries of a failing rule.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

struct RuleHandle {
    rule: Rule,
    stats: Arc<RuleStats>,
    requests: mpsc::Sender<SyncRequest>,
    stop: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

/// The running rules.
#[derive(Default)]
pub struct Cdc {
    rules: Mutex<BTreeMap<String, RuleHandle>>,
}

/// One rule as SHOW RULES, /status and /metrics show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleView {
    pub name: String,
    pub source: String,
    pub target: String,
    pub enabled: bool,
    pub interval_ms: u64,
    pub conflict_resolution: String,
    /// starting | snapshot | streaming | idle | following | retrying | refused | disabled
    pub state: String,
    pub last_error: Option<String>,
    pub last_run_started_ms: u64,
    pub last_run_finished_ms: u64,
    /// Last source position confirmed (everything before it is in the target).
    pub position: String,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub snapshot_rows: u64,
    /// Writes turned away by the position guard or by `target-wins`.
    pub skipped: u64,
    pub errors: u64,
    pub runs: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub rows_per_second: f64,
    pub snapshot: Option<SnapshotProgress>,
}

impl Cdc {
    fn handles(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RuleHandle>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts, stops and restarts rule tasks so they match the live config. A rule
    /// whose settings did not change keeps running untouched.
    ///
    /// In fleet mode only the leader runs rules: a follower stops its own, and starts
    /// them when it becomes the leader (called again on every change of leadership).
    pub fn reconcile(shared: &Arc<Shared>) {
        let config = shared.config.load_full();
        let mut handles = shared.cdc.handles();
        let runs_rules = shared.fleet.as_ref().is_none_or(|f| f.is_leader());
        let wanted: BTreeMap<&str, &Rule> = config
            .rules
            .iter()
            .filter(|_| runs_rules)
            .map(|r| (r.name.as_str(), r))
            .collect();
        let mut previous = BTreeMap::new();
        let names: Vec<String> = handles.keys().cloned().collect();
        for name in names {
            let unchanged = handles
                .get(&name)
                .is_some_and(|h| wanted.get(name.as_str()) == Some(&&h.rule));
            if unchanged {
                continue;
            }
            if let Some(handle) = handles.remove(&name) {
                info!(rule = %name, "stopping CDC rule (removed or changed)");
                let _ = handle.stop.send(true);
                previous.insert(name, (handle.stats, handle.task));
            }
        }
        for (name, rule) in wanted {
            if handles.contains_key(name) {
                continue;
            }
            // A changed rule keeps its figures, and starts once the old task has let
            // go of the slot.
            let (stats, before) = match previous.remove(name) {
                Some((stats, task)) => (stats, Some(task)),
                None => (Arc::default(), None),
            };
            let (requests, receiver) = mpsc::channel(16);
            let (stop, stop_rx) = watch::channel(false);
            let stop = Arc::new(stop);
            forward_shutdown(&shared.sessions, stop.clone());
            stats.set_state(if rule.enabled { "starting" } else { "disabled" });
            let task = tokio::spawn(rule_task(
                Runner::new(
                    rule.clone(),
                    shared.sessions.clone(),
                    shared.fleet.clone(),
                    stats.clone(),
                ),
                receiver,
                stop_rx,
                before,
            ));
            handles.insert(
                name.to_string(),
                RuleHandle {
                    rule: rule.clone(),
                    stats,
                    requests,
                    stop,
                    task,
                },
            );
        }
    }

    /// Waits (up to `timeout`) for every rule task to end after a shutdown: each
    /// confirms its last written position and closes its stream.
    pub async fn stopped(&self, timeout: Duration) {
        let tasks: Vec<tokio::task::JoinHandle<()>> = {
            let mut handles = self.handles();
            std::mem::take(&mut *handles)
                .into_values()
                .map(|h| {
                    let _ = h.stop.send(true);
                    h.task
                })
                .collect()
        };
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            warn!("CDC rules did not stop in time");
        }
    }

    /// Runs `rule` now (or, for a following rule, waits until it has caught up with
    /// the source's current position) and returns what the run did.
    pub async fn sync(&self, rule: &str) -> Result<RunReport, String> {
        let sender = self
            .handles()
            .get(rule)
            .map(|h| h.requests.clone())
            .ok_or_else(|| format!("no rule named \"{rule}\""))?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(SyncRequest { reply })
            .await
            .map_err(|_| format!("rule \"{rule}\" is stopping"))?;
        answer
            .await
            .map_err(|_| format!("rule \"{rule}\" stopped before its run finished"))?
    }

    pub fn views(&self, topology: &Topology) -> Vec<RuleView> {
        self.handles()
            .values()
            .map(|h| {
                let s = &h.stats;
                let position = s.position.load(Ordering::Relaxed);
                let source_lsn = topology
                    .projects
                    .get(&h.rule.source)
                    .and_then(|p| p.primary().map(|n| n.health.lsn()))
                    .unwrap_or(0);
                let lag_bytes = if position > 0 {
                    source_lsn.saturating_sub(position)
                } else {
                    0
                };
                let caught_up = s.caught_up_at_ms.load(Ordering::Relaxed);
                let lag_ms = if lag_bytes > 0 && caught_up > 0 {
                    now_ms().saturating_sub(caught_up)
                } else {
                    0
                };
                RuleView {
                    name: h.rule.name.clone(),
                    source: h.rule.source.clone(),
                    target: h.rule.target.clone(),
                    enabled: h.rule.enabled,
                    interval_ms: h.rule.interval_ms,
                    conflict_resolution: match h.rule.conflict_resolution {
                        crate::config::ConflictResolution::SourceWins => "source-wins".into(),
                        crate::config::ConflictResolution::TargetWins => "target-wins".into(),
                    },
                    state: s.state(),
                    last_error: s.last_error(),
                    last_run_started_ms: s.last_run_started_ms.load(Ordering::Relaxed),
                    last_run_finished_ms: s.last_run_finished_ms.load(Ordering::Relaxed),
                    position: if position > 0 {
                        format_lsn(position)
                    } else {
                        String::new()
                    },
                    inserted: s.inserted.load(Ordering::Relaxed),
                    updated: s.updated.load(Ordering::Relaxed),
                    deleted: s.deleted.load(Ordering::Relaxed),
                    snapshot_rows: s.snapshot_rows.load(Ordering::Relaxed),
                    skipped: s.skipped.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    runs: s.runs.load(Ordering::Relaxed),
                    lag_bytes,
                    lag_ms,
                    rows_per_second: s.rows_per_second(),
                    snapshot: s.snapshot(),
                }
            })
            .collect()
    }
}

/// A rule stops when the proxy shuts down, too.
fn forward_shutdown(context: &Context, stop: Arc<watch::Sender<bool>>) {
    let mut shutdown = context.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            if *shutdown.borrow_and_update() {
                let _ = stop.send(true);
                return;
            }
            tokio::select! {
                changed = shutdown.changed() => if changed.is_err() { return },
                _ = stop.closed() => return,
            }
        }
    });
}

/// The life of one rule: run on schedule or on request, retry with backoff on failure.
async fn rule_task(
    mut runner: Runner,
    mut requests: mpsc::Receiver<SyncRequest>,
    mut stop: watch::Receiver<bool>,
    before: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(before) = before {
        let _ = tokio::time::timeout(Duration::from_secs(10), before).await;
    }
    let rule = runner.rule.clone();
    let far_future = || Instant::now() + Duration::from_secs(86_400 * 365);
    let interval = Duration::from_millis(rule.interval_ms);
    let mut next_run = if rule.enabled {
        Instant::now()
    } else {
        far_future()
    };
    let mut failures: u32 = 0;
    loop {
        let mut request = None;
        tokio::select! {
            _ = tokio::time::sleep_until(next_run) => {}
            received = requests.recv() => match received {
                Some(r) => request = Some(r),
                None => return,
            },
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        // A following rule streams until stopped; a request that found it between
        // attempts gets a catch-up run of its own first.
        let mode = if rule.enabled && rule.interval_ms == 0 && request.is_none() {
            Mode::Follow
        } else {
            Mode::UntilCaughtUp
        };
        runner.stats.set_state("streaming");
        let result = runner.run(mode, &mut requests, &mut stop).await;
        if *stop.borrow() {
            if let Some(request) = request {
                let _ = request.reply.send(Err("the rule stopped".into()));
            }
            return;
        }
        match result {
            Ok(report) => {
                failures = 0;
                runner.stats.clear_error();
                runner.stats.set_state(if !rule.enabled {
                    "disabled"
                } else if rule.interval_ms == 0 {
                    "following"
                } else {
                    "idle"
                });
                if let Some(request) = request {
                    let _ = request.reply.send(Ok(report));
                }
                next_run = if !rule.enabled {
                    far_future()
                } else if rule.interval_ms == 0 {
                    Instant::now()
                } else {
                    Instant::now() + interval
                };
            }
            Err(e) => {
                failures += 1;
                runner.stats.record_error(&e.message);
                runner
                    .stats
                    .set_state(if e.refused { "refused" } else { "retrying" });
                let backoff = Duration::from_secs(1 << failures.min(6)).min(MAX_BACKOFF);
                warn!(rule = %rule.name, error = %e.message, retry_in_s = backoff.as_secs(), "CDC run failed");
                if let Some(request) = request {
                    let _ = request.reply.send(Err(e.message.clone()));
                }
                next_run = if rule.enabled {
                    Instant::now() + backoff
                } else {
                    far_future()
                };
            }
        }
    }
}
