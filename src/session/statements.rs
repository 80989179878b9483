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

#[derive(Debug)]
pub struct PreparedStatement {
    pub id: u64,
    pub server_name: String,
    /// The Parse payload after the statement name: `query\0 nparams oids...`.
    pub tail: Bytes,
    pub decision: Arc<Decision>,
}

/// Past this many distinct statements, or this many bytes of their texts, the
/// registry starts over; statements already held by clients stay valid, only new
/// registrations get new ids.
const MAX_STATEMENTS: usize = 100_000;
pub const MAX_STATEMENT_BYTES: usize = 64 << 20;

pub struct StatementRegistry {
    by_tail: Mutex<Registered>,
    next_id: AtomicU64,
}

/// The registered statements by Parse payload, and the bytes their payloads take.
#[derive(Default)]
struct Registered {
    /// foldhash: looked up for every Parse on the data path (see router/cache.rs).
    map: HashMap<Bytes, Arc<PreparedStatement>, foldhash::fast::RandomState>,
    bytes: usize,
}

impl Registered {
    fn remove(&mut self, tail: &[u8]) {
        if let Some(gone) = self.map.remove(tail) {
            self.bytes -= gone.tail.len();
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

impl Default for StatementRegistry {
    fn default() -> Self {
        Self {
            by_tail: Mutex::new(Registered::default()),
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
        if let Some(existing) = map.map.get(tail) {
            return existing.clone();
        }
        if map.map.len() >= MAX_STATEMENTS || map.bytes + tail.len() > MAX_STATEMENT_BYTES {
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
        if tail.len() <= MAX_STATEMENT_BYTES {
            map.bytes += tail.len();
            map.map.insert(tail, statement.clone());
        }
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
            .map
            .get(&statement.tail)
            .is_some_and(|current| current.id == statement.id)
        {
            map.remove(&statement.tail);
        }
    }

    /// A client's DDL ran (CREATE, ALTER, DROP): every statement is taken out of use
    /// for new Parse messages, as `retire` does for one. A statement prepared on a
    /// pooled connection before the change keeps the parameter types it was analysed
    /// with (Postgres re-plans a cached statement, but never re-infers its parameter
    /// types), so a client preparing the same text now must get a fresh one, as it
    /// would on a direct connection: after `DROP TABLE t; CREATE TABLE t (v time)`,
    /// `INSERT INTO t VALUES ($1)` takes a time, not the date of the old table.
    pub fn schema_changed(&self) {
        let mut map = match self.by_tail.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.clear();
    }

    pub fn len(&self) -> usize {
        self.by_tail.lock().map(|m| m.map.len()).unwrap_or(0)
    }

    /// Bytes of statement text the registry holds.
    pub fn bytes(&self) -> usize {
        self.by_tail.lock().map(|m| m.bytes).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a CommandComplete tag is that of DDL that can change what a statement text
/// means: `CREATE ...`, `ALTER ...`, `DROP ...`.
pub fn is_schema_change(tag: &[u8]) -> bool {
    [&b"CREATE "[..], b"ALTER ", b"DROP "]
        .iter()
        .any(|prefix| tag.starts_with(prefix))
}

/// The statement name of a `DEALLOCATE [PREPARE] name` query that is nothing else (one
/// statement, no comments), folded the way Postgres folds identifiers; None for
/// `DEALLOCATE ALL` and anything else. Protocol-level prepared statements and SQL ones
/// share one namespace, and drivers (psycopg 3, pgx) evict protocol ones with it.
pub fn deallocate_target(sql: &[u8]) -> Option<String> {
    let sql = sql.trim_ascii();
    let sql = sql.strip_suffix(b";").unwrap_or(sql).trim_ascii_end();
    let rest = strip_keyword(sql, b"deallocate")?;
    let rest = match strip_keyword(rest, b"prepare") {
        // `DEALLOCATE prepare` alone names a statement called "prepare".
        Some(after) if !after.is_empty() => after,
        _ => rest,
    };
    let name = if let Some(quoted) = rest.strip_prefix(b"\"") {
        let mut name = Vec::new();
        let mut i = 0;
        loop {
            match quoted.get(i)? {
                b'"' if quoted.get(i + 1) == Some(&b'"') => {
                    name.push(b'"');
                    i += 2;
                }
                b'"' => break,
                &b => {
                    name.push(b);
                    i += 1;
                }
            }
        }
        if i + 1 != quoted.len() || name.is_empty() {
            return None;
        }
        name
    } else {
        let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$') || *b >= 0x80;
        if rest.is_empty()
            || rest[0].is_ascii_digit()
            || rest[0] == b'$'
            || !rest.iter().all(plain)
            || rest.eq_ignore_ascii_case(b"all")
        {
            return None;
        }
        rest.to_ascii_lowercase()
    };
    String::from_utf8(name).ok()
}

/// `text` without a leading case-insensitive `keyword` and the whitespace after it; the
/// keyword must be followed by whitespace or the end.
fn strip_keyword<'a>(text: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let head = text.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let after = &text[keyword.len()..];
    match after.first() {
        None => Some(after),
        Some(b) if b.is_ascii_whitespace() => Some(after.trim_ascii_start()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_gives_every_text_a_new_statement() {
        let registry = StatementRegistry::default();
        let decide = || Arc::new(Decision::primary());
        let before = registry.register(b"INSERT INTO t VALUES ($1)\0\0\0", decide);
        let same = registry.register(b"INSERT INTO t VALUES ($1)\0\0\0", decide);
        assert_eq!(before.id, same.id);
        for tag in [&b"CREATE TABLE"[..], b"ALTER TABLE", b"DROP TYPE"] {
            assert!(is_schema_change(tag));
        }
        for tag in [&b"SELECT 1"[..], b"INSERT 0 1", b"CREATED", b"DROPPED"] {
            assert!(!is_schema_change(tag));
        }
        registry.schema_changed();
        let after = registry.register(b"INSERT INTO t VALUES ($1)\0\0\0", decide);
        assert_ne!(after.id, before.id);
        assert_ne!(after.server_name, before.server_name);
    }

    #[test]
    fn the_registry_is_bounded_in_bytes() {
        let registry = StatementRegistry::default();
        let decide = || Arc::new(Decision::primary());
        let mut held = Vec::new();
        for i in 0..100u32 {
            let mut tail = format!("SELECT {i} ").into_bytes();
            tail.resize(1 << 20, b' ');
            held.push(registry.register(&tail, decide));
            assert!(registry.bytes() <= MAX_STATEMENT_BYTES);
        }
        assert!(registry.len() < 100);
        // Statements handed out stay usable; one registered again gets a new id.
        assert_eq!(held[0].tail.len(), 1 << 20);
        let mut first = b"SELECT 0 ".to_vec();
        first.resize(1 << 20, b' ');
        assert_ne!(registry.register(&first, decide).id, held[0].id);
    }

    #[test]
    fn deallocate_names_are_read_as_postgres_reads_them() {
        let name = |sql: &str| deallocate_target(sql.as_bytes());
        assert_eq!(name("DEALLOCATE _pg3_0"), Some("_pg3_0".into()));
        assert_eq!(name("  deallocate   S_12 ;\n"), Some("s_12".into()));
        assert_eq!(name("DEALLOCATE PREPARE stmt1"), Some("stmt1".into()));
        assert_eq!(
            name("deallocate \"Mixed \"\"q\"\"\""),
            Some("Mixed \"q\"".into())
        );
        assert_eq!(name("DEALLOCATE prepare"), Some("prepare".into()));
        assert_eq!(name("DEALLOCATE PREPARE \"x\";"), Some("x".into()));
        for other in [
            "DEALLOCATE ALL",
            "DEALLOCATE PREPARE ALL",
            "DEALLOCATE",
            "DEALLOCATE a; SELECT 1",
            "DEALLOCATE a b",
            "DEALLOCATE /* c */ a",
            "DEALLOCATE \"\"",
            "DEALLOCATE \"open",
            "DEALLOCATE 1a",
            "DEALLOCATEa",
            "SELECT 1",
            "",
        ] {
            assert_eq!(name(other), None, "{other}");
        }
    }
}
