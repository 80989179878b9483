//! The live topology: per project, its nodes (primary and replicas), their pools and
//! health, and the choice of a node for a read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::{Config, NodeAddress, ReadRouting, Role};
use crate::pool::{self, BackendError, LoginInfo, Pool, Pooled};
use crate::session::users::UserEntry;

/// How long a node that refused a connection is skipped for reads before it is tried again.
const DOWN_BACKOFF: Duration = Duration::from_millis(1000);

pub struct Node {
    pub name: String,
    pub role: Role,
    pub addr: NodeAddress,
    pub database: String,
    pub weight: u32,
    pub lag_tolerance_ms: u64,
    pool_size: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
    pools: RwLock<HashMap<String, Pool>>,
    last_error: pool::LastError,
    /// Milliseconds since `epoch` until which the node is considered down.
    down_until_ms: AtomicU64,
    epoch: Instant,
    pub stats: NodeStats,
}

#[derive(Default)]
pub struct NodeStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub connect_errors: AtomicU64,
}

impl Node {
    /// Checks out a server connection for `user`, creating the user's pool on first use.
    pub async fn checkout(&self, user: &UserEntry) -> Result<Pooled, BackendError> {
        let pool = self.pool_for(user);
        // An error from an earlier attempt must not be blamed on this one.
        self.last_error.take();
        match pool.get_owned().await {
            Ok(conn) => {
                self.down_until_ms.store(0, Ordering::Relaxed);
                Ok(conn)
            }
            Err(e) => {
                let err = pool::checkout_error(e, &self.name, &self.last_error);
                if !matches!(
                    err,
                    BackendError::Auth { .. } | BackendError::Unsupported { .. }
                ) {
                    self.mark_down();
                }
                self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    fn pool_for(&self, user: &UserEntry) -> Pool {
        if let Ok(pools) = self.pools.read()
            && let Some(pool) = pools.get(&user.name)
        {
            return pool.clone();
        }
        let mut pools = match self.pools.write() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        pools
            .entry(user.name.clone())
            .or_insert_with(|| {
                pool::build_pool(
                    LoginInfo {
                        addr: self.addr.clone(),
                        database: self.database.clone(),
                        user: user.name.clone(),
                        password: user.backend_password.clone(),
                    },
                    self.pool_size,
                    self.connect_timeout,
                    self.idle_timeout,
                    self.last_error.clone(),
                )
            })
            .clone()
    }

    pub fn mark_down(&self) {
        let until = self.epoch.elapsed() + DOWN_BACKOFF;
        self.down_until_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) <= self.epoch.elapsed().as_millis() as u64
    }

    /// (user, connections, idle) per pool.
    pub fn pool_states(&self) -> Vec<(String, u32, u32)> {
        self.pools
            .read()
            .map(|pools| {
                pools
                    .iter()
                    .map(|(user, p)| {
                        let s = p.state();
                        (user.clone(), s.connections, s.idle_connections)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct Project {
    pub name: String,
    pub database: String,
    pub read_routing: ReadRouting,
    pub nodes: Vec<Arc<Node>>,
    rr: AtomicUsize,
}

impl Project {
    pub fn primary(&self) -> Option<&Arc<Node>> {
        self.nodes.iter().find(|n| n.role == Role::Primary)
    }

    /// Replicas eligible for reads right now, in the order the strategy prefers them.
    /// The caller tries them in turn and falls back to the primary.
    pub fn read_candidates(&self) -> Vec<Arc<Node>> {
        let up: Vec<&Arc<Node>> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Replica && n.is_up())
            .collect();
        if up.is_empty() {
            return Vec::new();
        }
        let total: u64 = up.iter().map(|n| n.weight as u64).sum();
        let ticket = match self.read_routing {
            ReadRouting::Random => rand::random_range(0..total.max(1)),
            // least-lag needs the lag monitor; until a node reports lag it behaves as round-robin.
            ReadRouting::RoundRobin | ReadRouting::LeastLag => {
                self.rr.fetch_add(1, Ordering::Relaxed) as u64 % total.max(1)
            }
        };
        // Weighted pick: walk the cumulative weights to the ticket.
        let mut acc = 0u64;
        let mut first = 0;
        for (i, n) in up.iter().enumerate() {
            acc += n.weight as u64;
            if ticket < acc {
                first = i;
                break;
            }
        }
        let mut ordered = Vec::with_capacity(up.len());
        for i in 0..up.len() {
            ordered.push(up[(first + i) % up.len()].clone());
        }
        ordered
    }
}

pub struct Topology {
    pub projects: HashMap<String, Arc<Project>>,
}

impl Topology {
    pub fn from_config(config: &Config) -> Topology {
        let epoch = Instant::now();
        let mut projects = HashMap::new();
        for (name, p) in &config.projects {
            let database = config.project_database(name).unwrap_or(name).to_string();
            let nodes = p
                .replicas
                .iter()
                .filter_map(|r| {
                    // Validation already guaranteed that every uri parses.
                    let addr = NodeAddress::parse(&r.uri).ok()?;
                    Some(Arc::new(Node {
                        name: r.name.clone(),
                        role: r.role,
                        database: p
                            .database
                            .clone()
                            .or(addr.dbname.clone())
                            .unwrap_or_else(|| database.clone()),
                        addr,
                        weight: r.weight,
                        lag_tolerance_ms: r.lag_tolerance_ms,
                        pool_size: p.pool_size,
                        connect_timeout: Duration::from_millis(config.proxy.connect_timeout_ms),
                        idle_timeout: Duration::from_millis(config.proxy.server_idle_timeout_ms),
                        pools: RwLock::new(HashMap::new()),
                        last_error: pool::LastError::default(),
                        down_until_ms: AtomicU64::new(0),
                        epoch,
                        stats: NodeStats::default(),
                    }))
                })
                .collect();
            projects.insert(
                name.clone(),
                Arc::new(Project {
                    name: name.clone(),
                    database,
                    read_routing: p.read_routing,
                    nodes,
                    rr: AtomicUsize::new(0),
                }),
            );
        }
        Topology { projects }
    }
}
