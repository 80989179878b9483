//! The live topology: per project, its nodes (primary and replicas), their pools and
//! health, and the choice of a node for a read.

pub mod coordination;
pub mod failover;
pub mod health;
pub mod monitor;
pub mod state_file;
pub mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::{Config, NodeAddress, ReadRouting, Role};
use crate::pool::{BackendError, LoginInfo, Pool, PoolSettings, Pooled};
use crate::users::UserEntry;
pub use health::{Health, NodeState};
pub use stats::NodeStats;

/// How long a node that refused a connection is skipped for reads before it is tried again.
const DOWN_BACKOFF: Duration = Duration::from_millis(1000);

/// What a node does now. It starts as configured; a failover (or the state file of an
/// earlier one) moves the primary role and fences the old primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodeRole {
    Primary = 0,
    Replica = 1,
    /// A former primary after a failover: no traffic until an operator re-attaches it.
    Fenced = 2,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Primary => "primary",
            NodeRole::Replica => "replica",
            NodeRole::Fenced => "fenced",
        }
    }

    fn from_u8(v: u8) -> NodeRole {
        match v {
            0 => NodeRole::Primary,
            2 => NodeRole::Fenced,
            _ => NodeRole::Replica,
        }
    }
}

impl From<Role> for NodeRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Primary => NodeRole::Primary,
            Role::Replica => NodeRole::Replica,
        }
    }
}

/// A checkout from a node's pool that notes the outcome on the node: up again after a
/// connection, down after a failed connection attempt.
pub struct NodeCheckout {
    node: Arc<Node>,
    checkout: crate::pool::Checkout,
}

impl NodeCheckout {
    /// The connection, if the pool hands one over without waiting (an idle one). The
    /// checkout is still to be awaited otherwise.
    pub fn now(&mut self) -> Option<Pooled> {
        let conn = self.checkout.now()?;
        self.node.clear_down();
        Some(conn)
    }
}

impl std::future::Future for NodeCheckout {
    type Output = Result<Pooled, BackendError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        let result = std::task::ready!(std::pin::Pin::new(&mut this.checkout).poll(cx));
        match &result {
            Ok(_) => this.node.clear_down(),
            Err(err) => {
                // A refused login is about the user, not the node; except "cannot
                // connect now" (57P03: starting up or shutting down).
                let node_fault = match err {
                    BackendError::Auth { fields, .. } => fields.code == "57P03",
                    BackendError::Unsupported { .. } => false,
                    _ => true,
                };
                if node_fault {
                    this.node.mark_down();
                }
                this.node
                    .stats
                    .connect_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        std::task::Poll::Ready(result)
    }
}

pub struct Node {
    pub name: String,
    role: AtomicU8,
    /// The role proxy.toml gives it.
    pub configured_role: Role,
    pub addr: NodeAddress,
    pub database: String,
    pub weight: u32,
    pub lag_tolerance_ms: u64,
    pub pool: PoolSettings,
    /// Per user (looked up on every checkout, hence foldhash).
    pools: RwLock<HashMap<String, Pool, foldhash::fast::RandomState>>,
    /// Milliseconds since `epoch` until which the node is considered down.
    down_until_ms: AtomicU64,
    epoch: Instant,
    pub stats: NodeStats,
    pub health: Health,
}

impl Node {
    /// Checks out a server connection for `user`, creating the user's pool on first use.
    /// Fails as soon as a connection attempt to this node fails, rather than waiting
    /// for the connect timeout.
    ///
    /// A plain future (see `pool::Checkout`), decided when first polled; `now` takes
    /// an idle connection without waiting.
    pub fn checkout(self: &Arc<Self>, user: &UserEntry) -> NodeCheckout {
        // The pool is looked up under the read lock; the write lock is taken only to
        // make a pool.
        let pools = match self.pools.read() {
            Ok(pools) => pools,
            Err(poisoned) => poisoned.into_inner(),
        };
        let checkout = match pools.get(&user.name) {
            Some(pool) if pool.serves(user) => pool.get(),
            // The first checkout of this user, or its credentials changed.
            _ => {
                drop(pools);
                self.pool_for(user).get()
            }
        };
        NodeCheckout {
            node: self.clone(),
            checkout,
        }
    }

    /// The pool of `user` on this node; a new one when the user's credentials changed
    /// (an auth_query user whose password was changed: the old pool's connections
    /// finish their work and go).
    fn pool_for(&self, user: &UserEntry) -> Pool {
        let current = |pool: &Pool| pool.serves(user);
        let keys = user.backend_keys();
        let mut pools = match self.pools.write() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(pool) = pools.get(&user.name)
            && current(pool)
        {
            return pool.clone();
        }
        let pool = Pool::new(
            LoginInfo {
                addr: Arc::new(self.addr.clone()),
                database: self.database.clone(),
                user: user.name.clone(),
                password: user.backend_password.clone(),
                scram_keys: keys,
                extra_params: Vec::new(),
            },
            self.pool,
        );
        pools.insert(user.name.clone(), pool.clone());
        pool
    }

    fn clear_down(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn mark_down(&self) {
        let until = self.epoch.elapsed() + DOWN_BACKOFF;
        self.down_until_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= self.epoch.elapsed().as_millis() as u64
    }

    pub fn role(&self) -> NodeRole {
        NodeRole::from_u8(self.role.load(Ordering::SeqCst))
    }

    pub fn set_role(&self, role: NodeRole) {
        self.role.store(role as u8, Ordering::SeqCst);
    }

    pub fn pool_size(&self) -> u32 {
        self.pool.size
    }

    /// Taken out of the topology by a reload: its pools are let go, so idle server
    /// connections close now and busy ones when their session returns them.
    pub fn retire(&self) {
        if let Ok(mut pools) = self.pools.write() {
            pools.clear();
        }
    }

    /// May get reads now: the monitor has it up (or has not checked yet) and no recent
    /// connection attempt failed.
    pub fn serves_reads(&self) -> bool {
        self.health.state().serves_reads() && self.is_up()
    }

    /// (user, connections, idle) per pool.
    /// Sum over this node's pools: (connections, idle).
    pub fn connection_counts(&self) -> (u32, u32) {
        self.pool_states()
            .iter()
            .fold((0, 0), |(c, i), (_, pc, pi)| (c + pc, i + pi))
    }

    /// (user, connections, idle) per pool.
    pub fn pool_states(&self) -> Vec<(String, u32, u32)> {
        self.pools
            .read()
            .map(|pools| {
                pools
                    .iter()
                    .map(|(user, p)| {
                        let c = p.counts();
                        (user.clone(), c.connections, c.idle)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct Project {
    pub name: String,
    pub database: String,
    read_routing: AtomicU8,
    pub read_your_writes: bool,
    pub causal_wait: Duration,
    pub lag_check_interval: Duration,
    pub nodes: Vec<Arc<Node>>,
    rr: AtomicUsize,
    /// Reads that found no replica to run on and went to the primary.
    pub fallback_reads: AtomicU64,
    /// Reads sent to the primary because no replica had replayed the client's writes.
    pub causal_primary_reads: AtomicU64,
    /// A "no replica available" episode is going on (logged once, when it starts).
    no_replica: AtomicBool,
    pub failover: failover::Failover,
    /// Replaced by a reload: sessions move to the new project object at their next
    /// request, and its monitor stops.
    pub retired: AtomicBool,
}

impl Project {
    pub fn primary(&self) -> Option<&Arc<Node>> {
        self.nodes.iter().find(|n| n.role() == NodeRole::Primary)
    }

    /// Read-your-writes can matter for a client: it is on and there are replicas to
    /// avoid (session-mode clients read from the primary anyway).
    pub fn read_your_writes_applies(&self, session_mode: bool) -> bool {
        self.read_your_writes && self.has_replicas() && !session_mode
    }

    pub fn has_replicas(&self) -> bool {
        self.nodes.iter().any(|n| n.role() == NodeRole::Replica)
    }

    pub fn read_routing(&self) -> ReadRouting {
        match self.read_routing.load(Ordering::Relaxed) {
            1 => ReadRouting::LeastLag,
            2 => ReadRouting::Random,
            _ => ReadRouting::RoundRobin,
        }
    }

    pub fn set_read_routing(&self, routing: ReadRouting) {
        self.read_routing
            .store(routing_code(routing), Ordering::Relaxed);
    }

    /// Replicas eligible for reads right now, in the order the strategy prefers them;
    /// the caller tries them in turn and falls back to the primary. With `min_lsn`
    /// (read-your-writes) only replicas known to have replayed that far qualify.
    /// `advance` moves the round-robin turn on: requests that run no statement (a
    /// driver's Parse/Describe before the Execute) leave it, so that they do not
    /// make every other read skip a replica.
    pub fn read_candidates(&self, min_lsn: u64, advance: bool) -> Vec<Arc<Node>> {
        let mut out = Vec::new();
        self.read_candidates_into(min_lsn, advance, &mut out);
        out
    }

    /// `read_candidates` into the caller's vector (cleared first): the data path keeps
    /// one per client instead of allocating for every read.
    pub fn read_candidates_into(&self, min_lsn: u64, advance: bool, out: &mut Vec<Arc<Node>>) {
        out.clear();
        let mut any_healthy = false;
        for node in &self.nodes {
            if node.role() == NodeRole::Replica && node.serves_reads() {
                any_healthy = true;
                if min_lsn == 0 || node.health.lsn() >= min_lsn {
                    out.push(node.clone());
                }
            }
        }
        self.note_availability(any_healthy);
        if out.is_empty() {
            return;
        }
        let total: u64 = out.iter().map(|n| n.weight as u64).sum::<u64>().max(1);
        let first = match self.read_routing() {
            ReadRouting::LeastLag => return self.least_lag_order(out, advance),
            ReadRouting::Random => weighted_index(out, rand::random_range(0..total)),
            ReadRouting::RoundRobin => weighted_index(out, self.next_turn(advance) as u64 % total),
        };
        out.rotate_left(first);
    }

    /// Freshest first (lag in ms, then bytes); replicas equally fresh take turns.
    fn next_turn(&self, advance: bool) -> usize {
        if advance {
            self.rr.fetch_add(1, Ordering::Relaxed)
        } else {
            self.rr.load(Ordering::Relaxed)
        }
    }

    fn least_lag_order(&self, nodes: &mut [Arc<Node>], advance: bool) {
        let key = |n: &Arc<Node>| (n.health.lag_ms(), n.health.lag_bytes());
        nodes.sort_by_key(key);
        let best = key(&nodes[0]);
        let tied = nodes.iter().take_while(|n| key(n) == best).count();
        let turn = self.next_turn(advance) % tied;
        nodes[..tied].rotate_left(turn);
    }

    /// Counts a read that goes to the primary for want of a replica, and logs when such
    /// an episode starts and ends rather than once per query.
    fn note_availability(&self, any_replica: bool) {
        if !self.has_replicas() {
            return;
        }
        if any_replica {
            // Read first: a swap on every read would dirty the line shared by all
            // clients of the project.
            if self.no_replica.load(Ordering::Relaxed)
                && self.no_replica.swap(false, Ordering::Relaxed)
            {
                info!(project = %self.name, "replicas are available again; reads leave the primary");
            }
        } else {
            self.fallback_reads.fetch_add(1, Ordering::Relaxed);
            if !self.no_replica.swap(true, Ordering::Relaxed) {
                warn!(project = %self.name, "no replica is healthy and within its lag tolerance; reads go to the primary");
            }
        }
    }
}

fn routing_code(routing: ReadRouting) -> u8 {
    match routing {
        ReadRouting::RoundRobin => 0,
        ReadRouting::LeastLag => 1,
        ReadRouting::Random => 2,
    }
}

/// The index whose cumulative weight range holds `ticket`.
fn weighted_index(nodes: &[Arc<Node>], ticket: u64) -> usize {
    let mut acc = 0u64;
    for (i, n) in nodes.iter().enumerate() {
        acc += n.weight as u64;
        if ticket < acc {
            return i;
        }
    }
    0
}

pub struct Topology {
    pub projects: HashMap<String, Arc<Project>>,
}

impl Topology {
    pub fn from_config(config: &Config) -> Topology {
        Topology::build(config, None, None)
    }

    /// The topology for `config`. Nodes of `previous` whose settings did not change are
    /// kept as they are (pools, health, statistics, current role), so a reload drops no
    /// connection to them; the others are new.
    ///
    /// In fleet mode the roles come from the fleet's topology in etcd (as last read),
    /// else from the state file.
    pub fn build(
        config: &Config,
        previous: Option<&Topology>,
        fleet: Option<Arc<dyn coordination::Coordination>>,
    ) -> Topology {
        let epoch = Instant::now();
        let mut projects = HashMap::new();
        let state_path = std::path::PathBuf::from(&config.proxy.state_file);
        let control_credentials = monitor::Credentials::control_plane(config);
        let recorded = match state_file::load(&state_path) {
            Ok(state) => state,
            Err(e) => {
                warn!("{e}; starting from the roles in proxy.toml");
                state_file::StateFile::default()
            }
        };
        for (name, p) in &config.projects {
            let database = config.project_database(name).unwrap_or(name).to_string();
            let old_project = previous.and_then(|t| t.projects.get(name));
            let nodes = p
                .replicas
                .iter()
                .filter_map(|r| {
                    // Validation already guaranteed that every uri parses.
                    let addr = NodeAddress::parse(&r.uri).ok()?;
                    let node_database = p
                        .database
                        .clone()
                        .or(addr.dbname.clone())
                        .unwrap_or_else(|| database.clone());
                    let pool = pool_settings(&config.proxy, p.pool_size);
                    if let Some(kept) = old_project
                        .and_then(|op| op.nodes.iter().find(|n| n.name == r.name))
                        .filter(|n| {
                            n.addr == addr
                                && n.database == node_database
                                && n.configured_role == r.role
                                && n.weight == r.weight
                                && n.lag_tolerance_ms == r.lag_tolerance_ms
                                && n.pool == pool
                        })
                    {
                        return Some(kept.clone());
                    }
                    Some(Arc::new(Node {
                        name: r.name.clone(),
                        role: AtomicU8::new(NodeRole::from(r.role) as u8),
                        configured_role: r.role,
                        database: node_database,
                        addr,
                        weight: r.weight,
                        lag_tolerance_ms: r.lag_tolerance_ms,
                        pool,
                        pools: RwLock::new(HashMap::default()),
                        down_until_ms: AtomicU64::new(0),
                        epoch,
                        stats: NodeStats::default(),
                        health: Health::default(),
                    }))
                })
                .collect();
            let project = Arc::new(Project {
                name: name.clone(),
                database,
                read_routing: AtomicU8::new(routing_code(p.read_routing)),
                read_your_writes: p.read_your_writes,
                causal_wait: Duration::from_millis(p.causal_wait_ms),
                lag_check_interval: Duration::from_millis(p.lag_check_interval_ms.max(10)),
                nodes,
                rr: AtomicUsize::new(0),
                fallback_reads: AtomicU64::new(0),
                causal_primary_reads: AtomicU64::new(0),
                no_replica: AtomicBool::new(false),
                failover: failover::Failover::new(failover::FailoverSettings {
                    mode: config.failover.mode,
                    check_interval: Duration::from_millis(
                        config.failover.health_check_interval_ms.max(10),
                    ),
                    failure_threshold: config.failover.failure_threshold.max(1),
                    write_wait: Duration::from_millis(config.failover.write_wait_ms),
                    credentials: control_credentials.clone(),
                    state_path: state_path.clone(),
                    fleet: fleet.clone(),
                }),
                retired: AtomicBool::new(false),
            });
            if let Some(old) = old_project {
                project.failover.carry_counters(&old.failover);
            }
            match fleet.as_ref().and_then(|f| f.record(name)) {
                Some(record) => state_file::assign_roles(&project, Some(&record), "etcd"),
                None => state_file::assign_roles(
                    &project,
                    recorded.projects.get(name),
                    "the state file",
                ),
            }
            projects.insert(name.clone(), project);
        }
        Topology { projects }
    }
}

/// The pool settings of a project's nodes.
fn pool_settings(proxy: &crate::config::ProxySettings, size: u32) -> PoolSettings {
    let ms = Duration::from_millis;
    PoolSettings {
        size,
        connect_timeout: ms(proxy.connect_timeout_ms),
        wait_timeout: ms(proxy.query_wait_timeout_ms),
        idle_timeout: ms(proxy.server_idle_timeout_ms),
        lifetime: (proxy.server_lifetime_ms > 0).then(|| ms(proxy.server_lifetime_ms)),
        keepalive: crate::keepalive::Keepalive::from_settings(proxy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEIGHTED: &str = r#"
[proxy]
listen = "127.0.0.1:6432"

[[users]]
name = "app"
password = "secret"

[projects.shop]
[[projects.shop.replicas]]
name = "main"
role = "primary"
uri = "postgresql://127.0.0.1:5432/shop"

[[projects.shop.replicas]]
name = "light"
role = "replica"
uri = "postgresql://127.0.0.1:5433/shop"

[[projects.shop.replicas]]
name = "heavy"
role = "replica"
weight = 2
uri = "postgresql://127.0.0.1:5434/shop"
"#;

    fn names(nodes: &[Arc<Node>]) -> Vec<&str> {
        nodes.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn read_candidates_take_weighted_turns_and_skip_what_cannot_serve() {
        let config = crate::config::Config::parse(WEIGHTED).unwrap();
        let topology = Topology::from_config(&config);
        let shop = &topology.projects["shop"];
        let mut firsts = Vec::new();
        let mut out = Vec::new();
        for _ in 0..6 {
            shop.read_candidates_into(0, true, &mut out);
            // Every replica is offered, the chosen one first, then the others in turn.
            let order = names(&out);
            assert!(
                order == ["light", "heavy"] || order == ["heavy", "light"],
                "{order:?}"
            );
            firsts.push(order[0].to_string());
        }
        let heavy = firsts.iter().filter(|n| *n == "heavy").count();
        assert_eq!(heavy, 4, "weight 2 gets twice the turns: {firsts:?}");
        // Requests that run no statement leave the turn where it is.
        let before = names(&shop.read_candidates(0, false)).join(",");
        let again = names(&shop.read_candidates(0, false)).join(",");
        assert_eq!(before, again);
        // A replica known not to have replayed far enough, or marked down, is left out.
        let light = shop.nodes.iter().find(|n| n.name == "light").unwrap();
        let heavy = shop.nodes.iter().find(|n| n.name == "heavy").unwrap();
        heavy.health.advance_lsn(100);
        assert_eq!(names(&shop.read_candidates(50, true)), ["heavy"]);
        light.mark_down();
        assert_eq!(names(&shop.read_candidates(0, true)), ["heavy"]);
        heavy.mark_down();
        assert!(shop.read_candidates(0, true).is_empty());
    }
}
