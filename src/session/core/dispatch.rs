//! Routing the client's units: each complete unit is decided once (its statements'
//! routes and effects, through the decision cache and the statement registry), answered
//! here when the proxy can (a deferred `BEGIN`, a `DEALLOCATE` of a client's name, the
//! end of a transaction no server saw), queued behind earlier units that need another
//! node, or sent to the held server; a unit that needs a server and has none goes back
//! to the shell as a `Planned` request.

use super::*;

impl<H: ServerHandle> Core<H> {
    /// Sends on the complete units waiting, in order, as far as it can. Returns the
    /// next unit when it needs a server and none is held: the shell checks one out
    /// for it (`Planned::checkout`), `attach`es it and calls `send_unit`, or calls
    /// `checkout_failed`, and then this again.
    pub(in crate::session) fn dispatch_pending(&mut self) -> Result<Option<Planned>, End> {
        loop {
            // Postgres discards every message up to Sync after an extended-protocol
            // error, simple Queries included.
            match self.skipping {
                SkipToSync::No => {}
                SkipToSync::Here => {
                    while let Some(frame) = self.flight.pending.pop_front() {
                        if frame[0] == msg::SYNC {
                            self.skipping = SkipToSync::No;
                            self.flight.deallocated_in_stretch = None;
                            msg::ready_for_query(&mut self.client_out, self.tx_status);
                            break;
                        }
                    }
                }
                SkipToSync::OnServer => {
                    while let Some(frame) = self.flight.pending.front() {
                        if frame[0] == msg::SYNC {
                            self.skipping = SkipToSync::No;
                            break;
                        }
                        self.flight.pending.pop_front();
                    }
                }
            }
            if self.skipping != SkipToSync::No {
                return Ok(None);
            }
            while self
                .flight
                .pending
                .front()
                .is_some_and(|f| is_copy_frame(f))
            {
                if let Some(frame) = self.flight.pending.pop_front() {
                    self.forward_copy_frame(&frame);
                }
            }
            // The server is not reading fast enough: more would only pile up here.
            if self.server_out.len() >= SERVER_OUT_LIMIT {
                return Ok(None);
            }
            let Some(len) = self.next_unit_len() else {
                return Ok(None);
            };
            let mut unit = spare::take_vec(&SPARE_UNITS);
            self.flight.pending.take_front(len, &mut unit);
            match self.dispatch(unit)? {
                Dispatch::Done => {}
                Dispatch::Later(unit) => {
                    self.flight.pending.put_back(unit);
                    return Ok(None);
                }
                Dispatch::NeedServer(planned) => return Ok(Some(planned)),
            }
        }
    }

    /// The combined routing decision of a unit's statements.
    /// Also returns the session effects of the unit's simple Query, if it has one, and
    /// fills `parsed` with the statement of each well-formed Parse, in order (looked up
    /// once here, used again when the Parse is forwarded).
    pub(super) fn unit_decision(
        &self,
        unit: &[BytesMut],
        parsed: &mut Vec<Arc<PreparedStatement>>,
    ) -> (Decision, Vec<SessionEffect>) {
        let mut decision = Decision::replica();
        let mut query_effects = Vec::new();
        let mut parsed_unnamed: Option<Arc<Decision>> = None;
        for frame in unit {
            let d = match frame[0] {
                msg::QUERY => {
                    // A Query without its terminator is the server's to refuse.
                    let sql = match Frontend::decode(frame) {
                        Ok(Frontend::Query { sql }) => sql,
                        _ => b"",
                    };
                    let d = self.decide(sql);
                    query_effects.clone_from(&d.effects);
                    Some(d)
                }
                msg::PARSE => match Frontend::decode(frame) {
                    Ok(Frontend::Parse(parse)) => {
                        let statement = self
                            .shared
                            .statements
                            .register(parse.tail, || self.decide(parse.sql));
                        let d = statement.decision.clone();
                        if parse.name.is_empty() {
                            parsed_unnamed = Some(d.clone());
                        }
                        parsed.push(statement);
                        Some(d)
                    }
                    // Malformed: refused when forwarded.
                    _ => Some(Arc::new(Decision::primary())),
                },
                msg::BIND => match Frontend::decode(frame) {
                    Ok(Frontend::Bind(Bind { statement: "", .. })) => parsed_unnamed
                        .clone()
                        .or_else(|| self.unnamed.as_ref().map(|s| s.decision.clone())),
                    Ok(Frontend::Bind(bind)) => self
                        .statements
                        .get(bind.statement)
                        .map(|s| s.decision.clone()),
                    _ => None,
                },
                msg::FUNCTION_CALL => Some(Arc::new(Decision::primary())),
                _ => None,
            };
            if let Some(d) = d {
                decision.merge(&d);
            }
        }
        (decision, query_effects)
    }

    /// `DEALLOCATE name` of a statement this client prepared through the protocol: the
    /// servers know it only by its proxy-wide name (shared with other clients), so the
    /// proxy forgets the client's name and answers itself, as Postgres would. Only when
    /// nothing is in flight (the answer goes straight out; a pipelined one waits for
    /// the answers before it, which decide whether the name exists and whether the
    /// transaction failed) and the transaction is not aborted (where Postgres refuses
    /// every statement); otherwise, and for names the proxy does not know (SQL
    /// `PREPARE`), the server answers.
    pub(super) fn deallocated_here(
        &mut self,
        unit: &[BytesMut],
        effects: &[SessionEffect],
    ) -> Deallocate {
        let [query] = unit else {
            return Deallocate::NotHere;
        };
        if query[0] != msg::QUERY || !effects.contains(&SessionEffect::ForgetPrepared) {
            return Deallocate::NotHere;
        }
        let Ok(Frontend::Query { sql }) = Frontend::decode(query) else {
            return Deallocate::NotHere;
        };
        let Some(name) = statements::deallocate_target(sql) else {
            return Deallocate::NotHere;
        };
        if !self.flight.expect.is_empty() {
            return if self.statements.contains_key(&name) || self.flight.expect.uncertain() {
                Deallocate::Wait
            } else {
                Deallocate::NotHere
            };
        }
        if self.tx_status == TxStatus::Failed || self.statements.remove(&name).is_none() {
            return Deallocate::NotHere;
        }
        debug!(user = %self.user.name, statement = %name, "DEALLOCATE answered by the proxy");
        // A simple query drops the unnamed statement on Postgres, this one too.
        self.unnamed = None;
        msg::command_complete(&mut self.client_out, "DEALLOCATE");
        msg::ready_for_query(&mut self.client_out, self.tx_status);
        Deallocate::Answered
    }

    /// Transaction control the proxy answers without a server (see `transaction.rs`):
    /// a `BEGIN` it can defer; the plain end of a transaction no server has seen; any
    /// other statement in such a transaction once it is aborted. Only for a lone
    /// statement (or, when aborted, any unit) with nothing in flight.
    pub(super) fn transaction_answered_here(
        &mut self,
        unit: &mut [BytesMut],
        decision: &Decision,
        parsed: &[Arc<PreparedStatement>],
    ) -> bool {
        if !self.flight.expect.is_empty() || self.server.is_some() {
            return false;
        }
        if let Some(begin) = &self.flight.deferred_begin {
            if let Some(lone) = transaction::lone_statement(unit)
                && let Some(end) = transaction::plain_end(lone.sql)
            {
                // Postgres reports the end of an aborted transaction as a rollback.
                let tag = if begin.aborted { "ROLLBACK" } else { end.tag() };
                transaction::answer(&mut self.client_out, lone.extended, tag, TxStatus::Idle);
                self.flight.deferred_begin = None;
                self.tx_status = TxStatus::Idle;
                self.info.set_state(ClientState::Idle);
                self.note_unnamed(lone.extended, parsed);
                return true;
            }
            if begin.aborted {
                self.unit_failed(
                    unit,
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                );
                return true;
            }
            return false;
        }
        if !self.tx_status.is_idle()
            || self.session_mode()
            || self.pinned.is_some()
            || decision.tx != TxEffect::Begin
        {
            return false;
        }
        let Some(lone) = transaction::lone_statement(unit) else {
            return false;
        };
        let Some(tag) = transaction::deferrable_begin(lone.sql) else {
            return false;
        };
        let (extended, sql_len) = (lone.extended, lone.sql.len());
        // The text, cut out of its frame without copying: after tag and length, and for
        // a Parse the unnamed statement's empty name.
        let mut sql = unit[0].split_off(if extended.is_some() { 6 } else { 5 });
        sql.truncate(sql_len);
        debug!(user = %self.user.name, "BEGIN answered by the proxy; sent with the first statement");
        transaction::answer(&mut self.client_out, extended, tag, TxStatus::InBlock);
        self.flight.deferred_begin = Some(Box::new(DeferredBegin {
            sql,
            route: decision.route,
            aborted: false,
            simple: extended.is_none(),
        }));
        self.tx_status = TxStatus::InBlock;
        self.info.set_state(ClientState::InTransaction);
        self.note_unnamed(extended, parsed);
        true
    }

    /// A Parse the proxy answered itself still makes its statement the client's
    /// unnamed one (a later Bind without Parse runs it); a simple query leaves none, as
    /// on Postgres.
    pub(super) fn note_unnamed(&mut self, extended: Option<u8>, parsed: &[Arc<PreparedStatement>]) {
        if extended.is_none() {
            self.unnamed = None;
        } else if let Some(statement) = parsed.first() {
            self.unnamed = Some(statement.clone());
        }
    }

    /// Queues the deferred `BEGIN`, if any, in front of the unit about to be sent. It
    /// goes as Parse/Bind/Execute without a Sync: were the server to refuse it, it would
    /// skip everything up to a Sync (a simple query included) rather than run the
    /// client's statements outside a transaction, and it sends the error at once.
    pub(super) fn send_deferred_begin(&mut self) {
        let Some(begin) = self.flight.deferred_begin.take() else {
            return;
        };
        msg::run_unnamed(&mut self.server_out, &begin.sql);
        self.push_expect(Expect::DeferredBegin);
        if begin.simple {
            msg::close(&mut self.server_out, b'P', "");
            self.push_expect(Expect::InjectedClose);
        }
        self.forget_server_unnamed();
    }

    fn dispatch(&mut self, mut unit: Vec<BytesMut>) -> Result<Dispatch, End> {
        if unit.iter().all(|f| is_copy_frame(f)) {
            for frame in &unit {
                self.forward_copy_frame(frame);
            }
            return Ok(Dispatch::Done);
        }
        if self.flight.expect.uncertain() && requests::relies_on_statements(&unit) {
            // What its statement names mean depends on an answer still to come.
            return Ok(Dispatch::Later(unit));
        }
        let mut parsed = spare::take_vec(&SPARE_PARSED);
        let (decision, query_effects) = self.unit_decision(&unit, &mut parsed);
        match self.deallocated_here(&unit, &query_effects) {
            Deallocate::NotHere => {}
            Deallocate::Answered => {
                spare::give_back_vec(&SPARE_PARSED, parsed, 64);
                return Ok(Dispatch::Done);
            }
            Deallocate::Wait => {
                parsed.clear();
                spare::give_back_vec(&SPARE_PARSED, parsed, 64);
                return Ok(Dispatch::Later(unit));
            }
        }
        if self.transaction_answered_here(&mut unit, &decision, &parsed) {
            parsed.clear();
            spare::give_back_vec(&SPARE_PARSED, parsed, 64);
            self.recycle_unit(unit);
            return Ok(Dispatch::Done);
        }
        // A deferred BEGIN decides where its transaction runs, as it would have sent it.
        let mut route = match &self.flight.deferred_begin {
            Some(begin) => begin.route,
            None => decision.route,
        };
        if decision.pin.is_some() || self.pinned.is_some() {
            route = Route::Primary;
        }
        // Still answering earlier units: queue behind them if this unit needs another
        // node, or if that server is going away (it sent a FATAL error).
        // A read right after a write waits for that write's commit position, so
        // that it can be routed by it rather than pile onto the primary.
        if let Some(held) = &self.server
            && !self.is_sticky()
            && (held.conn.state().broken
                || (route == Route::Primary && held.node.role() != NodeRole::Primary)
                || (route == Route::Replica
                    && self
                        .flight
                        .expect
                        .iter()
                        .any(|e| matches!(e, Expect::CommitLsn))))
        {
            return Ok(Dispatch::Later(unit));
        }
        let planned = Planned {
            unit,
            // A deferred BEGIN's route is the transaction's, whatever the hint says.
            hinted: decision.hinted && self.flight.deferred_begin.is_none(),
            decision,
            query_effects,
            parsed,
            route,
        };
        if self.server.is_none() {
            return Ok(Dispatch::NeedServer(planned));
        }
        self.send_unit(planned)?;
        Ok(Dispatch::Done)
    }

    /// A server for this planned unit could not be had: the unit is answered with
    /// the error, as the server would.
    pub(in crate::session) fn checkout_failed(&mut self, planned: Planned, error: &BackendError) {
        let Planned {
            unit, mut parsed, ..
        } = planned;
        if let Some(begin) = self.flight.deferred_begin.as_mut() {
            begin.aborted = true;
            self.tx_status = TxStatus::Failed;
        }
        parsed.clear();
        spare::give_back_vec(&SPARE_PARSED, parsed, 64);
        self.unit_failed(
            &unit,
            error.sqlstate(),
            &format!(
                "no server available for project \"{}\": {error}",
                self.project.name
            ),
        );
        self.recycle_unit(unit);
    }

    /// Sends a routed unit to the held server.
    pub(in crate::session) fn send_unit(&mut self, planned: Planned) -> Result<(), End> {
        let Planned {
            mut unit,
            decision,
            mut query_effects,
            mut parsed,
            route,
            ..
        } = planned;
        if let Some(reason) = decision.pin
            && self.pinned.is_none()
        {
            info!(user = %self.user.name, project = %self.project.name, %reason, "client pinned to its primary connection");
            self.pinned = Some(reason);
            self.info.set_pinned(reason.as_str());
        }
        let fresh_server = self.flight.expect.is_empty();
        if let Some(held) = &self.server {
            let counter = if route == Route::Primary {
                &held.node.stats.writes
            } else {
                &held.node.stats.reads
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.ryw
                && self.pinned.is_none()
                && route == Route::Primary
                && held.node.role() == NodeRole::Primary
            {
                self.wrote = true;
            }
        }
        if self.flight.started.is_none() {
            self.flight.started = Some(Instant::now());
            self.clock.query_started();
        }
        self.info.set_state(ClientState::Active);
        self.info.count_statement();
        self.prepare_server();
        self.send_deferred_begin();
        let mut parsed_unnamed = false;
        let answered_before = self.client_out.len();
        let idle_before = self.tx_status.is_idle();
        self.skipped_parse = false;
        if fresh_server {
            self.flight.group_named.clear();
        }
        let mut statements = parsed.drain(..);
        for frame in &unit {
            let statement = if frame[0] == msg::PARSE {
                statements.next()
            } else {
                None
            };
            self.forward_client_frame(frame, statement, &mut parsed_unnamed, &mut query_effects)?;
        }
        drop(statements);
        spare::give_back_vec(&SPARE_PARSED, parsed, 64);
        let keep_for_reparse = self.skipped_parse
            && fresh_server
            && idle_before
            && matches!(unit.last().map(|f| f[0]), Some(msg::SYNC));
        self.flight.reparse = None;
        // Answers the proxy gives itself wait for the server's first answer, unless the
        // server owes nothing.
        if self.flight.expect.iter().all(Expect::is_local) {
            self.emit_synthetics();
        }
        // A read that the server has not started answering can be sent again elsewhere
        // if that server fails: nothing of it reached the client, and it changed nothing.
        // Pipelined reads (a driver's Close, then its next query) are kept together
        // while none of them has been answered.
        let replayable = route == Route::Replica
            && decision.tx == TxEffect::None
            && !self.is_sticky()
            && self.replays < MAX_READ_REPLAYS
            && self.client_out.len() == answered_before
            && matches!(unit.last().map(|f| f[0]), Some(msg::SYNC | msg::QUERY));
        match (fresh_server, replayable, self.flight.replay.as_mut()) {
            (true, true, _) => {
                self.forget_replay();
                if keep_for_reparse {
                    self.flight.reparse = Some(Box::new(Reparse {
                        frames: unit.clone(),
                        client_mark: answered_before,
                    }));
                }
                self.flight.replay = Some(Replay {
                    frames: unit,
                    client_mark: answered_before,
                    settled: Vec::new(),
                })
            }
            (false, true, Some(earlier)) => {
                earlier.frames.append(&mut unit);
                self.recycle_unit(unit);
            }
            _ => {
                self.forget_replay();
                // Kept whole rather than copied: nothing else needs these frames.
                if keep_for_reparse {
                    self.flight.reparse = Some(Box::new(Reparse {
                        frames: unit,
                        client_mark: answered_before,
                    }));
                } else {
                    self.recycle_unit(unit);
                }
            }
        }
        Ok(())
    }
}
