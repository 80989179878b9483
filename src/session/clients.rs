//! Who is connected: one entry per client session, for `SHOW CLIENTS` and `/status`.
//! Sessions update their own entry with relaxed atomic stores (no locks on the data
//! path); the registry's lock is taken only when a client connects or leaves.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::task::AtomicWaker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    Idle = 0,
    Active = 1,
    InTransaction = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Active => "active",
            ClientState::InTransaction => "idle in transaction",
        }
    }
}

/// (In declaration order, the two fields a session writes on every transaction
/// first: they share a cache line, which is cold by the time a busy client's next
/// transaction comes.)
#[repr(C)]
pub struct ClientInfo {
    state: AtomicU8,
    statements: AtomicU64,
    pub id: u64,
    pub user: Arc<str>,
    pub project: Arc<str>,
    pub peer: SocketAddr,
    pub connected_at: SystemTime,
    pinned: OnceLock<&'static str>,
    /// Set when the proxy shuts down; the session leaves between transactions.
    stop: AtomicBool,
    /// Set by a reload: the session takes up the new timeouts.
    reconfigured: AtomicBool,
    /// Set when the shutdown's grace period is over: the session ends now.
    terminate: AtomicBool,
    /// One of the above was raised and the session has not looked yet.
    notice: AtomicBool,
    stop_waker: AtomicWaker,
}

impl ClientInfo {
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Active,
            2 => ClientState::InTransaction,
            _ => ClientState::Idle,
        }
    }

    pub fn set_state(&self, state: ClientState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Counts a statement sent. Only the session writes its count: a plain store,
    /// not a locked read-modify-write.
    pub fn count_statement(&self) {
        let n = self.statements.load(Ordering::Relaxed);
        self.statements.store(n + 1, Ordering::Relaxed);
    }

    pub fn pinned(&self) -> Option<&'static str> {
        self.pinned.get().copied()
    }

    pub fn set_pinned(&self, reason: &'static str) {
        let _ = self.pinned.set(reason);
    }

    /// Asks the session to leave at its next moment between transactions.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.raise_notice();
    }

    /// Asks the session to end now, in a transaction or not.
    pub fn request_terminate(&self) {
        self.terminate.store(true, Ordering::Release);
        self.raise_notice();
    }

    pub fn terminate_requested(&self) -> bool {
        self.terminate.load(Ordering::Acquire)
    }

    fn raise_notice(&self) {
        self.notice.store(true, Ordering::Release);
        self.stop_waker.wake();
    }

    /// Whether something was raised since the last call (the session then looks at
    /// the flags).
    pub fn take_notice(&self) -> bool {
        self.notice.swap(false, Ordering::AcqRel)
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Tells the session that a reload changed the config.
    pub fn notify_reconfigured(&self) {
        self.reconfigured.store(true, Ordering::Release);
        self.raise_notice();
    }

    /// Whether a reload happened since the last call.
    pub fn take_reconfigured(&self) -> bool {
        self.reconfigured.swap(false, Ordering::AcqRel)
    }

    fn has_notice(&self) -> bool {
        self.notice.load(Ordering::Acquire)
    }

    /// Ready once a stop, a reload or a termination was raised and not yet taken
    /// (`take_notice`). Polled by the session on every pass of its loop: flags and a
    /// waker slot, where a broadcast channel would take a lock. The waker is
    /// registered when `registered` is false only: a task's waker stays the same for
    /// its whole life, and a wake uses the registration up (the session then clears
    /// `registered`).
    pub fn poll_notice(&self, cx: &mut Context<'_>, registered: &mut bool) -> Poll<()> {
        if self.has_notice() {
            return Poll::Ready(());
        }
        if !*registered {
            self.stop_waker.register(cx.waker());
            *registered = true;
        }
        if self.has_notice() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    next_id: AtomicU64,
    clients: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
    /// User and project names, one copy each for all the clients that bear them.
    names: Mutex<std::collections::HashSet<Arc<str>>>,
}

impl ClientRegistry {
    pub fn register(&self, user: &str, project: &str, peer: SocketAddr) -> Arc<ClientInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            user: self.name(user),
            project: self.name(project),
            peer,
            connected_at: SystemTime::now(),
            state: AtomicU8::new(ClientState::Idle as u8),
            statements: AtomicU64::new(0),
            pinned: OnceLock::new(),
            stop: AtomicBool::new(false),
            reconfigured: AtomicBool::new(false),
            terminate: AtomicBool::new(false),
            notice: AtomicBool::new(false),
            stop_waker: AtomicWaker::new(),
        });
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(id, info.clone());
        }
        info
    }

    /// The shared copy of a name.
    fn name(&self, name: &str) -> Arc<str> {
        // Names come from logins that succeeded (configured users, or users `[auth]
        // query` found): few, but kept bounded all the same.
        const MAX_NAMES: usize = 10_000;
        let Ok(mut names) = self.names.lock() else {
            return Arc::from(name);
        };
        if let Some(shared) = names.get(name) {
            return shared.clone();
        }
        if names.len() >= MAX_NAMES {
            names.clear();
        }
        let shared: Arc<str> = Arc::from(name);
        names.insert(shared.clone());
        shared
    }

    pub fn unregister(&self, id: u64) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(&id);
        }
    }

    /// Graceful shutdown: every connected session is asked to leave.
    pub fn stop_all(&self) {
        for client in self.snapshot() {
            client.request_stop();
        }
    }

    /// The end of a shutdown's grace period: every session ends now.
    pub fn terminate_all(&self) {
        for client in self.snapshot() {
            client.request_terminate();
        }
    }

    /// After a reload: every session takes up the new timeouts.
    pub fn notify_reconfigured(&self) {
        for client in self.snapshot() {
            client.notify_reconfigured();
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<ClientInfo>> {
        self.clients
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_of_one_user_and_project_share_the_names() {
        let registry = ClientRegistry::default();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let a = registry.register("app", "shop", peer);
        let b = registry.register("app", "shop", peer);
        let c = registry.register("report", "shop", peer);
        assert!(Arc::ptr_eq(&a.user, &b.user));
        assert!(Arc::ptr_eq(&a.project, &c.project));
        assert_eq!(&*c.user, "report");
        registry.unregister(a.id);
        assert_eq!(registry.snapshot().len(), 2);
    }
}
