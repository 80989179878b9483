//! Session pooling: the client has its server for its whole session, so the proxy
//! forwards every message both ways unchanged, as if the client were connected
//! directly. Statement names stay the client's, the client's key carries its server's
//! real process id, and when that server ends the session (a FATAL error, a crash) the
//! client's connection ends with it. The proxy only watches ReadyForQuery (the
//! transaction status, and whether a request is in flight) and ParameterStatus.

use super::*;

impl<H: ServerHandle> Core<H> {
    /// A client message in session mode: straight on to the server, which judges it.
    pub(super) fn pass_client_frame(&mut self, frame: BytesMut) -> Result<(), End> {
        self.note_client_message(frame[0])?;
        self.server_out.extend_from_slice(&frame);
        Ok(())
    }

    /// What the proxy notes of a client message in session mode, from its tag alone
    /// (a large one is passed on in pieces).
    pub(super) fn note_client_message(&mut self, tag: u8) -> Result<(), End> {
        let Pooling::Session(passthrough) = &mut self.pooling else {
            return Ok(());
        };
        if !passthrough.cancel_armed
            && let Some(held) = self.server.as_ref()
        {
            let state = held.conn.state();
            self.cancel_slot.set(&state.addr, state.pid, state.secret);
            passthrough.cancel_armed = true;
        }
        match tag {
            msg::TERMINATE => return Err(End::ClientGone),
            msg::SYNC | msg::QUERY | msg::FUNCTION_CALL => passthrough.awaiting_ready += 1,
            _ => {}
        }
        if matches!(tag, msg::QUERY | msg::EXECUTE) {
            self.info.count_statement();
            if self.flight.started.is_none() {
                self.flight.started = Some(Instant::now());
                self.clock.query_started();
            }
            self.info.set_state(ClientState::Active);
        }
        Ok(())
    }

    /// A server message in session mode (or a piece of a large one): straight on to
    /// the client.
    pub(super) fn pass_server_piece(&mut self, piece: Piece) {
        match piece {
            Piece::Frame(frame) => self.pass_server_frame(&frame),
            Piece::Head { bytes, .. } | Piece::Body { bytes, .. } => {
                // A large row or COPY data, passed on as it arrives.
                self.client_out.extend_from_slice(&bytes);
            }
        }
    }

    /// One whole server frame in session pooling.
    pub(super) fn pass_server_frame(&mut self, frame: &[u8]) {
        let (Some(held), Pooling::Session(passthrough)) = (self.server.as_mut(), &mut self.pooling)
        else {
            return;
        };
        match Backend::decode(frame) {
            Backend::ReadyForQuery(status) => {
                self.tx_status = status;
                passthrough.awaiting_ready = passthrough.awaiting_ready.saturating_sub(1);
                if let Some(started) = self.flight.started.take() {
                    held.node.stats.latency.observe(started.elapsed());
                }
                self.clock.query_started();
                if passthrough.awaiting_ready > 0 && self.clock.timeouts.query.get().is_some() {
                    // Pipelined requests: the next one runs from now on.
                    self.flight.started = Some(Instant::now());
                }
                self.info.set_state(if self.tx_status.is_idle() {
                    ClientState::Idle
                } else {
                    ClientState::InTransaction
                });
                if passthrough.awaiting_ready == 0 {
                    // Nothing runs: a cancel request arriving now has nothing to
                    // cancel, as on the server itself. Forwarded, a late one (it
                    // takes a detour through the proxy) could hit the client's
                    // next statement instead.
                    self.cancel_slot.clear();
                    passthrough.cancel_armed = false;
                }
            }
            Backend::ParameterStatus { name, value } => {
                held.conn.state_mut().set_parameter(name, value)
            }
            Backend::Other(msg::COPY_IN_RESPONSE) => self.copy_in = true,
            Backend::CommandComplete { .. } => self.copy_in = false,
            Backend::Error(report) => {
                self.copy_in = false;
                if report.is_fatal() {
                    // The server ends the session; the client learns it from the
                    // server's own words, then from the closed connection.
                    held.conn.state_mut().broken = true;
                    info!(node = %held.node.name, user = %self.user.name, "server ended the session: {report}");
                }
            }
            _ => {}
        }
        self.client_out.extend_from_slice(frame);
    }

    /// Nothing is in flight on the session's server: no request unanswered, no COPY.
    pub(in crate::session) fn passthrough_idle(&self) -> bool {
        self.awaiting_ready() == 0 && self.tx_status.is_idle() && !self.copy_in
    }

    /// Session pooling: requests forwarded and not answered yet (0 otherwise).
    pub(super) fn awaiting_ready(&self) -> usize {
        match self.pooling {
            Pooling::Session(passthrough) => passthrough.awaiting_ready,
            Pooling::Transaction => 0,
        }
    }
}
