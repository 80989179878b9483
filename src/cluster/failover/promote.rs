//! Carrying out a promotion as a recorded decision: the intent (candidate and the
//! primary it replaces) is written to the state file before pg_promote, and the
//! decision is committed once the candidate is out of recovery. Whatever stops it in
//! between (a crash, a failed write, a lost connection) is finished later with the same
//! candidate, never answered by promoting another. Also the planned switchover behind
//! `PROMOTE` on a healthy primary.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::control::{PROMOTE_TIMEOUT, control, query, query_value, repoint};
use super::decide;
use crate::cluster::health::{self, NodeState};
use crate::cluster::state_file::{self, Intent, ProjectState, now_secs};
use crate::cluster::{Node, NodeRole, Project};

/// Nodes fenced now, plus `also` (the primary being replaced), without `except`.
fn fenced_names(project: &Project, also: Option<&str>, except: &str) -> Vec<String> {
    let mut fenced: Vec<String> = project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Fenced)
        .map(|n| n.name.clone())
        .chain(also.map(str::to_string))
        .filter(|n| n != except)
        .collect();
    fenced.sort();
    fenced.dedup();
    fenced
}

/// Records a decision: in the state file, or in fleet mode by compare-and-swap of the
/// fleet's topology in etcd (the state file then caches it).
async fn record_decision(project: &Project, record: ProjectState) -> Result<(), String> {
    let settings = &project.failover.settings;
    match &settings.fleet {
        None => state_file::record(&settings.state_path, &project.name, record),
        Some(fleet) => {
            let stored = fleet.swap_topology(&project.name, record).await?;
            fleet.cache_topology(&settings.state_path, &project.name, stored);
            Ok(())
        }
    }
}

/// Decides to promote `candidate` (recorded first), then carries the decision out.
pub async fn promote(
    project: &Arc<Project>,
    candidate: &Arc<Node>,
    reason: &str,
    started: Instant,
) -> Result<(), String> {
    let failover = &project.failover;
    let _one_at_a_time = failover.promoting.lock().await;
    let old_primary = project.primary().map(|n| n.name.clone());
    let intent = Intent {
        candidate: candidate.name.clone(),
        replaces: old_primary.clone(),
        reason: reason.to_string(),
        decided_at: now_secs(),
    };
    // The decision is durable before anything changes on a server: a proxy restarted
    // from here on finishes this promotion instead of deciding another.
    let record = ProjectState {
        primary: old_primary.clone().unwrap_or_default(),
        fenced: fenced_names(project, None, ""),
        promoted_at: 0,
        reason: String::new(),
        intent: Some(intent.clone()),
        generation: 0,
        timeline: 0,
    };
    record_decision(project, record)
        .await
        .map_err(|e| format!("cannot record the decision, so nothing was promoted: {e}"))?;
    failover.set_pending(Some(intent.clone()));
    warn!(project = %project.name, candidate = %candidate.name, old = ?old_primary, reason, "promoting a replica");
    carry_out(project, &intent, started).await
}

/// Finishes a decision recorded earlier (by this process, or by one that crashed).
pub async fn finish_pending(project: &Arc<Project>, intent: &Intent) -> Result<(), String> {
    let failover = &project.failover;
    let _one_at_a_time = failover.promoting.lock().await;
    if failover.pending().as_ref() != Some(intent) {
        return Ok(());
    }
    info!(project = %project.name, candidate = %intent.candidate, "finishing the promotion decided earlier");
    carry_out(project, intent, Instant::now()).await
}

/// Promotes the intent's candidate unless it is already out of recovery, moves traffic
/// to it, records the decision as done and re-points the other replicas. Called with
/// the promotion lock held.
async fn carry_out(
    project: &Arc<Project>,
    intent: &Intent,
    started: Instant,
) -> Result<(), String> {
    let failover = &project.failover;
    let settings = &failover.settings;
    let Some(candidate) = project
        .nodes
        .iter()
        .find(|n| n.name == intent.candidate)
        .cloned()
    else {
        return Err(format!(
            "the recorded candidate {} is no longer in proxy.toml; PROMOTE another replica",
            intent.candidate
        ));
    };
    // A retry of a decision already carried out (only its record failed) keeps saying so.
    if candidate.role() != NodeRole::Primary {
        failover.set_state(format!("promoting {}", candidate.name));
    }
    crate::failpoint::pause_if_armed("failover-slow-promotion", Duration::from_secs(3)).await;
    let client = control(&candidate, settings).await?;
    if query_value(&client, "SELECT pg_is_in_recovery()").await? == "t" {
        let promoted = query_value(&client, "SELECT pg_promote(true, 60)").await?;
        if promoted != "t" {
            return Err("pg_promote() did not finish".into());
        }
        let deadline = Instant::now() + PROMOTE_TIMEOUT;
        while query_value(&client, "SELECT pg_is_in_recovery()").await? != "f" {
            if Instant::now() > deadline {
                return Err("still in recovery after pg_promote()".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        info!(project = %project.name, node = %candidate.name, "already out of recovery: adopted as primary");
    }
    crate::failpoint::crash_if_armed("failover-crash-after-promote");
    let timeline = query_value(
        &client,
        "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
    )
    .await
    .ok()
    .and_then(|t| u64::from_str_radix(&t, 16).ok())
    .unwrap_or(0);
    if timeline != 0 {
        candidate.health.set_timeline(timeline);
    }

    // The intent is durable, so traffic may move before the commit: a restart finishes
    // with this same node. Fenced first, so no session ever sees two primaries.
    let replaced = intent
        .replaces
        .as_deref()
        .and_then(|name| project.nodes.iter().find(|n| n.name == name));
    for node in &project.nodes {
        if node.role() == NodeRole::Primary && node.name != candidate.name {
            node.set_role(NodeRole::Fenced);
        }
    }
    if let Some(old) = replaced
        && old.name != candidate.name
    {
        old.set_role(NodeRole::Fenced);
    }
    candidate.set_role(NodeRole::Primary);
    candidate.health.set_state(NodeState::Up);
    candidate.health.set_lag(0, 0);
    // Lag figures measured against the old primary say nothing about the new one.
    for node in &project.nodes {
        node.health.forget_lag_at_primary_seen();
    }
    let took = started.elapsed();
    failover
        .last_duration_ms
        .store(took.as_millis() as u64, Ordering::Relaxed);
    let event = format!(
        "{} promoted to primary ({}) in {} ms{}",
        candidate.name,
        intent.reason,
        took.as_millis(),
        replaced
            .map(|o| format!("; {} fenced", o.name))
            .unwrap_or_default()
    );
    warn!(project = %project.name, "{event}");
    failover.event(event);

    let record = ProjectState {
        primary: candidate.name.clone(),
        fenced: fenced_names(project, intent.replaces.as_deref(), &candidate.name),
        promoted_at: now_secs(),
        reason: intent.reason.clone(),
        intent: None,
        generation: 0,
        timeline,
    };
    let committed = if crate::failpoint::armed("failover-commit-fails") {
        Err("failpoint failover-commit-fails".to_string())
    } else {
        record_decision(project, record).await
    };
    match committed {
        Ok(()) => {
            failover.set_pending(None);
            failover.set_state("primary healthy");
        }
        Err(e) => {
            // Still recorded as the intent: a restart finishes with this node.
            error!(project = %project.name, "{} is the primary, but recording that failed: {e}; retrying", candidate.name);
            failover.set_state(format!(
                "{} is the primary, but recording the decision failed ({e}); retrying",
                candidate.name
            ));
        }
    }
    for node in project
        .nodes
        .iter()
        .filter(|n| n.role() == NodeRole::Replica)
    {
        if let Err(e) = repoint(node, &candidate, settings).await {
            warn!(project = %project.name, node = %node.name, "could not re-point replica to the new primary: {e}");
        } else {
            info!(project = %project.name, node = %node.name, primary = %candidate.name, "replica now follows the new primary");
        }
    }
    Ok(())
}

/// Planned switchover to `candidate` while the primary is healthy: hold new writes,
/// wait for the primary's transactions to finish and for the candidate to replay
/// everything, then promote. Nothing acknowledged is lost.
pub async fn switchover(project: &Arc<Project>, candidate: &Arc<Node>) -> Result<(), String> {
    let failover = &project.failover;
    let settings = &failover.settings;
    let Some(old) = project.primary().cloned() else {
        return Err("the project has no primary".into());
    };
    let started = Instant::now();
    let deadline = started + settings.write_wait;
    failover.writes_paused.store(true, Ordering::SeqCst);
    let result = async {
        failover.set_state(format!("switchover to {}: draining writes", candidate.name));
        loop {
            let (connections, idle) = old.connection_counts();
            if connections == idle {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} server connection(s) on the primary stayed busy (open transactions or pinned sessions); switchover abandoned",
                    connections - idle
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let primary = control(&old, settings).await?;
        // Nothing written through the proxy from here on; protect against writers that
        // bypass it as well.
        let _ = query(
            &primary,
            "ALTER SYSTEM SET default_transaction_read_only = on",
        )
        .await;
        let _ = query(&primary, "SELECT pg_reload_conf()").await;
        let target = health::parse_lsn(&query_value(&primary, "SELECT pg_current_wal_lsn()").await?)
            .ok_or("unreadable WAL position")?;
        failover.set_state(format!(
            "switchover to {}: waiting for it to replay {}",
            candidate.name,
            health::format_lsn(target)
        ));
        let replica = control(candidate, settings).await?;
        loop {
            let replayed = query_value(&replica, "SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')")
                .await
                .ok()
                .and_then(|v| health::parse_lsn(&v))
                .unwrap_or(0);
            if replayed >= target {
                break;
            }
            if Instant::now() > deadline {
                let _ = query(&primary, "ALTER SYSTEM RESET default_transaction_read_only").await;
                let _ = query(&primary, "SELECT pg_reload_conf()").await;
                return Err(format!(
                    "{} did not replay the primary's last position in time; switchover abandoned",
                    candidate.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        promote(project, candidate, "planned switchover", started).await
    }
    .await;
    failover.writes_paused.store(false, Ordering::SeqCst);
    if let Err(e) = &result {
        failover.set_state("primary healthy");
        failover.event(format!("switchover to {} failed: {e}", candidate.name));
    }
    result
}

/// `PROMOTE project replica`: a switchover when the primary answers, else a failover
/// to that replica (the operator's choice overrides the automatic eligibility rules and
/// an unfinished earlier decision, but never makes a second primary: a replica already
/// out of recovery is adopted only when it is the one named).
pub async fn promote_on_request(project: &Arc<Project>, replica: &str) -> Result<String, String> {
    if let Some(fleet) = &project.failover.settings.fleet
        && !fleet.is_leader()
    {
        return Err(match fleet.leader() {
            Some(leader) => format!(
                "this proxy is a follower in the fleet; run PROMOTE on the leader, {leader}"
            ),
            None => "the fleet has no leader now (is etcd reachable?); nothing was changed".into(),
        });
    }
    let Some(candidate) = project.nodes.iter().find(|n| n.name == replica).cloned() else {
        return Err(format!(
            "project \"{}\" has no node \"{replica}\"",
            project.name
        ));
    };
    if candidate.role() != NodeRole::Replica {
        return Err(format!(
            "\"{replica}\" is {}, not a replica",
            candidate.role().as_str()
        ));
    }
    let settings = &project.failover.settings;
    let primary_up = match project.primary() {
        Some(p) => control(p, settings).await.is_ok(),
        None => false,
    };
    if primary_up {
        switchover(project, &candidate).await?;
    } else {
        let (answers, silent) = decide::survey(project, settings).await;
        if !answers.iter().any(|a| a.node.name == candidate.name) {
            let why = silent
                .into_iter()
                .find(|s| s.starts_with(&format!("{}:", candidate.name)))
                .unwrap_or_else(|| format!("{}: no answer", candidate.name));
            return Err(why);
        }
        if let Some(other) = answers
            .iter()
            .find(|a| !a.in_recovery && a.node.name != candidate.name)
        {
            return Err(format!(
                "{} is already out of recovery; PROMOTE {} {} adopts it, or fence it first",
                other.node.name, project.name, other.node.name
            ));
        }
        promote(project, &candidate, "promoted on request", Instant::now()).await?;
    }
    project.failover.manual.fetch_add(1, Ordering::Relaxed);
    Ok(project.failover.status().last_event.unwrap_or_default())
}
