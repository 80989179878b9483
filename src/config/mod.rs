//! Loading and validating proxy.toml. Every problem found is reported as
//! `file: key: reason`, all of them at once, so a user fixes a config in one pass.

pub mod allow;
pub mod conninfo;
mod model;
pub mod persist;
pub mod secrets;
mod validate;
pub mod warnings;

pub use model::*;
pub use secrets::mask_passwords;
pub use validate::{ADMIN_DATABASE, NodeAddress};

use std::fmt;
use std::path::Path;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigIssue {
    pub key: String,
    pub reason: String,
}

/// All problems found in one file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: String,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if issue.key.is_empty() {
                write!(f, "{}: {}", self.file, issue.reason)?;
            } else {
                write!(f, "{}: {}: {}", self.file, issue.key, issue.reason)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            issues: vec![ConfigIssue {
                key: String::new(),
                reason: format!("cannot read file: {e}"),
            }],
        })?;
        Self::from_text_at(path, &text)
    }

    /// Parses and validates `text` as the config file at `path` (relative paths
    /// resolve against its folder): proxy.toml with the fleet's runtime changes applied.
    pub fn from_text_at(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut config = Self::parse(text).map_err(|issues| ConfigError {
            file: file.clone(),
            issues,
        })?;
        config.resolve_paths(path);
        let issues = config.check_files();
        if !issues.is_empty() {
            return Err(ConfigError { file, issues });
        }
        Ok(config)
    }

    /// A relative `state_file` is relative to the config file's folder, not to the
    /// folder the proxy was started from: started elsewhere, it would read another (or
    /// no) state file and bring a fenced old primary back as primary.
    /// Certificate and key files too.
    fn resolve_paths(&mut self, config_path: &Path) {
        let folder = match config_path.parent() {
            Some(folder) if !folder.as_os_str().is_empty() => folder,
            _ => Path::new("."),
        };
        let folder = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
        let resolve = |path: &mut String| {
            if !Path::new(path.as_str()).is_absolute() {
                *path = folder.join(path.as_str()).to_string_lossy().into_owned();
            }
        };
        resolve(&mut self.proxy.state_file);
        for file in [&mut self.proxy.tls_cert_file, &mut self.proxy.tls_key_file]
            .into_iter()
            .flatten()
        {
            resolve(file);
        }
    }

    /// Problems only the files named in the config show: a certificate that cannot be
    /// read or does not go with its key.
    fn check_files(&self) -> Vec<ConfigIssue> {
        match crate::tls::load_server_tls(&self.proxy) {
            Ok(_) => Vec::new(),
            Err(reason) => vec![ConfigIssue {
                key: "proxy.tls_cert_file".into(),
                reason,
            }],
        }
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigIssue>> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            vec![ConfigIssue {
                key: String::new(),
                reason: format!("invalid TOML: {}", e.to_string().trim_end()),
            }]
        })?;
        let mut issues = validate::unknown_keys(&table);
        let config = match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table))
        {
            Ok(config) => Some(config),
            Err(e) => {
                let key = e.path().to_string();
                let reason = e.inner().to_string();
                // Unknown keys were already reported with their full path.
                if !reason.starts_with("unknown field") {
                    issues.push(ConfigIssue {
                        key: if key == "." { String::new() } else { key },
                        reason,
                    });
                }
                None
            }
        };
        match config {
            Some(config) => {
                issues.extend(validate::semantics(&config));
                if issues.is_empty() {
                    Ok(config)
                } else {
                    Err(issues)
                }
            }
            None => Err(issues),
        }
    }

    /// The backend database of a project.
    pub fn project_database<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.projects
            .get(name)
            .map(|p| p.database.as_deref().unwrap_or(name))
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }
}

#[cfg(test)]
mod tests;
