//! The proxy as a real process (`replicator serve`), for tests that crash it, restart
//! it, or run several side by side: fixed ports, its own folder for proxy.toml, the
//! state file and its log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use replicator::admin::status::Status;

pub struct ProxyProcess {
    child: Child,
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    pub admin: String,
    env: Vec<(String, String)>,
}

/// A folder under the target dir for one test's proxy `name`, emptied.
pub fn proxy_dir(test: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(test)
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("proxy folder");
    dir
}

impl ProxyProcess {
    /// Writes `text` (a test config with `listen`/`admin_listen` on port 0 and any
    /// state_file) into `dir` with fixed free ports and `state.json` beside it, and
    /// starts the binary on it with `env` added.
    pub fn start(name: &str, dir: &Path, text: &str, env: &[(&str, &str)]) -> ProxyProcess {
        let port = replicator::testbed::free_port().expect("port");
        let admin_port = replicator::testbed::free_port().expect("port");
        let mut out = String::new();
        for line in text.lines() {
            let line = if line.starts_with("listen = ") {
                format!("listen = \"127.0.0.1:{port}\"")
            } else if line.starts_with("admin_listen = ") {
                format!("admin_listen = \"127.0.0.1:{admin_port}\"")
            } else if line.starts_with("state_file = ") {
                "state_file = \"state.json\"".to_string()
            } else {
                line.to_string()
            };
            out.push_str(&line);
            out.push('\n');
        }
        std::fs::write(dir.join("proxy.toml"), out).expect("write proxy.toml");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyProcess {
            child: spawn(dir, &env),
            name: name.to_string(),
            dir: dir.to_path_buf(),
            port,
            admin: format!("127.0.0.1:{admin_port}"),
            env,
        }
    }

    /// Starts the binary again on the same folder, with `env` instead of the first one.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.kill();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.child = spawn(&self.dir, &self.env);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A figure of /proc/<pid>/status in kB (VmRSS, VmHWM).
    pub fn memory_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("proxy process status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    /// SIGTERM: the proxy's graceful shutdown.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on the pid of our own child; no memory is involved.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }

    pub async fn status(&self) -> Option<Status> {
        let (code, body) = super::admin_http(&self.admin).get("/status").await.ok()?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// Polls `/status` until `check` holds, or fails after `timeout` with the last
    /// status and the log.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        check: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await;
            if let Some(s) = &status
                && check(s)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}: {status:#?}\n--- log ---\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("proxy.log"))
        .expect("log file");
    let log_err = log.try_clone().expect("log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_replicator"));
    command
        .args(["serve", "--config"])
        .arg(dir.join("proxy.toml"))
        // Started from elsewhere: paths in proxy.toml are relative to its folder.
        .current_dir("/")
        .env("RUST_LOG", "info")
        .env_remove("REPLICATOR_FAILPOINT")
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().expect("start replicator")
}
