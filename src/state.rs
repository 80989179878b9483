//! The proxy's state: the sessions' shared context (`session::Context`: config, users,
//! topology, caches, registries) and what only the control plane uses (reloads, CDC,
//! the fleet, the monitors).

use std::path::PathBuf;
use std::sync::Arc;

use crate::cluster::Topology;
use crate::config::Config;
use crate::session::Context;

/// The proxy's state: what the sessions share (`sessions`, which `Shared` dereferences
/// to, so `shared.config` reads the live config) and what only the control plane uses.
pub struct Shared {
    pub sessions: Arc<Context>,
    pub config_path: Option<PathBuf>,
    /// When the proxy started (uptime in status).
    pub started_at: std::time::SystemTime,
    /// One reload at a time; counts and the last outcome.
    pub reload_lock: tokio::sync::Mutex<()>,
    pub reloads: crate::reload::ReloadStats,
    /// The CDC rules' tasks and figures.
    pub cdc: crate::cdc::Cdc,
    /// Fleet mode (`[coordination]`): this instance's view of the fleet.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// The projects' monitor tasks, awaited on shutdown.
    pub monitors: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::ops::Deref for Shared {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.sessions
    }
}

impl Shared {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        fleet: Option<Arc<crate::fleet::Fleet>>,
        tls: Option<Arc<crate::tls::ServerTls>>,
    ) -> Arc<Shared> {
        let topology = Topology::build(&config, None, crate::fleet::coordination(&fleet));
        let peers = fleet
            .clone()
            .map(|fleet| fleet as Arc<dyn crate::session::Peers>);
        Arc::new(Shared {
            sessions: Arc::new(Context::new(config, topology, tls, peers)),
            monitors: Default::default(),
            config_path,
            started_at: std::time::SystemTime::now(),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: crate::reload::ReloadStats::default(),
            cdc: crate::cdc::Cdc::default(),
            fleet,
        })
    }
}
