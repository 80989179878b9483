//! CDC rules against the real test bed: a MongoDB-protocol server (MONGODB_URI, or the
//! in-memory one the test bed installs) and another Postgres database as targets.
//! Each test has its own tables, rule (slot, publication) and target database.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc, spec::BinarySubtype};
use replicator::server::Proxy;
use replicator::testbed::mongo::MongoServer;
use replicator::testbed::{SUPERUSER, SUPERUSER_PASSWORD};

const CONTROL_USER: &str = "[failover]\nuser = \"postgres\"\npassword = \"postgres\"\n";

fn mongo() -> &'static MongoServer {
    static MONGO: OnceLock<MongoServer> = OnceLock::new();
    MONGO.get_or_init(|| {
        MongoServer::start(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("jongodb"))
            .expect("start MongoDB-protocol server")
    })
}

async fn mongo_db(name: &str) -> mongodb::Database {
    let client = mongodb::Client::with_uri_str(mongo().uri(name))
        .await
        .expect("mongo client");
    client.database(name)
}

async fn documents(db: &mongodb::Database, collection: &str) -> Vec<Document> {
    let cursor = db
        .collection::<Document>(collection)
        .find(doc! {})
        .await
        .expect("find");
    let mut docs: Vec<Document> = cursor.try_collect().await.expect("read documents");
    docs.sort_by_key(|d| format!("{:?}", d.get("_id")));
    docs
}

/// Polls the collection until `check` holds, or fails showing what it holds.
async fn wait_documents(
    db: &mongodb::Database,
    collection: &str,
    what: &str,
    check: impl Fn(&[Document]) -> bool,
) -> Vec<Document> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let docs = documents(db, collection).await;
        if check(&docs) {
            return docs;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; {collection} holds {} documents: {:?}",
            docs.len(),
            docs.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn by_id(docs: &[Document], id: Bson) -> Option<&Document> {
    docs.iter().find(|d| d.get("_id") == Some(&id))
}

/// A test config with one target and one rule.
fn rule_config(rule: &str, tables: &[&str], target: &str, rule_extra: &str) -> String {
    let collections = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{}\n{CONTROL_USER}\n{target}\n[[rules]]\nname = \"{rule}\"\nsource = \"app\"\ntarget = \"sink\"\ncollections = [{collections}]\n{rule_extra}\n",
        config_text(cluster(), "", "")
    )
}

fn mongo_target(db: &str) -> String {
    format!(
        "[targets.sink]\nkind = \"mongodb\"\nuri = \"{}&serverSelectionTimeoutMS=2000\"\n",
        mongo().uri(db)
    )
}

async fn run_sql(sql: &str) {
    primary_client()
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Stops the proxy and removes the rule's slot and publication from the source.
async fn finish(proxy: Proxy, rule: &str) {
    proxy.stop(Duration::from_secs(2)).await;
    drop_rule_objects(rule).await;
}

/// Removes the rule's slot and publication, once no stream holds the slot any more.
async fn drop_rule_objects(rule: &str) {
    let name = replicator::cdc::schema::object_name(rule);
    let primary = primary_client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dropped = primary
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{name}'; DROP PUBLICATION IF EXISTS {name}"
            ))
            .await;
        if dropped.is_ok() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn admin_client(proxy: &Proxy) -> tokio_postgres::Client {
    connect(&proxy_url(proxy, "app", "secret", "replicator"))
        .await
        .expect("admin console")
}

/// `SYNC <rule>` through the admin console: the report row by column name.
async fn sync(proxy: &Proxy, rule: &str) -> Result<Vec<(String, String)>, String> {
    let admin = admin_client(proxy).await;
    let messages = admin
        .simple_query(&format!("SYNC {rule}"))
        .await
        .map_err(|e| {
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or(e.to_string())
        })?;
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            return Ok(row
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").to_string()))
                .collect());
        }
    }
    Err("SYNC returned no row".into())
}

fn field<'a>(report: &'a [(String, String)], name: &str) -> &'a str {
    report
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {report:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_stream_into_mongodb() {
    create_table("cdc_users", "id int primary key, name text, score int").await;
    run_sql("INSERT INTO cdc_users SELECT g, 'user ' || g, g * 10 FROM generate_series(1, 300) g")
        .await;
    let db = mongo_db("cdc_snapshot").await;
    let proxy = start_proxy_with(&rule_config(
        "users-to-mongo",
        &["cdc_users"],
        &mongo_target("cdc_snapshot"),
        "interval_ms = 0",
    ))
    .await;
    let docs = wait_documents(&db, "cdc_users", "the snapshot", |d| d.len() == 300).await;
    let first = by_id(&docs, Bson::Int32(1)).expect("document 1");
    assert_eq!(first.get_str("name").unwrap(), "user 1");
    assert_eq!(first.get_i32("score").unwrap(), 10);
    assert!(first.get_i64("_replicator_lsn").unwrap() > 0);

    // Changes made through the proxy while the rule follows the WAL.
    let app = app_client(&proxy).await;
    app.batch_execute(
        "INSERT INTO cdc_users SELECT g, 'new ' || g, 0 FROM generate_series(301, 320) g;
         UPDATE cdc_users SET name = 'renamed' WHERE id = 1;
         DELETE FROM cdc_users WHERE id = 2;
         BEGIN; UPDATE cdc_users SET score = 1 WHERE id = 3; UPDATE cdc_users SET score = 2 WHERE id = 3; COMMIT;",
    )
    .await
    .expect("changes");
    let docs = wait_documents(&db, "cdc_users", "the streamed changes", |d| {
        d.len() == 319
            && by_id(d, Bson::Int32(1)).is_some_and(|x| x.get_str("name") == Ok("renamed"))
            && by_id(d, Bson::Int32(3)).is_some_and(|x| x.get_i32("score") == Ok(2))
    })
    .await;
    assert!(
        by_id(&docs, Bson::Int32(2)).is_none(),
        "deleted row mirrored"
    );
    assert_eq!(
        by_id(&docs, Bson::Int32(320)).unwrap().get_str("name"),
        Ok("new 320")
    );

    // SYNC on a following rule returns once it has caught up; SHOW RULES and /status agree.
    let report = sync(&proxy, "users-to-mongo").await.expect("SYNC");
    assert_eq!(field(&report, "rule"), "users-to-mongo");
    // The same through the command line, and an unknown rule named in its error.
    let admin = proxy.admin_addr.unwrap().to_string();
    let cli = |rule: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_replicator"))
            .args(["sync", rule, "--admin", &admin])
            .env("REPLICATOR_ADMIN_TOKEN", replicator::testbed::ADMIN_TOKEN)
            .output()
            .expect("run replicator sync")
    };
    let out = tokio::task::block_in_place(|| cli("users-to-mongo"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("users-to-mongo") && stdout.contains("position"),
        "{stdout}"
    );
    let out = tokio::task::block_in_place(|| cli("no-such-rule"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rule named \"no-such-rule\""));
    let s = status(&proxy).await;
    let rule = &s.rules[0];
    assert_eq!(rule.snapshot_rows, 300);
    assert_eq!(rule.inserted, 20);
    assert_eq!(rule.updated, 3);
    assert_eq!(rule.deleted, 1);
    assert_eq!(rule.errors, 0, "{rule:?}");
    assert!(!rule.position.is_empty());
    let admin = admin_client(&proxy).await;
    let shown = admin.simple_query("SHOW RULES").await.expect("SHOW RULES");
    let row = shown
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a rule row");
    assert_eq!(row.get("rule"), Some("users-to-mongo"));
    assert_eq!(row.get("inserted"), Some("20"));
    let (code, metrics) = admin_http(&proxy.admin_addr.unwrap().to_string())
        .get("/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("replicator_cdc_rows_total{rule=\"users-to-mongo\",op=\"snapshot\"} 300"),
        "{metrics}"
    );
    finish(proxy, "users-to-mongo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_types_become_natural_bson_types() {
    create_table(
        "cdc_types",
        "id bigint primary key, small smallint, flag boolean, ratio double precision,
         price numeric(20,6), label text, doc jsonb, raw json, tags text[], matrix int[],
         blob bytea, uid uuid, at timestamptz, local timestamp, day date, span interval",
    )
    .await;
    run_sql(
        "INSERT INTO cdc_types VALUES (9000000000, 7, true, 0.25, 12345.678901, 'hello',
           '{\"a\": {\"b\": [1, 2]}}', '[1, \"x\"]', ARRAY['x', 'y, z', NULL], ARRAY[1, 2, 3],
           '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-05-06 07:08:09.123+02',
           '2024-05-06 07:08:09.5', '2024-05-06', '1 day 2 hours')",
    )
    .await;
    let db = mongo_db("cdc_types").await;
    let proxy = start_proxy_with(&rule_config(
        "types",
        &["cdc_types"],
        &mongo_target("cdc_types"),
        "interval_ms = 3600000",
    ))
    .await;
    sync(&proxy, "types").await.expect("SYNC");
    let docs = wait_documents(&db, "cdc_types", "the row", |d| d.len() == 1).await;
    let d = &docs[0];
    assert_eq!(d.get("_id"), Some(&Bson::Int64(9_000_000_000)));
    assert_eq!(d.get("small"), Some(&Bson::Int32(7)));
    assert_eq!(d.get("flag"), Some(&Bson::Boolean(true)));
    assert_eq!(d.get("ratio"), Some(&Bson::Double(0.25)));
    match d.get("price") {
        Some(Bson::Decimal128(v)) => assert_eq!(v.to_string(), "12345.678901"),
        other => panic!("price: {other:?}"),
    }
    assert_eq!(d.get("label"), Some(&Bson::String("hello".into())));
    assert_eq!(
        d.get("doc"),
        Some(&Bson::Document(doc! {"a": {"b": [1, 2]}}))
    );
    assert_eq!(
        d.get("raw"),
        Some(&Bson::Array(vec![Bson::Int32(1), Bson::String("x".into())]))
    );
    assert_eq!(
        d.get("tags"),
        Some(&Bson::Array(vec![
            Bson::String("x".into()),
            Bson::String("y, z".into()),
            Bson::Null
        ]))
    );
    assert_eq!(
        d.get("matrix"),
        Some(&Bson::Array(vec![
            Bson::Int32(1),
            Bson::Int32(2),
            Bson::Int32(3)
        ]))
    );
    match d.get("blob") {
        Some(Bson::Binary(b)) => {
            assert_eq!(b.subtype, BinarySubtype::Generic);
            assert_eq!(b.bytes, vec![0x00, 0xff, 0x10]);
        }
        other => panic!("blob: {other:?}"),
    }
    match d.get("uid") {
        Some(Bson::Binary(b)) => {
            assert_eq!(b.subtype, BinarySubtype::Uuid);
            assert_eq!(b.bytes.len(), 16);
            assert_eq!(b.bytes[0], 0xa0);
        }
        other => panic!("uid: {other:?}"),
    }
    let millis = |name: &str| match d.get(name) {
        Some(Bson::DateTime(t)) => t.timestamp_millis(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(millis("at"), 1_714_972_089_123); // 05:08:09.123 UTC
    assert_eq!(millis("local"), 1_714_979_289_500);
    assert_eq!(millis("day"), 1_714_953_600_000);
    assert_eq!(d.get("span"), Some(&Bson::String("P1DT2H".into())));
    finish(proxy, "types").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_deletes_and_untouched_toast_values() {
    create_table(
        "cdc_lines",
        "order_id int, line int, qty int, body text, PRIMARY KEY (order_id, line)",
    )
    .await;
    // Stored out of line and uncompressed: an update that does not touch it sends no value.
    run_sql("ALTER TABLE cdc_lines ALTER body SET STORAGE EXTERNAL").await;
    let db = mongo_db("cdc_lines").await;
    let proxy = start_proxy_with(&rule_config(
        "lines",
        &["cdc_lines"],
        &mongo_target("cdc_lines"),
        "interval_ms = 0",
    ))
    .await;
    wait_status(&proxy, Duration::from_secs(30), "rule streaming", |s| {
        s.rules.first().is_some_and(|r| r.state == "streaming")
    })
    .await;
    run_sql(
        "INSERT INTO cdc_lines VALUES (1, 1, 5, repeat('x', 20000)), (1, 2, 1, 'short'), (2, 1, 3, 'gone');
         UPDATE cdc_lines SET qty = 6 WHERE order_id = 1 AND line = 1;
         DELETE FROM cdc_lines WHERE order_id = 2;",
    )
    .await;
    let id = |o: i32, l: i32| Bson::Document(doc! {"order_id": o, "line": l});
    let docs = wait_documents(&db, "cdc_lines", "composite keys", |d| {
        d.len() == 2 && by_id(d, id(1, 1)).is_some_and(|x| x.get_i32("qty") == Ok(6))
    })
    .await;
    let big = by_id(&docs, id(1, 1)).unwrap();
    assert_eq!(
        big.get_str("body").map(str::len),
        Ok(20000),
        "an update that left the TOASTed value alone must not erase it"
    );
    assert!(by_id(&docs, id(2, 1)).is_none());
    // The same in separate transactions (separate batches).
    run_sql("UPDATE cdc_lines SET qty = 7 WHERE order_id = 1 AND line = 1").await;
    sync(&proxy, "lines").await.expect("SYNC");
    let docs = documents(&db, "cdc_lines").await;
    let big = by_id(&docs, id(1, 1)).unwrap();
    assert_eq!(big.get_i32("qty"), Ok(7));
    assert_eq!(big.get_str("body").map(str::len), Ok(20000));
    // A key change moves the document.
    run_sql("UPDATE cdc_lines SET line = 3 WHERE order_id = 1 AND line = 2").await;
    sync(&proxy, "lines").await.expect("SYNC");
    let docs = documents(&db, "cdc_lines").await;
    assert!(by_id(&docs, id(1, 2)).is_none());
    assert_eq!(by_id(&docs, id(1, 3)).unwrap().get_str("body"), Ok("short"));
    finish(proxy, "lines").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_resolution_source_wins_and_target_wins() {
    for (mode, table) in [("target-wins", "cdc_tw"), ("source-wins", "cdc_sw")] {
        create_table(table, "id int primary key, name text").await;
        run_sql(&format!(
            "INSERT INTO {table} VALUES (1, 'source 1'), (2, 'source 2')"
        ))
        .await;
        let db = mongo_db(table).await;
        // The target already has document 1, written by someone else.
        db.collection::<Document>(table)
            .insert_one(doc! {"_id": 1, "name": "target's own"})
            .await
            .expect("seed target");
        let rule = format!("conflict-{table}");
        let proxy = start_proxy_with(&rule_config(
            &rule,
            &[table],
            &mongo_target(table),
            &format!("interval_ms = 3600000\nconflict_resolution = \"{mode}\""),
        ))
        .await;
        sync(&proxy, &rule).await.expect("SYNC");
        run_sql(&format!(
            "UPDATE {table} SET name = name || ' updated'; INSERT INTO {table} VALUES (3, 'source 3')"
        ))
        .await;
        sync(&proxy, &rule).await.expect("SYNC");
        let docs = documents(&db, table).await;
        assert_eq!(docs.len(), 3, "{mode}: {docs:?}");
        let name = |id: i32| {
            by_id(&docs, Bson::Int32(id))
                .and_then(|d| d.get_str("name").ok())
                .unwrap_or_default()
                .to_string()
        };
        if mode == "target-wins" {
            assert_eq!(
                name(1),
                "target's own",
                "target-wins kept the target's document"
            );
            let s = status(&proxy).await;
            assert!(s.rules[0].skipped >= 2, "{:?}", s.rules[0]);
        } else {
            assert_eq!(name(1), "source 1 updated", "source-wins overwrote it");
        }
        assert_eq!(name(2), "source 2 updated");
        assert_eq!(name(3), "source 3");
        finish(proxy, &rule).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_cannot_work_is_refused_with_its_name() {
    create_table("cdc_nokey", "id int, name text").await;
    let proxy = start_proxy_with(&rule_config(
        "no-key",
        &["cdc_nokey"],
        &mongo_target("cdc_refused"),
        "interval_ms = 3600000",
    ))
    .await;
    let error = sync(&proxy, "no-key").await.expect_err("refused");
    assert!(
        error.contains("rule \"no-key\"") && error.contains("no primary key"),
        "{error}"
    );
    let s = wait_status(&proxy, Duration::from_secs(10), "refused state", |s| {
        s.rules[0].state == "refused"
    })
    .await;
    assert!(s.rules[0].errors >= 1);
    // Client traffic is not affected.
    let app = app_client(&proxy).await;
    app.simple_query("SELECT 1").await.expect("query");
    finish(proxy, "no-key").await;

    let proxy = start_proxy_with(&rule_config(
        "missing",
        &["cdc_no_such_table"],
        &mongo_target("cdc_refused"),
        "interval_ms = 3600000",
    ))
    .await;
    let error = sync(&proxy, "missing").await.expect_err("refused");
    assert!(
        error.contains("rule \"missing\"") && error.contains("does not exist"),
        "{error}"
    );
    finish(proxy, "missing").await;
}

/// A TCP relay to the MongoDB server that can be cut and restored on the same port.
struct Relay {
    port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(upstream: &str) -> Relay {
        let mut relay = Relay {
            port: replicator::testbed::free_port().expect("port"),
            upstream: upstream.to_string(),
            task: None,
        };
        relay.up().await;
        relay
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind relay");
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Closes the port and every relayed connection.
    fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_goes_down_is_retried_and_catches_up() {
    create_table("cdc_outage", "id int primary key, v text").await;
    run_sql("INSERT INTO cdc_outage VALUES (1, 'before')").await;
    let upstream = mongo().base.trim_start_matches("mongodb://").to_string();
    let mut relay = Relay::start(&upstream).await;
    let target = format!(
        "[targets.sink]\nkind = \"mongodb\"\nuri = \"mongodb://127.0.0.1:{}/cdc_outage?directConnection=true&serverSelectionTimeoutMS=1000&connectTimeoutMS=1000\"\n",
        relay.port
    );
    let db = mongo_db("cdc_outage").await;
    let proxy = start_proxy_with(&rule_config(
        "outage",
        &["cdc_outage"],
        &target,
        "interval_ms = 0",
    ))
    .await;
    wait_documents(&db, "cdc_outage", "the snapshot", |d| d.len() == 1).await;

    relay.down();
    tokio::time::sleep(Duration::from_millis(300)).await;
    run_sql("INSERT INTO cdc_outage SELECT g, 'during' FROM generate_series(2, 50) g").await;
    let s = wait_status(&proxy, Duration::from_secs(30), "the rule to retry", |s| {
        s.rules[0].state == "retrying" && s.rules[0].errors > 0
    })
    .await;
    assert!(s.rules[0].last_error.is_some());
    // Clients are not affected while the target is down.
    let app = app_client(&proxy).await;
    app.batch_execute("INSERT INTO cdc_outage VALUES (51, 'through the proxy')")
        .await
        .expect("write during the outage");

    relay.up().await;
    let docs = wait_documents(&db, "cdc_outage", "catch-up after the outage", |d| {
        d.len() == 51
    })
    .await;
    assert_eq!(
        by_id(&docs, Bson::Int32(51)).unwrap().get_str("v"),
        Ok("through the proxy")
    );
    wait_status(
        &proxy,
        Duration::from_secs(30),
        "the rule to recover",
        |s| s.rules[0].last_error.is_none(),
    )
    .await;
    finish(proxy, "outage").await;
}

// ---- Postgres targets and crashes ----

async fn create_database(name: &str) -> String {
    let primary = primary_client().await;
    primary
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop database");
    primary
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    format!(
        "postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{name}",
        primary_port()
    )
}

/// Rows of a table as JSON text (without the position column), sorted; none while the
/// table does not exist yet.
async fn table_rows(url: &str, table: &str) -> Vec<String> {
    let client = connect(url).await.expect("connect");
    match client
        .query(
            &format!("SELECT (to_jsonb(t) - '_replicator_lsn')::text FROM {table} t ORDER BY 1"),
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Vec::new(),
        Err(e) => panic!("read {table}: {e}"),
    }
}

fn source_url() -> String {
    cluster().primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_postgres_mirror_is_exact() {
    create_table(
        "cdc_pg",
        "id int primary key, price numeric(12,3), at timestamptz, tags text[], doc jsonb, blob bytea, note text",
    )
    .await;
    run_sql(
        "INSERT INTO cdc_pg SELECT g, g * 1.125, '2024-01-01'::timestamptz + g * interval '1 hour',
           ARRAY['a', g::text], jsonb_build_object('g', g), '\\xdead', NULL FROM generate_series(1, 500) g",
    )
    .await;
    let target_url = create_database("cdc_pg_mirror").await;
    let target = format!("[targets.sink]\nkind = \"postgres\"\nuri = \"{target_url}\"\n");
    let proxy = start_proxy_with(&rule_config(
        "pg-mirror",
        &["cdc_pg"],
        &target,
        "interval_ms = 0",
    ))
    .await;
    let app = app_client(&proxy).await;
    app.batch_execute(
        "UPDATE cdc_pg SET note = 'changed', price = price * 2 WHERE id % 7 = 0;
         DELETE FROM cdc_pg WHERE id % 11 = 0;
         INSERT INTO cdc_pg VALUES (1000, 0.001, now(), '{}', '[]', '', 'new');",
    )
    .await
    .expect("changes");
    let report = sync(&proxy, "pg-mirror").await.expect("SYNC");
    assert!(!field(&report, "position").is_empty());
    let expected = table_rows(&source_url(), "cdc_pg").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mirrored = table_rows(&target_url, "cdc_pg").await;
        if mirrored == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mirror differs: {} rows vs {} on the source",
            mirrored.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // TRUNCATE empties the mirror too.
    app.batch_execute("TRUNCATE cdc_pg")
        .await
        .expect("truncate");
    sync(&proxy, "pg-mirror").await.expect("SYNC");
    assert!(table_rows(&target_url, "cdc_pg").await.is_empty());
    finish(proxy, "pg-mirror").await;
}

/// A config file for the proxy binary (fixed ports, its own state file) and its admin
/// address.
fn binary_config(rule: &str, tables: &[&str], target: &str) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cdc-{rule}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = replicator::testbed::free_port().unwrap();
    let admin_port = replicator::testbed::free_port().unwrap();
    let text = rule_config(rule, tables, target, "interval_ms = 0")
        .replace(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
        )
        .replace(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"127.0.0.1:{port}\""),
        );
    let state_line = text
        .lines()
        .find(|l| l.starts_with("state_file"))
        .unwrap()
        .to_string();
    let text = text.replace(
        &state_line,
        &format!("state_file = \"{}\"", dir.join("state.json").display()),
    );
    let config = dir.join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    (config, format!("127.0.0.1:{admin_port}"))
}

/// `POST /sync/<rule>` until the (re)started binary answers it.
async fn sync_over_http(admin: &str, rule: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok((200, body)) = admin_http(admin).post(&format!("/sync/{rule}")).await {
            return body;
        }
        assert!(Instant::now() < deadline, "the proxy never synced {rule}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the proxy binary with `config`, optionally with the crash failpoint.
fn spawn_binary(config: &Path, failpoint: bool) -> std::process::Child {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_replicator"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if failpoint {
        command.env("REPLICATOR_FAILPOINT", "cdc-after-apply");
    }
    command.spawn().expect("start replicator")
}

async fn slot_position(rule: &str) -> Option<String> {
    let name = replicator::cdc::schema::object_name(rule);
    primary_client()
        .await
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .expect("slot query")
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_apply_and_acknowledgement_loses_nothing() {
    init_logs();
    create_table("cdc_crash", "id int primary key, v text").await;
    run_sql("INSERT INTO cdc_crash SELECT g, 'snapshot' FROM generate_series(1, 20) g").await;
    let target_url = create_database("cdc_crash_mirror").await;
    let target = format!("[targets.sink]\nkind = \"postgres\"\nuri = \"{target_url}\"\n");
    let (config, admin) = binary_config("crash", &["cdc_crash"], &target);

    // First life: copies the snapshot, then dies right after writing the first streamed
    // batch, before confirming it to the slot.
    let mut first = spawn_binary(&config, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while table_rows(&target_url, "cdc_crash").await.len().lt(&20) {
        assert!(Instant::now() < deadline, "snapshot never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slot_position("crash").await.is_some(), "slot exists");
    run_sql("INSERT INTO cdc_crash SELECT g, 'streamed' FROM generate_series(21, 40) g").await;
    let after_insert: String = primary_client()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let status = tokio::task::spawn_blocking(move || first.wait())
        .await
        .unwrap()
        .expect("wait");
    assert_eq!(status.code(), Some(86), "the failpoint stopped the process");
    assert_eq!(
        table_rows(&target_url, "cdc_crash").await.len(),
        40,
        "the batch reached the target before the crash"
    );
    let slot = slot_position("crash").await.expect("slot kept");
    let behind: bool = primary_client()
        .await
        .query_one(
            "SELECT $1::text::pg_lsn < $2::text::pg_lsn",
            &[&slot, &after_insert],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        behind,
        "the slot ({slot}) must not pass the unconfirmed batch (committed by {after_insert})"
    );

    // Second life: the unconfirmed batch comes again; applying it twice is harmless.
    run_sql("UPDATE cdc_crash SET v = 'after restart' WHERE id = 40").await;
    let mut second = spawn_binary(&config, false);
    let body = sync_over_http(&admin, "crash").await;
    let report: replicator::cdc::stats::RunReport = serde_json::from_str(&body).unwrap();
    assert!(!report.snapshot, "the slot was reused, not re-created");
    let expected = table_rows(&source_url(), "cdc_crash").await;
    assert_eq!(table_rows(&target_url, "cdc_crash").await, expected);
    let (_, status_body) = admin_http(&admin).get("/status").await.unwrap();
    let s: replicator::admin::status::Status = serde_json::from_str(&status_body).unwrap();
    assert!(
        s.rules[0].inserted >= 20,
        "the unconfirmed inserts were streamed again: {:?}",
        s.rules[0]
    );
    let _ = second.kill();
    let _ = second.wait();
    drop_rule_objects("crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_rule_follows_the_new_primary() {
    init_logs();
    let own = tokio::task::spawn_blocking(|| {
        replicator::testbed::Cluster::start(replicator::testbed::ClusterOptions::default())
    })
    .await
    .unwrap()
    .expect("own cluster");
    let superuser = |port: u16| {
        connect_owned(format!(
            "postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{port}/app"
        ))
    };
    superuser(own.primary.port)
        .await
        .batch_execute(
            "CREATE TABLE cdc_fo (id int PRIMARY KEY, v text); ALTER TABLE cdc_fo OWNER TO app;
             INSERT INTO cdc_fo SELECT g, 'before' FROM generate_series(1, 50) g;",
        )
        .await
        .unwrap();
    tokio::task::block_in_place(|| own.wait_caught_up(Duration::from_secs(20))).unwrap();
    let db = mongo_db("cdc_failover").await;
    let text = format!(
        "{}\n[failover]\nuser = \"postgres\"\npassword = \"postgres\"\nhealth_check_interval_ms = 200\nfailure_threshold = 2\n\n{}\n[[rules]]\nname = \"fo\"\nsource = \"app\"\ntarget = \"sink\"\ncollections = [\"cdc_fo\"]\ninterval_ms = 0\n",
        config_text(&own, "lag_check_interval_ms = 100", ""),
        mongo_target("cdc_failover"),
    );
    let proxy = start_proxy_with(&text).await;
    wait_documents(&db, "cdc_fo", "the first snapshot", |d| d.len() == 50).await;
    let app = app_client(&proxy).await;
    app.batch_execute("INSERT INTO cdc_fo SELECT g, 'streamed' FROM generate_series(51, 60) g")
        .await
        .unwrap();
    wait_documents(&db, "cdc_fo", "streamed rows", |d| d.len() == 60).await;
    tokio::task::block_in_place(|| own.wait_caught_up(Duration::from_secs(20))).unwrap();

    own.primary.kill().unwrap();
    let s = wait_status(&proxy, Duration::from_secs(60), "a new primary", |s| {
        s.projects[0]
            .primary
            .as_deref()
            .is_some_and(|p| p != "master")
    })
    .await;
    let new_primary = s.projects[0].primary.clone().unwrap();
    // Writes through the same connection string land on the new primary...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let app = app_client(&proxy).await;
        match app
            .batch_execute("INSERT INTO cdc_fo SELECT g, 'after' FROM generate_series(61, 70) g")
            .await
        {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "write after failover: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and the rule, whose slot did not survive the failover (PostgreSQL 15), copies
    // the tables again from the new primary and goes on streaming from there.
    let docs = wait_documents(&db, "cdc_fo", "rows after the failover", |d| d.len() == 70).await;
    assert_eq!(
        by_id(&docs, Bson::Int32(70)).unwrap().get_str("v"),
        Ok("after")
    );
    wait_status(
        &proxy,
        Duration::from_secs(30),
        "the second snapshot, then streaming",
        // The copied rows are counted before the snapshot is recorded as complete, so
        // the count alone does not mean the rule has moved on to streaming yet.
        |s| s.rules[0].snapshot_rows >= 50 + 60 && s.rules[0].state == "streaming",
    )
    .await;
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(own.dir.join("replicator-state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["cdc"]["fo"]["node"], new_primary.as_str());
    app_client(&proxy)
        .await
        .batch_execute("UPDATE cdc_fo SET v = 'later' WHERE id = 1")
        .await
        .unwrap();
    wait_documents(&db, "cdc_fo", "a change on the new primary", |d| {
        by_id(d, Bson::Int32(1)).is_some_and(|x| x.get_str("v") == Ok("later"))
    })
    .await;
    proxy.stop(Duration::from_secs(2)).await;
}

async fn connect_owned(url: String) -> tokio_postgres::Client {
    connect(&url).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_snapshot_removes_rows_the_source_no_longer_has() {
    create_table("cdc_sweep", "id int primary key, v text").await;
    run_sql("INSERT INTO cdc_sweep SELECT g, 'x' FROM generate_series(1, 30) g").await;
    let db = mongo_db("cdc_sweep").await;
    // A document the rule did not write: never swept.
    db.collection::<Document>("cdc_sweep")
        .insert_one(doc! {"_id": 1000, "v": "foreign"})
        .await
        .unwrap();
    let config = rule_config(
        "sweep",
        &["cdc_sweep"],
        &mongo_target("cdc_sweep"),
        "interval_ms = 3600000",
    );
    let proxy = start_proxy_with(&config).await;
    sync(&proxy, "sweep").await.expect("SYNC");
    wait_documents(&db, "cdc_sweep", "the snapshot", |d| d.len() == 31).await;
    proxy.stop(Duration::from_secs(2)).await;

    // While the rule is away its slot is lost (as on a failover in PostgreSQL 15) and
    // rows are deleted: the changes will never be streamed.
    let name = replicator::cdc::schema::object_name("sweep");
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary_client()
        .await
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{name}')"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "slot stayed busy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run_sql("DELETE FROM cdc_sweep WHERE id > 20").await;

    let proxy = start_proxy_with(&config).await;
    sync(&proxy, "sweep").await.expect("SYNC");
    let s = status(&proxy).await;
    assert_eq!(
        s.rules[0].snapshot_rows, 20,
        "copied again: {:?}",
        s.rules[0]
    );
    let docs = documents(&db, "cdc_sweep").await;
    let mut ids: Vec<i32> = docs.iter().filter_map(|d| d.get_i32("_id").ok()).collect();
    ids.sort();
    let mut expected: Vec<i32> = (1..=20).collect();
    expected.push(1000);
    assert_eq!(ids, expected);
    finish(proxy, "sweep").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_rule_by_reload_is_copied() {
    init_logs();
    create_table("cdc_first", "id int primary key").await;
    create_table("cdc_second", "id int primary key").await;
    run_sql(
        "INSERT INTO cdc_first SELECT generate_series(1, 5); INSERT INTO cdc_second SELECT generate_series(1, 7);",
    )
    .await;
    let db = mongo_db("cdc_reload").await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cdc-reload");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    let one = rule_config(
        "grow",
        &["cdc_first"],
        &mongo_target("cdc_reload"),
        "interval_ms = 0",
    );
    std::fs::write(&path, &one).unwrap();
    let config = replicator::config::Config::parse(&one).unwrap();
    let proxy = Proxy::start(config, Some(path.clone())).await.unwrap();
    wait_documents(&db, "cdc_first", "the first table", |d| d.len() == 5).await;

    let two = rule_config(
        "grow",
        &["cdc_first", "cdc_second"],
        &mongo_target("cdc_reload"),
        "interval_ms = 0",
    );
    std::fs::write(&path, &two).unwrap();
    replicator::reload::reload(&proxy.shared, "test")
        .await
        .expect("reload");
    wait_documents(&db, "cdc_second", "the added table", |d| d.len() == 7).await;
    run_sql("INSERT INTO cdc_second VALUES (8); DELETE FROM cdc_first WHERE id = 1").await;
    wait_documents(&db, "cdc_second", "a streamed row", |d| d.len() == 8).await;
    wait_documents(&db, "cdc_first", "a streamed delete", |d| d.len() == 4).await;
    finish(proxy, "grow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_proxy_at_random_moments_loses_nothing() {
    init_logs();
    create_table("cdc_kill", "id int primary key, v int").await;
    run_sql("INSERT INTO cdc_kill SELECT g, 0 FROM generate_series(1, 100) g").await;
    let target_url = create_database("cdc_kill_mirror").await;
    let target = format!("[targets.sink]\nkind = \"postgres\"\nuri = \"{target_url}\"\n");
    let (config, admin) = binary_config("kill", &["cdc_kill"], &target);

    // Writes go straight to the primary while proxies come and go.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let running = running.clone();
        tokio::spawn(async move {
            let client = primary_client().await;
            let mut id = 100;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                id += 1;
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO cdc_kill VALUES ({id}, 0);
                         UPDATE cdc_kill SET v = v + 1 WHERE id = {};
                         DELETE FROM cdc_kill WHERE id = {}; COMMIT;",
                        id / 2,
                        id / 3
                    ))
                    .await
                    .expect("source write");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    for round in 0..6u64 {
        let mut child = spawn_binary(&config, false);
        // Pseudo-random lifetimes between 0.2 and 2 s: deaths land in the snapshot, in
        // streaming, between a write and its acknowledgement.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        let life = 200 + (nanos / 1000 + round * 337) % 1800;
        tokio::time::sleep(Duration::from_millis(life)).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    let mut last = spawn_binary(&config, false);
    sync_over_http(&admin, "kill").await;
    let expected = table_rows(&source_url(), "cdc_kill").await;
    assert!(expected.len() > 100);
    assert_eq!(table_rows(&target_url, "cdc_kill").await, expected);
    let _ = last.kill();
    let _ = last.wait();
    drop_rule_objects("kill").await;
}
