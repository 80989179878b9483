//! Runtime changes in fleet mode (ADD REPLICA, REMOVE REPLICA, SET READ_ROUTING, from
//! the console, HTTP or the CLI of any instance): kept in etcd as one ordered list on
//! top of proxy.toml, changed by compare-and-swap, watched by every instance, which
//! reloads with the list applied to its own proxy.toml text. proxy.toml itself is not
//! touched: the list survives the restart of any instance, and SHOW CONFIG says which
//! values come from it.

use serde::{Deserialize, Serialize};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::session::{call, connect};
use super::{Fleet, keys};
use crate::config::persist::{self, Change};

/// One change, as stored in etcd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RuntimeChange {
    ReadRouting {
        project: String,
        strategy: String,
    },
    AddReplica {
        project: String,
        name: String,
        role: String,
        uri: String,
    },
    RemoveReplica {
        project: String,
        name: String,
    },
}

/// A change with who made it and when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    #[serde(flatten)]
    pub change: RuntimeChange,
    pub by: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

impl RuntimeChange {
    pub fn from_change(change: &Change) -> RuntimeChange {
        match change {
            Change::ReadRouting { project, strategy } => RuntimeChange::ReadRouting {
                project: project.to_string(),
                strategy: strategy.to_string(),
            },
            Change::AddReplica {
                project,
                name,
                role,
                uri,
            } => RuntimeChange::AddReplica {
                project: project.to_string(),
                name: name.to_string(),
                role: role.to_string(),
                uri: uri.to_string(),
            },
            Change::RemoveReplica { project, name } => RuntimeChange::RemoveReplica {
                project: project.to_string(),
                name: name.to_string(),
            },
        }
    }

    fn as_change(&self) -> Change<'_> {
        match self {
            RuntimeChange::ReadRouting { project, strategy } => {
                Change::ReadRouting { project, strategy }
            }
            RuntimeChange::AddReplica {
                project,
                name,
                role,
                uri,
            } => Change::AddReplica {
                project,
                name,
                role,
                uri,
            },
            RuntimeChange::RemoveReplica { project, name } => {
                Change::RemoveReplica { project, name }
            }
        }
    }

    pub fn project(&self) -> &str {
        match self {
            RuntimeChange::ReadRouting { project, .. }
            | RuntimeChange::AddReplica { project, .. }
            | RuntimeChange::RemoveReplica { project, .. } => project,
        }
    }

    /// Words for SHOW CONFIG.
    pub fn describe(&self) -> String {
        match self {
            RuntimeChange::ReadRouting { project, strategy } => {
                format!("SET READ_ROUTING {project} {strategy}")
            }
            RuntimeChange::AddReplica { project, name, .. } => {
                format!("ADD REPLICA {project} {name}")
            }
            RuntimeChange::RemoveReplica { project, name } => {
                format!("REMOVE REPLICA {project} {name}")
            }
        }
    }
}

/// `text` (proxy.toml) with every change applied in order. A change that no longer
/// applies (proxy.toml was edited to include it, or dropped its project) is skipped and
/// named in the second value.
pub fn apply(text: &str, entries: &[Entry]) -> (String, Vec<String>) {
    let mut text = text.to_string();
    let mut skipped = Vec::new();
    for entry in entries {
        match persist::edit(&text, &entry.change.as_change()) {
            Ok(edited) => text = edited,
            Err(e) => skipped.push(format!("{}: {e}", entry.change.describe())),
        }
    }
    (text, skipped)
}

/// The list with `next` added: a read routing replaces the project's earlier one, and
/// removing a node added at runtime drops both.
fn appended(mut entries: Vec<Entry>, next: Entry) -> Vec<Entry> {
    match &next.change {
        RuntimeChange::ReadRouting { project, .. } => {
            entries.retain(|e| {
                !matches!(&e.change, RuntimeChange::ReadRouting { project: p, .. } if p == project)
            });
            entries.push(next);
        }
        RuntimeChange::RemoveReplica { project, name } => {
            let added = entries.iter().position(|e| {
                matches!(&e.change, RuntimeChange::AddReplica { project: p, name: n, .. } if p == project && n == name)
            });
            match added {
                Some(i) => {
                    entries.remove(i);
                }
                None => entries.push(next),
            }
        }
        RuntimeChange::AddReplica { .. } => entries.push(next),
    }
    entries
}

impl Fleet {
    /// The runtime changes as last read from etcd.
    pub fn runtime_changes(&self) -> Vec<Entry> {
        self.runtime.lock().map(|r| r.0.clone()).unwrap_or_default()
    }

    /// Records a change for the whole fleet (compare-and-swap on the list). `check`
    /// gets the list the change would make, to refuse it before it is stored.
    pub async fn record_change(
        &self,
        change: RuntimeChange,
        check: impl Fn(&[Entry]) -> Result<(), String>,
    ) -> Result<(), String> {
        self.writes_allowed()?;
        let mut client = connect(self).await?;
        let key = keys::runtime(&self.settings);
        for _ in 0..5 {
            let answer = call(self, "runtime read", client.get(key.clone(), None)).await?;
            let (current, revision) = match answer.kvs().first() {
                Some(kv) => (
                    serde_json::from_slice::<Vec<Entry>>(kv.value())
                        .map_err(|e| format!("unreadable runtime changes in etcd: {e}"))?,
                    kv.mod_revision(),
                ),
                None => (Vec::new(), 0),
            };
            let entry = Entry {
                change: change.clone(),
                by: self.settings.instance.clone(),
                at: super::now_secs(),
            };
            let next = appended(current, entry);
            check(&next)?;
            let text = serde_json::to_string(&next).map_err(|e| e.to_string())?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key.clone(), text, None)]);
            let answer = call(self, "runtime change", client.txn(txn)).await?;
            if answer.succeeded() {
                let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
                self.remember_runtime(next, revision);
                return Ok(());
            }
        }
        Err("the fleet's runtime changes kept changing under this one; try again".into())
    }

    /// Stores a list read from etcd; true when it is newer than what this instance had.
    pub(super) fn remember_runtime(&self, entries: Vec<Entry>, revision: i64) -> bool {
        let Ok(mut slot) = self.runtime.lock() else {
            return false;
        };
        if slot.1 >= revision {
            return false;
        }
        let changed = slot.0 != entries;
        *slot = (entries, revision);
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(change: RuntimeChange) -> Entry {
        Entry {
            change,
            by: "a".into(),
            at: 0,
        }
    }

    #[test]
    fn the_list_keeps_only_what_still_matters() {
        let add = |name: &str| {
            entry(RuntimeChange::AddReplica {
                project: "app".into(),
                name: name.into(),
                role: "replica".into(),
                uri: "postgresql://h:1/app".into(),
            })
        };
        let routing = |s: &str| {
            entry(RuntimeChange::ReadRouting {
                project: "app".into(),
                strategy: s.into(),
            })
        };
        let list = appended(Vec::new(), add("r3"));
        let list = appended(list, routing("random"));
        let list = appended(list, routing("least-lag"));
        assert_eq!(list.len(), 2);
        let list = appended(
            list,
            entry(RuntimeChange::RemoveReplica {
                project: "app".into(),
                name: "r3".into(),
            }),
        );
        assert_eq!(list, vec![routing("least-lag")]);
        let list = appended(
            list,
            entry(RuntimeChange::RemoveReplica {
                project: "app".into(),
                name: "r1".into(),
            }),
        );
        assert_eq!(list.len(), 2, "removing a node of proxy.toml is kept");
    }

    #[test]
    fn changes_apply_to_the_file_text_and_stale_ones_are_skipped() {
        let text = "[proxy]\nlisten = \"127.0.0.1:6432\"\n\n[[users]]\nname = \"app\"\npassword = \"s\"\n\n[projects.app]\n[[projects.app.replicas]]\nname = \"main\"\nrole = \"primary\"\nuri = \"postgresql://127.0.0.1:5432/app\"\n";
        let entries = vec![
            entry(RuntimeChange::AddReplica {
                project: "app".into(),
                name: "r2".into(),
                role: "replica".into(),
                uri: "postgresql://127.0.0.1:5433/app".into(),
            }),
            entry(RuntimeChange::ReadRouting {
                project: "gone".into(),
                strategy: "random".into(),
            }),
        ];
        let (edited, skipped) = apply(text, &entries);
        let config = crate::config::Config::parse(&edited).unwrap();
        assert_eq!(config.projects["app"].replicas.len(), 2);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("gone"));
    }
}
