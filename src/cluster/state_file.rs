//! The state file (`proxy.state_file`): who is primary now after a failover, and which
//! nodes are fenced. It is written (to a temporary file, then renamed) before traffic
//! moves to a new primary, so a restarted proxy never sends writes to the old one.
//!
//! Precedence: proxy.toml says which nodes exist and their configured roles; the state
//! file overrides the roles for as long as proxy.toml still names the old primary. Once
//! an operator edits proxy.toml so that the promoted node is the primary (after
//! re-attaching the old one), the record is obsolete and ignored.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{NodeRole, Project};
use crate::config::Role;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateFile {
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectState>,
    /// Per CDC rule: the slot it streams from and whether its initial copy finished.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cdc: BTreeMap<String, CdcState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CdcState {
    pub slot: String,
    /// The node the slot was created on.
    pub node: String,
    /// Where the slot became consistent (the snapshot's position).
    pub consistent_point: String,
    /// Every table was copied: the slot can be streamed from without a new snapshot.
    pub snapshot_complete: bool,
    /// The tables copied (a rule that now names others needs a new copy).
    #[serde(default)]
    pub tables: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProjectState {
    /// The node promoted last.
    pub primary: String,
    /// Nodes that must get no traffic (former primaries).
    #[serde(default)]
    pub fenced: Vec<String>,
    /// Seconds since the Unix epoch.
    pub promoted_at: u64,
    pub reason: String,
    /// A promotion decided and not yet done: finished, with this candidate, before
    /// anything else is decided. Until then no node takes writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// Fleet mode: the topology's generation in etcd, one more for every change (the
    /// compare-and-swap every change goes through).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// The timeline the primary writes on, when known (a node still on an older one
    /// missed the promotion).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeline: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A promotion decision, recorded before pg_promote runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Intent {
    pub candidate: String,
    /// The primary it replaces (fenced once the decision is carried out).
    pub replaces: Option<String>,
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub decided_at: u64,
}

/// Seconds since the Unix epoch, as the records carry them.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read-modify-write of the file by concurrent promotions goes through this lock.
static WRITE_LOCK: Mutex<()> = Mutex::new(());

pub fn load(path: &Path) -> Result<StateFile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a valid state file: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Records a project's new primary, durably, before anyone is routed to it.
pub fn record(path: &Path, project: &str, state: ProjectState) -> Result<(), String> {
    let _guard = WRITE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut file = load(path)?;
    file.projects.insert(project.to_string(), state);
    let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
    crate::atomic_file::replace(path, text.as_bytes())
        .map_err(|e| format!("cannot write state file {}: {e}", path.display()))
}

/// Records (or with `None` forgets) a CDC rule's slot state.
pub fn record_cdc(path: &Path, rule: &str, state: Option<CdcState>) -> Result<(), String> {
    let _guard = WRITE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut file = load(path)?;
    match state {
        Some(state) => file.cdc.insert(rule.to_string(), state),
        None => file.cdc.remove(rule),
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
    crate::atomic_file::replace(path, text.as_bytes())
        .map_err(|e| format!("cannot write state file {}: {e}", path.display()))
}

/// Gives every node of a freshly built project its role: the configured one, unless a
/// recorded failover says otherwise. Nodes kept from before a reload change role (if at
/// all) fenced-first, so that no session ever sees two primaries. An unfinished decision
/// leaves the project without a primary (and the node it replaces fenced) until the
/// failover logic finishes it.
/// `source` names where the record comes from, for the log ("the state file", "etcd").
pub fn assign_roles(project: &Project, state: Option<&ProjectState>, source: &str) {
    let configured_primary = project
        .nodes
        .iter()
        .find(|n| n.configured_role == Role::Primary)
        .map(|n| n.name.clone());
    let record = state.filter(|state| {
        if let Some(intent) = &state.intent {
            if project.nodes.iter().any(|n| n.name == intent.candidate) {
                return true;
            }
            warn!(project = %project.name, candidate = %intent.candidate, "{source} holds an unfinished promotion of a node proxy.toml does not list; ignoring it");
            return false;
        }
        if configured_primary.as_deref() == Some(state.primary.as_str()) {
            if state.promoted_at != 0 {
                info!(project = %project.name, primary = %state.primary, "proxy.toml now names the promoted node as primary; the failover record is no longer needed");
            }
            return false;
        }
        if !project.nodes.iter().any(|n| n.name == state.primary) {
            warn!(project = %project.name, primary = %state.primary, "{source} names a primary that proxy.toml does not list; ignoring it");
            return false;
        }
        true
    });
    let desired = |node: &super::Node| -> NodeRole {
        let Some(state) = record else {
            return node.configured_role.into();
        };
        let replaced = state
            .intent
            .as_ref()
            .and_then(|i| i.replaces.as_deref())
            .is_some_and(|r| r == node.name);
        if state.fenced.contains(&node.name) || replaced {
            return NodeRole::Fenced;
        }
        if node.name == state.primary {
            // Under an unfinished decision the recorded primary is the one replaced.
            return if state.intent.is_some() {
                NodeRole::Fenced
            } else {
                NodeRole::Primary
            };
        }
        if node.configured_role == Role::Primary {
            NodeRole::Fenced
        } else {
            NodeRole::Replica
        }
    };
    for node in &project.nodes {
        let role = desired(node);
        if role != NodeRole::Primary && node.role() != role {
            node.set_role(role);
        }
    }
    for node in &project.nodes {
        if desired(node) == NodeRole::Primary && node.role() != NodeRole::Primary {
            node.set_role(NodeRole::Primary);
        }
    }
    let intent = record.and_then(|state| state.intent.clone());
    if let Some(intent) = &intent {
        warn!(project = %project.name, candidate = %intent.candidate, replaces = ?intent.replaces, "{source} holds an unfinished promotion; writes wait until it is finished");
    } else if let Some(state) = record {
        warn!(project = %project.name, primary = %state.primary, fenced = ?state.fenced, "applying the failover recorded in {source}");
    }
    project.failover.set_pending(intent);
}
