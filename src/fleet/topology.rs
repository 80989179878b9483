//! The fleet's topology in etcd: read at start (before any write is sent), watched
//! for changes (applied to routing within a tick), re-read periodically in case a
//! watch missed something, and changed only by compare-and-swap. Also the leader's
//! published knowledge.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tracing::{info, warn};

use super::session::{call, connect, tick};
use super::{Fleet, Knowledge, keys};
use crate::cluster::NodeRole;
use crate::cluster::state_file::{self, ProjectState};
use crate::state::Shared;

/// How often the whole topology is read again, whatever the watch says.
const RESYNC: Duration = Duration::from_secs(5);

pub fn spawn(fleet: Arc<Fleet>, shared: &Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ended = follow(&fleet, &shared) => {
                    if let Err(e) = ended {
                        warn!(instance = %fleet.settings.instance, "fleet topology watch: {e}");
                    }
                }
                _ = shutdown.changed() => return,
            }
            tokio::time::sleep(tick(&fleet)).await;
        }
    });
}

/// Reads everything, creates what is missing, then follows the watch.
async fn follow(fleet: &Fleet, shared: &Arc<Shared>) -> Result<(), String> {
    let mut client = connect(fleet).await?;
    let revision = read_all(fleet, shared, &mut client).await?;
    fleet.topology_read.store(true, Ordering::SeqCst);
    let options = || {
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1),
        )
    };
    let mut topology_events = call(
        fleet,
        "watch",
        client.watch(keys::topologies(&fleet.settings), options()),
    )
    .await?;
    let mut knowledge_events = call(
        fleet,
        "watch",
        client.watch(keys::all_knowledge(&fleet.settings), options()),
    )
    .await?;
    let mut runtime_events = call(
        fleet,
        "watch",
        client.watch(keys::runtime(&fleet.settings), options()),
    )
    .await?;
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        tokio::select! {
            message = topology_events.message() => {
                let answer = message
                    .map_err(|e| format!("watch: {e}"))?
                    .ok_or("watch ended")?;
                if answer.canceled() {
                    return Err("watch cancelled (compacted?)".into());
                }
                let folder = keys::topologies(&fleet.settings);
                for event in answer.events() {
                    if event.event_type() == EventType::Put
                        && let Some(kv) = event.kv()
                        && let Some(project) = keys::name_under(kv.key(), &folder)
                    {
                        apply(fleet, shared, project, kv.value(), kv.mod_revision());
                    }
                }
            }
            message = knowledge_events.message() => {
                let answer = message
                    .map_err(|e| format!("watch: {e}"))?
                    .ok_or("watch ended")?;
                let folder = keys::all_knowledge(&fleet.settings);
                for event in answer.events() {
                    if let Some(kv) = event.kv()
                        && let Some(project) = keys::name_under(kv.key(), &folder)
                    {
                        remember_knowledge(fleet, project, kv.value());
                    }
                }
            }
            message = runtime_events.message() => {
                let answer = message
                    .map_err(|e| format!("watch: {e}"))?
                    .ok_or("watch ended")?;
                for event in answer.events() {
                    if let Some(kv) = event.kv() {
                        take_runtime(fleet, shared, kv.value(), kv.mod_revision());
                    }
                }
            }
            _ = resync.tick() => {
                read_all(fleet, shared, &mut client).await?;
            }
        }
    }
}

/// Reads every project's topology and the published knowledge; creates the record of
/// a project etcd does not know yet from this instance's view. Returns the revision
/// read at.
async fn read_all(fleet: &Fleet, shared: &Arc<Shared>, client: &mut Client) -> Result<i64, String> {
    let folder = keys::topologies(&fleet.settings);
    let get = client.get(folder.clone(), Some(GetOptions::new().with_prefix()));
    let answer = call(fleet, "topology read", get).await?;
    let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
    for kv in answer.kvs() {
        if let Some(project) = keys::name_under(kv.key(), &folder) {
            apply(fleet, shared, project, kv.value(), kv.mod_revision());
        }
    }
    let topology = shared.topology.load_full();
    for project in topology.projects.values() {
        if fleet.record(&project.name).is_none() {
            create(fleet, shared, client, project).await?;
        }
    }
    let get = client.get(keys::runtime(&fleet.settings), None);
    let answer = call(fleet, "runtime read", get).await?;
    if let Some(kv) = answer.kvs().first() {
        take_runtime(fleet, shared, kv.value(), kv.mod_revision());
    }
    let folder = keys::all_knowledge(&fleet.settings);
    let get = client.get(folder.clone(), Some(GetOptions::new().with_prefix()));
    let answer = call(fleet, "knowledge read", get).await?;
    for kv in answer.kvs() {
        if let Some(project) = keys::name_under(kv.key(), &folder) {
            remember_knowledge(fleet, project, kv.value());
        }
    }
    Ok(revision)
}

/// The first record of a project: what this instance knows (its state file, else
/// proxy.toml), unless another instance was first.
async fn create(
    fleet: &Fleet,
    shared: &Shared,
    client: &mut Client,
    project: &crate::cluster::Project,
) -> Result<(), String> {
    let names = |role: NodeRole| {
        project
            .nodes
            .iter()
            .filter(|n| n.role() == role)
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
    };
    let record = ProjectState {
        primary: names(NodeRole::Primary)
            .into_iter()
            .next()
            .unwrap_or_default(),
        fenced: names(NodeRole::Fenced),
        promoted_at: 0,
        reason: format!("first recorded by {}", fleet.settings.instance),
        intent: project.failover.pending(),
        generation: 1,
        timeline: 0,
    };
    let text = serde_json::to_string(&record).map_err(|e| e.to_string())?;
    let key = keys::topology(&fleet.settings, &project.name);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), text.clone(), None)])
        .or_else([TxnOp::get(key, None)]);
    let answer = call(fleet, "topology create", client.txn(txn)).await?;
    if answer.succeeded() {
        let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
        info!(project = %project.name, primary = %record.primary, "recorded the project's topology in etcd");
        apply(fleet, shared, &project.name, text.as_bytes(), revision);
    } else {
        for op in answer.op_responses() {
            if let TxnOpResponse::Get(get) = op
                && let Some(kv) = get.kvs().first()
            {
                apply(fleet, shared, &project.name, kv.value(), kv.mod_revision());
            }
        }
    }
    Ok(())
}

/// Applies a record read from etcd (newer than what this instance has) to routing,
/// and caches it in the state file.
fn apply(fleet: &Fleet, shared: &Shared, project: &str, value: &[u8], revision: i64) {
    let record: ProjectState = match serde_json::from_slice(value) {
        Ok(r) => r,
        Err(e) => {
            warn!(project, "unreadable topology record in etcd: {e}");
            return;
        }
    };
    let Ok(mut records) = fleet.records.lock() else {
        return;
    };
    if records
        .get(project)
        .is_some_and(|(_, known)| *known >= revision)
    {
        return;
    }
    let changed = records
        .get(project)
        .is_none_or(|(known, _)| known.generation != record.generation);
    records.insert(project.to_string(), (record.clone(), revision));
    drop(records);
    if !changed {
        return;
    }
    info!(project, generation = record.generation, primary = %record.primary, intent = ?record.intent.as_ref().map(|i| &i.candidate), "applying the fleet's topology");
    let topology = shared.topology.load();
    if let Some(live) = topology.projects.get(project) {
        state_file::assign_roles(live, Some(&record), "etcd");
        cache(&live.failover.settings.state_path, project, record);
    }
}

/// Keeps the fleet's record in the state file, as a cache for a restart.
pub fn cache(path: &std::path::Path, project: &str, record: ProjectState) {
    if let Err(e) = state_file::record(path, project, record) {
        warn!(
            project,
            "cannot cache the fleet's topology in the state file: {e}"
        );
    }
}

/// Compare-and-swap of a project's record: succeeds only if the key is still at the
/// revision (so the generation) this instance read.
pub async fn swap(
    fleet: &Fleet,
    project: &str,
    mut next: ProjectState,
) -> Result<ProjectState, String> {
    let Some((current, revision)) = fleet
        .records
        .lock()
        .ok()
        .and_then(|r| r.get(project).cloned())
    else {
        return Err(format!("etcd holds no topology for {project} yet"));
    };
    next.generation = current.generation + 1;
    let text = serde_json::to_string(&next).map_err(|e| e.to_string())?;
    let key = keys::topology(&fleet.settings, project);
    // Fenced by leadership as well: the swap happens only while this instance's lease
    // still holds the leader key, so a leader that lost it (a long pause) changes nothing.
    let leader_key = keys::leader(&fleet.settings);
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            Compare::value(
                leader_key.clone(),
                CompareOp::Equal,
                fleet.settings.instance.clone(),
            ),
            Compare::lease(
                leader_key,
                CompareOp::Equal,
                fleet.lease.load(Ordering::SeqCst),
            ),
        ])
        .and_then([TxnOp::put(key, text, None)]);
    let mut client = connect(fleet).await?;
    let answer = call(fleet, "topology swap", client.txn(txn)).await?;
    if !answer.succeeded() {
        return Err(format!(
            "the topology of {project} changed in etcd since generation {}, or this proxy no \
             longer leads the fleet; nothing was changed",
            current.generation
        ));
    }
    let new_revision = answer
        .header()
        .map(|h| h.revision())
        .unwrap_or(revision + 1);
    if let Ok(mut records) = fleet.records.lock() {
        records.insert(project.to_string(), (next.clone(), new_revision));
    }
    Ok(next)
}

fn remember_knowledge(fleet: &Fleet, project: &str, value: &[u8]) {
    if let Ok(knowledge) = serde_json::from_slice::<Knowledge>(value)
        && let Ok(mut all) = fleet.knowledge.lock()
    {
        all.insert(project.to_string(), knowledge);
    }
}

pub async fn publish_knowledge(fleet: &Fleet, project: &str, knowledge: Knowledge) {
    if !fleet.is_leader() {
        return;
    }
    let now = fleet.now_ms();
    if let Ok(mut last) = fleet.published_at.lock() {
        let due = last
            .get(project)
            .is_none_or(|at| now.saturating_sub(*at) >= 1000);
        if !due {
            return;
        }
        last.insert(project.to_string(), now);
    }
    let Ok(text) = serde_json::to_string(&knowledge) else {
        return;
    };
    let Ok(mut client) = connect(fleet).await else {
        return;
    };
    let key = keys::knowledge(&fleet.settings, project);
    let put = client.put(key, text, None::<PutOptions>);
    if call(fleet, "knowledge put", put).await.is_ok()
        && let Ok(mut all) = fleet.knowledge.lock()
    {
        all.insert(project.to_string(), knowledge);
    }
}

/// A new list of runtime changes: every instance reloads with it applied.
fn take_runtime(fleet: &Fleet, shared: &Arc<Shared>, value: &[u8], revision: i64) {
    let entries: Vec<super::runtime::Entry> = match serde_json::from_slice(value) {
        Ok(e) => e,
        Err(e) => {
            warn!("unreadable runtime changes in etcd: {e}");
            return;
        }
    };
    if !fleet.remember_runtime(entries, revision) {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        match crate::reload::reload(&shared, "fleet runtime change").await {
            Ok(summary) => info!("applied the fleet's runtime changes: {summary}"),
            Err(e) => warn!("the fleet's runtime changes do not apply here: {e}"),
        }
    });
}
