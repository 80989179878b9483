//! Admin commands (`SHOW REPLICAS`, `SET READ_ROUTING ...`): parsing and execution,
//! independent of the surface that received them.

use std::sync::Arc;
use std::time::SystemTime;

use super::status::{self, Status};
use crate::config::persist;
pub use crate::config::persist::Change;
use crate::config::{Config, ReadRouting};
use crate::state::Shared;

mod show;
use show::*;
pub use show::{SYNC_COLUMNS, sync_row};

pub enum Reply {
    Rows {
        columns: Vec<&'static str>,
        rows: Vec<Vec<Option<String>>>,
        tag: &'static str,
    },
    Done {
        tag: String,
    },
}

#[derive(Debug)]
pub struct CommandError {
    pub code: &'static str,
    pub message: String,
}

fn error(code: &'static str, message: impl Into<String>) -> CommandError {
    CommandError {
        code,
        message: message.into(),
    }
}

pub const HELP: &[(&str, &str)] = &[
    (
        "SHOW REPLICAS",
        "every node: role, state, lag, connections, queries routed",
    ),
    ("SHOW POOLS", "server connection pools per node and user"),
    ("SHOW CLIENTS", "connected clients"),
    (
        "SHOW STATS",
        "per project: queries, reads, writes, fallbacks, latency",
    ),
    (
        "SHOW CONFIG",
        "the running configuration (passwords hidden)",
    ),
    (
        "SET READ_ROUTING <project> <strategy>",
        "round-robin | least-lag | random",
    ),
    (
        "PROMOTE <project> <replica>",
        "switchover (primary healthy) or failover to that replica",
    ),
    (
        "ADD REPLICA <project> <name> <role> '<uri>'",
        "add a node (saved in proxy.toml)",
    ),
    (
        "REMOVE REPLICA <project> <name>",
        "remove a node (saved in proxy.toml); its pools drain",
    ),
    ("RELOAD", "re-read proxy.toml (a bad file changes nothing)"),
    (
        "SHOW RULES",
        "CDC rules: state, last run, position, rows, errors, lag, throughput",
    ),
    (
        "SYNC <rule>",
        "run a CDC rule now; returns when it has caught up",
    ),
    (
        "SHOW FAILOVER",
        "per project: primary, failover mode, state, last event",
    ),
    (
        "SHOW FLEET",
        "fleet mode: every instance, its address, leader or follower, last heartbeat",
    ),
    ("SHOW HELP", "this list"),
];

/// Splits a simple query into statements at `;` outside quotes.
pub fn split_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (None, ';') => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Words of a command; single-quoted words keep their spaces (a URI with options).
pub fn words(statement: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut had_quote = false;
    for c in statement.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                had_quote = true;
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() || had_quote {
                    out.push(std::mem::take(&mut current));
                }
                had_quote = false;
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() || had_quote {
        out.push(current);
    }
    out
}

pub async fn execute(shared: &Arc<Shared>, statement: &str) -> Result<Reply, CommandError> {
    let words = words(statement);
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let key: Vec<&str> = upper.iter().map(String::as_str).collect();
    match key.as_slice() {
        ["SHOW", "REPLICAS"] => Ok(show_replicas(shared)),
        ["SHOW", "POOLS"] => Ok(show_pools(shared)),
        ["SHOW", "CLIENTS"] => Ok(show_clients(shared)),
        ["SHOW", "STATS"] => Ok(show_stats(shared)),
        ["SHOW", "CONFIG"] => Ok(show_config(shared)),
        ["SHOW", "HELP"] | ["HELP"] => Ok(rows(
            vec!["command", "description"],
            HELP.iter()
                .map(|(c, d)| vec![c.to_string(), d.to_string()])
                .collect(),
        )),
        ["SHOW", "FAILOVER"] => Ok(show_failover(shared)),
        ["SHOW", "FLEET"] => Ok(show_fleet(shared)),
        ["SHOW", "RULES"] => {
            let status = Status::collect(shared);
            Ok(rows(
                status::RULE_COLUMNS.to_vec(),
                status::rule_rows(&status),
            ))
        }
        ["SYNC", _] => {
            let report = shared
                .cdc
                .sync(&words[1])
                .await
                .map_err(|e| error("55000", e))?;
            Ok(rows(SYNC_COLUMNS.to_vec(), vec![sync_row(&report)]))
        }
        ["RELOAD"] => match crate::reload::reload(shared, "RELOAD").await {
            Ok(message) => Ok(Reply::Rows {
                columns: vec!["result"],
                rows: vec![vec![Some(message)]],
                tag: "SELECT",
            }),
            Err(message) => Err(error("F0000", message)),
        },
        ["PROMOTE", _, _] => {
            let message = promote(shared, &words[1], &words[2]).await?;
            Ok(Reply::Rows {
                columns: vec!["result"],
                rows: vec![vec![Some(message)]],
                tag: "SELECT",
            })
        }
        ["SET", "READ_ROUTING", _, _] => {
            set_read_routing(shared, &words[2], &words[3]).await?;
            Ok(Reply::Done { tag: "SET".into() })
        }
        ["ADD", "REPLICA", _, _, _, _] => {
            let change = Change::AddReplica {
                project: &words[2],
                name: &words[3],
                role: &words[4],
                uri: &words[5],
            };
            let message = persist_and_reload(shared, &change, "ADD REPLICA").await?;
            Ok(result_row(message))
        }
        ["REMOVE", "REPLICA", _, _] => {
            let change = Change::RemoveReplica {
                project: &words[2],
                name: &words[3],
            };
            let message = persist_and_reload(shared, &change, "REMOVE REPLICA").await?;
            Ok(result_row(message))
        }
        _ => Err(error(
            "42601",
            format!(
                "unknown admin command \"{statement}\"; available: {}",
                HELP.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Promotes `replica` of `project` (see `cluster::failover::promote_on_request`).
pub async fn promote(
    shared: &Shared,
    project: &str,
    replica: &str,
) -> Result<String, CommandError> {
    if *shared.shutdown.borrow() {
        return Err(error(
            "57P03",
            format!("PROMOTE {project} {replica}: the proxy is shutting down"),
        ));
    }
    let topology = shared.topology.load();
    let Some(live) = topology.projects.get(project).cloned() else {
        return Err(error(
            "42704",
            format!("project \"{project}\" does not exist"),
        ));
    };
    crate::cluster::failover::promote_on_request(&live, replica)
        .await
        .map_err(|e| error("55000", format!("PROMOTE {project} {replica}: {e}")))
}

/// Changes a project's read routing in the running proxy (and in the live config,
/// so that SHOW CONFIG and /status agree).
/// Writes a runtime change into proxy.toml (comments and layout kept) and reloads it.
/// Nothing changes, in the file or in the proxy, if the result would not be valid.
pub async fn persist_and_reload(
    shared: &Arc<Shared>,
    change: &Change<'_>,
    trigger: &str,
) -> Result<String, CommandError> {
    let Some(path) = shared.config_path.clone() else {
        return Err(error(
            "0A000",
            "the proxy runs without a config file, so there is nothing to change it in",
        ));
    };
    if let Some(fleet) = &shared.fleet {
        // For the whole fleet: stored in etcd, proxy.toml untouched.
        let text = std::fs::read_to_string(&path)
            .map_err(|e| error("58030", format!("cannot read {}: {e}", path.display())))?;
        let change = crate::fleet::runtime::RuntimeChange::from_change(change);
        let project = change.project().to_string();
        fleet
            .record_change(change, |entries| {
                let (edited, skipped) = crate::fleet::runtime::apply(&text, entries);
                match skipped.last() {
                    // The new change is the last one: it must apply.
                    Some(last)
                        if entries
                            .last()
                            .is_some_and(|e| last.starts_with(&e.change.describe())) =>
                    {
                        Err(last.clone())
                    }
                    _ => Config::from_text_at(&path, &edited)
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                }
            })
            .await
            .map_err(|e| {
                let code = if e.contains("does not exist") || e.contains("has no node") {
                    "42704"
                } else {
                    "22023"
                };
                error(code, e)
            })?;
        tracing::info!(project, "runtime change recorded for the fleet");
        return crate::reload::reload(shared, trigger)
            .await
            .map_err(|e| error("F0000", e));
    }
    persist::apply_to_file(&path, change).map_err(|e| {
        let code = if e.contains("does not exist") {
            "42704"
        } else {
            "22023"
        };
        error(code, e)
    })?;
    crate::reload::reload(shared, trigger)
        .await
        .map_err(|e| error("F0000", e))
}

fn result_row(message: String) -> Reply {
    Reply::Rows {
        columns: vec!["result"],
        rows: vec![vec![Some(message)]],
        tag: "SELECT",
    }
}

/// Changes a project's read routing: in proxy.toml (then reloaded) when the proxy has
/// a config file, else in the running proxy only.
pub async fn set_read_routing(
    shared: &Arc<Shared>,
    project: &str,
    strategy: &str,
) -> Result<(), CommandError> {
    let routing = parse_routing(strategy)?;
    let topology = shared.topology.load();
    let Some(live) = topology.projects.get(project) else {
        return Err(error(
            "42704",
            format!("project \"{project}\" does not exist"),
        ));
    };
    if shared.config_path.is_some() {
        let change = Change::ReadRouting {
            project,
            strategy: routing.as_str(),
        };
        persist_and_reload(shared, &change, "SET READ_ROUTING").await?;
        tracing::info!(
            project,
            strategy = routing.as_str(),
            "read routing changed and saved"
        );
        return Ok(());
    }
    live.set_read_routing(routing);
    shared.config.rcu(|config| {
        let mut next: Config = (**config).clone();
        if let Some(p) = next.projects.get_mut(project) {
            p.read_routing = routing;
        }
        next
    });
    tracing::info!(project, strategy = routing.as_str(), "read routing changed");
    Ok(())
}

fn parse_routing(strategy: &str) -> Result<ReadRouting, CommandError> {
    match strategy.to_ascii_lowercase().as_str() {
        "round-robin" => Ok(ReadRouting::RoundRobin),
        "least-lag" => Ok(ReadRouting::LeastLag),
        "random" => Ok(ReadRouting::Random),
        other => Err(error(
            "22023",
            format!("unknown read routing \"{other}\"; use round-robin, least-lag or random"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(
            split_statements("SHOW POOLS; ADD REPLICA p r replica 'host=a;b' ;"),
            vec!["SHOW POOLS", "ADD REPLICA p r replica 'host=a;b'"]
        );
        assert!(split_statements(" ; ").is_empty());
    }

    #[test]
    fn shown_config_hides_every_password() {
        let config: toml::Table = r#"
[[users]]
name = "app"
password = "plain"

[projects.app]
[[projects.app.replicas]]
uri = "postgresql://admin:in-uri@10.0.0.1/app"

[targets.sink]
uri = "mongodb://root:mongo-secret@10.0.0.9/analytics"
"#
        .parse()
        .unwrap();
        let mut out = Vec::new();
        flatten("", &toml::Value::Table(config), &mut out);
        let shown = format!("{out:?}");
        for secret in ["plain", "in-uri", "mongo-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("postgresql://admin:********@10.0.0.1/app"),
            "{shown}"
        );
    }

    #[test]
    fn quoted_words_keep_spaces() {
        assert_eq!(
            words("ADD REPLICA app r2 replica 'host=x port=5'"),
            vec!["ADD", "REPLICA", "app", "r2", "replica", "host=x port=5"]
        );
    }
}
