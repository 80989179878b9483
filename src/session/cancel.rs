//! Routes CancelRequests to the server running the client's statement.
//!
//! Clients get a key made up by the proxy (their server changes with every
//! transaction); the key maps to a slot that says which server, if any, is working for
//! the client right now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::NodeAddress;

#[derive(Clone, Debug)]
pub struct CancelTarget {
    pub addr: std::sync::Arc<NodeAddress>,
    pub pid: i32,
    pub secret: i32,
}

/// Which server works for one client now. Set on every checkout and cleared on every
/// return, so the common case costs two atomic stores: the backend key lives in an
/// atomic, and the lock is taken only when the client moves to another node (all the
/// connections of one pool share their address).
#[derive(Default)]
pub struct CancelSlot {
    /// The node of the client's latest server.
    addr: Mutex<Option<Arc<NodeAddress>>>,
    /// Identity of the `Arc` in `addr`, to see without the lock whether it changes.
    addr_id: AtomicUsize,
    /// Backend pid and secret key of the client's latest server, as one value so that
    /// a reader never pairs one server's pid with another's secret.
    key: AtomicU64,
    /// The latest server is the client's server right now (false between
    /// transactions).
    active: AtomicBool,
}

fn pack(pid: i32, secret: i32) -> u64 {
    ((pid as u32 as u64) << 32) | secret as u32 as u64
}

fn unpack(key: u64) -> (i32, i32) {
    ((key >> 32) as u32 as i32, key as u32 as i32)
}

impl CancelSlot {
    /// The client's statements now run on backend `pid` of the node at `addr`.
    pub fn set(&self, addr: &Arc<NodeAddress>, pid: i32, secret: i32) {
        let id = Arc::as_ptr(addr) as usize;
        if self.addr_id.load(Ordering::Relaxed) != id {
            if let Ok(mut current) = self.addr.lock() {
                *current = Some(addr.clone());
            }
            self.addr_id.store(id, Ordering::Relaxed);
        }
        self.key.store(pack(pid, secret), Ordering::Relaxed);
        self.active.store(true, Ordering::Release);
    }

    /// The client holds no server (between transactions).
    pub fn clear(&self) {
        self.active.store(false, Ordering::Release);
    }

    pub fn get(&self) -> Option<CancelTarget> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        let addr = self.addr.lock().ok()?.clone()?;
        let (pid, secret) = unpack(self.key.load(Ordering::Relaxed));
        Some(CancelTarget { addr, pid, secret })
    }
}

/// Process ids the proxy makes up for transaction-mode clients: above the largest pid
/// Linux hands out (2^22), so that `pg_terminate_backend()` of one can never hit a real
/// server process, another client's among them.
pub const STAND_IN_PIDS: std::ops::Range<i32> = (1 << 22) + 1..i32::MAX;

/// In fleet mode the top bits of every secret key name the instance that issued it, so
/// that a CancelRequest reaching another instance can be forwarded there (as
/// PgBouncer's peering does). 0 outside a fleet: every bit is random.
const INSTANCE_TAG_BITS: u32 = 12;
const RANDOM_BITS: u32 = 32 - INSTANCE_TAG_BITS;

/// The instance tag carried by a secret key (0: none).
pub fn instance_tag_of(secret: i32) -> u16 {
    ((secret as u32) >> RANDOM_BITS) as u16
}

/// The tag of a fleet instance, from its name: 1..=4095.
pub fn instance_tag_for(name: &str) -> u16 {
    // FNV-1a: stable across processes and builds, unlike the std hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    1 + (hash % ((1 << INSTANCE_TAG_BITS) - 1)) as u16
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    /// This instance's tag in fleet mode, else 0.
    instance_tag: AtomicU32,
}

impl CancelRegistry {
    /// Fleet mode: every secret from now on names this instance.
    pub fn set_instance_tag(&self, tag: u16) {
        self.instance_tag.store(u32::from(tag), Ordering::Relaxed);
    }

    pub fn instance_tag(&self) -> u16 {
        self.instance_tag.load(Ordering::Relaxed) as u16
    }

    fn new_secret(&self) -> i32 {
        let tag = self.instance_tag.load(Ordering::Relaxed);
        if tag == 0 {
            return rand::random();
        }
        let random: u32 = rand::random::<u32>() >> INSTANCE_TAG_BITS;
        ((tag << RANDOM_BITS) | random) as i32
    }

    /// Gives a new client its key and slot.
    pub fn register(&self) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot::default());
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        loop {
            let key: (i32, i32) = (rand::random_range(STAND_IN_PIDS), self.new_secret());
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(key) {
                e.insert(slot.clone());
                return (key.0, key.1, slot);
            }
        }
    }

    /// Moves a client's slot to a key with the given process id (a session-mode
    /// client gets its server's real one) and a fresh secret; returns the new key.
    pub fn rekey(&self, old: (i32, i32), pid: i32) -> (i32, i32) {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let Some(slot) = slots.remove(&old) else {
            return old;
        };
        loop {
            let key: (i32, i32) = (pid, self.new_secret());
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(key) {
                e.insert(slot);
                return key;
            }
        }
    }

    pub fn unregister(&self, pid: i32, secret: i32) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&(pid, secret));
        }
    }

    /// Forwards a cancel request; unknown keys are ignored, as Postgres does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = self
            .slots
            .lock()
            .ok()
            .and_then(|s| s.get(&(pid, secret)).cloned())
            .and_then(|slot| slot.get());
        let Some(target) = target else {
            tracing::debug!("cancel request for an unknown or idle client");
            return;
        };
        match crate::pool::recover::send_cancel(&target.addr, target.pid, target.secret).await {
            Ok(()) => {
                tracing::info!(node = %target.addr, backend_pid = target.pid, "cancel request forwarded")
            }
            Err(e) => tracing::warn!(node = %target.addr, "forwarding cancel request failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> Arc<NodeAddress> {
        Arc::new(NodeAddress {
            host: "127.0.0.1".into(),
            port,
            dbname: None,
            require_auth: None,
            tls: Default::default(),
        })
    }

    #[test]
    fn stand_in_process_ids_are_never_real_ones() {
        let registry = CancelRegistry::default();
        for _ in 0..1000 {
            let (pid, _, _) = registry.register();
            assert!(pid > 4_194_304, "{pid}");
        }
    }

    #[test]
    fn in_a_fleet_every_secret_names_the_instance_that_issued_it() {
        let registry = CancelRegistry::default();
        let tag = instance_tag_for("10.0.0.7:6432");
        assert!((1..4096).contains(&tag));
        assert_ne!(tag, instance_tag_for("10.0.0.8:6432"));
        registry.set_instance_tag(tag);
        for _ in 0..1000 {
            let (pid, secret, _) = registry.register();
            assert_eq!(instance_tag_of(secret), tag);
            let (_, secret) = registry.rekey((pid, secret), 4242);
            assert_eq!(instance_tag_of(secret), tag);
        }
        // Outside a fleet the secret is all random, and its top bits mean nothing.
        let single = CancelRegistry::default();
        let tags: std::collections::HashSet<u16> = (0..200)
            .map(|_| instance_tag_of(single.register().1))
            .collect();
        assert!(tags.len() > 50, "{tags:?}");
    }

    #[test]
    fn a_rekeyed_client_is_found_by_its_new_key_only() {
        let registry = CancelRegistry::default();
        let (pid, secret, slot) = registry.register();
        slot.set(&node(5432), 4242, 17);
        let key = registry.rekey((pid, secret), 4242);
        assert_eq!(key.0, 4242);
        let slots = registry.slots.lock().unwrap();
        assert!(!slots.contains_key(&(pid, secret)) || key == (pid, secret));
        let found = slots.get(&key).and_then(|s| s.get()).unwrap();
        assert_eq!((found.pid, found.secret), (4242, 17));
    }

    #[test]
    fn names_the_latest_server_while_it_works_for_the_client() {
        let slot = CancelSlot::default();
        assert!(slot.get().is_none());
        let primary = node(5432);
        slot.set(&primary, 101, -7);
        let target = slot.get().unwrap();
        assert_eq!(
            (target.addr.port, target.pid, target.secret),
            (5432, 101, -7)
        );
        // Another connection of the same pool (same address), then another node.
        slot.set(&primary, 102, i32::MIN);
        let target = slot.get().unwrap();
        assert_eq!(
            (target.addr.port, target.pid, target.secret),
            (5432, 102, i32::MIN)
        );
        slot.set(&node(5433), -3, 9);
        let target = slot.get().unwrap();
        assert_eq!((target.addr.port, target.pid, target.secret), (5433, -3, 9));
        // Between transactions nothing is running: a cancel has nothing to reach.
        slot.clear();
        assert!(slot.get().is_none());
    }
}
