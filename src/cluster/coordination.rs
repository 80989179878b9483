//! What failover asks of a fleet of proxies (`[coordination]`; `fleet/` answers it):
//! who leads, what the leader last published, and the project's record in etcd. The
//! cluster knows the fleet only through this trait, so the topology the sessions read
//! does not depend on the fleet's module (which depends on the sessions').

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use super::state_file::ProjectState;

pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Coordination: Send + Sync {
    /// This instance leads the fleet (and is in contact with etcd).
    fn is_leader(&self) -> bool;
    /// The leader's instance name, if there is one.
    fn leader(&self) -> Option<String>;
    /// This instance's name.
    fn instance(&self) -> &str;
    /// The project's record as last read from etcd.
    fn record(&self, project: &str) -> Option<ProjectState>;
    /// What the leader last published: the primary's position, a replica's lag.
    fn published_primary_lsn(&self, project: &str) -> Option<u64>;
    fn published_lag(&self, project: &str, node: &str) -> Option<u64>;
    /// Records a decision by compare-and-swap of the project's record in etcd; returns
    /// what is stored now.
    fn swap_topology<'a>(
        &'a self,
        project: &'a str,
        next: ProjectState,
    ) -> Pending<'a, Result<ProjectState, String>>;
    /// Keeps what etcd stores in the state file too (read at a start without etcd).
    fn cache_topology(&self, state_path: &Path, project: &str, stored: ProjectState);
    /// The leader publishes what a successor needs (followers publish nothing).
    fn publish_knowledge<'a>(&'a self, project: &'a str, knowledge: Knowledge) -> Pending<'a, ()>;
}

/// What the leader publishes for a successor: the primary's last position and each
/// replica's lag when the primary was last seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Knowledge {
    pub leader: String,
    pub primary_lsn: u64,
    pub lag_ms: BTreeMap<String, u64>,
    /// Seconds since the Unix epoch.
    pub at: u64,
}
