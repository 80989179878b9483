//! Control-plane connections for failover: logging in to a node as the failover user,
//! simple queries returning text rows, and rewriting a replica's primary_conninfo.

use crate::config::mask_passwords;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::FailoverSettings;
use crate::cluster::Node;

const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a promoted server may take to leave recovery.
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn control(node: &Node, settings: &FailoverSettings) -> Result<Client, String> {
    let Some(credentials) = &settings.credentials else {
        return Err("no control-plane credentials (set failover.user and failover.password, or give a user a plain-text password)".into());
    };
    let connect = crate::cluster::monitor::control_connection(
        node,
        credentials,
        CONTROL_TIMEOUT,
        "replicator-failover",
    );
    tokio::time::timeout(CONTROL_TIMEOUT, connect)
        .await
        .map_err(|_| format!("{}: no answer", node.addr))?
}

/// Rows of text values (NULL as `None`).
pub async fn query_nullable(
    client: &Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let messages = tokio::time::timeout(PROMOTE_TIMEOUT, client.simple_query(sql))
        .await
        .map_err(|_| format!("{}: no answer", mask_passwords(sql)))?
        .map_err(|e| match e.as_db_error() {
            // The statement may carry a conninfo with a password (re-pointing).
            Some(db) => format!("{}: {}", mask_passwords(sql), db.message()),
            None => format!("{}: {e}", mask_passwords(sql)),
        })?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// Rows of text values (NULL as the empty string).
pub async fn query(client: &Client, sql: &str) -> Result<Vec<Vec<String>>, String> {
    Ok(query_nullable(client, sql)
        .await?
        .into_iter()
        .map(|row| row.into_iter().map(Option::unwrap_or_default).collect())
        .collect())
}

/// The first value of the first row.
pub async fn query_value(client: &Client, sql: &str) -> Result<String, String> {
    query(client, sql)
        .await?
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next())
        .ok_or_else(|| format!("{sql}: empty answer"))
}

/// Points a replica's WAL receiver at `primary` (ALTER SYSTEM + reload; it follows the
/// new timeline by itself).
pub async fn repoint(
    node: &Node,
    primary: &Node,
    settings: &FailoverSettings,
) -> Result<(), String> {
    let client = control(node, settings).await?;
    let current = query_value(&client, "SHOW primary_conninfo")
        .await
        .unwrap_or_default();
    let conninfo = with_host_port(&current, &primary.addr.host, primary.addr.port);
    let sql = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    );
    query(&client, &sql).await?;
    query(&client, "SELECT pg_reload_conf()").await?;
    Ok(())
}

/// A libpq conninfo string with its host and port replaced (other settings kept).
pub fn with_host_port(conninfo: &str, host: &str, port: u16) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = conninfo.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '\'' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    parts.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts.retain(|p| {
        let key = p.split('=').next().unwrap_or("").trim();
        !matches!(key, "host" | "hostaddr" | "port")
    });
    parts.push(format!("host={host}"));
    parts.push(format!("port={port}"));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_gets_the_new_host_and_keeps_the_rest() {
        let old = "user=postgres passfile='/root/my pass' channel_binding=prefer host=127.0.0.1 port=15432 sslmode=prefer";
        assert_eq!(
            with_host_port(old, "10.0.0.2", 5433),
            "user=postgres passfile='/root/my pass' channel_binding=prefer sslmode=prefer host=10.0.0.2 port=5433"
        );
        assert_eq!(with_host_port("", "h", 1), "host=h port=1");
    }
}
