//! Cost of routing a statement: sqlparser classification (first sight of a text) and
//! the cached decision (every later time).

use criterion::{Criterion, criterion_group, criterion_main};
use replicator::router::DecisionCache;
use replicator::router::classify::classify;
use std::hint::black_box;

const STATEMENTS: &[(&str, &str)] = &[
    (
        "point_select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
    (
        "join_200",
        "SELECT o.id, o.total, c.name, c.email, sum(l.qty * l.price) AS amount FROM orders o \
         JOIN customers c ON c.id = o.customer_id JOIN order_lines l ON l.order_id = o.id \
         WHERE o.created_at > now() - interval '7 days' GROUP BY o.id, c.id ORDER BY amount DESC LIMIT 50",
    ),
    (
        "update",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    ),
];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    for (name, sql) in STATEMENTS {
        group.bench_function(format!("uncached/{name}"), |b| {
            b.iter(|| classify(black_box(sql)))
        });
        let cache = DecisionCache::new(10_000);
        cache.decide(sql);
        group.bench_function(format!("cached/{name}"), |b| {
            b.iter(|| cache.decide(black_box(sql)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
