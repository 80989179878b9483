//! Clusters of their own for tests that kill, promote or re-point nodes, and the
//! failover settings they run the proxy with.

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
