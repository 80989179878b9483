//! Checking out a server for a session: checkout from the node's pool in route
//! order (replicas by strategy, then the primary), waiting for a primary after failover
//! or for a replica to catch up with the client's writes, and bringing the held
//! server's session state (settings, reset) in line with the client's.

use super::core::ServerHandle;
use super::*;
use crate::pool::ServerState;
use tokio::time::Instant;

thread_local! {
    /// Vectors of the nodes a read may go to, lent to sessions (see `protocol::spare`).
    static SPARE_NODES: spare::SpareVecs<Arc<Node>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Session {
    /// Checks out a server for `route`: reads try the replicas in strategy order, then
    /// the primary, so a replica that is down costs the client nothing.
    pub(super) async fn acquire(
        &mut self,
        route: Route,
        hinted: bool,
        executes: bool,
    ) -> Result<(), BackendError> {
        self.core.follow_reload();
        if route == Route::Replica {
            let min_lsn = self.core.read_floor(hinted);
            let mut nodes = spare::take_vec(&SPARE_NODES);
            self.core
                .project()
                .read_candidates_into(min_lsn, executes, &mut nodes);
            if nodes.is_empty() && min_lsn > 0 {
                if !self.core.project().causal_wait.is_zero()
                    && Box::pin(self.wait_for_replica(min_lsn)).await
                {
                    return Ok(());
                }
                self.core
                    .project()
                    .causal_primary_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // Then the primary, which runs any read.
            let Some(primary) = self.core.project().primary().cloned() else {
                return self.attach_first(nodes).await;
            };
            if nodes.is_empty() {
                spare::give_back_vec(&SPARE_NODES, nodes, 16);
                return self.attach_from(primary).await;
            }
            nodes.push(primary);
            return self.attach_first(nodes).await;
        }
        let paused = self
            .core
            .project()
            .failover
            .writes_paused
            .load(std::sync::atomic::Ordering::SeqCst);
        if paused {
            return self
                .wait_for_primary(BackendError::Timeout("a switchover is in progress".into()))
                .await;
        }
        if let Some(peers) = &self.core.context().peers
            && let Err(reason) = peers.writes_allowed()
        {
            return Box::pin(self.wait_for_primary(BackendError::Timeout(reason))).await;
        }
        let attached = match self.core.project().primary().cloned() {
            Some(node) => self.attach_from(node).await,
            None => Err(BackendError::Timeout(
                "the project has no primary now".into(),
            )),
        };
        match attached {
            Err(e) => Box::pin(self.wait_for_primary(e)).await,
            ok => ok,
        }
    }

    /// A write found no primary (it is down, or a failover or switchover is running):
    /// wait up to `write_wait_ms` for one instead of failing at once.
    async fn wait_for_primary(&mut self, first: BackendError) -> Result<(), BackendError> {
        let failover = &self.core.project().failover;
        let wait = failover.settings.write_wait;
        let deadline = Instant::now() + wait;
        info!(project = %self.core.project().name, "no primary available ({first}); the write waits up to {} ms for one", wait.as_millis());
        let mut last = first;
        loop {
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout(format!(
                    "no primary after waiting {} ms ({last}); failover: {}",
                    wait.as_millis(),
                    failover.status().state
                )));
            }
            tokio::time::sleep(WRITE_WAIT_POLL).await;
            if failover
                .writes_paused
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                continue;
            }
            if let Some(peers) = &self.core.context().peers
                && let Err(reason) = peers.writes_allowed()
            {
                last = BackendError::Timeout(reason);
                continue;
            }
            let Some(primary) = self.core.project().primary().cloned() else {
                continue;
            };
            match primary.checkout(self.core.user()).await {
                Ok(conn) => {
                    self.core.attach(primary, conn);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
    }

    /// Read-your-writes with `causal_wait_ms`: no replica is known to have replayed the
    /// client's last commit, so ask the freshest one directly until it has, or until
    /// the wait is over. True if a caught-up replica is now attached.
    async fn wait_for_replica(&mut self, min_lsn: u64) -> bool {
        let Some(node) = self
            .core
            .project()
            .read_candidates(0, false)
            .into_iter()
            .max_by_key(|n| n.health.lsn())
        else {
            return false;
        };
        let deadline = Instant::now() + self.core.project().causal_wait;
        let Ok(mut conn) = node.checkout(self.core.user()).await else {
            return false;
        };
        loop {
            let replayed = match conn.query_value("SELECT pg_last_wal_replay_lsn()").await {
                Ok(Some(text)) => health::parse_lsn(&text).unwrap_or(0),
                _ => return false,
            };
            node.health.advance_lsn(replayed);
            if replayed >= min_lsn {
                self.core.attach(node, conn);
                return true;
            }
            if Instant::now() + CAUSAL_POLL > deadline {
                return false;
            }
            tokio::time::sleep(CAUSAL_POLL).await;
        }
    }

    /// Attaches a server from the first of `nodes` that yields one.
    /// The vector is kept for the next read (see `SPARE_NODES`).
    pub(super) async fn attach_first(
        &mut self,
        mut nodes: Vec<Arc<Node>>,
    ) -> Result<(), BackendError> {
        // The last node's outcome; none when there was no node to try.
        let mut result = None;
        for node in nodes.drain(..) {
            let attached = self.attach_from(node).await;
            let done = attached.is_ok();
            result = Some(attached);
            if done {
                break;
            }
        }
        spare::give_back_vec(&SPARE_NODES, nodes, 16);
        result.unwrap_or_else(|| Err(BackendError::Timeout("no node available".into())))
    }

    async fn attach_from(&mut self, node: Arc<Node>) -> Result<(), BackendError> {
        match node.checkout(self.core.user()).await {
            Ok(conn) => {
                self.core.attach(node, conn);
                Ok(())
            }
            Err(e) => {
                warn!(node = %node.name, project = %self.core.project().name, "cannot get a server connection: {e}");
                Err(e)
            }
        }
    }
}

/// A pooled connection is the server handle of a running session.
impl ServerHandle for Pooled {
    fn state(&self) -> &ServerState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut ServerState {
        &mut self.state
    }

    fn before_release(&mut self, node: &Node) {
        if self.reader.buffered() > 0 {
            // Unread bytes mean the proxy lost track of this connection's state.
            warn!(node = %node.name, buffered = ?&self.reader.peek_buffered()[..self.reader.buffered().min(40)], "server connection had unexpected data; discarding it");
            self.state.broken = true;
        }
    }
}
