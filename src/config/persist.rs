//! Runtime changes written back into proxy.toml (`SET READ_ROUTING`, `ADD REPLICA`,
//! `REMOVE REPLICA`), keeping the operator's comments and layout (toml_edit). The edited
//! text is validated like any config before it replaces the file (a temporary file
//! renamed over it, so readers see the old file or the new one, never half of one).

use std::path::Path;

use toml_edit::{DocumentMut, Item, Table, value};

use super::Config;

/// One change to the file.
pub enum Change<'a> {
    ReadRouting {
        project: &'a str,
        strategy: &'a str,
    },
    AddReplica {
        project: &'a str,
        name: &'a str,
        role: &'a str,
        uri: &'a str,
    },
    RemoveReplica {
        project: &'a str,
        name: &'a str,
    },
}

/// Applies `change` to the config text; the result is a valid config or an error.
pub fn edit(text: &str, change: &Change) -> Result<String, String> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| format!("the config file does not parse: {e}"))?;
    match change {
        Change::ReadRouting { project, strategy } => {
            set_keeping_comments(project_table(&mut doc, project)?, "read_routing", strategy);
        }
        Change::AddReplica {
            project,
            name,
            role,
            uri,
        } => {
            let replicas = project_table(&mut doc, project)?
                .entry("replicas")
                .or_insert_with(|| Item::ArrayOfTables(Default::default()));
            let Some(array) = replicas.as_array_of_tables_mut() else {
                return Err(format!(
                    "projects.{project}.replicas is not an array of tables"
                ));
            };
            if array
                .iter()
                .any(|t| t.get("name").and_then(Item::as_str) == Some(name))
            {
                return Err(format!(
                    "project \"{project}\" already has a node \"{name}\""
                ));
            }
            let mut replica = Table::new();
            replica.insert("name", value(*name));
            replica.insert("role", value(*role));
            replica.insert("uri", value(*uri));
            array.push(replica);
        }
        Change::RemoveReplica { project, name } => {
            let Some(array) = project_table(&mut doc, project)?
                .get_mut("replicas")
                .and_then(Item::as_array_of_tables_mut)
            else {
                return Err(format!("project \"{project}\" has no replicas"));
            };
            let Some(index) = array
                .iter()
                .position(|t| t.get("name").and_then(Item::as_str) == Some(name))
            else {
                return Err(format!("project \"{project}\" has no node \"{name}\""));
            };
            array.remove(index);
        }
    }
    let text = doc.to_string();
    Config::parse(&text).map_err(|issues| {
        issues
            .iter()
            .map(|i| format!("{}: {}", i.key, i.reason))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    Ok(text)
}

/// Sets `key`, keeping the comments around an existing entry (the key's and the
/// value's).
fn set_keeping_comments(table: &mut Table, key: &str, new: &str) {
    match table.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = new.into();
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, value(new));
        }
    }
}

fn project_table<'a>(doc: &'a mut DocumentMut, project: &str) -> Result<&'a mut Table, String> {
    doc.get_mut("projects")
        .and_then(Item::as_table_mut)
        .and_then(|t| t.get_mut(project))
        .and_then(Item::as_table_mut)
        .ok_or_else(|| format!("project \"{project}\" does not exist"))
}

/// Edits the file at `path` and replaces it atomically.
pub fn apply_to_file(path: &Path, change: &Change) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let edited = edit(&text, change)?;
    crate::atomic_file::replace(path, edited.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReadRouting, Replica, Role};

    const TEXT: &str = r#"# The operator's notes stay.
[proxy]
listen = "127.0.0.1:6432"   # clients here

[[users]]
name = "app"
password = "secret"

[projects.app]
# reads mostly
read_routing = "round-robin"

[[projects.app.replicas]]
name = "master"
role = "primary"
uri = "postgresql://127.0.0.1:5432/app"

[[projects.app.replicas]]
name = "r1"   # the old one
role = "replica"
uri = "postgresql://127.0.0.1:5433/app"
"#;

    #[test]
    fn runtime_changes_keep_comments_and_mean_what_they_say() {
        let mut expected = Config::parse(TEXT).unwrap();
        let text = edit(
            TEXT,
            &Change::ReadRouting {
                project: "app",
                strategy: "least-lag",
            },
        )
        .unwrap();
        let text = edit(
            &text,
            &Change::AddReplica {
                project: "app",
                name: "r2",
                role: "replica",
                uri: "postgresql://127.0.0.1:5434/app",
            },
        )
        .unwrap();
        let text = edit(
            &text,
            &Change::RemoveReplica {
                project: "app",
                name: "r1",
            },
        )
        .unwrap();
        for comment in [
            "# The operator's notes stay.",
            "# clients here",
            "# reads mostly",
        ] {
            assert!(text.contains(comment), "{comment} lost:\n{text}");
        }
        let project = expected.projects.get_mut("app").unwrap();
        project.read_routing = ReadRouting::LeastLag;
        project.replicas.retain(|r| r.name != "r1");
        project.replicas.push(Replica {
            name: "r2".into(),
            role: Role::Replica,
            uri: "postgresql://127.0.0.1:5434/app".into(),
            lag_tolerance_ms: 5000,
            weight: 1,
        });
        assert_eq!(Config::parse(&text).unwrap(), expected);
    }

    #[test]
    fn changes_that_would_break_the_config_are_refused() {
        let second_primary = Change::AddReplica {
            project: "app",
            name: "m2",
            role: "primary",
            uri: "postgresql://127.0.0.1:5435/app",
        };
        assert!(edit(TEXT, &second_primary).is_err());
        let duplicate = Change::AddReplica {
            project: "app",
            name: "r1",
            role: "replica",
            uri: "postgresql://127.0.0.1:5435/app",
        };
        assert!(edit(TEXT, &duplicate).unwrap_err().contains("already has"));
        let unknown = Change::RemoveReplica {
            project: "nope",
            name: "r1",
        };
        assert!(edit(TEXT, &unknown).unwrap_err().contains("does not exist"));
    }
}
