//! Live reload of proxy.toml: on a file change (notify, debounced), SIGHUP or the admin
//! console's `RELOAD`. The whole file is parsed and validated first; a bad file changes
//! nothing. A good one is applied without dropping a client: unchanged nodes keep their
//! pools, the new topology replaces the old one in one atomic swap, and sessions move to
//! it at their next request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use crate::cluster::Topology;
use crate::cluster::monitor::{self, Credentials};
use crate::config::Config;
use crate::state::Shared;
use crate::users;

/// Editors write a file in several steps; changes closer together than this are one.
const DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Default)]
pub struct ReloadStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    last: std::sync::Mutex<Option<LastReload>>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LastReload {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub trigger: String,
    pub ok: bool,
    /// What changed, or why the file was rejected.
    pub message: String,
}

impl ReloadStats {
    pub fn last(&self) -> Option<LastReload> {
        self.last.lock().ok().and_then(|l| l.clone())
    }

    fn record(&self, trigger: &str, ok: bool, message: String) {
        let counter = if ok { &self.succeeded } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastReload {
                at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                trigger: trigger.to_string(),
                ok,
                message,
            });
        }
    }
}

/// Starts the lag/health monitors of every project of `topology`.
pub fn spawn_monitors(shared: &Shared, topology: &Topology, config: &Config) {
    let credentials = Credentials::from_config(config);
    let Ok(mut monitors) = shared.monitors.lock() else {
        return;
    };
    monitors.retain(|task| !task.is_finished());
    for project in topology.projects.values() {
        monitors.extend(monitor::spawn(
            project,
            credentials.clone(),
            shared.shutdown.subscribe(),
        ));
    }
}

/// proxy.toml as it stands, with the fleet's runtime changes applied in fleet mode.
fn load_effective(
    shared: &Shared,
    path: &std::path::Path,
) -> Result<Config, crate::config::ConfigError> {
    let Some(fleet) = &shared.fleet else {
        return Config::load(path);
    };
    let text = std::fs::read_to_string(path).map_err(|e| crate::config::ConfigError {
        file: path.display().to_string(),
        issues: vec![crate::config::ConfigIssue {
            key: String::new(),
            reason: format!("cannot read file: {e}"),
        }],
    })?;
    let (text, skipped) = crate::fleet::runtime::apply(&text, &fleet.runtime_changes());
    for change in skipped {
        warn!("a runtime change of the fleet no longer applies to proxy.toml: {change}");
    }
    Config::from_text_at(path, &text)
}

/// Reloads proxy.toml. Returns a summary of what changed, or why nothing did.
pub async fn reload(shared: &Arc<Shared>, trigger: &str) -> Result<String, String> {
    let _one_at_a_time = shared.reload_lock.lock().await;
    let Some(path) = shared.config_path.clone() else {
        return Err("the proxy was started without a config file".into());
    };
    let mut next = match load_effective(shared, &path) {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            error!(
                trigger,
                "config reload rejected; the running config stays in force:\n{message}"
            );
            shared.reloads.record(trigger, false, message.clone());
            return Err(message);
        }
    };
    let current = shared.config.load_full();
    let mut restart = Vec::new();
    macro_rules! keep_running {
        ($($field:ident),*) => {$(
            if next.proxy.$field != current.proxy.$field {
                restart.push(concat!("proxy.", stringify!($field)));
                next.proxy.$field = current.proxy.$field.clone();
            }
        )*};
    }
    keep_running!(listen, admin_listen, workers, statement_cache_size);
    if !restart.is_empty() {
        warn!(keys = ?restart, "these settings change only with a restart; the running values stay");
    }

    // The certificate and key are read again: a renewed certificate applies to new
    // connections; open ones keep the one they were made with.
    let tls = match crate::tls::load_server_tls(&next.proxy) {
        Ok(tls) => tls,
        Err(e) => {
            let message = format!("proxy.tls_cert_file: {e}");
            error!(
                trigger,
                "config reload rejected; the running config stays in force:\n{message}"
            );
            shared.reloads.record(trigger, false, message.clone());
            return Err(message);
        }
    };
    let old_topology = shared.topology.load_full();
    let topology = Topology::build(
        &next,
        Some(&old_topology),
        crate::fleet::coordination(&shared.fleet),
    );
    let summary = describe_changes(&old_topology, &topology);
    spawn_monitors(shared, &topology, &next);
    shared.users.store(Arc::new(users::from_config(&next)));
    shared.tls.store(tls);
    crate::tls::connect::forget_client_configs();
    shared.auth_query.clear();
    shared.config.store(Arc::new(next));
    shared.topology.store(Arc::new(topology));
    shared.clients.notify_reconfigured();
    // Only now, so that a session that looks up its project finds the new one.
    let current = shared.topology.load();
    for project in old_topology.projects.values() {
        project.retired.store(true, Ordering::SeqCst);
        for node in &project.nodes {
            let kept = current
                .projects
                .values()
                .any(|p| p.nodes.iter().any(|n| Arc::ptr_eq(n, node)));
            if !kept {
                node.retire();
            }
        }
    }
    crate::cdc::Cdc::reconcile(shared);
    let mut message = summary;
    if !restart.is_empty() {
        message.push_str(&format!("; needs a restart: {}", restart.join(", ")));
    }
    info!(trigger, "config reloaded: {message}");
    shared.reloads.record(trigger, true, message.clone());
    Ok(message)
}

fn describe_changes(old: &Topology, new: &Topology) -> String {
    let mut changes = Vec::new();
    for name in new.projects.keys() {
        if !old.projects.contains_key(name) {
            changes.push(format!("project {name} added"));
        }
    }
    for (name, old_project) in &old.projects {
        let Some(new_project) = new.projects.get(name) else {
            changes.push(format!("project {name} removed"));
            continue;
        };
        for node in &new_project.nodes {
            match old_project.nodes.iter().find(|n| n.name == node.name) {
                None => changes.push(format!("{name}.{} added", node.name)),
                Some(old_node) if !Arc::ptr_eq(old_node, node) => {
                    changes.push(format!("{name}.{} changed", node.name))
                }
                Some(_) => {}
            }
        }
        for node in &old_project.nodes {
            if !new_project.nodes.iter().any(|n| n.name == node.name) {
                changes.push(format!("{name}.{} removed (its pools drain)", node.name));
            }
        }
        if old_project.read_routing() != new_project.read_routing() {
            changes.push(format!(
                "{name}.read_routing = {}",
                new_project.read_routing().as_str()
            ));
        }
    }
    if changes.is_empty() {
        "no topology change".into()
    } else {
        changes.join(", ")
    }
}

/// Watches the config file and reloads after each burst of changes. Watches the
/// directory, because editors often replace the file rather than write into it.
pub fn watch(shared: &Arc<Shared>, path: &Path) -> anyhow::Result<()> {
    use notify::Watcher;
    let file: PathBuf = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = file.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let shared = shared.clone();
    let mut stop = shared.shutdown.subscribe();
    tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { break },
                _ = stop.changed() => break,
            }
            // Debounce: wait until the file has been quiet for a moment.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = reload(&shared, "file change").await;
        }
    });
    info!(file = %file.display(), "watching the config file for changes");
    Ok(())
}
