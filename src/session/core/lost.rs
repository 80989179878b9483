//! A server that fails under a session: a message nothing asked for, a closed or broken
//! connection. Reads nobody has seen an answer to are replayed elsewhere; outside a
//! transaction the client gets an error per request in flight and carries on; inside
//! one (or pinned, or in session pooling) it is disconnected with the reason.

use super::*;

impl<H: ServerHandle> Core<H> {
    /// A server message nothing was waiting for: typically a FATAL before shutdown.
    pub(super) fn unsolicited(&mut self, frame: &[u8]) -> Result<(), End> {
        let node = self
            .server
            .as_ref()
            .map(|h| h.node.name.clone())
            .unwrap_or_default();
        if let Backend::Error(report) = Backend::decode(frame) {
            warn!(%node, "server sent an error outside any request: {report}");
            if let Some(held) = self.server.as_mut() {
                held.conn.state_mut().broken = true;
            }
            if self.is_sticky() {
                self.client_out.extend_from_slice(frame);
                return Err(End::fatal("08006", "server connection lost"));
            }
            self.release();
            return Ok(());
        }
        warn!(%node, tag = %crate::protocol::framing::printable_tag(frame[0]), "unexpected server message; dropping the server connection");
        if let Some(held) = self.server.as_mut() {
            held.conn.state_mut().broken = true;
        }
        self.release();
        Ok(())
    }

    /// The server connection failed. Outside a transaction the client gets an error for
    /// each request in flight and carries on; inside one the transaction cannot be
    /// finished safely, so the client is disconnected with a clear message.
    pub(in crate::session) fn server_lost(&mut self, reason: &str) -> Result<(), End> {
        let mid_frame = std::mem::replace(&mut self.streamed, Streamed::No) == Streamed::ToClient;
        if mid_frame && self.flight.replay.is_none() {
            // Part of a message is on its way to the client: nothing else can follow
            // it, so the client's connection ends with the server's.
            if let Some(held) = self.server.as_mut() {
                held.conn.state_mut().broken = true;
                held.node.mark_down();
            }
            return Err(End::ServerGone(format!(
                "{reason} (in the middle of a message to the client)"
            )));
        }
        if self.session_mode() {
            // The client's session lived on that server: it ends with it, as it would
            // on a direct connection, rather than moving on to another server.
            if let Some(held) = self.server.as_mut() {
                held.conn.state_mut().broken = true;
            }
            return Err(End::ServerGone(reason.to_string()));
        }
        let node = self.server.as_ref().map(|h| h.node.clone());
        if let Some(held) = self.server.as_mut() {
            held.conn.state_mut().broken = true;
            held.node.mark_down();
        }
        self.flight.deallocated_in_stretch = None;
        self.release();
        let node_name = node.as_ref().map(|n| n.name.as_str()).unwrap_or("?");
        self.flight.started = None;
        if let Some(replay) = self.flight.replay.take() {
            let Replay {
                frames: unit,
                client_mark,
                mut settled,
            } = replay;
            // What the failed server had answered never left the proxy; take it back.
            self.client_out.truncate(client_mark);
            // A read its server never answered: the client sees nothing of this, the
            // read runs again on another node (this one is now marked down).
            info!(node = node_name, user = %self.user.name, "server failed before answering a read ({reason}); running it elsewhere");
            self.replays += 1;
            // The unit is processed again from its first message: everything it
            // changed is undone, answered or not.
            settled.extend(self.flight.expect.take_all());
            self.undo_statement_changes(settled);
            self.mid_batch = false;
            self.copy_in = false;
            self.group_error = false;
            self.flight.group_effects.clear();
            self.flight.pending.put_back(unit);
            return Ok(());
        }
        warn!(node = node_name, user = %self.user.name, "server connection lost: {reason}");
        if !self.tx_status.is_idle() || self.pinned.is_some() || self.session_mode() {
            return Err(End::fatal(
                "08006",
                format!(
                    "connection to server \"{node_name}\" was lost: {reason}; the transaction or session state on it is gone"
                ),
            ));
        }
        let message = format!(
            "connection to server \"{node_name}\" was lost while running the statement: {reason}"
        );
        let mut answered = false;
        while let Some(entry) = self.flight.expect.pop_front() {
            if let Expect::Ready { .. } | Expect::FunctionCall = entry {
                // The request in progress may already have its error (the server's FATAL).
                if answered || !self.group_error {
                    msg::error_response(&mut self.client_out, "ERROR", "08006", &message);
                }
                msg::ready_for_query(&mut self.client_out, TxStatus::Idle);
                answered = true;
            }
        }
        if self.mid_batch || !answered {
            msg::error_response(&mut self.client_out, "ERROR", "08006", &message);
        }
        // The server's skip to Sync died with it; a batch the client has not finished
        // is skipped here instead.
        self.skipping = if self.mid_batch {
            SkipToSync::Here
        } else {
            SkipToSync::No
        };
        self.copy_in = false;
        self.mid_batch = false;
        self.group_error = false;
        self.flight.group_effects.clear();
        self.flight.tx_effects.clear();
        Ok(())
    }
}
