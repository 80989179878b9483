//! What a rule mirrors, read from the source's catalog: each table's columns, their
//! types and the key that identifies a row in the target. Also where a rule is refused
//! (missing table, no usable key) and the publication it streams from.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::values::{ColumnType, kind_of};
use super::walsender::quote_ident;

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub ty: ColumnType,
    /// The type as SQL (`numeric(10,2)`), for creating a Postgres target table.
    pub sql_type: String,
}

/// One source table as the rule sees it. Rows (`Vec<Datum>`) are aligned with
/// `columns`; `key` holds positions in `columns`.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// `schema.table` on the source.
    pub source: String,
    /// Collection (MongoDB) or table (Postgres) name on the target.
    pub target: String,
    pub columns: Vec<Column>,
    pub key: Vec<usize>,
}

impl Shape {
    pub fn key_names(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.columns[i].name.as_str())
            .collect()
    }
}

/// A rule's tables, by source OID (pgoutput names relations by OID).
pub struct RuleTables {
    pub by_oid: HashMap<u32, Arc<Shape>>,
    /// In the order the rule lists them.
    pub ordered: Vec<(u32, Arc<Shape>)>,
    pub types: TypeMap,
}

/// Column type OIDs resolved to conversions (domains to their base type, arrays to
/// their element type).
#[derive(Default, Clone)]
pub struct TypeMap {
    known: HashMap<u32, ColumnType>,
}

impl TypeMap {
    pub fn get(&self, oid: u32) -> Option<ColumnType> {
        self.known.get(&oid).copied()
    }

    /// Learns the OIDs not known yet from the catalog.
    pub async fn resolve(&mut self, client: &Client, oids: &[u32]) -> Result<(), String> {
        let missing: Vec<String> = oids
            .iter()
            .filter(|o| !self.known.contains_key(o))
            .map(|o| o.to_string())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT t.oid::int8, COALESCE(NULLIF(t.typbasetype, 0), t.oid)::int8, \
                        CASE WHEN b.typcategory = 'A' \
                             THEN COALESCE(NULLIF(e.typbasetype, 0), e.oid)::int8 END \
                 FROM pg_type t \
                 JOIN pg_type b ON b.oid = COALESCE(NULLIF(t.typbasetype, 0), t.oid) \
                 LEFT JOIN pg_type e ON e.oid = b.typelem \
                 WHERE t.oid = ANY(string_to_array($1, ',')::oid[])",
                &[&missing.join(",")],
            )
            .await
            .map_err(|e| format!("cannot read column types: {e}"))?;
        for row in rows {
            let oid: i64 = row.get(0);
            let base: i64 = row.get(1);
            let element: Option<i64> = row.get(2);
            let ty = match element {
                Some(e) => ColumnType {
                    kind: kind_of(e as u32),
                    array: true,
                },
                None => ColumnType {
                    kind: kind_of(base as u32),
                    array: false,
                },
            };
            self.known.insert(oid as u32, ty);
        }
        Ok(())
    }

    pub fn lookup(&self, oid: u32) -> ColumnType {
        self.get(oid).unwrap_or(ColumnType {
            kind: kind_of(oid),
            array: false,
        })
    }
}

/// Reads and checks the rule's tables. Errors name the rule and say what to do.
pub async fn load(
    client: &Client,
    rule: &str,
    collections: &[String],
) -> Result<RuleTables, String> {
    let mut tables = RuleTables {
        by_oid: HashMap::new(),
        ordered: Vec::new(),
        types: TypeMap::default(),
    };
    for name in collections {
        let row = client
            .query_opt(
                "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text, \
                        c.relreplident::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass($1)",
                &[name],
            )
            .await
            .map_err(|e| format!("rule \"{rule}\": cannot look up table \"{name}\": {e}"))?
            .ok_or_else(|| {
                format!("rule \"{rule}\": table \"{name}\" does not exist on the source")
            })?;
        let oid: i64 = row.get(0);
        let schema: String = row.get(1);
        let relname: String = row.get(2);
        let relkind: String = row.get(3);
        let identity: String = row.get(4);
        if relkind != "r" && relkind != "p" {
            return Err(format!(
                "rule \"{rule}\": \"{name}\" is not a table (views and the like cannot be streamed)"
            ));
        }
        let column_rows = client
            .query(
                "SELECT attname::text, atttypid::int8, format_type(atttypid, atttypmod) \
                 FROM pg_attribute \
                 WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped \
                   AND attgenerated = '' \
                 ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(|e| format!("rule \"{rule}\": cannot read columns of \"{name}\": {e}"))?;
        let oids: Vec<u32> = column_rows
            .iter()
            .map(|r| r.get::<_, i64>(1) as u32)
            .collect();
        tables.types.resolve(client, &oids).await?;
        let columns: Vec<Column> = column_rows
            .iter()
            .map(|r| {
                let type_oid = r.get::<_, i64>(1) as u32;
                Column {
                    name: r.get(0),
                    type_oid,
                    ty: tables.types.lookup(type_oid),
                    sql_type: r.get(2),
                }
            })
            .collect();
        let primary_key: Vec<String> = client
            .query(
                "SELECT a.attname::text \
                 FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
                 ORDER BY k.ord",
                &[&oid],
            )
            .await
            .map_err(|e| format!("rule \"{rule}\": cannot read the key of \"{name}\": {e}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let key = choose_key(rule, name, &identity, &primary_key, &columns)?;
        let shape = Arc::new(Shape {
            source: format!("{schema}.{relname}"),
            target: target_name(name),
            columns,
            key,
        });
        tables.by_oid.insert(oid as u32, shape.clone());
        tables.ordered.push((oid as u32, shape));
    }
    Ok(tables)
}

/// The key a target document or row is identified by: the primary key when updates
/// and deletes carry it (identity DEFAULT or FULL), else every column (FULL without a
/// primary key). Other identities are refused with what to change.
fn choose_key(
    rule: &str,
    table: &str,
    identity: &str,
    primary_key: &[String],
    columns: &[Column],
) -> Result<Vec<usize>, String> {
    let position = |name: &String| columns.iter().position(|c| &c.name == name);
    match identity {
        "d" if primary_key.is_empty() => Err(format!(
            "rule \"{rule}\": table \"{table}\" has no primary key; add one or run \
             ALTER TABLE {table} REPLICA IDENTITY FULL"
        )),
        "d" | "f" if !primary_key.is_empty() => primary_key
            .iter()
            .map(|k| {
                position(k).ok_or_else(|| {
                    format!("rule \"{rule}\": key column \"{k}\" of \"{table}\" is generated")
                })
            })
            .collect(),
        "f" => Ok((0..columns.len()).collect()),
        "n" => Err(format!(
            "rule \"{rule}\": table \"{table}\" has REPLICA IDENTITY NOTHING, so its updates \
             and deletes cannot be mirrored; use DEFAULT (with a primary key) or FULL"
        )),
        _ => Err(format!(
            "rule \"{rule}\": table \"{table}\" has REPLICA IDENTITY USING INDEX; use DEFAULT \
             (with a primary key) or FULL"
        )),
    }
}

/// The name on the target: the table name without a `public.` prefix; other schemas
/// keep theirs (`sales.orders`).
fn target_name(name: &str) -> String {
    name.strip_prefix("public.").unwrap_or(name).to_string()
}

/// A slot or publication name derived from the rule's name.
pub fn object_name(rule: &str) -> String {
    let cleaned: String = rule
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("replicator_{cleaned}");
    name.truncate(63);
    name
}

/// Creates the rule's publication, or makes it cover exactly the rule's tables.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &RuleTables,
) -> Result<(), String> {
    let list = tables
        .ordered
        .iter()
        .map(|(_, s)| {
            let (schema, table) = s.source.split_once('.').unwrap_or(("public", &s.source));
            format!("{}.{}", quote_ident(schema), quote_ident(table))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| format!("cannot look up publication {publication}: {e}"))?
        .is_some();
    let sql = if exists {
        format!(
            "ALTER PUBLICATION {} SET TABLE {list}",
            quote_ident(publication)
        )
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list}",
            quote_ident(publication)
        )
    };
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| format!("cannot set up publication {publication}: {e}"))
}

/// The slot's confirmed position on the source, if the slot exists there.
pub async fn slot_position(client: &Client, slot: &str) -> Result<Option<u64>, String> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("cannot look up slot {slot}: {e}"))?;
    Ok(row.map(|r| {
        r.get::<_, Option<String>>(0)
            .and_then(|s| crate::cluster::health::parse_lsn(&s))
            .unwrap_or(0)
    }))
}

/// The source's current WAL position: where a run that starts now must get to.
pub async fn current_lsn(client: &Client) -> Result<u64, String> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| format!("cannot read the source's WAL position: {e}"))?;
    crate::cluster::health::parse_lsn(&row.get::<_, String>(0))
        .ok_or_else(|| "unreadable WAL position".to_string())
}
