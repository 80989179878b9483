//! The initial copy: every existing row of the rule's tables, read in one repeatable-
//! read transaction that imports the snapshot the slot exported when it was created.
//! That snapshot sees exactly the transactions committed before the slot's consistent
//! point, and the stream delivers exactly those committed after it: no row is missed
//! and none is seen twice. Rows are written with the consistent point as their
//! position, so any streamed change replaces them. Afterwards, documents or rows this
//! rule wrote earlier and the snapshot did not rewrite belong to rows the source no
//! longer has (deleted while the rule was away, or lost with a failed primary): they are
//! swept.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::info;

use super::change::{Batch, Change, Op};
use super::pgoutput::Datum;
use super::schema::RuleTables;
use super::sink::Sink;
use super::stats::{RuleStats, SnapshotProgress};
use super::walsender::{quote_ident, quote_literal};
use crate::config::ConflictResolution;

/// Rows fetched and written per batch.
pub const SNAPSHOT_BATCH: usize = 2000;

/// Where copied rows go, and whose figures they count in.
pub struct Destination<'a> {
    pub sink: &'a mut Sink,
    pub mode: ConflictResolution,
    pub stats: &'a Arc<RuleStats>,
    pub rule: &'a str,
}

pub async fn copy(
    client: &Client,
    snapshot_name: &str,
    tables: &RuleTables,
    position: i64,
    to: Destination<'_>,
) -> Result<u64, String> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT {}; \
             SET LOCAL DateStyle = ISO; SET LOCAL TimeZone = UTC; \
             SET LOCAL IntervalStyle = iso_8601; SET LOCAL extra_float_digits = 3; \
             SET LOCAL bytea_output = hex",
            quote_literal(snapshot_name)
        ))
        .await
        .map_err(|e| format!("cannot import the slot's snapshot: {e}"))?;
    let stats = to.stats.clone();
    let result = copy_tables(client, tables, position, to).await;
    let _ = client.batch_execute("COMMIT").await;
    stats.set_snapshot(None);
    result
}

async fn copy_tables(
    client: &Client,
    tables: &RuleTables,
    position: i64,
    to: Destination<'_>,
) -> Result<u64, String> {
    let Destination {
        sink,
        mode,
        stats,
        rule,
    } = to;
    let mut total = 0u64;
    for (done, (_, shape)) in tables.ordered.iter().enumerate() {
        let columns = shape
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let (schema, table) = shape
            .source
            .split_once('.')
            .unwrap_or(("public", &shape.source));
        client
            .batch_execute(&format!(
                "DECLARE replicator_snapshot NO SCROLL CURSOR FOR SELECT {columns} FROM {}.{}",
                quote_ident(schema),
                quote_ident(table)
            ))
            .await
            .map_err(|e| format!("cannot read {}: {e}", shape.source))?;
        let mut copied = 0u64;
        loop {
            let messages = client
                .simple_query(&format!("FETCH {SNAPSHOT_BATCH} FROM replicator_snapshot"))
                .await
                .map_err(|e| format!("cannot read {}: {e}", shape.source))?;
            let mut batch = Batch::default();
            for message in messages {
                if let SimpleQueryMessage::Row(row) = message {
                    let values = (0..shape.columns.len())
                        .map(|i| match row.get(i) {
                            Some(text) => Datum::Text(text.to_string()),
                            None => Datum::Null,
                        })
                        .collect();
                    batch.push(Change {
                        shape: shape.clone(),
                        position,
                        op: Op::Upsert(values),
                        insert: true,
                    });
                }
            }
            if batch.is_empty() {
                break;
            }
            let rows = batch.len() as u64;
            let (changes, truncates) = batch.into_parts();
            let applied = sink
                .apply(&changes, &truncates, mode)
                .await
                .map_err(|e| format!("snapshot of {} into the target: {e}", shape.source))?;
            stats.skipped.fetch_add(applied.skipped, Ordering::Relaxed);
            copied += rows;
            total += rows;
            stats.snapshot_rows.fetch_add(rows, Ordering::Relaxed);
            stats.sample();
            stats.set_snapshot(Some(SnapshotProgress {
                table: shape.source.clone(),
                tables_done: done,
                tables_total: tables.ordered.len(),
                rows_copied: total,
            }));
            tracing::debug!(rule, table = %shape.source, copied, "snapshot batch written");
        }
        client
            .batch_execute("CLOSE replicator_snapshot")
            .await
            .map_err(|e| format!("cannot read {}: {e}", shape.source))?;
        info!(rule, table = %shape.source, rows = copied, "snapshot of table done");
    }
    Ok(total)
}
