//! Named prepared statements across pooled connections.
//!
//! A client's `Parse("s1", text)` is registered under a proxy-wide name derived from
//! the text and parameter types (`__rp_<id>`), so identical statements from many
//! clients share one server-side statement per connection. Each server connection
//! records which ids it has; a Bind to a statement the connection lacks gets a Parse
//! injected in front of it, whose ParseComplete the client never sees.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::router::Decision;

pub struct PreparedStatement {
    pub id: u64,
    pub server_name: String,
    /// The Parse payload after the statement name: `query\0 nparams oids...`.
    pub tail: Bytes,
    pub decision: Arc<Decision>,
}

/// Past this many distinct statements the registry starts over; statements already
/// held by clients stay valid, only new registrations get new ids.
const MAX_STATEMENTS: usize = 100_000;

pub struct StatementRegistry {
    /// foldhash: looked up for every Parse on the data path (see router/cache.rs).
    by_tail: Mutex<HashMap<Bytes, Arc<PreparedStatement>, foldhash::fast::RandomState>>,
    next_id: AtomicU64,
}

impl Default for StatementRegistry {
    fn default() -> Self {
        Self {
            by_tail: Mutex::new(HashMap::default()),
            next_id: AtomicU64::new(1),
        }
    }
}

impl StatementRegistry {
    /// The statement for a Parse payload (`tail`: query, parameter count and types),
    /// registered on first sight; `decide` routes its query then, and only then.
    pub fn register(
        &self,
        tail: &[u8],
        decide: impl FnOnce() -> Arc<Decision>,
    ) -> Arc<PreparedStatement> {
        let mut map = match self.by_tail.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(existing) = map.get(tail) {
            return existing.clone();
        }
        if map.len() >= MAX_STATEMENTS {
            map.clear();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tail = Bytes::copy_from_slice(tail);
        let statement = Arc::new(PreparedStatement {
            id,
            server_name: format!("__rp_{id}"),
            tail: tail.clone(),
            decision: decide(),
        });
        map.insert(tail, statement.clone());
        statement
    }

    /// Takes `statement` out of use for new Parse messages: the next Parse of its text
    /// registers a new id, so every server prepares it afresh under a new name. For a
    /// statement a server refused to run from its cached plan (a schema change altered
    /// its result type, 0A000): on Postgres itself, preparing the text again gives the
    /// new shape, and through the proxy it must too, on every pooled connection. The
    /// old server-side statements stay until the per-connection limit clears them.
    pub fn retire(&self, statement: &PreparedStatement) {
        let mut map = match self.by_tail.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map
            .get(&statement.tail)
            .is_some_and(|current| current.id == statement.id)
        {
            map.remove(&statement.tail);
        }
    }

    pub fn len(&self) -> usize {
        self.by_tail.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
