//! The streaming part of a CDC run: changes read from the replication slot, batched,
//! written to the target, and confirmed to the slot once written; and the counters
//! SYNC reports from.

use super::*;

#[derive(Clone, Copy)]
pub(super) struct Counters {
    pub(super) inserted: u64,
    pub(super) updated: u64,
    pub(super) deleted: u64,
    pub(super) snapshot: u64,
}

impl Counters {
    /// What happened between `before` and `after`, as SYNC reports it.
    pub(super) fn report(
        before: Counters,
        after: Counters,
        rule: &str,
        position: u64,
    ) -> RunReport {
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

    pub(super) fn of(stats: &RuleStats) -> Counters {
        Counters {
            inserted: stats.inserted.load(Ordering::Relaxed),
            updated: stats.updated.load(Ordering::Relaxed),
            deleted: stats.deleted.load(Ordering::Relaxed),
            snapshot: stats.snapshot_rows.load(Ordering::Relaxed),
        }
    }
}

/// The streaming part of a run.
pub(super) struct Stream<'a> {
    pub(super) runner: &'a mut Runner,
    pub(super) wal: WalSender,
    pub(super) tables: RuleTables,
    pub(super) control: Client,
    /// Relations as the stream last described them, by OID.
    pub(super) relations: HashMap<u32, Arc<Shape>>,
    /// The source's timeline: the high part of every position written.
    pub(super) timeline: u32,
    pub(super) batch: Batch,
    pub(super) in_transaction: bool,
    /// Commit position of the transaction being received.
    pub(super) transaction_lsn: u64,
    /// Last position confirmed to the slot.
    pub(super) confirmed: u64,
    /// End of the last transaction received completely: confirmed once written.
    pub(super) pending_end: u64,
}

impl Stream<'_> {
    pub(super) async fn follow(
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
    pub(super) fn idle(&self) -> bool {
        !self.in_transaction && self.batch.is_empty()
    }

    pub(super) fn mark_caught_up(&self) {
        let stats = &self.runner.stats;
        stats.clear_error();
        stats.position.store(self.confirmed, Ordering::Relaxed);
        stats.caught_up_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(super) fn report_since(&self, before: Counters) -> RunReport {
        let after = Counters::of(&self.runner.stats);
        Counters::report(before, after, &self.runner.rule.name, self.confirmed)
    }

    pub(super) async fn on_message(&mut self, payload: &[u8]) -> Result<(), RunError> {
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
    pub(super) fn check_width(&self, message: &Message) -> Result<(), RunError> {
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

    pub(super) fn on_update(
        &mut self,
        shape: Arc<Shape>,
        old: Option<Vec<Datum>>,
        mut new: Vec<Datum>,
    ) {
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

    pub(super) fn push(&mut self, shape: Arc<Shape>, op: Op) {
        self.push_change(shape, op, false);
    }

    pub(super) fn push_change(&mut self, shape: Arc<Shape>, op: Op, insert: bool) {
        self.batch.push(Change {
            shape,
            position: super::super::change::position(self.timeline, self.transaction_lsn),
            op,
            insert,
        });
    }

    /// Maps a relation description onto the rule's table: column types, SQL types and
    /// key positions by name.
    pub(super) async fn on_relation(&mut self, relation: Relation) -> Result<(), RunError> {
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
    pub(super) async fn flush(&mut self) -> Result<(), RunError> {
        if !self.batch.is_empty() {
            self.write_batch().await?;
        }
        if self.pending_end > self.confirmed {
            let end = self.pending_end;
            self.confirm_to(end).await?;
        }
        Ok(())
    }

    pub(super) async fn write_batch(&mut self) -> Result<(), RunError> {
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

    pub(super) async fn confirm_to(&mut self, end: u64) -> Result<(), RunError> {
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
