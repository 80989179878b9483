//! A real local PostgreSQL cluster: one primary (`wal_level = logical`) and streaming
//! replicas made with `pg_basebackup -R -X stream -c fast`, on loopback ports in a
//! temporary folder. Used by the integration tests and by `replicator demo`.
//!
//! Postgres refuses to run as root, so when the caller is root every server command
//! runs as the `postgres` user. Servers are stopped when the [`Cluster`] is dropped, at
//! process exit (for clusters kept in statics), and, if a process died before either,
//! by the next harness run, which finds the folder's owner process gone.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

mod node;

/// Superuser created by the harness; tests use it to inspect and break nodes.
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "postgres";
/// The admin HTTP token of the configs [`Cluster::proxy_toml`] writes.
pub const ADMIN_TOKEN: &str = "testbed-admin-token";

const DIR_PREFIX: &str = "replicator-testbed-";

/// Data directories of every running cluster, stopped at process exit.
static LIVE_NODES: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub replicas: usize,
    /// Ports for the primary then each replica; free ports are picked when empty.
    pub ports: Vec<u16>,
    /// Application login created on every node (password authentication).
    pub user: String,
    pub password: String,
    pub database: String,
    /// Extra `postgresql.conf` lines for the primary (copied to replicas by the backup).
    pub extra_conf: Vec<String>,
    /// A certificate and key (PEM files): every node runs with `ssl = on` and accepts
    /// TCP connections only over TLS (`hostssl` lines in pg_hba.conf).
    pub tls_only: Option<(PathBuf, PathBuf)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 2,
            ports: Vec::new(),
            user: "app".into(),
            password: "secret".into(),
            database: "app".into(),
            extra_conf: Vec::new(),
            tls_only: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    bin: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<(u32, u32)>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub primary: Node,
    pub replicas: Vec<Node>,
    pub options: ClusterOptions,
}

/// Folder of the PostgreSQL server binaries (initdb, pg_ctl, psql, pgbench...).
pub fn bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|p| p.join("initdb").exists());
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries not found (pg_config --bindir, /usr/lib/postgresql/*/bin)"
        )
    })
}

/// The uid/gid to run servers as: `postgres` when we are root, nobody else otherwise.
fn server_identity() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, SUPERUSER]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                anyhow!("running as root needs a `postgres` system user to run PostgreSQL")
            })
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

/// A loopback port nothing listens on, for a server started a moment later.
///
/// The port comes from below the kernel's ephemeral range: a port the kernel hands out
/// for `bind(0)` is one it may also give the next outgoing connection (tests open many),
/// which then holds it when Postgres tries to listen there. Ports handed out once are not
/// handed out again by this process, so clusters started side by side never share one.
pub fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000;
    if ephemeral_start > low + 1000 {
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..200 {
            let port = rand::random_range(low..ephemeral_start);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

extern "C" fn stop_live_nodes_at_exit() {
    let nodes = LIVE_NODES
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for (bin, data_dir) in nodes {
        let _ = immediate_stop(&bin, &data_dir);
    }
}

/// Stops a server without waiting for clients (like a crash, but tidy for the OS).
fn immediate_stop(bin: &Path, data_dir: &Path) -> Result<()> {
    let pid = postmaster_pid(data_dir);
    if let Some(pid) = pid {
        // SIGQUIT is Postgres' "immediate shutdown": children exit at once.
        // SAFETY: plain signal to a process we started.
        unsafe { libc::kill(pid, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = bin;
    Ok(())
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Removes clusters whose creating process is gone (killed before it could clean up).
fn reap_stale(base: &Path, bin: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with(DIR_PREFIX) {
            continue;
        }
        let owner = fs::read_to_string(entry.path().join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if owner.is_some_and(pid_alive) {
            continue;
        }
        if let Ok(nodes) = fs::read_dir(entry.path()) {
            for node in nodes.filter_map(|e| e.ok()) {
                let _ = immediate_stop(bin, &node.path());
            }
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

fn register_live(bin: &Path, data_dir: &Path) {
    AT_EXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(stop_live_nodes_at_exit) };
    });
    if let Ok(mut live) = LIVE_NODES.lock()
        && !live.iter().any(|(_, d)| d == data_dir)
    {
        live.push((bin.to_path_buf(), data_dir.to_path_buf()));
    }
}

impl Cluster {
    /// Creates and starts a primary and `options.replicas` streaming replicas.
    pub fn start(options: ClusterOptions) -> Result<Cluster> {
        let bin = bindir()?;
        let run_as = server_identity()?;
        let base = std::env::temp_dir();
        reap_stale(&base, &bin);
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        chown(&dir, run_as)?;
        fs::write(dir.join("owner.pid"), std::process::id().to_string())?;

        let mut ports = options.ports.clone();
        while ports.len() < options.replicas + 1 {
            ports.push(free_port()?);
        }
        let node = |name: &str, port: u16| Node {
            name: name.to_string(),
            port,
            data_dir: dir.join(name),
            bin: bin.clone(),
            socket_dir: dir.clone(),
            run_as,
        };
        let primary = node("primary", ports[0]);
        let pwfile = dir.join("pwfile");
        fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        chown(&pwfile, run_as)?;
        let data = primary.data_dir.to_string_lossy().to_string();
        primary.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                SUPERUSER,
                "--pwfile",
                &pwfile.to_string_lossy(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "wal_level = logical".into(),
            "max_wal_senders = 20".into(),
            "max_replication_slots = 20".into(),
            "wal_keep_size = '256MB'".into(),
            "hot_standby = on".into(),
            "hot_standby_feedback = on".into(),
            "max_connections = 200".into(),
            "shared_buffers = '32MB'".into(),
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "wal_receiver_status_interval = '1s'".into(),
            "wal_retrieve_retry_interval = '500ms'".into(),
            "log_min_messages = warning".into(),
            "log_line_prefix = '%m [%p] %u@%d '".into(),
        ];
        conf.extend(options.extra_conf.iter().cloned());
        if let Some((cert, key)) = &options.tls_only {
            // The server reads its key only when the key belongs to it and nobody else
            // may read it.
            let (own_cert, own_key) = (dir.join("server.crt"), dir.join("server.key"));
            fs::copy(cert, &own_cert)?;
            fs::copy(key, &own_key)?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&own_key, fs::Permissions::from_mode(0o600))?;
            chown(&own_cert, run_as)?;
            chown(&own_key, run_as)?;
            conf.push("ssl = on".into());
            conf.push(format!("ssl_cert_file = '{}'", own_cert.display()));
            conf.push(format!("ssl_key_file = '{}'", own_key.display()));
        }
        append(&primary.data_dir.join("postgresql.conf"), &conf.join("\n"))?;
        append(
            &primary.data_dir.join("postgresql.conf"),
            &format!("port = {}", ports[0]),
        )?;
        // Replication from loopback needs no password, so replicas' primary_conninfo stays simple.
        prepend(
            &primary.data_dir.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\nhost all trust_user 127.0.0.1/32 trust\nhost all md5_user 127.0.0.1/32 md5\nhost all plain_user 127.0.0.1/32 password\n",
        )?;
        if options.tls_only.is_some() {
            let hba = primary.data_dir.join("pg_hba.conf");
            let text = fs::read_to_string(&hba)?;
            let only_tls: Vec<String> = text
                .lines()
                .map(|line| match line.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}"),
                    None => line.to_string(),
                })
                .collect();
            fs::write(&hba, only_tls.join("\n") + "\n")?;
        }
        primary.start()?;

        let user = options.user.replace('"', "");
        let password = options.password.replace('\'', "''");
        primary.psql(
            "postgres",
            &format!(
                "CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}';
                 SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'secret';
                 RESET password_encryption; CREATE ROLE plain_user LOGIN PASSWORD 'secret';
                 CREATE ROLE trust_user LOGIN;"
            ),
        )?;
        primary.psql(
            "postgres",
            &format!(
                "CREATE DATABASE \"{}\" OWNER \"{user}\"",
                options.database.replace('"', "")
            ),
        )?;
        primary.psql(&options.database, "GRANT ALL ON SCHEMA public TO PUBLIC")?;

        let mut replicas = Vec::new();
        for i in 0..options.replicas {
            let replica = node(&format!("replica{}", i + 1), ports[i + 1]);
            let rdata = replica.data_dir.to_string_lossy().to_string();
            replica.run(
                "pg_basebackup",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &ports[0].to_string(),
                    "-U",
                    SUPERUSER,
                    "-D",
                    &rdata,
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                ],
            )?;
            append(
                &replica.data_dir.join("postgresql.conf"),
                &format!("port = {}", ports[i + 1]),
            )?;
            replica.start()?;
            replicas.push(replica);
        }
        let cluster = Cluster {
            dir,
            primary,
            replicas,
            options,
        };
        cluster.wait_streaming(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Waits until every running replica streams from the primary.
    pub fn wait_streaming(&self, timeout: Duration) -> Result<()> {
        let want = self.replicas.iter().filter(|r| r.is_running()).count();
        let deadline = Instant::now() + timeout;
        loop {
            let streaming: usize = self
                .primary
                .psql(
                    "postgres",
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if streaming >= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {streaming} of {want} replicas are streaming");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running replica has replayed the primary's current WAL position.
    pub fn wait_caught_up(&self, timeout: Duration) -> Result<()> {
        let lsn = self
            .primary
            .psql("postgres", "SELECT pg_current_wal_lsn()")?;
        let deadline = Instant::now() + timeout;
        for replica in self.replicas.iter().filter(|r| r.is_running()) {
            loop {
                let done = replica
                    .psql(
                        "postgres",
                        &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
                    )
                    .map(|s| s == "t")
                    .unwrap_or(false);
                if done {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} did not replay up to {lsn}", replica.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// proxy.toml text for this cluster (one project named after the database).
    pub fn proxy_toml(&self, listen: &str, admin_listen: &str, extra_project: &str) -> String {
        let o = &self.options;
        let mut s = format!(
            "[proxy]\nlisten = \"{listen}\"\nadmin_listen = \"{admin_listen}\"\nadmin_token = \"{ADMIN_TOKEN}\"\nstate_file = \"{}\"\n\n\
             [[users]]\nname = \"{}\"\npassword = \"{}\"\nadmin = true\n\n\
             [projects.{}]\n{extra_project}\n\n",
            self.dir.join("replicator-state.json").display(),
            o.user,
            o.password,
            o.database,
        );
        let mut nodes = vec![("master", "primary", &self.primary)];
        let names: Vec<String> = (1..=self.replicas.len())
            .map(|i| format!("slave-{i}"))
            .collect();
        for (i, r) in self.replicas.iter().enumerate() {
            nodes.push((names[i].as_str(), "replica", r));
        }
        for (name, role, node) in nodes {
            s.push_str(&format!(
                "[[projects.{db}.replicas]]\nname = \"{name}\"\nrole = \"{role}\"\nuri = \"postgresql://127.0.0.1:{port}/{db}\"\n\n",
                db = o.database,
                port = node.port
            ));
        }
        s
    }

    pub fn stop_all(&mut self) {
        let nodes: Vec<Node> = std::iter::once(self.primary.clone())
            .chain(self.replicas.iter().cloned())
            .collect();
        for node in nodes {
            let _ = immediate_stop(&node.bin, &node.data_dir);
            if let Ok(mut live) = LIVE_NODES.lock() {
                live.retain(|(_, d)| d != &node.data_dir);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    writeln!(f, "\n{text}")?;
    Ok(())
}

fn prepend(path: &Path, text: &str) -> Result<()> {
    let old = fs::read_to_string(path)?;
    fs::write(path, format!("{text}{old}"))?;
    Ok(())
}
pub mod etcd;
pub mod mongo;

/// Installs an npm package under `dir` (no scripts run, nothing saved to a manifest):
/// how the test bed gets tools it does not ship, such as the in-memory MongoDB server.
pub fn npm_install(dir: &Path, package: &str) -> Result<()> {
    fs::create_dir_all(dir)?;
    let status = Command::new("npm")
        .args([
            "install",
            "--no-save",
            "--ignore-scripts",
            "--silent",
            "--prefix",
        ])
        .arg(dir)
        .arg(package)
        .status()
        .with_context(|| format!("cannot run npm to install {package}"))?;
    if !status.success() {
        bail!("npm install {package} failed");
    }
    Ok(())
}
