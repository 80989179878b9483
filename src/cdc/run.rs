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
use crate::pool::server::LoginInfo;
use crate::state::Shared;

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
    pub shared: Arc<Shared>,
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
    pub fn new(rule: Rule, shared: Arc<Shared>, stats: Arc<RuleStats>) -> Runner {
        Runner {
            rule,
            shared,
            stats,
            sink: None,
        }
    }

    fn config(&self) -> Arc<Config> {
        self.shared.config.load_full()
    }

    /// The current primary of `project` (it changes with a failover).
    fn primary_of(&self, project: &str) -> Result<Arc<Node>, RunError> {
        let topology = self.shared.topology.load_full();
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
        match &self.shared.fleet {
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
        if let Some(fleet) = &self.shared.fleet {
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

#[derive(Clone, Copy)]
struct Counters {
    inserted: u64,
    updated: u64,
    deleted: u64,
    snapshot: u64,
}

impl Counters {
    /// What happened between `before` and `after`, as SYNC reports it.
    fn report(before: Counters, after: Counters, rule: &str, position: u64) -> RunReport {
        RunReport {
            rule: rule.to_string(),
            snapshot: false,
            snapshot_rows: after.snapshot - before.snapshot,
            inserted: after.inserted - before.inserted,
            updated: after.updated - before.updated,
            deleted: after.deleted - before.deleted,
            position: format_lsn(position),
            duration_ms: 0,
        }
    }

    fn of(stats: &RuleStats) -> Counters {
        Counters {
            inserted: stats.inserted.load(Ordering::Relaxed),
            updated: stats.updated.load(Ordering::Relaxed),
            deleted: stats.deleted.load(Ordering::Relaxed),
            snapshot: stats.snapshot_rows.load(Ordering::Relaxed),
        }
    }
}

/// The streaming part of a run.
struct Stream<'a> {
    runner: &'a mut Runner,
    wal: WalSender,
    tables: RuleTables,
    control: Client,
    /// Relations as the stream last described them, by OID.
    relations: HashMap<u32, Arc<Shape>>,
    /// The source's timeline: the high part of every position written.
    timeline: u32,
    batch: Batch,
    in_transaction: bool,
    /// Commit position of the transaction being received.
    transaction_lsn: u64,
    /// Last position confirmed to the slot.
    confirmed: u64,
    /// End of the last transaction received completely: confirmed once written.
    pending_end: u64,
}

impl Stream<'_> {
    async fn follow(
        &mut self,
        mode: Mode,
        target: u64,
        requests: &mut mpsc::Receiver<SyncRequest>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let mut waiting: Vec<(u64, Counters, SyncRequest)> = Vec::new();
        let tick_every = match mode {
            Mode::UntilCaughtUp => Duration::from_millis(100),
            Mode::Follow => Duration::from_millis(500),
        };
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if mode == Mode::UntilCaughtUp && self.idle() && self.confirmed >= target {
                self.mark_caught_up();
                return Ok(());
            }
            if !waiting.is_empty() && self.idle() {
                let confirmed = self.confirmed;
                let (done, rest): (Vec<_>, Vec<_>) =
                    waiting.into_iter().partition(|(t, _, _)| confirmed >= *t);
                waiting = rest;
                for (_, before, request) in done {
                    let _ = request.reply.send(Ok(self.report_since(before)));
                }
            }
            tokio::select! {
                event = self.wal.next() => match event? {
                    StreamEvent::Data { payload, .. } => self.on_message(&payload).await?,
                    StreamEvent::Keepalive { wal_end, reply } => {
                        if !self.in_transaction {
                            self.flush().await?;
                        }
                        if self.idle() {
                            if wal_end > self.confirmed {
                                self.confirmed = wal_end;
                            }
                            self.mark_caught_up();
                        }
                        if reply {
                            self.wal.confirm(self.confirmed, false).await?;
                        }
                    }
                    StreamEvent::End => {
                        return Err(RunError::failed("the source ended the stream"));
                    }
                },
                _ = tick.tick() => {
                    if !self.in_transaction {
                        self.flush().await?;
                    }
                    // Asking for a reply brings a keepalive with the server's position,
                    // which an idle stream may confirm: the slot keeps up (no WAL held
                    // back) and the lag figures stay true.
                    self.wal.confirm(self.confirmed, true).await?;
                    self.runner.stats.position.store(self.confirmed, Ordering::Relaxed);
                    self.runner.stats.sample();
                }
                request = requests.recv(), if mode == Mode::Follow => {
                    let Some(request) = request else { continue };
                    let target = schema::current_lsn(&self.control).await?;
                    waiting.push((target, Counters::of(&self.runner.stats), request));
                }
                _ = shutdown.changed() => {
                    if !self.in_transaction {
                        self.flush().await?;
                    }
                    self.wal.confirm(self.confirmed, false).await?;
                    for (_, _, request) in waiting {
                        let _ = request.reply.send(Err("the proxy is shutting down".into()));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Nothing received that is not yet in the target.
    fn idle(&self) -> bool {
        !self.in_transaction && self.batch.is_empty()
    }

    fn mark_caught_up(&self) {
        let stats = &self.runner.stats;
        stats.clear_error();
        stats.position.store(self.confirmed, Ordering::Relaxed);
        stats.caught_up_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn report_since(&self, before: Counters) -> RunReport {
        let after = Counters::of(&self.runner.stats);
        Counters::report(before, after, &self.runner.rule.name, self.confirmed)
    }

    async fn on_message(&mut self, payload: &[u8]) -> Result<(), RunError> {
        let message = pgoutput::decode(payload).map_err(|e| RunError::failed(e.to_string()))?;
        self.check_width(&message)?;
        let stats = self.runner.stats.clone();
        match message {
            Message::Begin { final_lsn, .. } => {
                self.in_transaction = true;
                self.transaction_lsn = final_lsn;
            }
            Message::Commit { end_lsn, .. } => {
                debug!(rule = %self.runner.rule.name, end = %format_lsn(end_lsn), buffered = self.wal.has_buffered(), "commit received");
                self.in_transaction = false;
                self.pending_end = end_lsn;
                // Write when the batch is full or the stream pauses; otherwise the
                // next transactions join this batch (a stream of small transactions
                // then costs one target round trip per batch, not per transaction).
                if self.batch.len() >= BATCH_CHANGES || !self.wal.more_within(BATCH_PAUSE).await {
                    self.flush().await?;
                }
            }
            Message::Relation(relation) => self.on_relation(relation).await?,
            Message::Insert { relation, new } => {
                if let Some(shape) = self.relations.get(&relation).cloned() {
                    stats.inserted.fetch_add(1, Ordering::Relaxed);
                    self.push_change(shape, Op::Upsert(new), true);
                }
            }
            Message::Update { relation, old, new } => {
                if let Some(shape) = self.relations.get(&relation).cloned() {
                    stats.updated.fetch_add(1, Ordering::Relaxed);
                    self.on_update(shape, old, new);
                }
            }
            Message::Delete { relation, old } => {
                if let Some(shape) = self.relations.get(&relation).cloned() {
                    stats.deleted.fetch_add(1, Ordering::Relaxed);
                    let key = shape.key.iter().map(|&i| old[i].clone()).collect();
                    self.push(shape, Op::Delete(key));
                }
            }
            Message::Truncate { relations } => {
                for id in relations {
                    if let Some(shape) = self.relations.get(&id).cloned() {
                        self.push(shape, Op::Truncate);
                    }
                }
            }
            Message::Other(_) => {}
        }
        if self.in_transaction && self.batch.len() >= MAX_PENDING {
            // A very large transaction: write what we have, confirm at its commit.
            self.write_batch().await?;
        }
        Ok(())
    }

    /// Every tuple must have its relation's columns: the key positions index into it.
    fn check_width(&self, message: &Message) -> Result<(), RunError> {
        let (relation, old, new) = match message {
            Message::Insert { relation, new } => (*relation, None, Some(new)),
            Message::Update { relation, old, new } => (*relation, old.as_ref(), Some(new)),
            Message::Delete { relation, old } => (*relation, Some(old), None),
            _ => return Ok(()),
        };
        let Some(shape) = self.relations.get(&relation) else {
            return Ok(());
        };
        match old
            .into_iter()
            .chain(new)
            .find(|t| t.len() != shape.columns.len())
        {
            Some(t) => Err(RunError::failed(format!(
                "malformed change for {}: {} values for {} columns",
                shape.source,
                t.len(),
                shape.columns.len()
            ))),
            None => Ok(()),
        }
    }

    fn on_update(&mut self, shape: Arc<Shape>, old: Option<Vec<Datum>>, mut new: Vec<Datum>) {
        if let Some(old) = old {
            let old_key: Vec<Datum> = shape.key.iter().map(|&i| old[i].clone()).collect();
            let new_key: Vec<Datum> = shape.key.iter().map(|&i| new[i].clone()).collect();
            // A full old row (REPLICA IDENTITY FULL) fills in untouched TOAST values.
            for (value, previous) in new.iter_mut().zip(&old) {
                if *value == Datum::Unchanged && *previous != Datum::Null {
                    *value = previous.clone();
                }
            }
            if old_key != new_key && !new_key.contains(&Datum::Unchanged) {
                self.push(shape.clone(), Op::Delete(old_key));
            }
        }
        self.push(shape, Op::Upsert(new));
    }

    fn push(&mut self, shape: Arc<Shape>, op: Op) {
        self.push_change(shape, op, false);
    }

    fn push_change(&mut self, shape: Arc<Shape>, op: Op, insert: bool) {
        self.batch.push(Change {
            shape,
            position: super::change::position(self.timeline, self.transaction_lsn),
            op,
            insert,
        });
    }

    /// Maps a relation description onto the rule's table: column types, SQL types and
    /// key positions by name.
    async fn on_relation(&mut self, relation: Relation) -> Result<(), RunError> {
        let Some(table) = self.tables.by_oid.get(&relation.id).cloned() else {
            return Ok(()); // not one of ours (the publication was just changed)
        };
        let oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
        self.tables.types.resolve(&self.control, &oids).await?;
        let columns: Vec<Column> = relation
            .columns
            .iter()
            .map(|c| {
                let known = table.columns.iter().find(|k| k.name == c.name);
                Column {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    ty: self.tables.types.lookup(c.type_oid),
                    sql_type: known.map_or_else(|| "text".to_string(), |k| k.sql_type.clone()),
                }
            })
            .collect();
        let key: Option<Vec<usize>> = table
            .key_names()
            .iter()
            .map(|k| columns.iter().position(|c| c.name == *k))
            .collect();
        let Some(key) = key else {
            return Err(RunError {
                message: format!(
                    "rule \"{}\": a key column of {} is gone from the stream (was the table altered?)",
                    self.runner.rule.name, table.source
                ),
                refused: true,
            });
        };
        self.relations.insert(
            relation.id,
            Arc::new(Shape {
                source: table.source.clone(),
                target: table.target.clone(),
                columns,
                key,
            }),
        );
        Ok(())
    }

    /// Writes the batch and confirms the end of the last complete transaction in it.
    /// Only called between transactions.
    async fn flush(&mut self) -> Result<(), RunError> {
        if !self.batch.is_empty() {
            self.write_batch().await?;
        }
        if self.pending_end > self.confirmed {
            let end = self.pending_end;
            self.confirm_to(end).await?;
        }
        Ok(())
    }

    async fn write_batch(&mut self) -> Result<(), RunError> {
        let batch = std::mem::take(&mut self.batch);
        let (changes, truncates) = batch.into_parts();
        let mode = self.runner.rule.conflict_resolution;
        let applied = self
            .runner
            .sink_mut()?
            .apply(&changes, &truncates, mode)
            .await?;
        self.runner
            .stats
            .skipped
            .fetch_add(applied.skipped, Ordering::Relaxed);
        self.runner.stats.clear_error();
        debug!(rule = %self.runner.rule.name, changes = changes.len(), "batch written");
        // A crash right after a batch is in the target and before its position is
        // confirmed: the tests prove that it loses nothing.
        crate::failpoint::crash_if_armed("cdc-after-apply");
        Ok(())
    }

    async fn confirm_to(&mut self, end: u64) -> Result<(), RunError> {
        if end > self.confirmed {
            self.confirmed = end;
        }
        self.wal.confirm(self.confirmed, false).await?;
        self.runner
            .stats
            .position
            .store(self.confirmed, Ordering::Relaxed);
        Ok(())
    }
}
