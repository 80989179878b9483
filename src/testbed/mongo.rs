//! A MongoDB-protocol server for the test bed and the demo. `MONGODB_URI` (e.g.
//! `mongodb://127.0.0.1:27017`) points at a real mongod when set; otherwise the
//! standalone in-memory server of the npm package `@jongodb/memory-server-bin-linux-x64-gnu`
//! is installed once (its sha256 checked against the package's own manifest) and started
//! on a free port. It is stopped when the process exits.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

const PACKAGE: &str = "@jongodb/memory-server-bin-linux-x64-gnu";
const VERSION: &str = "0.1.6";

static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
static AT_EXIT: std::sync::Once = std::sync::Once::new();

extern "C" fn kill_children_at_exit() {
    if let Ok(mut children) = CHILDREN.lock() {
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running server: `uri(db)` names a database on it.
pub struct MongoServer {
    /// `mongodb://host:port`, without a database or options.
    pub base: String,
    pid: Option<u32>,
}

impl MongoServer {
    /// `MONGODB_URI` when set, else a fresh in-memory server.
    pub fn start(install_dir: &Path) -> Result<MongoServer> {
        if let Ok(uri) = std::env::var("MONGODB_URI") {
            return Ok(MongoServer {
                base: uri.trim_end_matches('/').to_string(),
                pid: None,
            });
        }
        let binary = install(install_dir)?;
        let mut child = Command::new(&binary)
            .args(["--host=127.0.0.1", "--port=0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut base = None;
        for line in lines.by_ref().take(50) {
            let line = line?;
            if let Some(uri) = line.strip_prefix("JONGODB_URI=") {
                // mongodb://127.0.0.1:PORT/test -> mongodb://127.0.0.1:PORT
                let without_db = uri.rsplit_once('/').map_or(uri, |(head, _)| head);
                base = Some(without_db.to_string());
                break;
            }
        }
        let Some(base) = base else {
            let _ = child.kill();
            bail!("{} did not print its address", binary.display());
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let pid = child.id();
        AT_EXIT.call_once(|| {
            // SAFETY: registering a plain extern "C" function.
            unsafe { libc::atexit(kill_children_at_exit) };
        });
        if let Ok(mut children) = CHILDREN.lock() {
            children.push(child);
        }
        Ok(MongoServer {
            base,
            pid: Some(pid),
        })
    }

    /// A connection string for database `db`.
    pub fn uri(&self, db: &str) -> String {
        format!("{}/{db}?directConnection=true", self.base)
    }

    /// Stops the server (no effect on an external `MONGODB_URI` one).
    pub fn stop(&self) {
        let Some(pid) = self.pid else { return };
        if let Ok(mut children) = CHILDREN.lock() {
            for child in children.iter_mut().filter(|c| c.id() == pid) {
                let _ = child.kill();
                let _ = child.wait();
            }
            children.retain(|c| c.id() != pid);
        }
    }
}

/// Installs the package under `dir` (once) and returns the verified binary.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let package_dir = dir.join("node_modules").join(PACKAGE);
    let binary = package_dir.join("bin").join("jongodb");
    if !binary.exists() {
        super::npm_install(dir, &format!("{PACKAGE}@{VERSION}"))?;
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(package_dir.join("package.json"))?)?;
    let expected = manifest["jongodb"]["sha256"]
        .as_str()
        .context("the package manifest has no sha256")?;
    let actual: String = Sha256::digest(std::fs::read(&binary)?)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != expected {
        bail!(
            "{}: sha256 {actual} does not match the manifest's {expected}",
            binary.display()
        );
    }
    Ok(binary)
}
