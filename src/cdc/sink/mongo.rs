//! The MongoDB sink. A single-column key becomes the document's `_id`; a composite key
//! a sub-document `_id` of its columns. Each document carries `_replicator_lsn`, the
//! commit position of the change that wrote it, and every write is conditional on it:
//! a document is only replaced by a change at the same or a later position.
//!
//! Writes use the `update` and `delete` commands with many statements each (not the
//! driver's `bulk_write`, which needs MongoDB 8 and is not understood by every
//! MongoDB-protocol server). A conditional upsert whose filter does not match an
//! existing, newer document fails with a duplicate-key error: that is the "skip" case
//! and is counted, not raised.

use mongodb::bson::{Bson, Document, doc};
use mongodb::{Client, Database};

use super::super::change::{Change, Op};
use super::super::pgoutput::Datum;
use super::super::values::to_bson;
use super::{Applied, POSITION_FIELD, SinkError};
use crate::config::ConflictResolution;

/// Statements per command; far below MongoDB's limits on count and message size.
const STATEMENTS_PER_COMMAND: usize = 500;

pub struct MongoSink {
    database: Database,
}

impl MongoSink {
    pub async fn connect(uri: &str) -> Result<MongoSink, SinkError> {
        let options = mongodb::options::ClientOptions::parse(uri)
            .await
            .map_err(|e| {
                SinkError::Config(format!(
                    "bad MongoDB uri: {}",
                    crate::config::mask_passwords(&e.to_string())
                ))
            })?;
        let database = options
            .default_database
            .clone()
            .ok_or_else(|| SinkError::Config("the MongoDB uri names no database".into()))?;
        let client = Client::with_options(options).map_err(|e| {
            SinkError::Config(format!(
                "bad MongoDB options: {}",
                crate::config::mask_passwords(&e.to_string())
            ))
        })?;
        let database = client.database(&database);
        database.run_command(doc! {"ping": 1}).await.map_err(|e| {
            SinkError::Unavailable(format!(
                "MongoDB does not answer: {}",
                crate::config::mask_passwords(&e.to_string())
            ))
        })?;
        Ok(MongoSink { database })
    }

    pub async fn apply(
        &self,
        changes: &[Change],
        truncates: &[Change],
        mode: ConflictResolution,
    ) -> Result<Applied, SinkError> {
        let mut applied = Applied::default();
        // Rows the source inserted go in with plain inserts (much cheaper than upserts
        // with a filter); those whose key the target already has take the guarded
        // upsert path like every other change.
        let (fresh, mut upsert_changes): (Vec<&Change>, Vec<&Change>) = changes
            .iter()
            .filter(|c| matches!(c.op, Op::Upsert(_)))
            .partition(|c| {
                c.insert && matches!(&c.op, Op::Upsert(row) if !row.contains(&Datum::Unchanged))
            });
        upsert_changes.extend(self.insert_fresh(fresh, &mut applied).await?);
        let mut upserts: Vec<(&str, Document)> = Vec::new();
        for change in upsert_changes {
            let Op::Upsert(row) = &change.op else {
                continue;
            };
            let Some(id) = document_id(change, row) else {
                continue;
            };
            let mut filter = guard(mode, change.position);
            filter.insert("_id", id);
            upserts.push((
                change.shape.target.as_str(),
                doc! {"q": filter, "u": {"$set": fields(change, row)}, "upsert": true},
            ));
        }
        let mut deletes: Vec<(&str, Document)> = Vec::new();
        for change in changes {
            let collection = change.shape.target.as_str();
            match &change.op {
                Op::Upsert(_) => {}
                Op::Delete(key) => {
                    let Some(id) = key_id(change, key) else {
                        continue;
                    };
                    let mut filter = guard(mode, change.position);
                    filter.insert("_id", id);
                    deletes.push((collection, doc! {"q": filter, "limit": 1}));
                }
                Op::Truncate => {}
            }
        }
        self.run_grouped("update", "updates", upserts, &mut applied)
            .await?;
        self.run_grouped("delete", "deletes", deletes, &mut applied)
            .await?;
        let truncated: Vec<(&str, Document)> = truncates
            .iter()
            .map(|t| {
                (
                    t.shape.target.as_str(),
                    doc! {"q": {POSITION_FIELD: {"$lte": lsn_value(t.position)}}, "limit": 0},
                )
            })
            .collect();
        self.run_grouped("delete", "deletes", truncated, &mut applied)
            .await?;
        Ok(applied)
    }

    /// Sends the statements collection by collection, in commands of bounded size.
    async fn run_grouped(
        &self,
        command: &str,
        list: &str,
        mut statements: Vec<(&str, Document)>,
        applied: &mut Applied,
    ) -> Result<(), SinkError> {
        statements.sort_by(|a, b| a.0.cmp(b.0));
        let mut start = 0;
        while start < statements.len() {
            let collection = statements[start].0;
            let mut end = start;
            while end < statements.len()
                && statements[end].0 == collection
                && end - start < STATEMENTS_PER_COMMAND
            {
                end += 1;
            }
            let chunk: Vec<Document> = statements[start..end]
                .iter()
                .map(|(_, d)| d.clone())
                .collect();
            let count = chunk.len() as u64;
            let skipped = match self
                .run_command(command, collection, list, chunk.clone())
                .await
            {
                Ok(skipped) => skipped,
                // Some servers fail the whole command on a duplicate key instead of
                // reporting it per statement: then go one statement at a time.
                Err(CommandFailure::DuplicateKey) => {
                    let mut skipped = 0;
                    for statement in chunk {
                        match self
                            .run_command(command, collection, list, vec![statement])
                            .await
                        {
                            Ok(n) => skipped += n,
                            Err(CommandFailure::DuplicateKey) => skipped += 1,
                            Err(CommandFailure::Other(e)) => return Err(e),
                        }
                    }
                    skipped
                }
                Err(CommandFailure::Other(e)) => return Err(e),
            };
            applied.written += count - skipped;
            applied.skipped += skipped;
            start = end;
        }
        Ok(())
    }
}

impl MongoSink {
    pub async fn sweep(
        &self,
        shapes: &[std::sync::Arc<super::super::schema::Shape>],
        position: i64,
    ) -> Result<u64, SinkError> {
        let mut removed = 0;
        for shape in shapes {
            let result = self
                .database
                .collection::<Document>(&shape.target)
                .delete_many(doc! {POSITION_FIELD: {"$lt": lsn_value(position)}})
                .await
                .map_err(|e| SinkError::Unavailable(format!("MongoDB delete failed: {e}")))?;
            removed += result.deleted_count;
        }
        Ok(removed)
    }
}

impl MongoSink {
    /// Inserts the rows; returns the changes whose key the target already had.
    async fn insert_fresh<'c>(
        &self,
        mut fresh: Vec<&'c Change>,
        applied: &mut Applied,
    ) -> Result<Vec<&'c Change>, SinkError> {
        fresh.sort_by(|a, b| a.shape.target.cmp(&b.shape.target));
        let mut existing = Vec::new();
        let mut start = 0;
        while start < fresh.len() {
            let collection = fresh[start].shape.target.as_str();
            let mut end = start;
            while end < fresh.len()
                && fresh[end].shape.target == collection
                && end - start < STATEMENTS_PER_COMMAND
            {
                end += 1;
            }
            let chunk = &fresh[start..end];
            let documents: Vec<Document> = chunk
                .iter()
                .filter_map(|c| {
                    let Op::Upsert(row) = &c.op else { return None };
                    let mut document = doc! {"_id": document_id(c, row)?};
                    document.extend(fields(c, row));
                    Some(document)
                })
                .collect();
            let reply = self
                .database
                .run_command(doc! {"insert": collection, "documents": documents, "ordered": false})
                .await;
            match reply {
                Ok(reply) => {
                    let mut failed = 0;
                    if let Ok(errors) = reply.get_array("writeErrors") {
                        for error in errors {
                            let error = error.as_document();
                            let code = error.and_then(|d| d.get("code")).and_then(as_code);
                            let index = error
                                .and_then(|d| d.get("index"))
                                .and_then(as_code)
                                .and_then(|i| usize::try_from(i).ok());
                            match (code, index) {
                                (Some(DUPLICATE_KEY), Some(i)) if i < chunk.len() => {
                                    existing.push(chunk[i]);
                                    failed += 1;
                                }
                                _ => {
                                    return Err(SinkError::Rejected(format!(
                                        "MongoDB refused an insert into {collection}: {error:?}"
                                    )));
                                }
                            }
                        }
                    }
                    applied.written += chunk.len() as u64 - failed;
                }
                // A server that fails the whole command on a duplicate key: the
                // guarded upserts redo the chunk (rewriting what did go in is harmless).
                Err(e) if matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == DUPLICATE_KEY) =>
                {
                    existing.extend_from_slice(chunk);
                }
                Err(e) => {
                    return Err(SinkError::Unavailable(format!(
                        "MongoDB insert failed: {e}"
                    )));
                }
            }
            start = end;
        }
        Ok(existing)
    }
}

fn as_code(value: &Bson) -> Option<i32> {
    match value {
        Bson::Int32(v) => Some(*v),
        Bson::Int64(v) => i32::try_from(*v).ok(),
        Bson::Double(v) => Some(*v as i32),
        _ => None,
    }
}

/// The document's fields: every column the change carries, and its position.
fn fields(change: &Change, row: &[Datum]) -> Document {
    let mut fields = Document::new();
    for (column, value) in change.shape.columns.iter().zip(row) {
        match value {
            Datum::Unchanged => {}
            Datum::Null => {
                fields.insert(column.name.clone(), Bson::Null);
            }
            Datum::Text(text) => {
                fields.insert(column.name.clone(), to_bson(text, column.ty));
            }
        }
    }
    fields.insert(POSITION_FIELD, lsn_value(change.position));
    fields
}

enum CommandFailure {
    DuplicateKey,
    Other(SinkError),
}

impl MongoSink {
    /// Runs one write command; returns how many statements the position guard turned
    /// away (duplicate-key write errors).
    async fn run_command(
        &self,
        command: &str,
        collection: &str,
        list: &str,
        statements: Vec<Document>,
    ) -> Result<u64, CommandFailure> {
        let reply = self
            .database
            .run_command(doc! {command: collection, list: statements, "ordered": false})
            .await
            .map_err(|e| match *e.kind {
                mongodb::error::ErrorKind::Command(ref c) if c.code == DUPLICATE_KEY => {
                    CommandFailure::DuplicateKey
                }
                _ => CommandFailure::Other(SinkError::Unavailable(format!(
                    "MongoDB {command} failed: {e}"
                ))),
            })?;
        let mut skipped = 0;
        if let Ok(errors) = reply.get_array("writeErrors") {
            for error in errors {
                let code = error
                    .as_document()
                    .and_then(|d| d.get("code"))
                    .and_then(as_code);
                if code == Some(DUPLICATE_KEY) {
                    skipped += 1;
                } else {
                    return Err(CommandFailure::Other(SinkError::Rejected(format!(
                        "MongoDB refused a write to {collection}: {error}"
                    ))));
                }
            }
        }
        Ok(skipped)
    }
}

const DUPLICATE_KEY: i32 = 11000;

/// The filter part that protects newer documents. `source-wins` also replaces
/// documents the rule did not write; `target-wins` leaves those alone.
fn guard(mode: ConflictResolution, lsn: i64) -> Document {
    match mode {
        ConflictResolution::SourceWins => doc! {"$or": [
            {POSITION_FIELD: {"$lte": lsn_value(lsn)}},
            {POSITION_FIELD: {"$exists": false}},
        ]},
        ConflictResolution::TargetWins => doc! {POSITION_FIELD: {"$lte": lsn_value(lsn)}},
    }
}

fn lsn_value(position: i64) -> Bson {
    Bson::Int64(position)
}

fn document_id(change: &Change, row: &[Datum]) -> Option<Bson> {
    let key: Vec<Datum> = change.shape.key.iter().map(|&i| row[i].clone()).collect();
    key_id(change, &key)
}

/// `_id` from the key values: the value itself for one column, else a sub-document.
fn key_id(change: &Change, key: &[Datum]) -> Option<Bson> {
    let shape = &change.shape;
    let value = |i: usize, datum: &Datum| match datum {
        Datum::Text(text) => Some(to_bson(text, shape.columns[shape.key[i]].ty)),
        Datum::Null => Some(Bson::Null),
        Datum::Unchanged => None,
    };
    if key.len() == 1 {
        return value(0, &key[0]);
    }
    let mut id = Document::new();
    for (i, datum) in key.iter().enumerate() {
        id.insert(shape.columns[shape.key[i]].name.clone(), value(i, datum)?);
    }
    Some(Bson::Document(id))
}
