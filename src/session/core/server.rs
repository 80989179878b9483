//! The held server: attached when the shell checked it out for the core, released
//! when the core no longer needs it (its handle dropped, back to its pool), its
//! session state brought in line with the client's before each use, and handed back
//! whole or for recovery when the session ends.

use super::*;

impl<H: ServerHandle> Core<H> {
    pub(in crate::session) fn attach(&mut self, node: Arc<Node>, conn: H) {
        let state = conn.state();
        self.cancel_slot.set(&state.addr, state.pid, state.secret);
        self.server = Some(Held { node, conn });
    }

    pub(in crate::session) fn release(&mut self) {
        self.flight.reparse = None;
        if self.streamed_in == Streamed::ToServer {
            // The rest of a large client message was for this server only.
            self.streamed_in = Streamed::Dropped;
        }
        if let Some(mut held) = self.server.take() {
            held.conn.before_release(&held.node);
            self.cancel_slot.clear();
        }
    }

    /// Queues what brings the held server's session state in line with this client's;
    /// the answers are swallowed.
    pub(in crate::session) fn prepare_server(&mut self) {
        let sql = self.sync_sql();
        if !sql.is_empty() {
            msg::query(&mut self.server_out, &sql);
            self.flight.expect.push_back(Expect::Injected);
            self.forget_server_unnamed();
        }
    }

    /// SQL that brings the held server's session state in line with this client's.
    pub(super) fn sync_sql(&mut self) -> String {
        let Some(held) = self.server.as_mut() else {
            return String::new();
        };
        let conn = held.conn.state_mut();
        let mut sql = String::new();
        if conn.needs_reset {
            // DISCARD ALL refuses to run inside the implicit transaction of a
            // multi-statement query, so it goes alone.
            msg::query(&mut self.server_out, "DISCARD ALL");
            self.flight.expect.push_back(Expect::Injected);
            conn.settings.clear();
            conn.prepared.clear();
            conn.unnamed = None;
            conn.needs_reset = false;
        }
        if conn.prepared.len() > MAX_PREPARED_PER_SERVER {
            sql.push_str("DEALLOCATE ALL;");
            conn.prepared.clear();
        }
        if conn.settings.same_as(&self.settings) {
            // Compared as pointers from now on (see `protocol::settings`).
            conn.settings.share_with(&mut self.settings);
        } else {
            sql.push_str(&conn.settings.transition_sql(&self.settings));
            conn.settings = self.settings.clone();
        }
        sql
    }

    /// The session ends: what to do with the server it holds, if any.
    pub(in crate::session) fn leave_server(&mut self) -> Option<Leaving<H>> {
        let held = self.server.take()?;
        self.cancel_slot.clear();
        let mut conn = held.conn;
        let busy = !self.flight.expect.is_empty()
            || !self.tx_status.is_idle()
            || self.copy_in
            || self.mid_batch
            || (self.session_mode() && !self.passthrough_idle());
        if busy && !conn.state().broken {
            return Some(Leaving::Recover {
                conn,
                unsent: std::mem::take(&mut self.server_out),
                in_flight: !self.flight.expect.is_empty()
                    || self.awaiting_ready() > 0
                    || self.copy_in,
            });
        }
        if self.pinned.is_some() || self.session_mode() {
            conn.state_mut().needs_reset = true;
        }
        Some(Leaving::Release(conn))
    }
}
