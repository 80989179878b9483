//! Failover: deciding that the primary is gone, choosing the replica that loses the
//! least, promoting it as a recorded decision, moving traffic and re-pointing the other
//! replicas. Also the planned switchover behind `PROMOTE` on a healthy primary.
//!
//! The safety rules, in order:
//! - the primary is declared down only after `failure_threshold` failed checks
//!   `health_check_interval_ms` apart *and* once no replica still streams from it (from
//!   its address, on its timeline: a replica streaming from a sibling or from a node
//!   promoted elsewhere proves nothing), so a network problem between proxy and primary
//!   does not promote anything;
//! - a replica already out of recovery is adopted, never joined by a second primary;
//! - a replica whose lag when the primary was last seen is unknown (fresh start) or
//!   beyond its `lag_tolerance_ms` is never chosen (0: it must have everything the
//!   primary was last seen with);
//! - the decision is written to the state file before pg_promote, and a decision left
//!   unfinished (crash, failed write) is finished with the same candidate.

mod control;
mod decide;
mod promote;

pub use control::with_host_port;
pub use promote::{promote_on_request, switchover};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info};

use super::Project;
use super::monitor::Credentials;
use super::state_file::Intent;
use crate::config::FailoverMode;

pub struct FailoverSettings {
    pub mode: FailoverMode,
    pub check_interval: Duration,
    pub failure_threshold: u32,
    pub write_wait: Duration,
    pub credentials: Option<Credentials>,
    pub state_path: PathBuf,
    /// Fleet mode: decisions are the leader's, recorded in etcd.
    pub fleet: Option<Arc<dyn crate::cluster::coordination::Coordination>>,
}

/// A project's failover machinery: settings, what it is doing, and its counters.
pub struct Failover {
    pub settings: FailoverSettings,
    status: Mutex<FailoverStatus>,
    /// One promotion at a time per project (automatic or requested); held for good
    /// by a shutdown (see `hold_promotions`).
    promoting: Arc<tokio::sync::Mutex<()>>,
    /// A promotion decided (recorded) and not yet recorded as done.
    pending: Mutex<Option<Intent>>,
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
    /// Waits for a promotion under way to finish, then keeps any other from starting
    /// while the guard lives: a shutdown finishes a promotion or never starts one.
    pub async fn hold_promotions(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.promoting.clone().lock_owned().await
    }

    pub fn new(settings: FailoverSettings) -> Failover {
        Failover {
            settings,
            status: Mutex::new(FailoverStatus {
                state: "primary healthy".into(),
                last_event: None,
            }),
            promoting: Arc::new(tokio::sync::Mutex::new(())),
            pending: Mutex::new(None),
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

    /// The promotion decided and not finished, if any.
    pub fn pending(&self) -> Option<Intent> {
        self.pending.lock().ok().and_then(|p| p.clone())
    }

    pub fn set_pending(&self, intent: Option<Intent>) {
        if let Ok(mut p) = self.pending.lock() {
            *p = intent;
        }
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

impl Detector {
    /// Logs and records a refusal (or a failure to finish) once per distinct reason.
    fn refuse(&mut self, project: &Project, reason: String) {
        let failover = &project.failover;
        failover.set_state(reason.clone());
        if self.reported.as_deref() != Some(reason.as_str()) {
            error!(project = %project.name, "no failover: {reason}");
            failover.event(format!("no failover: {reason}"));
            self.reported = Some(reason);
        }
    }
}

/// Called by the monitor after every round of checks.
pub async fn after_checks(
    project: &Arc<Project>,
    detector: &mut Detector,
    primary_reachable: bool,
) {
    let failover = &project.failover;
    // Fleet mode: followers route and count the primary's failures (so that one that
    // becomes leader acts at once), but only the leader decides and finishes decisions.
    let follower_of = match &failover.settings.fleet {
        Some(fleet) if !fleet.is_leader() => Some(
            fleet
                .leader()
                .map(|l| format!("the fleet's leader {l}"))
                .unwrap_or_else(|| "the fleet's next leader (none now)".into()),
        ),
        Some(fleet) => {
            if primary_reachable {
                publish_knowledge(project, fleet.as_ref()).await;
            }
            None
        }
        None => None,
    };
    // A decision left unfinished comes first, and is finished with its own candidate.
    if let Some(intent) = failover.pending() {
        if let Some(leader) = &follower_of {
            failover.set_state(format!(
                "the promotion of {} is being finished by {leader}",
                intent.candidate
            ));
            return;
        }
        if let Err(e) = promote::finish_pending(project, &intent).await {
            detector.refuse(
                project,
                format!(
                    "the promotion of {} decided earlier is not finished ({e}); retrying",
                    intent.candidate
                ),
            );
        }
        return;
    }
    let Some(primary) = project.primary().cloned() else {
        return;
    };
    if primary_reachable {
        if detector.failures > 0 {
            info!(project = %project.name, node = %primary.name, "primary answers again");
        }
        *detector = Detector::default();
        failover.set_state(match &follower_of {
            Some(leader) => format!("primary healthy; failover is decided by {leader}"),
            None => "primary healthy".into(),
        });
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
    if let Some(leader) = follower_of {
        failover.set_state(format!(
            "primary {} failed {} checks; failover is decided by {leader}",
            primary.name, detector.failures
        ));
        return;
    }
    if failover.settings.mode == FailoverMode::Manual {
        let reason = format!(
            "primary {} is down; failover mode is manual: run PROMOTE {} <replica>",
            primary.name, project.name
        );
        detector.refuse(project, reason);
        return;
    }
    let plan = decide::plan(project, &primary, &failover.settings).await;
    let (candidate, reason) = match plan {
        Err(reason) => {
            detector.refuse(project, reason);
            return;
        }
        Ok(decide::Plan::Adopt(node)) => (node, "adopted: already out of recovery"),
        Ok(decide::Plan::Promote(node)) => (node, "automatic failover"),
    };
    match promote::promote(project, &candidate, reason, Instant::now()).await {
        Ok(()) => {
            failover.automatic.fetch_add(1, Ordering::Relaxed);
            *detector = Detector::default();
        }
        Err(e) => detector.refuse(project, format!("promoting {} failed: {e}", candidate.name)),
    }
}

/// The leader publishes what a successor needs to judge replicas the moment it takes
/// over: the primary's last position and each replica's lag when it was last seen.
async fn publish_knowledge(
    project: &Project,
    fleet: &dyn crate::cluster::coordination::Coordination,
) {
    let Some(primary) = project.primary() else {
        return;
    };
    let lag_ms = project
        .nodes
        .iter()
        .filter(|n| n.role() == super::NodeRole::Replica)
        .filter_map(|n| Some((n.name.clone(), n.health.lag_at_primary_seen_ms()?)))
        .collect();
    let knowledge = crate::cluster::coordination::Knowledge {
        leader: fleet.instance().to_string(),
        primary_lsn: primary.health.lsn(),
        lag_ms,
        at: super::state_file::now_secs(),
    };
    fleet.publish_knowledge(&project.name, knowledge).await;
}
