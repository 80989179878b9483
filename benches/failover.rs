//! Failover resume time: a primary and two streaming replicas, a client writing through
//! the proxy, the primary killed (SIGKILL); the figure is the time from the kill to the
//! first write the proxy acknowledges afterwards, with the same connection string.
//! Each round uses a fresh cluster; medians of FAILOVER_ROUNDS (default 3) per setting.
//!
//! The fleet case runs three proxy processes (the release binary) on a real etcd, a
//! client writing through each: the primary killed alone, then the leader proxy and the
//! primary killed together; the figure is the time to the first acknowledged write
//! through every surviving proxy (the slowest of them). Needs an etcd binary
//! (FAILOVER_FLEET=0 skips it).
//!
//!   cargo bench --bench failover
//!   FAILOVER_ROUNDS=5 cargo bench --bench failover

use std::time::{Duration, Instant};

use replicator::config::Config;
use replicator::server::Proxy;
use replicator::testbed::{Cluster, ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD};
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Option<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Some(client)
}

/// One round: seconds from the kill to the first acknowledged write.
async fn round(failover_settings: &str) -> anyhow::Result<f64> {
    let cluster =
        tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??;
    let admin = connect(&cluster.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app"))
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot reach the primary"))?;
    admin
        .batch_execute("CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz DEFAULT now()); ALTER TABLE ticks OWNER TO app")
        .await?;
    tokio::task::block_in_place(|| cluster.wait_caught_up(Duration::from_secs(20)))?;
    let text = format!(
        "{}\n[failover]\nuser = \"{SUPERUSER}\"\npassword = \"{SUPERUSER_PASSWORD}\"\n{failover_settings}\n",
        cluster.proxy_toml("127.0.0.1:0", "", "")
    );
    let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let proxy = Proxy::start(config, None).await?;
    let url = format!("postgresql://app:secret@{}/app", proxy.addr);
    let mut client = connect(&url)
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot connect through the proxy"))?;
    for _ in 0..50 {
        client
            .batch_execute("INSERT INTO ticks DEFAULT VALUES")
            .await?;
    }
    let killed = Instant::now();
    cluster.primary.kill()?;
    let deadline = killed + Duration::from_secs(120);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "writes never resumed");
        if client
            .batch_execute("INSERT INTO ticks DEFAULT VALUES")
            .await
            .is_ok()
        {
            break;
        }
        if client.is_closed() {
            if let Some(c) = connect(&url).await {
                client = c;
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let resume = killed.elapsed().as_secs_f64();
    proxy.stop(Duration::from_secs(1)).await;
    Ok(resume)
}

#[path = "failover/fleet.rs"]
mod fleet;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("Failover: primary killed under writes, time to the first acknowledged write");
    for (label, settings) in [
        ("defaults (1000 ms checks, 3 failures)", ""),
        (
            "fast (200 ms checks, 3 failures)",
            "health_check_interval_ms = 200\nfailure_threshold = 3",
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..rounds {
            times.push(runtime.block_on(round(settings))?);
        }
        let shown: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "{label:<40} median {:.2} s  (rounds: {} s)",
            median(times.clone()),
            shown.join(", ")
        );
    }
    if std::env::var("FAILOVER_FLEET").as_deref() == Ok("0") {
        return Ok(());
    }
    println!(
        "Fleet of three proxies on etcd: time to the first acknowledged write through every surviving proxy"
    );
    for (label, settings, kill_leader) in [
        ("primary killed (defaults)", "", false),
        ("leader proxy + primary killed (defaults)", "", true),
        (
            "leader proxy + primary killed (lease 3000 ms)",
            "lease_ttl_ms = 3000",
            true,
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..rounds {
            times.push(runtime.block_on(fleet::round(settings, kill_leader))?);
        }
        let shown: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "{label:<48} median {:.2} s  (rounds: {} s)",
            median(times.clone()),
            shown.join(", ")
        );
    }
    Ok(())
}
