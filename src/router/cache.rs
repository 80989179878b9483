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

/// Every statement is hashed on the data path: foldhash is several times faster than
/// the default SipHash on statement-sized keys, and keeps a per-process random seed.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Per shape: the shared decision, or `None` when the exact text must be used.
/// Keys are bytes: statements arrive as bytes, and checking that they are UTF-8 is
/// only needed when one is parsed (a cache miss).
type ShapeMap = FastMap<Box<[u8]>, Option<Arc<Decision>>>;

pub struct DecisionCache {
    by_shape: RwLock<ShapeMap>,
    by_text: RwLock<FastMap<Box<[u8]>, Arc<Decision>>>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

thread_local! {
    static SHAPE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            by_shape: RwLock::new(FastMap::default()),
            by_text: RwLock::new(FastMap::default()),
            capacity: capacity.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn decide(&self, sql: &str) -> Arc<Decision> {
        self.decide_bytes(sql.as_bytes())
    }

    /// The decision for a statement as it arrived on the wire. Text that is not UTF-8
    /// cannot be classified with confidence and goes to the primary (which refuses it
    /// with a proper error if the database encoding does too).
    pub fn decide_bytes(&self, sql: &[u8]) -> Arc<Decision> {
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
            .and_then(|m| m.get(shape).cloned());
        match by_shape {
            Some(Some(decision)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return decision;
            }
            Some(None) => {
                if let Some(decision) = self.by_text.read().ok().and_then(|m| m.get(sql).cloned()) {
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
            // Unbounded distinct shapes would grow the map forever; starting over is
            // simple and keeps memory bounded.
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(shape.into(), shareable.then(|| decision.clone()));
        }
        if !shareable && let Ok(mut map) = self.by_text.write() {
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(sql.into(), decision.clone());
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
        self.by_shape.read().map(|m| m.len()).unwrap_or(0)
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
