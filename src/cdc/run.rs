//! One run of a rule: find the source's current primary, check the rule's tables, make
//! sure the publication and slot exist (creating the slot copies the tables first),
//! then stream changes into the target until caught up (interval rules and SYNC) or
//! for good (`interval_ms = 0`).
//!
//! Delivery is at least once: a batch is written to the target and acknowledged by it
//! before its end position is confirmed to the slot. A crash anywhere replays from the
//! last confirmed position, and the position guard in the sinks makes replays
//! harmless.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use super::change::{Batch, Change, Op};
use super::pgoutput::{self, Datum, Message, Relation};
use super::schema::{self, Column, RuleTables, Shape};
use super::sink::{Sink, SinkError, mongo::MongoSink, postgres::PostgresSink};
use super::snapshot;
use super::stats::{RuleStats, RunReport, now_ms};
use super::walsender::{StreamEvent, WalSender};
use crate::cluster::Node;
use crate::cluster::health::format_lsn;
use crate::cluster::monitor::{Credentials, control_connection};
use crate::cluster::state_file::{self, CdcState};
use crate::config::{Config, Rule, TargetKind};
use crate::fleet::Fleet;
use crate::pool::server::LoginInfo;
use crate::session::Context;

mod stream;
use stream::{Counters, Stream};

/// A batch is written once it holds this many changes and a transaction ends.
const BATCH_CHANGES: usize = 5000;
/// A transaction bigger than this is written in parts; its position is confirmed only
/// after its last part.
const MAX_PENDING: usize = 50_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a commit, a batch waits this long for more of the stream before it is written.
const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// A request to run a rule now; answered when the run has caught up.
pub struct SyncRequest {
    pub reply: oneshot::Sender<Result<RunReport, String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stream until the source position read at the start is confirmed.
    UntilCaughtUp,
    /// Stream until shutdown or an error (`interval_ms = 0`).
    Follow,
}

#[derive(Debug)]
pub struct RunError {
    pub message: String,
    /// The rule itself is wrong (missing table, no key): shown as `refused`.
    pub refused: bool,
}

impl RunError {
    fn failed(message: impl Into<String>) -> RunError {
        RunError {
            message: message.into(),
            refused: false,
        }
    }
}

impl From<String> for RunError {
    fn from(message: String) -> Self {
        RunError::failed(message)
    }
}

impl From<SinkError> for RunError {
    fn from(e: SinkError) -> Self {
        RunError::failed(format!("target: {e}"))
    }
}

impl From<super::walsender::WalError> for RunError {
    fn from(e: super::walsender::WalError) -> Self {
        RunError::failed(format!("source stream: {e}"))
    }
}

pub struct Runner {
    pub rule: Rule,
    /// The live config and topology (a failover moves the source's primary).
    context: Arc<Context>,
    /// In fleet mode, where the rule's slot is recorded.
    fleet: Option<Arc<Fleet>>,
    pub stats: Arc<RuleStats>,
    sink: Option<Sink>,
}

/// Everything a run needs from the source.
struct Source {
    primary: Arc<Node>,
    credentials: Credentials,
    control: Client,
}

impl Source {
    fn login(&self) -> LoginInfo {
        LoginInfo {
            addr: std::sync::Arc::new(self.primary.addr.clone()),
            database: self.primary.database.clone(),
            user: self.credentials.user.clone(),
            password: self.credentials.password.clone(),
            scram_keys: None,
            extra_params: Vec::new(),
        }
    }
}

impl Runner {
    pub fn new(
        rule: Rule,
        context: Arc<Context>,
        fleet: Option<Arc<Fleet>>,
        stats: Arc<RuleStats>,
    ) -> Runner {
        Runner {
            rule,
            context,
            fleet,
            stats,
            sink: None,
        }
    }

    fn config(&self) -> Arc<Config> {
        self.context.config.load_full()
    }

    /// The current primary of `project` (it changes with a failover).
    fn primary_of(&self, project: &str) -> Result<Arc<Node>, RunError> {
        let topology = self.context.topology.load_full();
        let project = topology
            .projects
            .get(project)
            .ok_or_else(|| RunError::failed(format!("no project {project}")))?;
        project.primary().cloned().ok_or_else(|| {
            RunError::failed(format!("project {} has no primary right now", project.name))
        })
    }

    fn credentials(&self) -> Result<Credentials, RunError> {
        Credentials::control_plane(&self.config()).ok_or_else(|| {
            RunError::failed(
                "no control-plane credentials (set failover.user and failover.password)",
            )
        })
    }

    async fn source(&self) -> Result<Source, RunError> {
        let primary = self.primary_of(&self.rule.source)?;
        let credentials = self.credentials()?;
        let control = control_connection(
            &primary,
            &credentials,
            CONNECT_TIMEOUT,
            &format!("replicator-cdc-{}", self.rule.name),
        )
        .await?;
        Ok(Source {
            primary,
            credentials,
            control,
        })
    }

    async fn connect_sink(&self) -> Result<Sink, RunError> {
        let config = self.config();
        if let Some(target) = config.targets.get(&self.rule.target) {
            return Ok(match target.kind {
                TargetKind::Mongodb => Sink::Mongo(MongoSink::connect(&target.uri).await?),
                TargetKind::Postgres => Sink::Postgres(PostgresSink::connect(&target.uri).await?),
            });
        }
        // A project as target: its current primary, as the control-plane user.
        let primary = self.primary_of(&self.rule.target)?;
        let client = control_connection(
            &primary,
            &self.credentials()?,
            CONNECT_TIMEOUT,
            "replicator-cdc",
        )
        .await?;
        Ok(Sink::Postgres(PostgresSink::new(client)))
    }

    /// One run. Requests arriving while following are answered once the stream has
    /// caught up with the position the source had when they arrived.
    pub async fn run(
        &mut self,
        mode: Mode,
        requests: &mut mpsc::Receiver<SyncRequest>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<RunReport, RunError> {
        let started = Instant::now();
        let before = Counters::of(&self.stats);
        self.stats.runs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_run_started_ms
            .store(now_ms(), Ordering::Relaxed);
        let source = self.source().await?;
        let tables = schema::load(&source.control, &self.rule.name, &self.rule.collections)
            .await
            .map_err(|message| RunError {
                message,
                refused: true,
            })?;
        if self.sink.as_ref().is_none_or(Sink::is_broken) {
            self.sink = Some(self.connect_sink().await?);
        }
        let shapes: Vec<Arc<Shape>> = tables.ordered.iter().map(|(_, s)| s.clone()).collect();
        self.sink_mut()?.prepare(&shapes).await?;
        let name = schema::object_name(&self.rule.name);
        schema::ensure_publication(&source.control, &name, &tables).await?;

        let target = schema::current_lsn(&source.control).await?;
        let mut wal = WalSender::connect(
            source.login(),
            &format!("replicator-cdc-{}", self.rule.name),
            CONNECT_TIMEOUT,
        )
        .await?;
        let timeline = wal.timeline().await?;
        let snapshot_taken = self
            .prepare_slot(&source, &tables, &mut wal, &name, timeline)
            .await?;

        self.stats.set_state("streaming");
        wal.start(&name, &name).await?;
        let mut stream = Stream {
            runner: self,
            wal,
            tables,
            control: source.control,
            relations: HashMap::new(),
            timeline,
            batch: Batch::default(),
            in_transaction: false,
            transaction_lsn: 0,
            confirmed: 0,
            pending_end: 0,
        };
        stream.confirmed = schema::slot_position(&stream.control, &name)
            .await?
            .unwrap_or(0);
        let result = stream.follow(mode, target, requests, shutdown).await;
        let confirmed = stream.confirmed;
        let finish = stream.wal.finish().await;
        result?;
        if let Err(e) = finish {
            debug!(rule = %self.rule.name, "closing the stream: {e}");
        }
        let after = Counters::of(&self.stats);
        let duration = started.elapsed();
        self.stats
            .last_run_finished_ms
            .store(now_ms(), Ordering::Relaxed);
        Ok(RunReport {
            snapshot: snapshot_taken,
            duration_ms: duration.as_millis() as u64,
            ..Counters::report(before, after, &self.rule.name, confirmed)
        })
    }

    fn sink_mut(&mut self) -> Result<&mut Sink, RunError> {
        self.sink
            .as_mut()
            .ok_or_else(|| RunError::failed("target not connected"))
    }

    fn state_path(&self) -> PathBuf {
        PathBuf::from(&self.config().proxy.state_file)
    }

    /// What is known about the rule's slot: in fleet mode from etcd (a new leader
    /// resumes from the slot its predecessor made, without a new snapshot), else from
    /// the state file.
    async fn recorded_slot(&self) -> Result<Option<CdcState>, RunError> {
        match &self.fleet {
            Some(fleet) => fleet
                .cdc_state(&self.rule.name)
                .await
                .map_err(RunError::failed),
            None => Ok(state_file::load(&self.state_path())
                .map_err(RunError::failed)?
                .cdc
                .get(&self.rule.name)
                .cloned()),
        }
    }

    async fn record_slot(&self, state: CdcState) -> Result<(), RunError> {
        if let Some(fleet) = &self.fleet {
            fleet
                .record_cdc_state(&self.rule.name, &state)
                .await
                .map_err(RunError::failed)?;
        }
        state_file::record_cdc(&self.state_path(), &self.rule.name, Some(state))
            .map_err(RunError::failed)
    }

    /// Makes sure the slot exists with a completed snapshot; creates it (and copies the
    /// tables) when it does not. Returns whether a snapshot was taken.
    async fn prepare_slot(
        &mut self,
        source: &Source,
        tables: &RuleTables,
        wal: &mut WalSender,
        slot: &str,
        timeline: u32,
    ) -> Result<bool, RunError> {
        let recorded = self.recorded_slot().await?;
        let existing = schema::slot_position(&source.control, slot).await?;
        let table_names: Vec<String> = tables
            .ordered
            .iter()
            .map(|(_, s)| s.source.clone())
            .collect();
        let usable = matches!(
            (&existing, &recorded),
            (Some(_), Some(r)) if r.snapshot_complete
                && r.slot == slot
                && r.node == source.primary.name
                && r.tables == table_names
        );
        if usable {
            return Ok(false);
        }
        if existing.is_some() {
            // A slot whose snapshot never finished, that we know nothing about, or that
            // was made for other tables: its position means nothing for the target.
            // Start over (the copy rewrites what the target has, idempotently).
            warn!(rule = %self.rule.name, slot, "dropping a slot without a completed snapshot");
            wal.drop_slot(slot).await?;
        }
        if recorded.is_some() {
            info!(rule = %self.rule.name, node = %source.primary.name, "the source slot is gone (first start on this primary, e.g. after a failover): copying the tables again");
        }
        self.stats.set_state("snapshot");
        let created = wal.create_slot(slot).await?;
        let mut marker = CdcState {
            slot: slot.to_string(),
            node: source.primary.name.clone(),
            consistent_point: format_lsn(created.consistent_point),
            snapshot_complete: false,
            tables: table_names,
        };
        self.record_slot(marker.clone()).await?;
        info!(rule = %self.rule.name, slot, position = %marker.consistent_point, tables = tables.ordered.len(), "slot created; copying existing rows");
        let mode = self.rule.conflict_resolution;
        let stats = self.stats.clone();
        let rule_name = self.rule.name.clone();
        // A separate session imports the snapshot while `wal` stays idle, which keeps
        // the exported snapshot alive.
        let copier = control_connection(
            &source.primary,
            &source.credentials,
            CONNECT_TIMEOUT,
            "replicator-cdc-snapshot",
        )
        .await?;
        let sink = self.sink_mut()?;
        let position = super::change::position(timeline, created.consistent_point);
        let rows = snapshot::copy(
            &copier,
            &created.snapshot_name,
            tables,
            position,
            snapshot::Destination {
                sink,
                mode,
                stats: &stats,
                rule: &rule_name,
            },
        )
        .await?;
        let shapes: Vec<Arc<Shape>> = tables.ordered.iter().map(|(_, s)| s.clone()).collect();
        let swept = self.sink_mut()?.sweep(&shapes, position).await?;
        if swept > 0 {
            info!(rule = %self.rule.name, swept, "removed target rows the source no longer has");
        }
        marker.snapshot_complete = true;
        self.record_slot(marker).await?;
        self.stats
            .position
            .store(created.consistent_point, Ordering::Relaxed);
        info!(rule = %self.rule.name, rows, "snapshot complete; streaming changes");
        Ok(true)
    }
}
