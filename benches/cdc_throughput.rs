//! CDC throughput, from source commit to target acknowledgement, on a local test bed:
//! the initial copy, streamed inserts and streamed updates into another Postgres
//! database (where the target is rarely the bottleneck), and small transactions into a
//! MongoDB-protocol server (MONGODB_URI, or the in-memory one).
//!
//!   cargo bench --bench cdc_throughput
//!   ROWS=500000 MONGO_ROWS=5000 cargo bench --bench cdc_throughput
//!
//! A run is timed from just before the first source commit until the rule has confirmed
//! the source position read after the last one (everything is in the target). The
//! source, the target, the proxy and the load share this machine's cores.

use std::path::Path;
use std::time::{Duration, Instant};

use replicator::config::Config;
use replicator::server::Proxy;
use replicator::testbed::mongo::MongoServer;
use replicator::testbed::{Cluster, ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD};
use tokio_postgres::{Client, NoTls};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn current_lsn(client: &Client) -> anyhow::Result<u64> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    replicator::cluster::health::parse_lsn(&row.get::<_, String>(0))
        .ok_or_else(|| anyhow::anyhow!("bad lsn"))
}

/// Waits until the rule has confirmed `lsn`; returns when it did.
async fn wait_confirmed(proxy: &Proxy, lsn: u64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let views = proxy.shared.cdc.views(&proxy.shared);
        if let Some(rule) = views.first() {
            if let Some(e) = &rule.last_error {
                anyhow::bail!("rule failed: {e}");
            }
            let at = replicator::cluster::health::parse_lsn(&rule.position).unwrap_or(0);
            if at >= lsn {
                return Ok(Instant::now());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the rule never caught up");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_state(proxy: &Proxy, state: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if proxy
            .shared
            .cdc
            .views(&proxy.shared)
            .first()
            .is_some_and(|r| r.state == state)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("rule never reached {state}")
}

fn config(cluster: &Cluster, target: &str, table: &str) -> anyhow::Result<Config> {
    let text = format!(
        "{}\n[failover]\nuser = \"{SUPERUSER}\"\npassword = \"{SUPERUSER_PASSWORD}\"\n\n{target}\n\
         [[rules]]\nname = \"bench-{table}\"\nsource = \"app\"\ntarget = \"sink\"\n\
         collections = [\"{table}\"]\ninterval_ms = 0\n",
        cluster.proxy_toml("127.0.0.1:0", "", ""),
    );
    Config::parse(&text).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Runs `statements` on the source one transaction each and times them into the target.
async fn timed(
    proxy: &Proxy,
    source: &Client,
    statements: &[String],
    rows: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for sql in statements {
        source.batch_execute(sql).await?;
    }
    let end = current_lsn(source).await?;
    let done = wait_confirmed(proxy, end).await?;
    Ok(rows as f64 / (done - started).as_secs_f64())
}

fn print(label: &str, rows: usize, rate: f64) {
    println!("{label:<46} {rows:>9} rows {rate:>12.0} rows/s");
}

async fn postgres_bench(cluster: &Cluster, rows: usize) -> anyhow::Result<()> {
    let source_url = cluster.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app");
    let source = connect(&source_url).await?;
    source
        .batch_execute(
            "DROP TABLE IF EXISTS bench_pg; \
             CREATE TABLE bench_pg (id bigint PRIMARY KEY, name text, amount numeric(12,2), at timestamptz)",
        )
        .await?;
    source
        .batch_execute(&format!(
            "INSERT INTO bench_pg SELECT g, 'name ' || g, g * 0.5, now() FROM generate_series(1, {rows}) g"
        ))
        .await?;
    source
        .batch_execute("DROP DATABASE IF EXISTS bench_mirror")
        .await?;
    source.batch_execute("CREATE DATABASE bench_mirror").await?;
    let target_url = cluster
        .primary
        .url(SUPERUSER, SUPERUSER_PASSWORD, "bench_mirror");
    let target = format!("[targets.sink]\nkind = \"postgres\"\nuri = \"{target_url}\"\n");

    let started = Instant::now();
    let proxy = Proxy::start(config(cluster, &target, "bench_pg")?, None).await?;
    wait_state(&proxy, "streaming").await?;
    print(
        "Postgres -> Postgres, initial copy",
        rows,
        rows as f64 / started.elapsed().as_secs_f64(),
    );

    let per_tx = 1000;
    let inserts: Vec<String> = (0..rows / per_tx)
        .map(|i| {
            let from = rows + i * per_tx + 1;
            format!(
                "INSERT INTO bench_pg SELECT g, 'name ' || g, g * 0.5, now() FROM generate_series({from}, {}) g",
                from + per_tx - 1
            )
        })
        .collect();
    let rate = timed(&proxy, &source, &inserts, rows).await?;
    print("Postgres -> Postgres, inserts (1000/tx)", rows, rate);

    let updates: Vec<String> = (0..rows / per_tx)
        .map(|i| {
            format!(
                "UPDATE bench_pg SET amount = amount + 1 WHERE id BETWEEN {} AND {}",
                i * per_tx + 1,
                (i + 1) * per_tx
            )
        })
        .collect();
    let rate = timed(&proxy, &source, &updates, rows).await?;
    print("Postgres -> Postgres, updates (1000/tx)", rows, rate);

    let small = rows / 10;
    let singles: Vec<String> = (0..small)
        .map(|i| format!("UPDATE bench_pg SET name = 'single' WHERE id = {}", i + 1))
        .collect();
    let rate = timed(&proxy, &source, &singles, small).await?;
    print("Postgres -> Postgres, single-row transactions", small, rate);

    let mirror = connect(&target_url).await?;
    let count: i64 = mirror
        .query_one("SELECT count(*) FROM bench_pg", &[])
        .await?
        .get(0);
    anyhow::ensure!(count as usize == rows * 2, "mirror holds {count} rows");
    proxy.stop(Duration::from_secs(2)).await;
    Ok(())
}

async fn mongo_bench(cluster: &Cluster, rows: usize) -> anyhow::Result<()> {
    let mongo = MongoServer::start(&Path::new("target").join("jongodb"))?;
    let source = connect(&cluster.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app")).await?;
    source
        .batch_execute(
            "DROP TABLE IF EXISTS bench_mongo; \
             CREATE TABLE bench_mongo (id bigint PRIMARY KEY, name text, amount numeric(12,2), at timestamptz)",
        )
        .await?;
    let target = format!(
        "[targets.sink]\nkind = \"mongodb\"\nuri = \"{}\"\n",
        mongo.uri("bench")
    );
    let proxy = Proxy::start(config(cluster, &target, "bench_mongo")?, None).await?;
    wait_state(&proxy, "streaming").await?;
    let per_tx = 10;
    let inserts: Vec<String> = (0..rows / per_tx)
        .map(|i| {
            let from = i * per_tx + 1;
            format!(
                "INSERT INTO bench_mongo SELECT g, 'name ' || g, g * 0.5, now() FROM generate_series({from}, {}) g",
                from + per_tx - 1
            )
        })
        .collect();
    let rate = timed(&proxy, &source, &inserts, rows).await?;
    print("Postgres -> MongoDB, inserts (10/tx)", rows, rate);
    proxy.stop(Duration::from_secs(2)).await;
    mongo.stop();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let rows = env_usize("ROWS", 200_000);
    let mongo_rows = env_usize("MONGO_ROWS", 3000);
    let cluster = Cluster::start(ClusterOptions {
        replicas: 0,
        ..ClusterOptions::default()
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "CDC throughput, source commit to target acknowledgement ({} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    runtime.block_on(async {
        postgres_bench(&cluster, rows).await?;
        mongo_bench(&cluster, mongo_rows).await
    })
}
