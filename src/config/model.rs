//! The proxy.toml model. Field names are the user-facing contract (see README).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxySettings,
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub projects: BTreeMap<String, Project>,
    #[serde(default)]
    pub failover: Failover,
    #[serde(default)]
    pub targets: BTreeMap<String, Target>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Users looked up in the database (`auth_query`) when proxy.toml does not list them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthQuery>,
    /// Fleet mode: several proxies that share one view of the cluster through etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordination: Option<Coordination>,
}

/// `[auth]`: who looks users up, and how (PgBouncer's auth_user and auth_query).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthQuery {
    pub user: String,
    pub password: String,
    /// Returns the user name and its stored secret (SCRAM verifier or md5 hash) for
    /// `$1`, the login name.
    #[serde(default = "default_auth_query")]
    pub query: String,
    /// How long a lookup (found or not) is kept before asking again.
    #[serde(default = "default_auth_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
}

pub fn default_auth_query() -> String {
    "SELECT rolname::text, rolpassword::text FROM pg_catalog.pg_authid \
     WHERE rolname = $1 AND rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > now())"
        .into()
}

fn default_auth_cache_ttl_ms() -> u64 {
    30_000
}

/// `[coordination]`: the etcd cluster a fleet of proxies agrees through.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Coordination {
    /// etcd v3 endpoints (`http://host:2379`).
    pub etcd: Vec<String>,
    /// Key prefix: every proxy with the same prefix is in the same fleet.
    #[serde(default = "default_coordination_prefix")]
    pub prefix: String,
    /// How long an instance's lease (and the leadership bound to it) outlives its last
    /// contact with etcd; an instance cut off longer stops sending writes.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// This instance's name in the fleet (default: host:port of `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The address other instances reach this one at (default: `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
}

fn default_coordination_prefix() -> String {
    "/replicator".into()
}

fn default_lease_ttl_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    #[serde(default)]
    pub pool_mode: PoolMode,
    #[serde(default = "default_state_file")]
    pub state_file: String,
    /// How long a client waits for a backend connection before it gets an error.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle backend connections are closed after this long.
    #[serde(default = "default_server_idle_timeout_ms")]
    pub server_idle_timeout_ms: u64,
    /// Distinct statement shapes whose routing decision is cached.
    #[serde(default = "default_statement_cache_size")]
    pub statement_cache_size: usize,
    /// Threads serving clients: 1 (default) is a single-threaded event loop; 0 means
    /// one per CPU core.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// On SIGTERM/SIGINT, how long clients inside a transaction may take to finish it.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Bearer token for the admin HTTP endpoints that change things or show the
    /// topology (REPLICATOR_ADMIN_TOKEN wins when set). Empty: those endpoints refuse.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_token: String,
    /// Clients connected at once, logins under way included (0: no limit).
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// `/metrics` asks for the admin token too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_auth: bool,
    /// The proxy's certificate (PEM, the leaf first, its chain after it) and key, for
    /// clients that ask for TLS; re-read on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<String>,
    /// Whether clients may (allow), must (require) or cannot (disable) use TLS;
    /// default: allow with a certificate, disable without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTls>,
    /// A client idle between transactions this long is disconnected (57P05); 0: never.
    #[serde(default, skip_serializing_if = "is_zero_ms")]
    pub client_idle_timeout_ms: u64,
    /// A client idle inside a transaction this long is disconnected (25P03) and its
    /// server connection rolled back and returned to the pool; 0: never.
    #[serde(default, skip_serializing_if = "is_zero_ms")]
    pub idle_transaction_timeout_ms: u64,
    /// A query running this long is cancelled on its server (the client gets 57014 and
    /// keeps its session); 0: never.
    #[serde(default, skip_serializing_if = "is_zero_ms")]
    pub query_timeout_ms: u64,
    /// Server connections older than this are closed when they come back to the pool;
    /// 0: never.
    #[serde(default, skip_serializing_if = "is_zero_ms")]
    pub server_lifetime_ms: u64,
    /// How long a client waits for a pooled connection when every one is busy.
    #[serde(default = "default_query_wait_timeout_ms")]
    pub query_wait_timeout_ms: u64,
    /// A client that takes none of the bytes sent to it for this long is disconnected,
    /// its query cancelled and its server connection reset and returned; 0: never.
    #[serde(default = "default_client_write_timeout_ms")]
    pub client_write_timeout_ms: u64,
    /// TCP keepalive on client and server sockets; the timings default to the kernel's.
    #[serde(default = "default_true")]
    pub tcp_keepalive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive_idle_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive_count: Option<u32>,
}

fn is_zero_ms(n: &u64) -> bool {
    *n == 0
}

/// `[proxy] client_tls`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientTls {
    Disable,
    Allow,
    Require,
}

/// The environment variable that holds the admin token (it wins over proxy.toml).
pub const ADMIN_TOKEN_ENV: &str = "REPLICATOR_ADMIN_TOKEN";

impl ProxySettings {
    /// The token the admin endpoints require: the environment's, else proxy.toml's.
    pub fn admin_token(&self) -> Option<String> {
        std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| Some(self.admin_token.clone()).filter(|t| !t.is_empty()))
    }

    /// The effective `client_tls`.
    pub fn client_tls(&self) -> ClientTls {
        match self.client_tls {
            Some(mode) => mode,
            None if self.tls_cert_file.is_some() => ClientTls::Allow,
            None => ClientTls::Disable,
        }
    }

    pub fn worker_threads(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.workers
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub admin: bool,
    /// Client addresses this user may connect from (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Clients of this user connected at once (0: no limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_clients: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_max_client_conn() -> usize {
    10_000
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// Backend database name; defaults to the project's name.
    pub database: Option<String>,
    #[serde(default)]
    pub read_routing: ReadRouting,
    #[serde(default)]
    pub read_your_writes: bool,
    #[serde(default)]
    pub causal_wait_ms: u64,
    #[serde(default = "default_lag_check_interval_ms")]
    pub lag_check_interval_ms: u64,
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    #[serde(default)]
    pub replicas: Vec<Replica>,
    /// Client addresses that may connect to this project (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Clients of this project connected at once (0: no limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_clients: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum ReadRouting {
    #[default]
    #[serde(rename = "round-robin")]
    RoundRobin,
    #[serde(rename = "least-lag")]
    LeastLag,
    #[serde(rename = "random")]
    Random,
}

impl ReadRouting {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadRouting::RoundRobin => "round-robin",
            ReadRouting::LeastLag => "least-lag",
            ReadRouting::Random => "random",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub name: String,
    pub role: Role,
    pub uri: String,
    #[serde(default = "default_lag_tolerance_ms")]
    pub lag_tolerance_ms: u64,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum Role {
    #[serde(rename = "primary", alias = "master")]
    Primary,
    #[serde(rename = "replica", alias = "slave")]
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    #[serde(default)]
    pub mode: FailoverMode,
    #[serde(default = "default_health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "default_write_wait_ms")]
    pub write_wait_ms: u64,
    /// Who the proxy logs in as to promote a replica and re-point the others (a
    /// superuser, or a role allowed `pg_promote`, `ALTER SYSTEM` and `pg_reload_conf`).
    /// Unset: the monitor's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            mode: FailoverMode::default(),
            health_check_interval_ms: default_health_check_interval_ms(),
            failure_threshold: default_failure_threshold(),
            write_wait_ms: default_write_wait_ms(),
            user: None,
            password: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    #[default]
    Auto,
    Manual,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub kind: TargetKind,
    pub uri: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Mongodb,
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub source: String,
    pub target: String,
    #[serde(default = "default_rule_mode")]
    pub mode: String,
    pub collections: Vec<String>,
    #[serde(default)]
    pub conflict_resolution: ConflictResolution,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum ConflictResolution {
    #[default]
    #[serde(rename = "source-wins")]
    SourceWins,
    #[serde(rename = "target-wins")]
    TargetWins,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9930".into()
}
fn default_state_file() -> String {
    "replicator-state.json".into()
}
fn default_connect_timeout_ms() -> u64 {
    5000
}
fn default_query_wait_timeout_ms() -> u64 {
    120_000
}
fn default_client_write_timeout_ms() -> u64 {
    60_000
}
fn default_server_idle_timeout_ms() -> u64 {
    600_000
}
fn default_statement_cache_size() -> usize {
    10_000
}
fn default_shutdown_timeout_ms() -> u64 {
    10_000
}
fn default_workers() -> usize {
    1
}
fn default_lag_check_interval_ms() -> u64 {
    500
}
fn default_pool_size() -> u32 {
    20
}
fn default_lag_tolerance_ms() -> u64 {
    5000
}
fn default_weight() -> u32 {
    1
}
fn default_health_check_interval_ms() -> u64 {
    1000
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_write_wait_ms() -> u64 {
    10_000
}
fn default_rule_mode() -> String {
    "cdc".into()
}
fn default_interval_ms() -> u64 {
    30_000
}
fn default_true() -> bool {
    true
}
