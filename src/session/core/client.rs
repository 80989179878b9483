//! The client's side of the core: its messages checked as they arrive (a message the
//! protocol does not allow here ends the session with 08P01), COPY data passed straight
//! to the held server, the rest queued until a unit is complete (`next_unit_len`); and
//! the bytes the client's socket took, which settle what can no longer be replayed.

use super::*;

impl<H: ServerHandle> Core<H> {
    /// `n` bytes of `client_out` reached the client's socket. Once answers to the reads
    /// in flight are among them, those reads can no longer be replayed elsewhere.
    pub(in crate::session) fn client_wrote(&mut self, n: usize) {
        self.clock.client_write_progressed();
        if let Some(replay) = self.flight.replay.as_mut() {
            if n > replay.client_mark {
                self.forget_replay();
            } else {
                replay.client_mark -= n;
            }
        }
        if let Some(reparse) = self.flight.reparse.as_mut() {
            reparse.client_mark = reparse.client_mark.saturating_sub(n);
        }
        consume(&mut self.client_out, n);
    }

    /// Whether a large client message with this tag goes on in pieces rather than
    /// whole: in session pooling every one, in transaction pooling COPY data going
    /// straight to the held server. The core need not look inside those.
    pub(in crate::session) fn streams_client(&self, tag: u8) -> bool {
        self.session_mode()
            || (tag == msg::COPY_DATA && self.flight.pending.is_empty() && self.server.is_some())
    }

    /// A client message, or a piece of a large one (see `streams_client`).
    pub(in crate::session) fn client_piece(&mut self, piece: Piece) -> Result<(), End> {
        let frame = match piece {
            Piece::Frame(frame) => frame,
            Piece::Head { tag, bytes } => {
                if self.session_mode() {
                    self.note_client_message(tag)?;
                }
                self.streamed_in = Streamed::ToServer;
                self.server_out.extend_from_slice(&bytes);
                return Ok(());
            }
            Piece::Body { bytes, last } => {
                // With the server lost meanwhile, the rest goes nowhere, as COPY
                // data with no COPY running does.
                if self.streamed_in == Streamed::ToServer {
                    self.server_out.extend_from_slice(&bytes);
                }
                if last {
                    self.streamed_in = Streamed::No;
                }
                return Ok(());
            }
        };
        if self.session_mode() {
            return self.pass_client_frame(frame);
        }
        if frame.len() != 5
            && matches!(
                frame[0],
                msg::SYNC | msg::FLUSH | msg::COPY_DONE | msg::TERMINATE
            )
        {
            // These carry no body. The server would refuse one that does without
            // the answer the proxy waits for (a Sync's ReadyForQuery), and the
            // session would hang behind it.
            return Err(malformed_message(frame[0]));
        }
        if is_copy_frame(&frame) && self.flight.pending.is_empty() {
            self.forward_copy_frame(&frame);
            return Ok(());
        }
        match frame[0] {
            msg::TERMINATE => return Err(End::ClientGone),
            msg::QUERY
            | msg::PARSE
            | msg::BIND
            | msg::DESCRIBE
            | msg::EXECUTE
            | msg::CLOSE
            | msg::SYNC
            | msg::FLUSH
            | msg::FUNCTION_CALL
            | msg::COPY_DATA
            | msg::COPY_DONE
            | msg::COPY_FAIL => {}
            other => return Err(invalid_message(other)),
        }
        self.flight.pending.push_back(frame);
        Ok(())
    }

    /// COPY FROM STDIN data, CopyDone or CopyFail, with nothing queued before it: it goes
    /// to the held server in order, whether the server's CopyInResponse has arrived or
    /// not (asyncpg sends the data right behind the COPY statement). A server that is
    /// not copying ignores it, as Postgres does with COPY messages outside COPY; with
    /// no server held, no COPY can be running and it is dropped for the same reason.
    pub(super) fn forward_copy_frame(&mut self, frame: &[u8]) {
        if self.server.is_some() {
            self.server_out.extend_from_slice(frame);
            self.note_copy_end(frame[0]);
        }
    }

    /// Marks where the client's CopyDone or CopyFail went, among the answers expected.
    pub(super) fn note_copy_end(&mut self, tag: u8) {
        if matches!(tag, msg::COPY_DONE | msg::COPY_FAIL) && !self.flight.expect.is_empty() {
            self.flight.expect.push_back(Expect::CopyEnd);
        }
    }

    /// Number of pending messages that form the next complete unit.
    pub(in crate::session) fn next_unit_len(&self) -> Option<usize> {
        let end = self.flight.pending.iter().position(|f| {
            matches!(
                f[0],
                msg::SYNC | msg::QUERY | msg::FUNCTION_CALL | msg::FLUSH
            )
        });
        match end {
            Some(i) => Some(i + 1),
            None if self.flight.pending.len() >= PARTIAL_UNIT
                || self.flight.pending.bytes() >= PARTIAL_UNIT_BYTES =>
            {
                Some(self.flight.pending.len())
            }
            None => None,
        }
    }
}
