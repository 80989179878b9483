//! The fleet rounds of the failover benchmark: three `replicator serve` processes on
//! one etcd and one cluster.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replicator::admin::status::Status;
use replicator::testbed::etcd::Etcd;
use replicator::testbed::{Cluster, ClusterOptions, SUPERUSER, SUPERUSER_PASSWORD, free_port};

struct Instance {
    child: Child,
    port: u16,
    admin: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, text: &str) -> anyhow::Result<Instance> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let admin_port = free_port()?;
    let text = text
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            "admin_listen = \"\"",
            &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
        );
    std::fs::write(dir.join("proxy.toml"), text)?;
    let log = std::fs::File::create(dir.join("proxy.log"))?;
    let child = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(["serve", "--config"])
        .arg(dir.join("proxy.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    Ok(Instance {
        child,
        port,
        admin: format!("127.0.0.1:{admin_port}"),
    })
}

async fn status(instance: &Instance) -> Option<Status> {
    let (code, body) = replicator::admin::http::AdminClient::new(
        instance.admin.as_str(),
        Some(replicator::testbed::ADMIN_TOKEN),
    )
    .get("/status")
    .await
    .ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// One round: seconds from the kill to the first acknowledged write through the
/// slowest surviving proxy.
pub async fn round(settings: &str, kill_leader: bool) -> anyhow::Result<f64> {
    let base = std::env::temp_dir().join(format!("replicator-bench-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let etcd = Etcd::start(&base)?;
    let cluster =
        tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??;
    let admin = super::connect(&cluster.primary.url(SUPERUSER, SUPERUSER_PASSWORD, "app"))
        .await
        .ok_or_else(|| anyhow::anyhow!("cannot reach the primary"))?;
    admin
        .batch_execute(
            "CREATE TABLE ticks (id bigserial PRIMARY KEY); ALTER TABLE ticks OWNER TO app",
        )
        .await?;
    tokio::task::block_in_place(|| cluster.wait_caught_up(Duration::from_secs(20)))?;
    let text = format!(
        "{}\n[failover]\nuser = \"{SUPERUSER}\"\npassword = \"{SUPERUSER_PASSWORD}\"\n\n\
         [coordination]\netcd = [\"{}\"]\nprefix = \"/bench\"\n{settings}\n",
        cluster.proxy_toml("127.0.0.1:0", "", ""),
        etcd.endpoint()
    );
    let mut instances = Vec::new();
    for i in 0..3 {
        instances.push(spawn(&base.join(format!("proxy-{i}")), &text)?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut leader = None;
    loop {
        anyhow::ensure!(Instant::now() < deadline, "the fleet did not form");
        let mut ready = 0;
        for (i, instance) in instances.iter().enumerate() {
            if let Some(s) = status(instance).await
                && let Some(f) = &s.fleet
                && f.members.len() == 3
                && f.writes_allowed
                && s.projects[0].nodes.iter().all(|n| n.state == "up")
            {
                ready += 1;
                if f.is_leader {
                    leader = Some(i);
                }
            }
        }
        if ready == 3 && leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = leader.unwrap_or(0);
    let urls: Vec<String> = instances
        .iter()
        .map(|i| format!("postgresql://app:secret@127.0.0.1:{}/app", i.port))
        .collect();
    for url in &urls {
        let client = super::connect(url)
            .await
            .ok_or_else(|| anyhow::anyhow!("cannot connect through {url}"))?;
        for _ in 0..20 {
            client
                .batch_execute("INSERT INTO ticks DEFAULT VALUES")
                .await?;
        }
    }
    let killed = Instant::now();
    if kill_leader {
        let _ = instances[leader].child.kill();
    }
    cluster.primary.kill()?;
    let survivors: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| !kill_leader || *i != leader)
        .map(|(_, u)| u.clone())
        .collect();
    let waits = survivors.iter().map(|url| async move {
        let deadline = killed + Duration::from_secs(120);
        loop {
            if Instant::now() > deadline {
                return None;
            }
            if let Some(client) = super::connect(url).await
                && client
                    .batch_execute("INSERT INTO ticks DEFAULT VALUES")
                    .await
                    .is_ok()
            {
                return Some(killed.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let times = futures_util::future::join_all(waits).await;
    drop(instances);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&base);
    let slowest = times
        .into_iter()
        .map(|t| t.ok_or_else(|| anyhow::anyhow!("writes never resumed through a proxy")))
        .collect::<anyhow::Result<Vec<f64>>>()?
        .into_iter()
        .fold(0.0, f64::max);
    Ok(slowest)
}
