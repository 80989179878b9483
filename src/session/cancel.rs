//! Routes CancelRequests to the server running the client's statement.
//!
//! Clients get a key made up by the proxy (their server changes with every
//! transaction); the key maps to a slot that says which server, if any, is working for
//! the client right now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::NodeAddress;
use crate::protocol::messages;

#[derive(Clone, Debug)]
pub struct CancelTarget {
    pub addr: std::sync::Arc<NodeAddress>,
    pub pid: i32,
    pub secret: i32,
}

/// Which server works for one client now. Set on every checkout and cleared on every
/// return, so it avoids the lock when the server is the one it already names (the
/// pools hand the same connection back to a client whenever they can).
#[derive(Default)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
    /// `target` is the client's server right now (false between transactions).
    active: AtomicBool,
    /// Backend pid and secret key of `target`, readable without the lock (the secret
    /// is random per server connection, so the pair names one connection).
    pid: AtomicI32,
    secret: AtomicI32,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        let Some(target) = target else {
            self.active.store(false, Ordering::Release);
            return;
        };
        if self.pid.load(Ordering::Relaxed) != target.pid
            || self.secret.load(Ordering::Relaxed) != target.secret
        {
            self.pid.store(target.pid, Ordering::Relaxed);
            self.secret.store(target.secret, Ordering::Relaxed);
            if let Ok(mut t) = self.target.lock() {
                *t = Some(target);
            }
        }
        self.active.store(true, Ordering::Release);
    }

    fn get(&self) -> Option<CancelTarget> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.target.lock().ok().and_then(|t| t.clone())
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

impl CancelRegistry {
    /// Gives a new client its key and slot.
    pub fn register(&self) -> (i32, i32, Arc<CancelSlot>) {
        let slot = Arc::new(CancelSlot::default());
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        loop {
            let key: (i32, i32) = (rand::random_range(1..i32::MAX), rand::random());
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry(key) {
                e.insert(slot.clone());
                return (key.0, key.1, slot);
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
        let mut buf = BytesMut::new();
        messages::cancel_request(&mut buf, target.pid, target.secret);
        match TcpStream::connect((target.addr.host.as_str(), target.addr.port)).await {
            Ok(mut stream) => {
                if let Err(e) = stream.write_all(&buf).await {
                    tracing::warn!(node = %target.addr, "forwarding cancel request failed: {e}");
                }
                let _ = stream.shutdown().await;
                tracing::info!(node = %target.addr, backend_pid = target.pid, "cancel request forwarded");
            }
            Err(e) => tracing::warn!(node = %target.addr, "cannot reach node to cancel: {e}"),
        }
    }
}
