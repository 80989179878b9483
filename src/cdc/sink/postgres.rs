//! The Postgres sink: another database (a `kind = "postgres"` target or a project's
//! primary). Values travel as text and are cast to the column types by the target, so
//! nothing is reinterpreted on the way. A missing target table is created with the
//! source's columns and key; every target table gets a `_replicator_lsn` column (the
//! commit position of the change that wrote the row), which guards every write. One
//! batch is one target transaction.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};
use tracing::info;

use super::super::change::{Change, Op};
use super::super::pgoutput::Datum;
use super::super::schema::Shape;
use super::super::walsender::quote_ident;
use super::{Applied, POSITION_FIELD, SinkError};
use crate::config::ConflictResolution;

pub struct PostgresSink {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// `schema.table` or `table`, quoted.
fn qualified(name: &str) -> String {
    match name.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(name),
    }
}

impl PostgresSink {
    /// Connects to a target's URI (one TCP host) under the same login rules as every
    /// server connection (no clear-text password over an unencrypted connection).
    pub async fn connect(uri: &str) -> Result<PostgresSink, SinkError> {
        let unavailable =
            |e: String| SinkError::Unavailable(format!("cannot connect to the target: {e}"));
        let (uri, security) = crate::config::conninfo::split(uri).map_err(unavailable)?;
        let config: tokio_postgres::Config = uri
            .parse()
            .map_err(|e| unavailable(format!("bad uri: {e}")))?;
        let host = match config.get_hosts() {
            [tokio_postgres::config::Host::Tcp(host)] => host.clone(),
            _ => return Err(unavailable("the target URI must name one TCP host".into())),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(std::time::Duration::from_secs(10));
        let client =
            crate::cluster::monitor::guarded_connect(&config, &host, port, &security, timeout)
                .await
                .map_err(unavailable)?;
        Ok(PostgresSink::new(client))
    }

    /// A sink writing through an open connection.
    pub fn new(client: Client) -> PostgresSink {
        PostgresSink {
            client,
            statements: HashMap::new(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Creates missing tables and the position column.
    pub async fn prepare(&mut self, shapes: &[Arc<Shape>]) -> Result<(), SinkError> {
        for shape in shapes {
            let table = qualified(&shape.target);
            let columns = shape
                .columns
                .iter()
                .map(|c| format!("{} {}", quote_ident(&c.name), c.sql_type))
                .collect::<Vec<_>>()
                .join(", ");
            let key = shape
                .key_names()
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {table} ({columns}, {POSITION_FIELD} bigint, PRIMARY KEY ({key})); \
                 ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {POSITION_FIELD} bigint"
            );
            self.client
                .batch_execute(&sql)
                .await
                .map_err(|e| SinkError::Rejected(format!("cannot prepare {table}: {e}")))?;
            info!(table = %shape.target, "CDC target table ready");
        }
        Ok(())
    }

    pub async fn sweep(&mut self, shapes: &[Arc<Shape>], position: i64) -> Result<u64, SinkError> {
        let mut removed = 0;
        for shape in shapes {
            let sql = format!(
                "DELETE FROM {} WHERE {POSITION_FIELD} < $1",
                qualified(&shape.target)
            );
            removed += self
                .client
                .execute(&sql, &[&position])
                .await
                .map_err(|e| SinkError::Rejected(format!("sweep of {}: {e}", shape.target)))?;
        }
        Ok(removed)
    }

    async fn statement(&mut self, sql: String, params: usize) -> Result<Statement, SinkError> {
        if let Some(s) = self.statements.get(&sql) {
            return Ok(s.clone());
        }
        let types = vec![Type::TEXT_ARRAY; params];
        let statement =
            self.client.prepare_typed(&sql, &types).await.map_err(|e| {
                SinkError::Rejected(format!("cannot prepare a target statement: {e}"))
            })?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    pub async fn apply(
        &mut self,
        changes: &[Change],
        truncates: &[Change],
        mode: ConflictResolution,
    ) -> Result<Applied, SinkError> {
        let mut applied = Applied::default();
        // Upserts grouped by table and by which columns they carry (an update that left
        // TOAST values alone carries fewer); deletes grouped by table.
        let mut upserts: HashMap<(String, Vec<bool>), Vec<&Change>> = HashMap::new();
        let mut deletes: HashMap<String, Vec<&Change>> = HashMap::new();
        for change in changes {
            match &change.op {
                Op::Upsert(row) => {
                    let present = row.iter().map(|d| *d != Datum::Unchanged).collect();
                    upserts
                        .entry((change.shape.target.clone(), present))
                        .or_default()
                        .push(change);
                }
                Op::Delete(_) => deletes
                    .entry(change.shape.target.clone())
                    .or_default()
                    .push(change),
                Op::Truncate => {}
            }
        }
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| SinkError::Unavailable(format!("target: {e}")))?;
        let result = async {
            for ((_, present), group) in &upserts {
                self.upsert(group, present, mode, &mut applied).await?;
            }
            for group in deletes.values() {
                self.delete(group, mode, &mut applied).await?;
            }
            for truncate in truncates {
                let sql = format!(
                    "DELETE FROM {} WHERE {POSITION_FIELD} <= ($1::text[])[1]::bigint",
                    qualified(&truncate.shape.target)
                );
                let statement = self.statement(sql, 1).await?;
                let position = vec![Some(truncate.position.to_string())];
                let n = self
                    .client
                    .execute(&statement, &[&position])
                    .await
                    .map_err(|e| SinkError::Rejected(format!("target truncate: {e}")))?;
                applied.written += n;
            }
            Ok::<(), SinkError>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| SinkError::Unavailable(format!("target commit: {e}")))?;
                Ok(applied)
            }
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    async fn upsert(
        &mut self,
        group: &[&Change],
        present: &[bool],
        mode: ConflictResolution,
        applied: &mut Applied,
    ) -> Result<(), SinkError> {
        let shape = group[0].shape.clone();
        let table = qualified(&shape.target);
        let columns: Vec<usize> = (0..shape.columns.len()).filter(|&i| present[i]).collect();
        let names: Vec<String> = columns
            .iter()
            .map(|&i| quote_ident(&shape.columns[i].name))
            .collect();
        let casts: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(n, &i)| format!("u.c{n}::{}", shape.columns[i].sql_type))
            .collect();
        let arrays: Vec<String> = (0..=columns.len())
            .map(|n| format!("${}::text[]", n + 1))
            .collect();
        let aliases: Vec<String> = (0..columns.len()).map(|n| format!("c{n}")).collect();
        let key: Vec<String> = shape.key_names().iter().map(|k| quote_ident(k)).collect();
        let updates: Vec<String> = names
            .iter()
            .filter(|n| !key.contains(n))
            .map(|n| format!("{n} = EXCLUDED.{n}"))
            .chain(std::iter::once(format!(
                "{POSITION_FIELD} = EXCLUDED.{POSITION_FIELD}"
            )))
            .collect();
        let condition = match mode {
            ConflictResolution::SourceWins => format!(
                "t.{POSITION_FIELD} IS NULL OR t.{POSITION_FIELD} <= EXCLUDED.{POSITION_FIELD}"
            ),
            ConflictResolution::TargetWins => {
                format!("t.{POSITION_FIELD} <= EXCLUDED.{POSITION_FIELD}")
            }
        };
        let sql = format!(
            "INSERT INTO {table} AS t ({}, {POSITION_FIELD}) \
             SELECT {}, u.lsn::bigint FROM unnest({}) AS u({}, lsn) \
             ON CONFLICT ({}) DO UPDATE SET {} WHERE {condition}",
            names.join(", "),
            casts.join(", "),
            arrays.join(", "),
            aliases.join(", "),
            key.join(", "),
            updates.join(", "),
        );
        let statement = self.statement(sql, columns.len() + 1).await?;
        let mut values: Vec<Vec<Option<String>>> =
            vec![Vec::with_capacity(group.len()); columns.len() + 1];
        for change in group {
            let Op::Upsert(row) = &change.op else {
                continue;
            };
            for (n, &i) in columns.iter().enumerate() {
                values[n].push(as_text(&row[i]));
            }
            values[columns.len()].push(Some(change.position.to_string()));
        }
        let what = format!("upsert into {table}");
        self.execute_arrays(&statement, &values, group.len(), &what, applied)
            .await
    }

    /// Runs `statement` with one text array per column (the last one holding the
    /// positions) and counts the rows written and those the position guard turned away.
    async fn execute_arrays(
        &self,
        statement: &Statement,
        values: &[Vec<Option<String>>],
        rows: usize,
        what: &str,
        applied: &mut Applied,
    ) -> Result<(), SinkError> {
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let n = self
            .client
            .execute(statement, &params)
            .await
            .map_err(|e| SinkError::Rejected(format!("target {what}: {e}")))?;
        applied.written += n;
        applied.skipped += rows as u64 - n.min(rows as u64);
        Ok(())
    }

    async fn delete(
        &mut self,
        group: &[&Change],
        mode: ConflictResolution,
        applied: &mut Applied,
    ) -> Result<(), SinkError> {
        let shape = group[0].shape.clone();
        let table = qualified(&shape.target);
        let key = &shape.key;
        let arrays: Vec<String> = (0..=key.len())
            .map(|n| format!("${}::text[]", n + 1))
            .collect();
        let aliases: Vec<String> = (0..key.len()).map(|n| format!("k{n}")).collect();
        let matches: Vec<String> = key
            .iter()
            .enumerate()
            .map(|(n, &i)| {
                let column = &shape.columns[i];
                format!(
                    "t.{} = u.k{n}::{}",
                    quote_ident(&column.name),
                    column.sql_type
                )
            })
            .collect();
        let guard = match mode {
            ConflictResolution::SourceWins => {
                format!("(t.{POSITION_FIELD} IS NULL OR t.{POSITION_FIELD} <= u.lsn::bigint)")
            }
            ConflictResolution::TargetWins => format!("t.{POSITION_FIELD} <= u.lsn::bigint"),
        };
        let sql = format!(
            "DELETE FROM {table} AS t USING unnest({}) AS u({}, lsn) WHERE {} AND {guard}",
            arrays.join(", "),
            aliases.join(", "),
            matches.join(" AND "),
        );
        let statement = self.statement(sql, key.len() + 1).await?;
        let mut values: Vec<Vec<Option<String>>> =
            vec![Vec::with_capacity(group.len()); key.len() + 1];
        for change in group {
            let Op::Delete(key_values) = &change.op else {
                continue;
            };
            for (n, datum) in key_values.iter().enumerate() {
                values[n].push(as_text(datum));
            }
            values[key.len()].push(Some(change.position.to_string()));
        }
        let what = format!("delete from {table}");
        self.execute_arrays(&statement, &values, group.len(), &what, applied)
            .await
    }
}

/// A value as the text parameter the target casts (NULL for NULL).
fn as_text(datum: &Datum) -> Option<String> {
    match datum {
        Datum::Text(t) => Some(t.clone()),
        Datum::Null | Datum::Unchanged => None,
    }
}
