//! Session settings a client expects to persist (startup parameters and `SET`s), kept
//! by the proxy so they follow the client from one pooled server connection to the next.
//!
//! A server connection records the settings the proxy applied to it. Before a client's
//! statement runs on a server, the two are compared by hash (one integer compare on the
//! hot path) and, only when they differ, the server is brought in line with one
//! `RESET`/`SET` batch whose answers the client never sees.
//!
//! Equal hashes are confirmed by comparing the entries, which live apart from the
//! session: with hundreds of clients, another client's entries are rarely in the CPU's
//! cache. So the entries are shared (`Arc`), and two equal settings found equal keep
//! one copy from then on (`share_with`): clients with the same settings converge on
//! one copy, and the confirmation is a pointer compare.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// (name, SQL value text) sorted by name; names are lower case. Copied on write.
    entries: Arc<Vec<(String, String)>>,
    hash: u64,
}

impl Settings {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.entries[i].1.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        let entries = Arc::make_mut(&mut self.entries);
        match entries.binary_search_by(|(n, _)| n.cmp(&name)) {
            Ok(i) => entries[i].1 = value.to_string(),
            Err(i) => entries.insert(i, (name, value.to_string())),
        }
        self.rehash();
    }

    pub fn remove(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        if let Ok(i) = self.entries.binary_search_by(|(n, _)| n.cmp(&name)) {
            Arc::make_mut(&mut self.entries).remove(i);
            self.rehash();
        }
    }

    pub fn clear(&mut self) {
        if !self.entries.is_empty() {
            self.entries = Arc::default();
        }
        self.rehash();
    }

    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    pub fn same_as(&self, other: &Settings) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.entries, &other.entries) || self.entries == other.entries)
    }

    /// Settings found equal (`same_as`) keep one copy of their entries from now on:
    /// the one at the lower address, so that every holder of equal settings converges
    /// on the same copy.
    pub fn share_with(&mut self, other: &mut Settings) {
        if Arc::ptr_eq(&self.entries, &other.entries) {
            return;
        }
        if Arc::as_ptr(&self.entries) < Arc::as_ptr(&other.entries) {
            other.entries = self.entries.clone();
        } else {
            self.entries = other.entries.clone();
        }
    }

    fn rehash(&mut self) {
        let mut h = DefaultHasher::new();
        self.entries[..].hash(&mut h);
        self.hash = h.finish();
    }

    /// SQL that turns a server holding `self` into one holding `target`.
    pub fn transition_sql(&self, target: &Settings) -> String {
        let mut sql = String::new();
        for (name, _) in self.entries.iter() {
            if target.get(name).is_none() {
                sql.push_str(&format!("RESET {};", quote_ident(name)));
            }
        }
        for (name, value) in target.entries.iter() {
            if self.get(name) != Some(value.as_str()) {
                sql.push_str(&format!("SET {} = {};", quote_ident(name), value));
            }
        }
        sql
    }
}

/// Quotes a parameter name if it is not a plain identifier (e.g. `myapp.tenant`).
fn quote_ident(name: &str) -> String {
    if name.split('.').all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }) {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// A startup parameter value as an SQL literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Settings a client asked for in its startup packet, including `options=-c a=b`.
pub fn from_startup(params: &[(String, String)]) -> Settings {
    let mut settings = Settings::default();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for (k, v) in parse_options(value) {
                    settings.set(&k, &literal(&v));
                }
            }
            _ => settings.set(name, &literal(value)),
        }
    }
    settings
}

/// Parses libpq's `options` (`-c name=value --name=value`, backslash escapes spaces).
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    current.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let assignment = if word == "-c" {
            iter.next()
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            word.strip_prefix("-c").map(str::to_string)
        };
        if let Some((k, v)) = assignment.as_deref().and_then(|a| a.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal settings found equal share one copy of their entries (the next compare
    /// is a pointer compare); a change to one is its own (copy on write).
    #[test]
    fn equal_settings_share_one_copy_and_stay_apart_when_changed() {
        let mut client = from_startup(&[("application_name".into(), "app".into())]);
        let mut server = from_startup(&[("application_name".into(), "app".into())]);
        assert!(!Arc::ptr_eq(&client.entries, &server.entries));
        assert!(client.same_as(&server));
        client.share_with(&mut server);
        assert!(Arc::ptr_eq(&client.entries, &server.entries));
        assert!(client.same_as(&server));

        client.set("search_path", "'tenant'");
        assert!(!client.same_as(&server));
        assert_eq!(server.get("search_path"), None);
        assert_eq!(client.get("search_path"), Some("'tenant'"));
        assert_eq!(server.get("application_name"), Some("'app'"));
    }

    #[test]
    fn transition_resets_and_sets_only_differences() {
        let mut a = Settings::default();
        a.set("application_name", "'x'");
        a.set("search_path", "app");
        let mut b = Settings::default();
        b.set("application_name", "'x'");
        b.set("TimeZone", "'UTC'");
        assert_eq!(
            a.transition_sql(&b),
            "RESET search_path;SET timezone = 'UTC';"
        );
        assert!(!a.same_as(&b));
        b.remove("timezone");
        b.set("search_path", "app");
        assert!(a.same_as(&b));
        assert_eq!(a.transition_sql(&b), "");
    }

    #[test]
    fn startup_options_are_parsed() {
        let params = vec![
            ("user".to_string(), "u".to_string()),
            (
                "options".to_string(),
                "-c search_path=a\\ b --statement-timeout=5s".to_string(),
            ),
            ("application_name".to_string(), "it's".to_string()),
        ];
        let s = from_startup(&params);
        assert_eq!(s.get("search_path"), Some("'a b'"));
        assert_eq!(s.get("statement_timeout"), Some("'5s'"));
        assert_eq!(s.get("application_name"), Some("'it''s'"));
        assert_eq!(s.get("user"), None);
    }
}
