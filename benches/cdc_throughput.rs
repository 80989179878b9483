//! CDC throughput, from source commit to target acknowledgement, on a local test bed:
//! the initial copy, streamed inserts and streamed updates into another Postgres
//! database (where the target is rarely the bottleneck), and small transactions into a
//! MongoDB-protocol server (MONGODB_URI, or the in-memory one).
//!
//!   cargo bench --bench cdc_throughput
//!   ROWS=500000 MONGO_ROWS=2000 cargo bench --bench cdc_throughput
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

/// Waits until the rule has copied `rows` rows and streams.
async fn wait_copied(proxy: &Proxy, rows: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if proxy
            .shared
            .cdc
            .views(&proxy.shared.topology.load())
            .first()
            .is_some_and(|r| {
                r.snapshot_rows >= rows && r.state == "streaming" && !r.position.is_empty()
            })
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("the rule never finished its copy")
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

/// How the bench knows the target has everything: a query on the target that returns
/// an expected count.
enum Done<'a> {
    Postgres(&'a Client, String, i64),
    Mongo(&'a mongodb::Collection<mongodb::bson::Document>, u64),
}

impl Done<'_> {
    async fn wait(&self) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let reached = match self {
                Done::Postgres(client, sql, want) => {
                    client.query_one(sql.as_str(), &[]).await?.get::<_, i64>(0) == *want
                }
                Done::Mongo(collection, want) => {
                    collection.count_documents(mongodb::bson::doc! {}).await? == *want
                }
            };
            if reached {
                return Ok(Instant::now());
            }
            anyhow::ensure!(Instant::now() < deadline, "the target never got everything");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Runs `statements` on the source (one transaction each) while the rule follows, and
/// times them from the first commit until the target has everything. Returns rows per
/// second and how long after the last commit the target had it.
async fn live(
    source: &Client,
    statements: &[String],
    rows: usize,
    done: Done<'_>,
) -> anyhow::Result<(f64, Duration)> {
    let started = Instant::now();
    for sql in statements {
        source.batch_execute(sql).await?;
    }
    let last_commit = Instant::now();
    let finished = done.wait().await?;
    Ok((
        rows as f64 / (finished - started).as_secs_f64(),
        finished - last_commit,
    ))
}

fn print(label: &str, rows: usize, rate: f64, after: Option<Duration>) {
    let after = after.map_or(String::new(), |d| {
        format!(
            "  (target complete {} ms after the last commit)",
            d.as_millis()
        )
    });
    println!("{label:<50} {rows:>8} rows {rate:>10.0} rows/s{after}");
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

    let pg_config = config(cluster, &target, "bench_pg")?;
    let started = Instant::now();
    let proxy = Proxy::start(pg_config.clone(), None).await?;
    wait_copied(&proxy, rows as u64).await?;
    print(
        "Postgres -> Postgres, initial copy",
        rows,
        rows as f64 / started.elapsed().as_secs_f64(),
        None,
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
    let mirror = connect(&target_url).await?;
    let count = "SELECT count(*) FROM bench_pg".to_string();
    let (rate, after) = live(
        &source,
        &inserts,
        rows,
        Done::Postgres(&mirror, count, 2 * rows as i64),
    )
    .await?;
    print(
        "Postgres -> Postgres, live inserts (1000/tx)",
        rows,
        rate,
        Some(after),
    );

    let updates: Vec<String> = (0..rows / per_tx)
        .map(|i| {
            format!(
                "UPDATE bench_pg SET amount = amount + 1 WHERE id BETWEEN {} AND {}",
                i * per_tx + 1,
                (i + 1) * per_tx
            )
        })
        .collect();
    let updated = "SELECT count(*) FROM bench_pg WHERE amount = id * 0.5 + 1".to_string();
    let (rate, after) = live(
        &source,
        &updates,
        rows,
        Done::Postgres(&mirror, updated, rows as i64),
    )
    .await?;
    print(
        "Postgres -> Postgres, live updates (1000/tx)",
        rows,
        rate,
        Some(after),
    );

    // A backlog of single-row transactions written while the proxy was down, drained
    // from the slot: what the pipeline can do when the source is not the limit.
    proxy.stop(Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let small = rows / 10;
    for i in 0..small {
        source
            .batch_execute(&format!(
                "UPDATE bench_pg SET name = 'single' WHERE id = {}",
                i + 1
            ))
            .await?;
    }
    let started = Instant::now();
    let proxy = Proxy::start(pg_config, None).await?;
    let singles = "SELECT count(*) FROM bench_pg WHERE name = 'single'".to_string();
    let done = Done::Postgres(&mirror, singles, small as i64)
        .wait()
        .await?;
    print(
        "Postgres -> Postgres, backlog of 1-row transactions",
        small,
        small as f64 / (done - started).as_secs_f64(),
        None,
    );

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
    wait_copied(&proxy, 0).await?;
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
    let client = mongodb::Client::with_uri_str(mongo.uri("bench")).await?;
    let collection = client
        .database("bench")
        .collection::<mongodb::bson::Document>("bench_mongo");
    let (rate, after) = live(
        &source,
        &inserts,
        rows,
        Done::Mongo(&collection, rows as u64),
    )
    .await?;
    print(
        "Postgres -> MongoDB, live inserts (10/tx)",
        rows,
        rate,
        Some(after),
    );
    proxy.stop(Duration::from_secs(2)).await;
    mongo.stop();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let rows = env_usize("ROWS", 200_000);
    let mongo_rows = env_usize("MONGO_ROWS", 1000);
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
