//! What the shell sees of the core. The core keeps its state to itself; the shell gets
//! the bytes each side waits for with the held connection to write them on (`io`),
//! says how much a socket took, asks whether to read each side (backpressure), and
//! learns when the session's timeouts fall due and which one ran out.

use super::*;
use crate::session::timeouts::Expired;

/// Client messages read ahead of the server before the shell stops reading the client
/// (backpressure), in messages and in bytes.
const MAX_PENDING: usize = 4096;
const MAX_PENDING_BYTES: usize = 1024 * 1024;
/// Bytes waiting for a slow client beyond which the server is not read (see
/// `SERVER_OUT_LIMIT` for the other direction).
const CLIENT_OUT_LIMIT: usize = 256 * 1024;

/// The core's output and its held connection, lent to the shell for one pass of I/O.
pub(in crate::session) struct Io<'a, H> {
    /// The held server, if any.
    pub server: Option<&'a mut H>,
    /// Bytes waiting for the server (nothing is held: dropped by `write_ready`).
    pub server_out: &'a [u8],
    /// Bytes waiting for the client.
    pub client_out: &'a [u8],
}

impl<H: ServerHandle> Core<H> {
    pub(in crate::session) fn context(&self) -> &Arc<Context> {
        &self.shared
    }

    pub(in crate::session) fn user(&self) -> &Arc<UserEntry> {
        &self.user
    }

    pub(in crate::session) fn project(&self) -> &Arc<Project> {
        &self.project
    }

    /// This client's entry behind SHOW CLIENTS, which also carries the notices the
    /// proxy sends it (a shutdown, a reload).
    pub(in crate::session) fn info(&self) -> &ClientInfo {
        &self.info
    }

    /// The held server, lent for reading its answers or cancelling its query.
    pub(in crate::session) fn held_mut(&mut self) -> Option<&mut Held<H>> {
        self.server.as_mut()
    }

    pub(in crate::session) fn holds_server(&self) -> bool {
        self.server.is_some()
    }

    pub(in crate::session) fn io(&mut self) -> Io<'_, H> {
        Io {
            server: self.server.as_mut().map(|held| &mut held.conn),
            server_out: &self.server_out,
            client_out: &self.client_out,
        }
    }

    /// `n` bytes of `server_out` reached the server's socket.
    pub(in crate::session) fn server_wrote(&mut self, n: usize) {
        consume(&mut self.server_out, n);
    }

    /// A write to the server failed: what waited for it is dropped and the server is
    /// lost.
    pub(in crate::session) fn server_write_failed(&mut self, reason: &str) -> Result<(), End> {
        self.server_out.clear();
        self.server_lost(reason)
    }

    /// Bytes wait for a server that is no longer held (it was given back or lost
    /// after they were queued): they go nowhere.
    pub(in crate::session) fn drop_orphan_output(&mut self) {
        if self.server.is_none() {
            self.server_out.clear();
        }
    }

    pub(in crate::session) fn has_pending(&self) -> bool {
        !self.flight.pending.is_empty()
    }

    /// Whether to read more from the client: what it sent ahead and what waits for
    /// the server are within their bounds.
    pub(in crate::session) fn reads_client(&self) -> bool {
        self.flight.pending.len() < MAX_PENDING
            && self.flight.pending.bytes() < MAX_PENDING_BYTES
            && self.server_out.len() < SERVER_OUT_LIMIT
    }

    /// Whether to read more from the server: what waits for the client is within its
    /// bound.
    pub(in crate::session) fn reads_server(&self) -> bool {
        self.client_out.len() < CLIENT_OUT_LIMIT
    }

    /// Before the shell waits: the session's phase goes to its clock (a request that
    /// begins runs under the timeouts of the latest reload), an idle session lends its
    /// buffers back, and bytes the client's socket did not take start the write
    /// timeout. Returns the phase.
    pub(in crate::session) fn before_wait(&mut self) -> Phase {
        let phase = self.phase();
        if phase == Phase::Idle {
            self.park_buffers();
        } else if self.clock.phase() == Phase::Idle {
            self.refresh_timeouts();
        }
        self.clock.set_phase(phase);
        if !self.client_out.is_empty() {
            self.clock.client_write_waiting();
        }
        phase
    }

    /// A notice came (a reload, a shutdown): a reload's timeouts apply from now on.
    /// True if the proxy's shutdown asks this client to leave at once.
    pub(in crate::session) fn take_notice(&mut self) -> bool {
        self.info.take_notice();
        if self.info.take_reconfigured() {
            self.refresh_timeouts();
        }
        self.info.terminate_requested()
    }

    /// When the next timeout could run out (None: none is running).
    pub(in crate::session) fn deadline(&self) -> Option<Instant> {
        self.clock.deadline(self.flight.started)
    }

    /// The session's timer fired: the timeout that really ran out, if one did. A
    /// query past query_timeout_ms is cancelled once (the shell sends the cancel).
    pub(in crate::session) fn timer_fired(&mut self) -> Option<Expired> {
        let expired = self.clock.expired(self.flight.started)?;
        if matches!(expired, Expired::Query(_)) {
            self.clock.query_cancel_sent();
        }
        Some(expired)
    }

    /// The session ends with a FATAL error: it is the last thing the client is sent.
    pub(in crate::session) fn say_fatal(&mut self, code: &str, message: &str) {
        msg::error_response(&mut self.client_out, "FATAL", code, message);
    }

    /// The bytes waiting for the client (at the end, its last words).
    pub(in crate::session) fn client_out(&self) -> &[u8] {
        &self.client_out
    }

    /// After a reload, moves to the project's new topology (its old one keeps serving
    /// only what is already in flight). A removed project keeps its old topology for
    /// the clients still connected to it.
    pub(in crate::session) fn follow_reload(&mut self) {
        if !self
            .project
            .retired
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let topology = self.shared.topology.load();
        if let Some(project) = topology.projects.get(&self.project.name) {
            self.project = project.clone();
            self.ryw = project.read_your_writes_applies(self.session_mode());
        }
    }

    /// How far a replica must have replayed to serve this client's reads (0: any). A
    /// read hinted to a replica is the user's choice over read-your-writes.
    pub(in crate::session) fn read_floor(&self, hinted: bool) -> u64 {
        if self.ryw && !hinted { self.min_lsn } else { 0 }
    }
}
