//! State shared by every session: the live config and topology (swapped atomically on
//! reload), users, caches, and the cancel-key registry.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use arc_swap::ArcSwap;

use crate::cluster::Topology;
use crate::config::Config;
use crate::router::DecisionCache;
use crate::session::cancel::CancelRegistry;
use crate::session::clients::ClientRegistry;
use crate::session::statements::StatementRegistry;
use crate::users::{self, Users};

pub struct Shared {
    pub config_path: Option<PathBuf>,
    pub config: ArcSwap<Config>,
    pub users: ArcSwap<Users>,
    pub topology: ArcSwap<Topology>,
    pub cache: DecisionCache,
    pub statements: StatementRegistry,
    pub cancels: CancelRegistry,
    /// Flips to true when the proxy starts shutting down; sessions watch it.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Client sessions currently running.
    pub active_clients: AtomicUsize,
    pub clients: ClientRegistry,
    /// When the proxy started (uptime in status).
    pub started_at: std::time::SystemTime,
    /// One reload at a time; counts and the last outcome.
    pub reload_lock: tokio::sync::Mutex<()>,
    pub reloads: crate::reload::ReloadStats,
    /// The CDC rules' tasks and figures.
    pub cdc: crate::cdc::Cdc,
    /// Fleet mode (`[coordination]`): this instance's view of the fleet.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Clients connected, per project and per user, against their limits.
    pub limits: crate::session::limits::ClientLimits,
    /// Users looked up with `[auth] query`.
    pub auth_query: crate::session::auth_query::AuthQueryCache,
    /// The TLS offered to clients (re-read on reload; `None`: clear text only).
    pub tls: arc_swap::ArcSwapOption<crate::tls::ServerTls>,
    /// The projects' monitor tasks, awaited on shutdown.
    pub monitors: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Shared {
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        fleet: Option<Arc<crate::fleet::Fleet>>,
        tls: Option<Arc<crate::tls::ServerTls>>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            tls: arc_swap::ArcSwapOption::new(tls),
            monitors: Default::default(),
            auth_query: Default::default(),
            limits: Default::default(),
            config_path,
            users: ArcSwap::from_pointee(users::from_config(&config)),
            topology: ArcSwap::from_pointee(Topology::build(&config, None, fleet.as_ref())),
            cache: DecisionCache::new(config.proxy.statement_cache_size),
            statements: StatementRegistry::default(),
            cancels: CancelRegistry::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            active_clients: AtomicUsize::new(0),
            clients: ClientRegistry::default(),
            started_at: std::time::SystemTime::now(),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads: crate::reload::ReloadStats::default(),
            cdc: crate::cdc::Cdc::default(),
            fleet,
            config: ArcSwap::from_pointee(config),
        })
    }
}
