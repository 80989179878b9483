//! What every session shares, and nothing of the control plane: the live config,
//! users and topology (each swapped whole on reload), the decision cache, the
//! registries of statements, cancel keys, clients and limits, the users looked up with
//! `[auth] query`, the TLS offered to clients, and the fleet's answers (`Peers`) when
//! there is a fleet. The control plane (`state::Shared`) holds one and hands it to
//! each client's task; a session never sees the rest, so the data path does not
//! depend on the control plane's modules.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::auth_query::AuthQueryCache;
use super::cancel::CancelRegistry;
use super::clients::ClientRegistry;
use super::limits::ClientLimits;
use super::statements::StatementRegistry;
use crate::cluster::Topology;
use crate::config::Config;
use crate::router::DecisionCache;
use crate::tls::ServerTls;
use crate::users::Users;

pub struct Context {
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
    /// Clients connected, per project and per user, against their limits.
    pub limits: ClientLimits,
    /// Users looked up with `[auth] query`.
    pub auth_query: AuthQueryCache,
    /// The TLS offered to clients (re-read on reload; `None`: clear text only).
    pub tls: ArcSwapOption<ServerTls>,
    /// The other proxies of a fleet (`[coordination]`), if this one is in a fleet.
    pub peers: Option<Arc<dyn Peers>>,
}

/// What the data path asks of a fleet of proxies (`fleet/` answers it).
pub trait Peers: Send + Sync {
    /// Whether this instance may send writes now, and if not, why (it has lost the
    /// fleet's word on which node is the primary).
    fn writes_allowed(&self) -> Result<(), String>;

    /// Sends on a CancelRequest whose key another instance issued; true when it was
    /// not this instance's to handle.
    fn forward_cancel<'a>(
        &'a self,
        pid: i32,
        secret: i32,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
}

impl Context {
    pub fn new(
        config: Config,
        topology: Topology,
        tls: Option<Arc<ServerTls>>,
        peers: Option<Arc<dyn Peers>>,
    ) -> Context {
        Context {
            users: ArcSwap::from_pointee(crate::users::from_config(&config)),
            topology: ArcSwap::from_pointee(topology),
            cache: DecisionCache::new(config.proxy.statement_cache_size),
            statements: StatementRegistry::default(),
            cancels: CancelRegistry::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            active_clients: AtomicUsize::new(0),
            clients: ClientRegistry::default(),
            limits: ClientLimits::default(),
            auth_query: AuthQueryCache::default(),
            tls: ArcSwapOption::new(tls),
            peers,
            config: ArcSwap::from_pointee(config),
        }
    }
}
