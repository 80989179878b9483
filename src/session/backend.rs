//! Checking out a server for a session: checkout from the node's pool in route
//! order (replicas by strategy, then the primary), waiting for a primary after failover
//! or for a replica to catch up with the client's writes, and bringing the held
//! server's session state (settings, reset) in line with the client's.

use super::core::{Checkout, Planned, ServerHandle};
use super::*;
use crate::cluster::NodeCheckout;
use crate::pool::ServerState;
use tokio::time::Instant;

thread_local! {
    /// Vectors of the nodes a read may go to, lent to sessions (see `protocol::spare`).
    static SPARE_NODES: spare::SpareVecs<Arc<Node>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// Boxes of checkouts that may wait, lent to sessions (see `protocol::spare`). With
    /// more clients than pooled connections every checkout waits, and hundreds of
    /// sessions hold one at once: more than the allocator's per-thread cache keeps, so
    /// a fresh box each time took its slow path on both ends.
    #[allow(clippy::vec_box)]
    static SPARE_WAITS: std::cell::RefCell<Vec<Box<Waiting>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A unit whose checkout may wait, and that checkout: the nodes to try in order, and
/// the checkout from the current one. Polled by the session's task in place of a
/// boxed future (see `Session::send_after_wait`).
pub(super) struct Waiting {
    /// None for a checkout of the login (`attach_first`).
    planned: Option<Planned>,
    nodes: Vec<Arc<Node>>,
    /// The node that `checkout` is from.
    current: usize,
    checkout: Option<NodeCheckout>,
    /// The last node's failure. (Boxed: it is rare, and large.)
    last_error: Option<Box<BackendError>>,
}

impl Waiting {
    /// A box from the thread's spares, or a new one.
    pub(super) fn lend(
        planned: Option<Planned>,
        nodes: Vec<Arc<Node>>,
        begun: Option<NodeCheckout>,
    ) -> Box<Waiting> {
        let fill = |waiting: &mut Waiting| {
            waiting.planned = planned;
            waiting.nodes = nodes;
            waiting.current = 0;
            waiting.checkout = begun;
            waiting.last_error = None;
        };
        let spare = SPARE_WAITS
            .try_with(|spares| spares.borrow_mut().pop())
            .ok()
            .flatten();
        match spare {
            Some(mut waiting) => {
                fill(&mut waiting);
                waiting
            }
            None => {
                let mut waiting = Box::new(Waiting {
                    planned: None,
                    nodes: Vec::new(),
                    current: 0,
                    checkout: None,
                    last_error: None,
                });
                fill(&mut waiting);
                waiting
            }
        }
    }

    /// Why the checkout failed: the last node's failure, or that there was none.
    fn take_error(&mut self) -> BackendError {
        match self.last_error.take() {
            Some(e) => *e,
            None => BackendError::Timeout("no node available".into()),
        }
    }

    /// Empties the box and keeps it for the next checkout that waits; its vector of
    /// nodes goes back to theirs.
    fn give_back(mut self: Box<Self>) {
        const KEPT: usize = 64;
        spare::give_back_vec(&SPARE_NODES, std::mem::take(&mut self.nodes), 16);
        self.checkout = None;
        self.last_error = None;
        self.planned = None;
        let _ = SPARE_WAITS.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < KEPT {
                spares.push(self);
            }
        });
    }
}

/// Where a checkout goes: the nodes to try, or a wait first.
pub(super) enum Candidates {
    /// The nodes in order, and the checkout already begun from the first of them.
    Nodes(Vec<Arc<Node>>, Option<NodeCheckout>),
    Wait(Wait),
}

/// A wait that comes before a checkout (the rare paths, boxed apart).
pub(super) enum Wait {
    /// A read after the client's write (`causal_wait_ms`): no replica is known to
    /// have replayed it; ask one until it has.
    CaughtUpReplica(u64),
    /// A write with no primary to go to now.
    ForPrimary(BackendError),
}

impl Session {
    /// Attaches an idle connection of the first node to try, if it has one: the
    /// checkout that needs no waiting is done here, without a `Waiting` box (with
    /// fewer clients than pooled connections, every checkout). The candidates come
    /// back otherwise.
    /// (The checkout begun here goes on in `send_after_wait`: the pool is looked up
    /// once.)
    pub(super) fn attach_idle(&mut self, candidates: Candidates) -> Result<(), Candidates> {
        let Candidates::Nodes(mut nodes, None) = candidates else {
            return Err(candidates);
        };
        let Some(first) = nodes.first() else {
            return Err(Candidates::Nodes(nodes, None));
        };
        let mut checkout = first.checkout(self.core.user());
        let Some(conn) = checkout.now() else {
            return Err(Candidates::Nodes(nodes, Some(checkout)));
        };
        let node = first.clone();
        self.core.attach(node, conn);
        nodes.clear();
        spare::give_back_vec(&SPARE_NODES, nodes, 16);
        Ok(())
    }

    /// Sends a unit whose checkout may wait once a server is attached, or answers it
    /// with the reason there is none. The session's task keeps only the box across
    /// the wait (nothing larger: every client's task is as large as what it keeps
    /// across its largest wait); a write that finds no primary waits for one.
    pub(super) async fn send_after_wait(&mut self, mut waiting: Box<Waiting>) -> Result<(), End> {
        let mut attached = std::future::poll_fn(|cx| self.poll_waiting(&mut waiting, cx)).await;
        let route = |w: &Waiting| w.planned.as_ref().map(|p| p.checkout().route);
        if !attached && route(&waiting) != Some(Route::Replica) {
            // A write waits for a primary (after a failover, one may come).
            let first = waiting.take_error();
            if let Err(e) = Box::pin(self.wait_for_primary(first)).await {
                waiting.last_error = Some(Box::new(e));
            } else {
                attached = true;
            }
        }
        let planned = waiting.planned.take();
        let failed = (!attached).then(|| waiting.take_error());
        waiting.give_back();
        let Some(planned) = planned else {
            return Ok(());
        };
        match failed {
            None => self.core.send_unit(planned),
            Some(e) => {
                self.core.checkout_failed(planned, &e);
                Ok(())
            }
        }
    }

    /// Checks out from the waiting unit's nodes in order and attaches the first server
    /// that comes. False if none does (the last failure is kept in the box).
    fn poll_waiting(
        &mut self,
        waiting: &mut Waiting,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<bool> {
        loop {
            let Some(node) = waiting.nodes.get(waiting.current) else {
                return Poll::Ready(false);
            };
            let checkout = waiting
                .checkout
                .get_or_insert_with(|| node.checkout(self.core.user()));
            let result = std::task::ready!(std::pin::Pin::new(checkout).poll(cx));
            waiting.checkout = None;
            match result {
                Ok(conn) => {
                    self.core.attach(node.clone(), conn);
                    return Poll::Ready(true);
                }
                Err(e) => {
                    warn!(node = %node.name, project = %self.core.project().name, "cannot get a server connection: {e}");
                    waiting.last_error = Some(Box::new(e));
                    waiting.current += 1;
                }
            }
        }
    }

    /// A read that waits for a replica to catch up, or a write that waits for a
    /// primary.
    pub(super) async fn acquire_after(&mut self, wait: Wait) -> Result<(), BackendError> {
        match wait {
            Wait::CaughtUpReplica(min_lsn) => {
                if self.wait_for_replica(min_lsn).await {
                    return Ok(());
                }
                // No replica caught up in time: the primary has the write.
                let project = self.core.project();
                project
                    .causal_primary_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut nodes = spare::take_vec(&SPARE_NODES);
                nodes.extend(project.primary().cloned());
                self.attach_first(nodes, None).await
            }
            Wait::ForPrimary(first) => self.wait_for_primary(first).await,
        }
    }

    /// The nodes to try, in order (a vector from `SPARE_NODES`), or the wait that
    /// must come first: reads try the replicas in strategy order, then the primary, so
    /// a replica that is down costs the client nothing.
    pub(super) fn candidates(&mut self, checkout: Checkout) -> Candidates {
        let Checkout {
            route,
            hinted,
            executes,
        } = checkout;
        self.core.follow_reload();
        let mut nodes = spare::take_vec(&SPARE_NODES);
        let project = self.core.project();
        if route == Route::Replica {
            let min_lsn = self.core.read_floor(hinted);
            project.read_candidates_into(min_lsn, executes, &mut nodes);
            if nodes.is_empty() && min_lsn > 0 {
                if !project.causal_wait.is_zero() {
                    spare::give_back_vec(&SPARE_NODES, nodes, 16);
                    return Candidates::Wait(Wait::CaughtUpReplica(min_lsn));
                }
                project
                    .causal_primary_reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // Then the primary, which runs any read.
            if let Some(primary) = project.primary() {
                nodes.push(primary.clone());
            }
            return Candidates::Nodes(nodes, None);
        }
        let paused = project
            .failover
            .writes_paused
            .load(std::sync::atomic::Ordering::SeqCst);
        let blocked = if paused {
            Some(BackendError::Timeout("a switchover is in progress".into()))
        } else if let Some(peers) = &self.core.context().peers
            && let Err(reason) = peers.writes_allowed()
        {
            Some(BackendError::Timeout(reason))
        } else if let Some(primary) = project.primary() {
            nodes.push(primary.clone());
            None
        } else {
            Some(BackendError::Timeout(
                "the project has no primary now".into(),
            ))
        };
        match blocked {
            Some(first) => {
                spare::give_back_vec(&SPARE_NODES, nodes, 16);
                Candidates::Wait(Wait::ForPrimary(first))
            }
            None => Candidates::Nodes(nodes, None),
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

    /// Attaches a server from the first of `nodes` that yields one; `begun` is the
    /// checkout from the first already under way, if any.
    /// The vector is kept for the next read (see `SPARE_NODES`).
    pub(super) async fn attach_first(
        &mut self,
        nodes: Vec<Arc<Node>>,
        begun: Option<NodeCheckout>,
    ) -> Result<(), BackendError> {
        let mut waiting = Waiting::lend(None, nodes, begun);
        let attached = std::future::poll_fn(|cx| self.poll_waiting(&mut waiting, cx)).await;
        let result = if attached {
            Ok(())
        } else {
            Err(waiting.take_error())
        };
        waiting.give_back();
        result
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
