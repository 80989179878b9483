//! Clusters of their own for tests that kill, promote or re-point nodes, and the
//! failover settings they run the proxy with.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replicator::testbed::{Cluster, ClusterOptions, Node, SUPERUSER, SUPERUSER_PASSWORD};

use super::{config_text, connect};

pub const FAILOVER_USER: &str = "[failover]\nuser = \"postgres\"\npassword = \"postgres\"\n";

pub async fn own_cluster(extra_conf: &[&str]) -> Cluster {
    let extra_conf = extra_conf.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterOptions {
            extra_conf,
            ..ClusterOptions::default()
        })
    })
    .await
    .expect("join")
    .expect("start cluster")
}

pub fn config_for(
    cluster: &Cluster,
    project_extra: &str,
    replica_extra: &str,
    failover_extra: &str,
) -> String {
    let text = config_text(cluster, project_extra, "").replace(
        "role = \"replica\"\n",
        &format!("role = \"replica\"\n{replica_extra}\n"),
    );
    format!("{text}\n{FAILOVER_USER}{failover_extra}\n")
}

pub fn node_port(cluster: &Cluster, name: &str) -> u16 {
    match name {
        "master" => cluster.primary.port,
        other => {
            let i: usize = other
                .trim_start_matches("slave-")
                .parse()
                .expect("node name");
            cluster.replicas[i - 1].port
        }
    }
}

pub fn node_named<'a>(cluster: &'a Cluster, name: &str) -> &'a Node {
    match name {
        "master" => &cluster.primary,
        other => {
            let i: usize = other
                .trim_start_matches("slave-")
                .parse()
                .expect("node name");
            &cluster.replicas[i - 1]
        }
    }
}

pub async fn superuser(port: u16) -> tokio_postgres::Client {
    connect(&format!(
        "postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{port}/app"
    ))
    .await
    .expect("superuser connection")
}

/// Which nodes of `cluster` are out of recovery now (unreachable ones are left out).
pub async fn out_of_recovery(cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for (i, node) in std::iter::once(&cluster.primary)
        .chain(cluster.replicas.iter())
        .enumerate()
    {
        let name = if i == 0 {
            "master".to_string()
        } else {
            format!("slave-{i}")
        };
        let url = node.url(SUPERUSER, SUPERUSER_PASSWORD, "app");
        if let Ok(client) = connect(&url).await
            && let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await
            && !row.get::<_, bool>(0)
        {
            out.push(name);
        }
    }
    out
}

/// Clients writing through the proxy; every acknowledged row is remembered.
pub struct Writers {
    pub running: Arc<AtomicBool>,
    pub acked: Arc<Mutex<HashSet<(i32, i32)>>>,
    pub errors: Arc<Mutex<Vec<String>>>,
    pub first_ok_after: Arc<Mutex<Option<Instant>>>,
    pub mark: Arc<Mutex<Option<Instant>>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub total: Arc<AtomicU64>,
}

impl Writers {
    /// `n` writers, spread over `urls` (one proxy each).
    pub async fn start(urls: &[String], n: i32) -> Writers {
        let running = Arc::new(AtomicBool::new(true));
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let first_ok_after = Arc::new(Mutex::new(None));
        let mark: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let total = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for writer in 0..n {
            let url = urls[writer as usize % urls.len()].clone();
            let (running, acked, errors, first_ok_after, mark, total, url) = (
                running.clone(),
                acked.clone(),
                errors.clone(),
                first_ok_after.clone(),
                mark.clone(),
                total.clone(),
                url,
            );
            tasks.push(tokio::spawn(async move {
                let mut client = connect(&url).await.expect("writer connects");
                let mut seq = 0;
                while running.load(Ordering::Relaxed) {
                    seq += 1;
                    let began = Instant::now();
                    let r = client
                        .execute(
                            "INSERT INTO failover_log (writer, seq) VALUES ($1, $2)",
                            &[&writer, &seq],
                        )
                        .await;
                    match r {
                        Ok(_) => {
                            acked.lock().unwrap().insert((writer, seq));
                            total.fetch_add(1, Ordering::Relaxed);
                            // Only writes sent after the kill count: earlier ones may
                            // have been answered before it.
                            if mark.lock().unwrap().is_some_and(|m| began > m) {
                                let mut first = first_ok_after.lock().unwrap();
                                if first.is_none() {
                                    *first = Some(Instant::now());
                                }
                            }
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{e:?}"));
                            if client.is_closed() {
                                // Same connection string as before.
                                match connect(&url).await {
                                    Ok(c) => client = c,
                                    Err(e) => {
                                        errors.lock().unwrap().push(format!("reconnect: {e:?}"));
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                    }
                                }
                            }
                        }
                    }
                }
            }));
        }
        Writers {
            running,
            acked,
            errors,
            first_ok_after,
            mark,
            tasks,
            total,
        }
    }

    /// From now on, the first acknowledged write is timed.
    pub fn mark(&self) -> Instant {
        let now = Instant::now();
        *self.mark.lock().unwrap() = Some(now);
        *self.first_ok_after.lock().unwrap() = None;
        now
    }

    pub async fn stop(self) -> (HashSet<(i32, i32)>, Vec<String>, Option<Instant>) {
        self.running.store(false, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("a writer is stuck")
                .unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let errors = self.errors.lock().unwrap().clone();
        let first = *self.first_ok_after.lock().unwrap();
        (acked, errors, first)
    }
}

pub async fn rows_on(port: u16) -> HashSet<(i32, i32)> {
    superuser(port)
        .await
        .query("SELECT writer, seq FROM failover_log", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The table the writers fill, owned by the application user, on every replica.
pub async fn create_log_table(cluster: &Cluster) {
    superuser(cluster.primary.port)
        .await
        .batch_execute(
            "CREATE TABLE failover_log (writer int, seq int, PRIMARY KEY (writer, seq));
             ALTER TABLE failover_log OWNER TO app;",
        )
        .await
        .unwrap();
    tokio::task::block_in_place(|| cluster.wait_caught_up(Duration::from_secs(20))).unwrap();
}

/// kill -9 of the cluster's primary; returns when it is gone.
pub async fn kill_primary(cluster: &Cluster) -> Instant {
    let killer = cluster.primary.clone();
    tokio::task::spawn_blocking(move || killer.kill())
        .await
        .expect("join")
        .expect("kill the primary");
    Instant::now()
}

/// Commits wait for one replica (set once the replicas stream: the test bed's own setup
/// would wait forever).
pub async fn make_synchronous(cluster: &Cluster) {
    let primary = superuser(cluster.primary.port).await;
    primary
        .batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'")
        .await
        .unwrap();
    primary
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
}

/// Port of the server that takes a write through the proxy at `url`, or the error the
/// client got.
pub async fn write_port(url: &str) -> Result<u16, String> {
    let message = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())
    };
    let mut client = connect(url).await.map_err(message)?;
    let tx = client.transaction().await.map_err(message)?;
    tx.batch_execute("CREATE TEMP TABLE w (x int) ON COMMIT DROP; INSERT INTO w VALUES (1)")
        .await
        .map_err(message)?;
    let port: i32 = tx
        .query_one("SELECT inet_server_port()", &[])
        .await
        .map_err(message)?
        .get(0);
    tx.commit().await.map_err(message)?;
    Ok(port as u16)
}
