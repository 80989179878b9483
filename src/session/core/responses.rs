//! The server's side of a session: frames from the held server are matched against what
//! the proxy expects (`expect.rs`), swallowed when the proxy injected the request,
//! answered again after a transparent re-prepare, or forwarded to the client; at
//! ReadyForQuery the unit's session effects are applied and, in transaction pooling, the
//! server goes back to its pool. A server lost mid-unit ends here too.

use super::*;

impl<H: ServerHandle> Core<H> {
    /// A server message, or a piece of a large one: large rows and COPY data go on in
    /// pieces (the core need not look inside them).
    pub(in crate::session) fn server_piece(&mut self, piece: Piece) -> Result<(), End> {
        match piece {
            Piece::Frame(frame) => self.server_frame(&frame),
            _ if self.session_mode() => {
                self.pass_server_piece(piece);
                Ok(())
            }
            Piece::Head { tag, bytes } => self.on_large_frame(tag, bytes),
            Piece::Body { bytes, last } => {
                if self.streamed == Streamed::ToClient {
                    self.client_out.extend_from_slice(&bytes);
                }
                if last {
                    self.streamed = Streamed::No;
                }
                Ok(())
            }
        }
    }

    /// Handles the whole frames of `batch` (see `MessageReader::take_whole_frames`) in
    /// order, while the server is held. Returns how many bytes it used: what is left
    /// goes back to the server's reader, as if never taken.
    pub(in crate::session) fn server_frames(&mut self, batch: &[u8]) -> (usize, Result<(), End>) {
        let mut frames = Frames::new(batch);
        while self.server.is_some() {
            let Some(frame) = frames.next() else { break };
            if let Err(end) = self.server_frame(frame) {
                return (frames.consumed(batch), Err(end));
            }
        }
        (frames.consumed(batch), Ok(()))
    }

    /// One whole server frame.
    pub(in crate::session) fn server_frame(&mut self, frame: &[u8]) -> Result<(), End> {
        if self.session_mode() {
            self.pass_server_frame(frame);
            return Ok(());
        }
        self.on_server_frame(frame)
    }

    /// The start of a row or COPY data too large to hold whole: passed on to the client
    /// as it arrives, unless it answers something the proxy asked itself.
    fn on_large_frame(&mut self, tag: u8, bytes: BytesMut) -> Result<(), End> {
        self.emit_synthetics();
        let Some(front) = self.flight.expect.front() else {
            return self.unsolicited(&bytes);
        };
        if front.is_injected() || matches!(front, Expect::CommitLsn | Expect::DeferredBegin) {
            debug!(user = %self.user.name, tag = %crate::protocol::framing::printable_tag(tag), "dropping a large answer to the proxy's own request");
            self.streamed = Streamed::Dropped;
            return Ok(());
        }
        // A row is an answer: nothing to send again with a Parse.
        self.flight.reparse = None;
        self.streamed = Streamed::ToClient;
        self.client_out.extend_from_slice(&bytes);
        Ok(())
    }

    /// Writes responses the proxy answers itself once they reach the front of the queue,
    /// and settles the statement changes of messages that were answered.
    pub(super) fn emit_synthetics(&mut self) {
        while let Some(entry) = self.flight.expect.front().filter(|e| e.is_local()) {
            if let Expect::Synthetic(tag) = entry {
                msg::empty_message(&mut self.client_out, *tag);
            }
            if let Some(entry) = self.flight.expect.pop_front()
                && matches!(entry, Expect::UndoNamed(_) | Expect::UndoUnnamed(_))
                && let Some(replay) = self.flight.replay.as_mut()
            {
                replay.settled.push(entry);
            }
        }
    }

    /// Puts back the client's statement names that abandoned messages changed, newest
    /// change first. A later change of the same name still in flight (behind a Sync
    /// the error does not reach) keeps its effect: it now replaces what the abandoned
    /// change had replaced, which is what it puts back should it be abandoned too.
    pub(super) fn undo_statement_changes(&mut self, abandoned: Vec<Expect>) {
        for entry in abandoned.into_iter().rev() {
            match entry {
                Expect::UndoNamed(change) => {
                    let (name, previous) = *change;
                    if let Some(later) = self.flight.expect.next_change_of(Some(&name)) {
                        *later = previous;
                        continue;
                    }
                    match previous {
                        Some(statement) => {
                            self.statements.insert(name, statement);
                        }
                        None => {
                            self.statements.remove(&name);
                        }
                    }
                }
                Expect::UndoUnnamed(previous) => match self.flight.expect.next_change_of(None) {
                    Some(later) => *later = previous,
                    None => self.unnamed = previous,
                },
                _ => {}
            }
        }
    }

    fn on_server_frame(&mut self, frame: &[u8]) -> Result<(), End> {
        let tag = frame[0];
        let injected = self.flight.expect.front().is_some_and(Expect::is_injected);
        match tag {
            msg::NOTIFICATION => {
                self.client_out.extend_from_slice(frame);
                return Ok(());
            }
            msg::NOTICE_RESPONSE => {
                if !injected {
                    self.client_out.extend_from_slice(frame);
                }
                return Ok(());
            }
            msg::PARAMETER_STATUS => {
                if let Some(held) = self.server.as_mut()
                    && let Backend::ParameterStatus { name, value } = Backend::decode(frame)
                {
                    held.conn.state_mut().set_parameter(name, value);
                }
                if !injected {
                    self.client_out.extend_from_slice(frame);
                }
                return Ok(());
            }
            _ => {}
        }
        self.emit_synthetics();
        let Some(front) = self.flight.expect.front() else {
            return self.unsolicited(frame);
        };
        if tag == msg::DATA_ROW && !front.is_injected() {
            // A row for the client, the bulk of most answers: ends nothing, changes
            // nothing, and is passed on undecoded. (It answers the unit, so there is
            // nothing to send again with a Parse.)
            self.flight.reparse = None;
            self.client_out.extend_from_slice(frame);
            return Ok(());
        }
        let message = Backend::decode(frame);
        match front {
            Expect::Injected => {
                match message {
                    Backend::Error(report) => {
                        warn!(user = %self.user.name, "restoring session settings failed: {report}");
                        msg::notice_response(
                            &mut self.client_out,
                            "01000",
                            &format!(
                                "replicator could not restore a session setting: {}",
                                report.message()
                            ),
                        );
                    }
                    Backend::ReadyForQuery(_) => {
                        self.flight.expect.pop_front();
                    }
                    _ => {}
                }
                return Ok(());
            }
            Expect::CommitLsn => {
                match message {
                    Backend::DataRow(row) => {
                        self.flight.commit_lsn = backend::first_column(row)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(health::parse_lsn);
                    }
                    Backend::ReadyForQuery(status) => {
                        self.flight.expect.pop_front();
                        // Valid only if it ran outside a transaction, i.e. after the
                        // commit; otherwise the next idle ReadyForQuery asks again.
                        match self.flight.commit_lsn.take() {
                            Some(lsn) if status.is_idle() => self.min_lsn = self.min_lsn.max(lsn),
                            _ => self.wrote = true,
                        }
                        self.tx_status = status;
                        self.release_if_idle();
                    }
                    _ => {}
                }
                return Ok(());
            }
            Expect::DeferredBegin => {
                match message {
                    Backend::Error(report) => return Err(self.deferred_begin_refused(&report)),
                    Backend::CommandComplete { .. } => {
                        self.flight.expect.pop_front();
                    }
                    _ => {}
                }
                return Ok(());
            }
            Expect::InjectedParse { .. } if tag == msg::PARSE_COMPLETE => {
                self.flight.expect.pop_front();
                return Ok(());
            }
            Expect::InjectedClose if tag == msg::CLOSE_COMPLETE => {
                self.flight.expect.pop_front();
                return Ok(());
            }
            _ => {}
        }
        // What the answer means for the entry it answers, read before anything changes.
        let survives = front.survives_error();
        let duplicate = match front {
            Expect::ParseDuplicate(name) => Some(name.clone()),
            _ => None,
        };
        let ends = front.ends_with(tag);
        let in_execute = matches!(front, Expect::Execute);
        if let Some(reparse) = self.flight.reparse.take() {
            if let Backend::Error(report) = message
                && report.code == b"0A000"
            {
                self.send_again_with_parse(*reparse);
                return Ok(());
            }
            // Answered: nothing to send again.
            drop(reparse);
        }
        if let Backend::Error(report) = message
            && report.is_fatal()
            && self.flight.replay.is_some()
        {
            // The server is going away before answering a read: try another node.
            return self.server_lost(&report.to_string());
        }
        if let Backend::Error(report) = message {
            if !self.flight.group_named.is_empty() && report.code == b"0A000" {
                self.retire_refused_statements();
            }
            self.forget_server_unnamed();
            match duplicate {
                Some(name) if report.code == b"42P05" => {
                    let message = format!("prepared statement \"{name}\" already exists");
                    msg::error_response(&mut self.client_out, "ERROR", "42P05", &message);
                }
                _ => self.forward_error(frame, &report),
            }
            self.group_error = true;
            if !survives {
                self.abandon_group();
            }
            return Ok(());
        }
        self.client_out.extend_from_slice(frame);
        match message {
            Backend::Other(msg::COPY_IN_RESPONSE) => {
                self.copy_in = true;
                if in_execute {
                    // Extended protocol: the server ignores a Sync that reaches it during
                    // COPY, i.e. one the client sent before its CopyDone or CopyFail (its
                    // `CopyEnd` marker); the client sends another after those, which is
                    // the one that gets answered.
                    let ignored = self
                        .flight
                        .expect
                        .iter()
                        .take_while(|e| !matches!(e, Expect::CopyEnd))
                        .position(|e| matches!(e, Expect::Ready { .. }));
                    if let Some(i) = ignored {
                        self.flight.expect.remove(i);
                        // Unless its Sync is already on the way, the batch is open again.
                        if !self
                            .flight
                            .expect
                            .iter()
                            .any(|e| matches!(e, Expect::Ready { .. }))
                        {
                            self.mid_batch = true;
                        }
                    }
                }
            }
            Backend::CommandComplete { tag: command } => {
                self.copy_in = false;
                match command {
                    b"ROLLBACK" => self.saw_rollback = true,
                    b"DEALLOCATE ALL" | b"DISCARD ALL" => self.statements_deallocated(true),
                    b"DEALLOCATE" => self.statements_deallocated(false),
                    tag if statements::is_schema_change(tag) => {
                        self.shared.statements.schema_changed()
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        if ends {
            let entry = self.flight.expect.pop_front();
            self.emit_synthetics();
            if let Backend::ReadyForQuery(status) = message {
                let effects = match entry {
                    Some(Expect::Ready { effects, .. }) => effects,
                    _ => Vec::new(),
                };
                self.on_ready(status, effects);
            }
        }
        Ok(())
    }

    /// The server ran a `DEALLOCATE` (`all`: `DEALLOCATE ALL` or `DISCARD ALL`, which
    /// also drop the client's names). It takes effect when it runs, as on Postgres: a
    /// later error or rollback does not undo it, and statements prepared by messages
    /// still in flight behind it are prepared after it, so they stay.
    fn statements_deallocated(&mut self, all: bool) {
        let (kept_names, kept_ids) = self.flight.expect.forget_before_in_flight();
        if let Some(held) = self.server.as_mut() {
            // A named DEALLOCATE that reaches the server names no statement of the
            // client's (those are answered here), but could name a proxy-wide one.
            held.conn
                .state_mut()
                .prepared
                .retain(|id| kept_ids.contains(id));
        }
        if all {
            self.statements.retain(|name, _| kept_names.contains(name));
        }
    }

    /// A server refused a deferred `BEGIN` (the texts deferred cannot fail on a working
    /// server, so this is a server in trouble). The client was told its transaction
    /// started; the server skipped its statements, so nothing of it ran. The session
    /// ends, as when a server is lost inside a transaction.
    fn deferred_begin_refused(&mut self, report: &Report) -> End {
        let node = match self.server.as_mut() {
            Some(held) => {
                held.conn.state_mut().broken = true;
                held.node.name.clone()
            }
            None => String::new(),
        };
        warn!(%node, user = %self.user.name, "server refused a deferred BEGIN: {report}");
        End::fatal(
            "08006",
            format!(
                "server \"{node}\" could not start the transaction: {}; none of its statements ran",
                report.message()
            ),
        )
    }

    /// Records a proxy-named statement the units in flight use (see `group_named`). A
    /// batch that runs one statement many times before its Sync records it once, and a
    /// pipeline that never lets the server go idle records at most a bounded number: a
    /// refusal of one left out is retired at the client's next attempt instead.
    pub(super) fn note_named_use(&mut self, id: u64) {
        const MAX_NOTED: usize = 256;
        if self.flight.group_named.last() != Some(&id) && self.flight.group_named.len() < MAX_NOTED
        {
            self.flight.group_named.push(id);
        }
    }

    /// The server refused a statement's cached plan ("cached plan must not change
    /// result type" after a schema change, 0A000; other 0A000 errors only cost a fresh
    /// Parse). The client gets the error, as from Postgres; its next Parse of the same
    /// text must plan afresh, whichever server it lands on, instead of meeting the same
    /// refusal on every connection that holds the old statement.
    fn retire_refused_statements(&mut self) {
        for id in std::mem::take(&mut self.flight.group_named) {
            if let Some(statement) = self.statements.values().find(|s| s.id == id) {
                debug!(user = %self.user.name, statement = %statement.server_name, "a server refused a prepared statement's cached plan; the next Parse of its text prepares it anew");
                self.shared.statements.retire(statement);
            }
        }
    }

    /// The server refused to reuse its unnamed statement for a unit whose Parse the
    /// proxy had answered: take back what the client was told, swallow the rest of
    /// the server's answer to the unit, and send the unit again, Parse included.
    fn send_again_with_parse(&mut self, reparse: Reparse) {
        debug!(user = %self.user.name, "server refused its cached unnamed statement; parsing it again");
        self.client_out.truncate(reparse.client_mark);
        self.forget_server_unnamed();
        self.forget_replay();
        // The server still ends the unit with ReadyForQuery: not the client's.
        let abandoned = self.flight.expect.replace_first_ready(Expect::Injected);
        // The unit is processed again from its first message.
        self.undo_statement_changes(abandoned);
        self.flight.group_effects.clear();
        self.flight.pending.put_back(reparse.frames);
    }

    /// Forwards a server error. A FATAL one means the server is about to close this
    /// connection; when the client's session does not depend on that server it carries
    /// on elsewhere, so it gets the error as a plain ERROR.
    fn forward_error(&mut self, frame: &[u8], report: &Report) {
        if report.is_fatal() {
            if let Some(held) = self.server.as_mut() {
                held.conn.state_mut().broken = true;
            }
            if self.tx_status.is_idle() && self.pinned.is_none() && !self.session_mode() {
                msg::error_response(
                    &mut self.client_out,
                    "ERROR",
                    report.code(),
                    &report.message(),
                );
                return;
            }
        }
        self.client_out.extend_from_slice(frame);
    }

    /// After an ErrorResponse to an extended-protocol message the server discards every
    /// message up to the next Sync, simple Queries and FunctionCalls included: what was
    /// sent behind the failed message gets no answer. If the client's Sync has not been
    /// sent yet, its messages up to that Sync are dropped here instead, as the server
    /// would drop them (`SkipToSync::OnServer`), and the server stays held: it must
    /// get that Sync before it answers anything again.
    fn abandon_group(&mut self) {
        self.copy_in = false;
        // A refused Parse of the unnamed statement leaves none: Postgres drops the old
        // one before parsing the new one.
        let mut unnamed_refused = matches!(self.flight.expect.front(), Some(Expect::Parse));
        let mut abandoned = Vec::new();
        loop {
            let Some(entry) = self.flight.expect.front() else {
                self.skipping = SkipToSync::OnServer;
                self.mid_batch = true;
                break;
            };
            if matches!(entry, Expect::Ready { sync: true, .. }) {
                break;
            }
            match self.flight.expect.pop_front() {
                Some(Expect::ParseNamed { id } | Expect::InjectedParse { id: Some(id) }) => {
                    if let Some(held) = self.server.as_mut() {
                        held.conn.state_mut().prepared.remove(&id);
                    }
                }
                Some(Expect::UndoUnnamed(_)) if unnamed_refused => {
                    unnamed_refused = false;
                    abandoned.push(Expect::UndoUnnamed(None));
                }
                Some(undo @ (Expect::UndoNamed(_) | Expect::UndoUnnamed(_))) => {
                    abandoned.push(undo)
                }
                _ => {}
            }
        }
        self.undo_statement_changes(abandoned);
    }

    fn on_ready(&mut self, status: TxStatus, effects: Vec<SessionEffect>) {
        self.tx_status = status;
        self.copy_in = false;
        self.replays = 0;
        self.info.set_state(if status.is_idle() {
            ClientState::Idle
        } else {
            ClientState::InTransaction
        });
        if let (Some(started), Some(held)) = (self.flight.started.take(), self.server.as_ref()) {
            held.node.stats.latency.observe(started.elapsed());
        }
        self.clock.query_started();
        if !self.flight.expect.is_empty() && self.clock.timeouts.query.get().is_some() {
            // Pipelined requests: the next one runs from now on.
            self.flight.started = Some(Instant::now());
        }
        if status.is_idle() && self.wrote {
            // Learn where this commit put the WAL before the server goes back to the
            // pool; the client already has its answer and is not kept waiting.
            self.wrote = false;
            msg::query(&mut self.server_out, COMMIT_LSN_SQL);
            self.flight.expect.push_back(Expect::CommitLsn);
            self.forget_server_unnamed();
        }
        if !self.group_error {
            self.flight.tx_effects.extend(effects);
        }
        self.group_error = false;
        if status.is_idle() {
            // Portals end with their transaction.
            self.flight.portal_effects.clear();
            let effects = std::mem::take(&mut self.flight.tx_effects);
            if !self.saw_rollback {
                self.apply_effects(&effects);
            }
        }
        self.saw_rollback = false;
        self.release_if_idle();
    }

    /// Transaction pooling: the server goes back to the pool once nothing is in flight.
    fn release_if_idle(&mut self) {
        if self.tx_status.is_idle() && self.flight.expect.is_empty() && !self.is_sticky() {
            self.release();
        }
    }

    /// Records committed SET/RESET effects on both the client and the server it ran on.
    fn apply_effects(&mut self, effects: &[SessionEffect]) {
        if effects.is_empty() {
            return;
        }
        let mut server_settings = self
            .server
            .as_ref()
            .map(|h| h.conn.state().settings.clone());
        for effect in effects {
            match effect {
                SessionEffect::Set { name, value } => {
                    self.settings.set(name, value);
                    if let Some(s) = server_settings.as_mut() {
                        s.set(name, value);
                    }
                }
                SessionEffect::Reset { name } => {
                    match self.startup_settings.get(name).map(str::to_string) {
                        Some(v) => self.settings.set(name, &v),
                        None => self.settings.remove(name),
                    }
                    if let Some(s) = server_settings.as_mut() {
                        s.remove(name);
                    }
                }
                SessionEffect::ResetAll => {
                    self.settings = (*self.startup_settings).clone();
                    if let Some(s) = server_settings.as_mut() {
                        s.clear();
                    }
                }
                SessionEffect::ForgetPrepared | SessionEffect::ForgetClientStatements => {}
            }
        }
        if let (Some(held), Some(s)) = (self.server.as_mut(), server_settings) {
            held.conn.state_mut().settings = s;
        }
    }
}
