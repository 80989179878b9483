//! Deciding a failover: is the primary really gone, has someone already promoted a
//! replica, and which replica loses the least. Every replica is asked once per decision
//! (one survey); the rules below only read the answers.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::FailoverSettings;
use super::control::{control, query_nullable};
use crate::cluster::{Node, NodeRole, Project, health};

/// What a replica said when the failover logic asked.
pub struct Answer {
    pub node: Arc<Node>,
    pub in_recovery: bool,
    /// Everything received (what it will have once promoted).
    pub received: u64,
    pub replayed: u64,
    pub receiver: Option<Receiver>,
}

/// The replica's WAL receiver, as pg_stat_wal_receiver shows it (its details need
/// superuser or pg_read_all_stats; without them only the status is missing too).
pub struct Receiver {
    pub status: Option<String>,
    pub sender_host: Option<String>,
    pub sender_port: Option<u16>,
    pub timeline: Option<u64>,
}

/// What to do about a primary confirmed down.
pub enum Plan {
    /// A replica is already out of recovery (promoted by an operator, another proxy, or
    /// this one before a crash): it becomes the primary without a second promotion.
    Adopt(Arc<Node>),
    Promote(Arc<Node>),
}

/// Asks every replica-role node, concurrently; nodes that do not answer are left out
/// (with the reason).
pub async fn survey(project: &Project, settings: &FailoverSettings) -> (Vec<Answer>, Vec<String>) {
    let replicas: Vec<Arc<Node>> = project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Replica)
        .cloned()
        .collect();
    let results =
        futures_util::future::join_all(replicas.iter().map(|node| ask(node, settings))).await;
    let mut answers = Vec::new();
    let mut silent = Vec::new();
    for (node, result) in replicas.into_iter().zip(results) {
        match result {
            Ok(answer) => answers.push(answer),
            Err(e) => silent.push(format!("{}: {e}", node.name)),
        }
    }
    (answers, silent)
}

async fn ask(node: &Arc<Node>, settings: &FailoverSettings) -> Result<Answer, String> {
    let client = control(node, settings).await?;
    let rows = query_nullable(
        &client,
        "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_receive_lsn(), '0/0'), \
         coalesce(pg_last_wal_replay_lsn(), '0/0'), r.status, r.sender_host, \
         r.sender_port, r.received_tli \
         FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true",
    )
    .await?;
    let row = rows.first().ok_or("empty answer")?;
    let text = |i: usize| row.get(i).cloned().flatten();
    let lsn = |i: usize| text(i).and_then(|v| health::parse_lsn(&v)).unwrap_or(0);
    let status = text(3);
    let receiver = (status.is_some() || text(4).is_some()).then(|| Receiver {
        status,
        sender_host: text(4),
        sender_port: text(5).and_then(|v| v.parse().ok()),
        timeline: text(6).and_then(|v| v.parse().ok()),
    });
    Ok(Answer {
        node: node.clone(),
        in_recovery: text(0).as_deref() == Some("t"),
        received: lsn(1).max(lsn(2)),
        replayed: lsn(2),
        receiver,
    })
}

/// The plan for a primary that failed its checks: refused while a replica still streams
/// from it or while two replicas are out of recovery; adopt a replica already promoted;
/// else promote the eligible replica with the most WAL.
pub async fn plan(
    project: &Project,
    primary: &Node,
    settings: &FailoverSettings,
) -> Result<Plan, String> {
    let (answers, silent) = survey(project, settings).await;
    if answers.is_empty() {
        return Err(if silent.is_empty() {
            "no replica configured, so nothing can replace the primary".into()
        } else {
            format!(
                "no replica answers, so the primary's failure cannot be confirmed ({})",
                silent.join("; ")
            )
        });
    }
    for answer in &answers {
        if let Some(receiver) = &answer.receiver
            && receiver.status.as_deref() == Some("streaming")
            && streams_from(receiver, primary, project).await
        {
            return Err(format!(
                "the proxy cannot reach the primary, but replica {} still streams from it",
                answer.node.name
            ));
        }
    }
    let promoted: Vec<&Answer> = answers.iter().filter(|a| !a.in_recovery).collect();
    match promoted.as_slice() {
        [] => {}
        [one] => return Ok(Plan::Adopt(one.node.clone())),
        many => {
            return Err(format!(
                "replicas {} are all out of recovery (promoted outside this proxy?); \
                 choose one with PROMOTE after fencing the others",
                many.iter()
                    .map(|a| a.node.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    choose(project, primary, &answers, &silent).map(Plan::Promote)
}

/// Whether a streaming WAL receiver may be streaming from `primary`. It is not when it
/// follows a newer timeline than the primary's (someone promoted a node), or when its
/// sender is another node of the project (cascading from a sibling, or streaming from
/// a node promoted elsewhere): such a replica proves nothing about the primary. Any
/// other sender counts, even at an address the proxy does not use for the primary
/// (replicas often reach it by another name or network): the safe side is not to fail
/// over while something may still be writing.
async fn streams_from(receiver: &Receiver, primary: &Node, project: &Project) -> bool {
    let primary_timeline = primary.health.timeline();
    if let Some(timeline) = receiver.timeline
        && primary_timeline != 0
        && timeline > primary_timeline
    {
        return false;
    }
    let (Some(host), Some(port)) = (&receiver.sender_host, receiver.sender_port) else {
        return true;
    };
    if port == primary.addr.port && same_host(host, &primary.addr.host).await {
        return true;
    }
    for other in project.nodes.iter().filter(|n| n.name != primary.name) {
        if other.addr.port == port && same_host(host, &other.addr.host).await {
            return false;
        }
    }
    true
}

/// Equal names, or names that resolve to a common address (localhost and 127.0.0.1).
async fn same_host(a: &str, b: &str) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    // A Unix socket directory: only the port can be compared, so it is the same host.
    if a.starts_with('/') || b.starts_with('/') {
        return true;
    }
    let resolve = |h: &str| {
        let h = h.to_string();
        async move {
            match tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host((h, 0)))
                .await
            {
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect::<Vec<_>>(),
                _ => Vec::new(),
            }
        }
    };
    let (left, right) = tokio::join!(resolve(a), resolve(b));
    left.iter().any(|ip| right.contains(ip))
}

/// The eligible replica with the most WAL. A replica is eligible when its lag at the
/// last check that reached the primary is known and within its `lag_tolerance_ms`
/// (tolerance 0: it has replayed everything the primary was last seen with). Unknown
/// lag (the primary was never reached since this proxy started, or since the replica
/// joined) is never taken for zero.
fn choose(
    project: &Project,
    primary: &Node,
    answers: &[Answer],
    silent: &[String],
) -> Result<Arc<Node>, String> {
    // A leader that just took over judges by what its predecessor published.
    let fleet = project.failover.settings.fleet.as_ref();
    let primary_last_lsn = match primary.health.lsn() {
        0 => fleet
            .and_then(|f| f.published_primary_lsn(&project.name))
            .unwrap_or(0),
        known => known,
    };
    let mut best: Option<(u64, Arc<Node>)> = None;
    let mut why_not: Vec<String> = silent.to_vec();
    for answer in answers {
        let node = &answer.node;
        let published = || fleet.and_then(|f| f.published_lag(&project.name, &node.name));
        let Some(lag_when_seen) = node.health.lag_at_primary_seen_ms().or_else(published) else {
            why_not.push(format!(
                "{}: its lag is unknown, as this proxy has not reached the primary while \
                 watching it (fresh start); check it and PROMOTE by hand",
                node.name
            ));
            continue;
        };
        // Tolerance 0: everything the primary was last seen with is already replayed
        // (received is not enough: replay may be paused on purpose).
        let eligible = if node.lag_tolerance_ms == 0 {
            primary_last_lsn != 0 && answer.replayed >= primary_last_lsn
        } else {
            lag_when_seen <= node.lag_tolerance_ms
        };
        if !eligible {
            why_not.push(format!(
                "{}: was {lag_when_seen} ms behind when the primary was last seen (tolerance {} ms)",
                node.name, node.lag_tolerance_ms
            ));
            continue;
        }
        if best.as_ref().is_none_or(|(p, _)| answer.received > *p) {
            best = Some((answer.received, node.clone()));
        }
    }
    match best {
        Some((position, node)) => {
            info!(project = %project.name, candidate = %node.name, position = %health::format_lsn(position), "failover candidate chosen");
            Ok(node)
        }
        None => Err(format!(
            "no eligible replica ({})",
            if why_not.is_empty() {
                "none configured".to_string()
            } else {
                why_not.join("; ")
            }
        )),
    }
}
