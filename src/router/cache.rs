//! Routing decisions cached by statement shape (text with literals replaced), so each
//! distinct statement is parsed once, even when applications inline their values.
//!
//! sqlparser costs 10-50 µs per statement; a shape scan plus a hash lookup well under
//! one. A decision that carries values (a `SET` and its value) cannot be shared between
//! texts of the same shape; such texts are cached by their exact text instead.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::classify::classify;
use super::decision::Decision;
use super::fingerprint::shape_into;
use super::large::{self, LARGE_STATEMENT};

/// Bytes of keys each of the two maps may hold before it starts over: statements of up
/// to LARGE_STATEMENT bytes are cached, so the entry limit alone does not bound them.
pub const MAX_CACHE_BYTES: usize = 32 << 20;

/// Every statement is hashed on the data path: foldhash is several times faster than
/// the default SipHash on statement-sized keys, and keeps a per-process random seed.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Per shape: the shared decision, or `None` when the exact text must be used.
/// Keys are bytes: statements arrive as bytes, and checking that they are UTF-8 is
/// only needed when one is parsed (a cache miss).
type ShapeMap = FastMap<Box<[u8]>, Option<Arc<Decision>>>;
/// Decisions that carry values, by exact text.
type TextMap = FastMap<Box<[u8]>, Arc<Decision>>;

pub struct DecisionCache {
    by_shape: RwLock<Bounded<ShapeMap>>,
    by_text: RwLock<Bounded<TextMap>>,
    capacity: usize,
    max_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Statements routed without a parse for their size.
    large: AtomicU64,
}

/// A map and the bytes of its keys.
#[derive(Default)]
struct Bounded<M> {
    map: M,
    bytes: usize,
}

impl<V> Bounded<FastMap<Box<[u8]>, V>> {
    /// Inserts, first starting over when the entry or byte limit would be passed
    /// (simple, and keeps memory bounded whatever the statements).
    fn insert_bounded(&mut self, key: &[u8], value: V, capacity: usize, max_bytes: usize) {
        if self.map.len() >= capacity || self.bytes + key.len() > max_bytes {
            self.map.clear();
            self.bytes = 0;
        }
        if self.map.insert(key.into(), value).is_none() {
            self.bytes += key.len();
        }
    }
}

thread_local! {
    static SHAPE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(capacity, MAX_CACHE_BYTES)
    }

    /// A cache of at most `capacity` entries and `max_bytes` of keys per map.
    pub fn with_limits(capacity: usize, max_bytes: usize) -> Self {
        Self {
            max_bytes,
            by_shape: RwLock::new(Bounded::default()),
            by_text: RwLock::new(Bounded::default()),
            capacity: capacity.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            large: AtomicU64::new(0),
        }
    }

    pub fn decide(&self, sql: &str) -> Arc<Decision> {
        self.decide_bytes(sql.as_bytes())
    }

    /// The decision for a statement as it arrived on the wire. Text that is not UTF-8
    /// cannot be classified with confidence and goes to the primary (which refuses it
    /// with a proper error if the database encoding does too).
    pub fn decide_bytes(&self, sql: &[u8]) -> Arc<Decision> {
        if sql.len() > LARGE_STATEMENT {
            // Neither parsed nor cached (see large.rs).
            self.large.fetch_add(1, Ordering::Relaxed);
            return Arc::new(large::decide(sql));
        }
        SHAPE_BUF.with(|buf| {
            let mut shape = buf.borrow_mut();
            shape_into(sql, &mut shape);
            self.decide_shaped(sql, &shape)
        })
    }

    fn decide_shaped(&self, sql: &[u8], shape: &[u8]) -> Arc<Decision> {
        let by_shape = self
            .by_shape
            .read()
            .ok()
            .and_then(|m| m.map.get(shape).cloned());
        match by_shape {
            Some(Some(decision)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return decision;
            }
            Some(None) => {
                if let Some(decision) = self
                    .by_text
                    .read()
                    .ok()
                    .and_then(|m| m.map.get(sql).cloned())
                {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return decision;
                }
            }
            None => {}
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let Ok(text) = std::str::from_utf8(sql) else {
            // Not cached: the shape of such a text may also be that of valid ones,
            // which must not inherit this fallback.
            return Arc::new(Decision::primary());
        };
        let decision = Arc::new(classify(text));
        let shareable = decision.effects.is_empty();
        if let Ok(mut map) = self.by_shape.write() {
            map.insert_bounded(
                shape,
                shareable.then(|| decision.clone()),
                self.capacity,
                self.max_bytes,
            );
        }
        if !shareable && let Ok(mut map) = self.by_text.write() {
            map.insert_bounded(sql, decision.clone(), self.capacity, self.max_bytes);
        }
        decision
    }

    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    pub fn len(&self) -> usize {
        self.by_shape.read().map(|m| m.map.len()).unwrap_or(0)
    }

    /// Bytes of statement text the cache holds as keys.
    pub fn bytes(&self) -> usize {
        let shapes = self.by_shape.read().map(|m| m.bytes).unwrap_or(0);
        let texts = self.by_text.read().map(|m| m.bytes).unwrap_or(0);
        shapes + texts
    }

    /// Statements routed to the primary without a parse because of their size.
    pub fn large_statements(&self) -> u64 {
        self.large.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::SessionEffect;

    #[test]
    fn keys_are_bounded_in_bytes_and_large_texts_are_not_cached() {
        let cache = DecisionCache::with_limits(1_000_000, 100_000);
        for i in 0..100 {
            // Distinct shapes (identifiers differ), 3 kB each: 300 kB in all.
            let sql = format!("SELECT c{i} FROM t WHERE x IN ({}1)", "a, ".repeat(1_000));
            cache.decide(&sql);
            assert!(cache.bytes() <= 2 * 100_000);
        }
        assert!(cache.len() < 200);
        let huge = format!("INSERT INTO t VALUES {}", "(1), ".repeat(100_000));
        let before = (cache.len(), cache.bytes());
        let decision = cache.decide(&huge);
        assert_eq!(decision.route, crate::router::Route::Primary);
        assert_eq!((cache.len(), cache.bytes()), before);
        assert_eq!(cache.large_statements(), 1);
    }

    #[test]
    fn texts_of_one_shape_share_a_decision_and_capacity_is_bounded() {
        let cache = DecisionCache::new(2);
        cache.decide("SELECT * FROM t WHERE id = 1");
        cache.decide("SELECT * FROM t WHERE id = 2");
        assert_eq!(cache.stats(), (1, 1));
        cache.decide("SELECT 2 FROM a");
        cache.decide("SELECT 3 FROM b");
        assert!(cache.len() <= 2);
    }

    #[test]
    fn text_that_is_not_utf8_goes_to_the_primary_without_poisoning_its_shape() {
        use crate::router::Route;
        let cache = DecisionCache::new(100);
        let latin1 = cache.decide_bytes(b"SELECT * FROM t WHERE name = 'caf\xe9'");
        assert_eq!(latin1.route, Route::Primary);
        let valid = cache.decide("SELECT * FROM t WHERE name = 'cafe'");
        assert_eq!(valid.route, Route::Replica);
    }

    #[test]
    fn decisions_with_values_are_never_shared_between_texts() {
        let cache = DecisionCache::new(100);
        let a = cache.decide("SET application_name = 'a'");
        let b = cache.decide("SET application_name = 'b'");
        assert_eq!(
            a.effects,
            vec![SessionEffect::Set {
                name: "application_name".into(),
                value: "'a'".into()
            }]
        );
        assert_eq!(
            b.effects,
            vec![SessionEffect::Set {
                name: "application_name".into(),
                value: "'b'".into()
            }]
        );
        let again = cache.decide("SET application_name = 'a'");
        assert_eq!(again.effects, a.effects);
    }
}
