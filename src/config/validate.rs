//! Checks on a parsed config: keys the model does not know, and rules between values
//! (one primary per project, unique names, parseable URIs, rules that point somewhere).

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{Config, ConfigIssue, Role};

/// Keys allowed at each level; anything else is an error, never silently ignored.
const TOP: &[&str] = &[
    "proxy",
    "users",
    "projects",
    "failover",
    "targets",
    "rules",
    "coordination",
    "auth",
];
const AUTH: &[&str] = &["user", "password", "query", "cache_ttl_ms"];
const COORDINATION: &[&str] = &["etcd", "prefix", "lease_ttl_ms", "instance", "advertise"];
const PROXY: &[&str] = &[
    "listen",
    "admin_listen",
    "pool_mode",
    "state_file",
    "connect_timeout_ms",
    "server_idle_timeout_ms",
    "statement_cache_size",
    "workers",
    "shutdown_timeout_ms",
    "admin_token",
    "max_client_conn",
    "metrics_auth",
    "tls_cert_file",
    "tls_key_file",
    "client_tls",
    "client_idle_timeout_ms",
    "idle_transaction_timeout_ms",
    "query_timeout_ms",
    "server_lifetime_ms",
    "query_wait_timeout_ms",
    "client_write_timeout_ms",
    "tcp_keepalive",
    "tcp_keepalive_idle_ms",
    "tcp_keepalive_interval_ms",
    "tcp_keepalive_count",
];
const USER: &[&str] = &["name", "password", "admin", "allow", "max_clients"];
const PROJECT: &[&str] = &[
    "database",
    "read_routing",
    "read_your_writes",
    "causal_wait_ms",
    "lag_check_interval_ms",
    "pool_size",
    "replicas",
    "allow",
    "max_clients",
];
const REPLICA: &[&str] = &["name", "role", "uri", "lag_tolerance_ms", "weight"];
const FAILOVER: &[&str] = &[
    "mode",
    "health_check_interval_ms",
    "failure_threshold",
    "write_wait_ms",
    "user",
    "password",
];
const TARGET: &[&str] = &["kind", "uri"];
const RULE: &[&str] = &[
    "name",
    "source",
    "target",
    "mode",
    "collections",
    "conflict_resolution",
    "interval_ms",
    "enabled",
];

/// A target URI the sink will be able to use: `mongodb://host/db` (a database is
/// required: documents go there) or a Postgres URI tokio-postgres accepts.
fn check_target_uri(target: &super::model::Target) -> Result<(), String> {
    let uri = target.uri.as_str();
    match target.kind {
        super::model::TargetKind::Mongodb => {
            let rest = uri
                .strip_prefix("mongodb://")
                .or_else(|| uri.strip_prefix("mongodb+srv://"))
                .ok_or("must start with mongodb:// or mongodb+srv://")?;
            let database = rest
                .split_once('/')
                .map(|(_, path)| path.split('?').next().unwrap_or(""))
                .unwrap_or("");
            if database.is_empty() {
                return Err("must name a database (mongodb://host:port/DATABASE)".into());
            }
            Ok(())
        }
        super::model::TargetKind::Postgres => {
            let (uri, _) = super::conninfo::split(uri)?;
            uri.parse::<tokio_postgres::Config>()
                .map(|_| ())
                .map_err(|e| format!("not a Postgres connection string: {e}"))
        }
    }
}

/// The name clients use to reach the admin console; no project may take it.
pub const ADMIN_DATABASE: &str = "replicator";

fn issue(key: impl Into<String>, reason: impl Into<String>) -> ConfigIssue {
    ConfigIssue {
        key: key.into(),
        reason: reason.into(),
    }
}

fn check_table(table: &toml::Table, prefix: &str, allowed: &[&str], out: &mut Vec<ConfigIssue>) {
    for key in table.keys() {
        if !allowed.contains(&key.as_str()) {
            out.push(issue(
                format!("{prefix}{key}"),
                format!("unknown key (expected one of: {})", allowed.join(", ")),
            ));
        }
    }
}

fn each_table(value: Option<&toml::Value>) -> Vec<(usize, &toml::Table)> {
    match value {
        Some(toml::Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_table().map(|t| (i, t)))
            .collect(),
        _ => Vec::new(),
    }
}

pub fn unknown_keys(root: &toml::Table) -> Vec<ConfigIssue> {
    let mut out = Vec::new();
    check_table(root, "", TOP, &mut out);
    if let Some(t) = root.get("proxy").and_then(|v| v.as_table()) {
        check_table(t, "proxy.", PROXY, &mut out);
    }
    if let Some(t) = root.get("failover").and_then(|v| v.as_table()) {
        check_table(t, "failover.", FAILOVER, &mut out);
    }
    if let Some(t) = root.get("auth").and_then(|v| v.as_table()) {
        check_table(t, "auth.", AUTH, &mut out);
    }
    if let Some(t) = root.get("coordination").and_then(|v| v.as_table()) {
        check_table(t, "coordination.", COORDINATION, &mut out);
    }
    for (i, t) in each_table(root.get("users")) {
        check_table(t, &format!("users[{i}]."), USER, &mut out);
    }
    for (i, t) in each_table(root.get("rules")) {
        check_table(t, &format!("rules[{i}]."), RULE, &mut out);
    }
    if let Some(targets) = root.get("targets").and_then(|v| v.as_table()) {
        for (name, t) in targets {
            if let Some(t) = t.as_table() {
                check_table(t, &format!("targets.{name}."), TARGET, &mut out);
            }
        }
    }
    if let Some(projects) = root.get("projects").and_then(|v| v.as_table()) {
        for (name, p) in projects {
            let Some(p) = p.as_table() else { continue };
            check_table(p, &format!("projects.{name}."), PROJECT, &mut out);
            for (i, r) in each_table(p.get("replicas")) {
                check_table(
                    r,
                    &format!("projects.{name}.replicas[{i}]."),
                    REPLICA,
                    &mut out,
                );
            }
        }
    }
    out
}

/// Where a node listens, taken from its `uri`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddress {
    pub host: String,
    pub port: u16,
    /// Database named in the URI, if any (the project's `database` wins when unset here).
    pub dbname: Option<String>,
    /// libpq's `require_auth` from the URI: the authentication methods the proxy
    /// answers when it logs in there.
    pub require_auth: Option<crate::protocol::auth_policy::RequireAuth>,
    /// libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey` from the URI.
    pub tls: crate::tls::connect::ServerTlsSettings,
}

impl NodeAddress {
    pub fn parse(uri: &str) -> Result<NodeAddress, String> {
        let (uri, security) = super::conninfo::split(uri)?;
        let config: tokio_postgres::Config =
            uri.parse().map_err(|e| format!("invalid uri: {e}"))?;
        let host = match config.get_hosts() {
            [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
            [] => return Err("uri names no host".into()),
            [_] => return Err("unix sockets are not supported; use a TCP host".into()),
            _ => return Err("uri must name exactly one host".into()),
        };
        let port = match config.get_ports() {
            [] => 5432,
            [p] => *p,
            _ => return Err("uri must name exactly one port".into()),
        };
        Ok(NodeAddress {
            host,
            port,
            dbname: config.get_dbname().map(str::to_string),
            require_auth: security.require_auth,
            tls: security.tls,
        })
    }
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn check_allow(key: &str, allow: &[String], out: &mut Vec<ConfigIssue>) {
    for (i, entry) in allow.iter().enumerate() {
        if let Err(reason) = super::allow::Network::parse(entry) {
            out.push(issue(format!("{key}[{i}]"), reason));
        }
    }
}

pub fn semantics(config: &Config) -> Vec<ConfigIssue> {
    let mut out = Vec::new();
    if config.proxy.listen.parse::<SocketAddr>().is_err() {
        out.push(issue(
            "proxy.listen",
            "must be an address like 127.0.0.1:6432",
        ));
    }
    if !config.proxy.admin_listen.is_empty()
        && config.proxy.admin_listen.parse::<SocketAddr>().is_err()
    {
        out.push(issue(
            "proxy.admin_listen",
            "must be an address like 127.0.0.1:9930 (or \"\" for no HTTP endpoints)",
        ));
    }
    let proxy = &config.proxy;
    match (&proxy.tls_cert_file, &proxy.tls_key_file) {
        (Some(_), None) => out.push(issue("proxy.tls_key_file", "tls_cert_file needs its key")),
        (None, Some(_)) => out.push(issue(
            "proxy.tls_cert_file",
            "tls_key_file needs its certificate",
        )),
        (None, None)
            if proxy
                .client_tls
                .is_some_and(|m| m != super::ClientTls::Disable) =>
        {
            out.push(issue(
                "proxy.client_tls",
                "needs tls_cert_file and tls_key_file",
            ))
        }
        _ => {}
    }
    if config.proxy.connect_timeout_ms == 0 {
        out.push(issue("proxy.connect_timeout_ms", "must be greater than 0"));
    }
    if proxy.query_wait_timeout_ms == 0 {
        out.push(issue(
            "proxy.query_wait_timeout_ms",
            "must be greater than 0 (a client must not wait for a server forever)",
        ));
    }
    // The kernel counts keepalive timings in whole seconds.
    for (key, value) in [
        ("proxy.tcp_keepalive_idle_ms", proxy.tcp_keepalive_idle_ms),
        (
            "proxy.tcp_keepalive_interval_ms",
            proxy.tcp_keepalive_interval_ms,
        ),
    ] {
        if value.is_some_and(|ms| ms < 1000) {
            out.push(issue(key, "must be at least 1000 (whole seconds)"));
        }
    }
    if proxy.tcp_keepalive_count == Some(0) {
        out.push(issue("proxy.tcp_keepalive_count", "must be at least 1"));
    }
    if config.proxy.statement_cache_size == 0 {
        out.push(issue(
            "proxy.statement_cache_size",
            "must be greater than 0",
        ));
    }
    if config.users.is_empty() && config.auth.is_none() {
        out.push(issue(
            "users",
            "at least one [[users]] entry (or an [auth] section) is needed, or no client can log in",
        ));
    }
    if let Some(auth) = &config.auth {
        if auth.user.is_empty() {
            out.push(issue("auth.user", "must not be empty"));
        }
        if !auth.query.contains("$1") {
            out.push(issue("auth.query", "must use $1, the login name"));
        }
    }
    let mut user_names = HashSet::new();
    for (i, user) in config.users.iter().enumerate() {
        if user.name.is_empty() {
            out.push(issue(format!("users[{i}].name"), "must not be empty"));
        } else if !user_names.insert(user.name.as_str()) {
            out.push(issue(
                format!("users[{i}].name"),
                format!("user \"{}\" is defined twice", user.name),
            ));
        }
        if user.password.is_empty() {
            out.push(issue(format!("users[{i}].password"), "must not be empty"));
        } else if user.password.starts_with("SCRAM-SHA-256$")
            && crate::protocol::auth::ScramVerifier::parse(&user.password).is_none()
        {
            out.push(issue(
                format!("users[{i}].password"),
                "looks like a SCRAM verifier but cannot be parsed",
            ));
        }
        check_allow(&format!("users[{i}].allow"), &user.allow, &mut out);
    }
    if config.projects.is_empty() {
        out.push(issue("projects", "at least one [projects.NAME] is needed"));
    }
    for (name, project) in &config.projects {
        let key = format!("projects.{name}");
        if name == ADMIN_DATABASE {
            out.push(issue(
                &key,
                format!("\"{ADMIN_DATABASE}\" is reserved for the admin console"),
            ));
        }
        check_allow(&format!("{key}.allow"), &project.allow, &mut out);
        if project.pool_size == 0 {
            out.push(issue(format!("{key}.pool_size"), "must be greater than 0"));
        }
        if project.lag_check_interval_ms == 0 {
            out.push(issue(
                format!("{key}.lag_check_interval_ms"),
                "must be greater than 0",
            ));
        }
        let primaries = project
            .replicas
            .iter()
            .filter(|r| r.role == Role::Primary)
            .count();
        if primaries != 1 {
            out.push(issue(
                format!("{key}.replicas"),
                format!("needs exactly one replica with role = \"primary\" (found {primaries})"),
            ));
        }
        let mut names = HashSet::new();
        for (i, replica) in project.replicas.iter().enumerate() {
            let rkey = format!("{key}.replicas[{i}]");
            if replica.name.is_empty() {
                out.push(issue(format!("{rkey}.name"), "must not be empty"));
            } else if !names.insert(replica.name.as_str()) {
                out.push(issue(
                    format!("{rkey}.name"),
                    format!("replica \"{}\" is defined twice", replica.name),
                ));
            }
            match NodeAddress::parse(&replica.uri) {
                Err(reason) => out.push(issue(format!("{rkey}.uri"), reason)),
                Ok(addr) => {
                    if let Err(reason) = addr.tls.client_config() {
                        out.push(issue(format!("{rkey}.uri"), reason));
                    }
                }
            }
            if replica.weight == 0 {
                out.push(issue(format!("{rkey}.weight"), "must be at least 1"));
            }
        }
    }
    if config.failover.failure_threshold == 0 {
        out.push(issue("failover.failure_threshold", "must be at least 1"));
    }
    if config.failover.health_check_interval_ms == 0 {
        out.push(issue(
            "failover.health_check_interval_ms",
            "must be greater than 0",
        ));
    }
    if let Some(c) = &config.coordination {
        if c.etcd.is_empty() {
            out.push(issue(
                "coordination.etcd",
                "must list at least one etcd endpoint",
            ));
        }
        for (i, endpoint) in c.etcd.iter().enumerate() {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"))
                .unwrap_or(endpoint);
            let has_port = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !has_port {
                out.push(issue(
                    format!("coordination.etcd[{i}]"),
                    "must be http://host:port",
                ));
            }
        }
        if !c.prefix.starts_with('/') || c.prefix.len() < 2 {
            out.push(issue(
                "coordination.prefix",
                "must start with / and name the fleet (\"/replicator/prod\")",
            ));
        }
        if c.lease_ttl_ms < 2000 {
            out.push(issue(
                "coordination.lease_ttl_ms",
                "must be at least 2000 (etcd leases count in whole seconds)",
            ));
        }
        if c.instance
            .as_deref()
            .is_some_and(|i| i.is_empty() || i.contains('/'))
        {
            out.push(issue(
                "coordination.instance",
                "must be a non-empty name without /",
            ));
        }
    }
    for (name, target) in &config.targets {
        if let Err(reason) = check_target_uri(target) {
            out.push(issue(format!("targets.{name}.uri"), reason));
        }
        if config.projects.contains_key(name) {
            out.push(issue(
                format!("targets.{name}"),
                "a project has the same name; rule targets would be ambiguous",
            ));
        }
    }
    let mut rule_names = HashSet::new();
    for (i, rule) in config.rules.iter().enumerate() {
        let key = format!("rules[{i}]");
        if !rule_names.insert(rule.name.as_str()) {
            out.push(issue(
                format!("{key}.name"),
                format!("rule \"{}\" is defined twice", rule.name),
            ));
        }
        if !config.projects.contains_key(&rule.source) {
            out.push(issue(
                format!("{key}.source"),
                format!(
                    "rule \"{}\": no project named \"{}\"",
                    rule.name, rule.source
                ),
            ));
        }
        if !config.targets.contains_key(&rule.target) && !config.projects.contains_key(&rule.target)
        {
            out.push(issue(
                format!("{key}.target"),
                format!(
                    "rule \"{}\": no target or project named \"{}\"",
                    rule.name, rule.target
                ),
            ));
        }
        if rule.mode != "cdc" {
            out.push(issue(
                format!("{key}.mode"),
                format!("rule \"{}\": only \"cdc\" is supported", rule.name),
            ));
        }
        if rule.collections.is_empty() {
            out.push(issue(
                format!("{key}.collections"),
                format!("rule \"{}\": name at least one table", rule.name),
            ));
        }
    }
    out
}
