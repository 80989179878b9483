//! A real single-member etcd for the fleet tests and `replicator demo --proxies N`: the
//! `etcd` binary (Debian's etcd-server) on free loopback ports, its data in a temporary
//! folder. It can be stopped and started again on the same ports and data (the tests
//! cut the fleet off from it), and is killed when dropped or at process exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static AT_EXIT: std::sync::Once = std::sync::Once::new();

extern "C" fn kill_at_exit() {
    if let Ok(pids) = PIDS.lock() {
        for pid in pids.iter() {
            // SAFETY: kill(2) with a pid this process started.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Where the etcd binary is, or how to install it.
pub fn binary() -> Result<PathBuf> {
    if let Ok(path) = std::env::var("ETCD_BIN") {
        return Ok(PathBuf::from(path));
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = Path::new(dir).join("etcd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no etcd binary found: install it (Debian/Ubuntu: apt-get install etcd-server) or set ETCD_BIN"
    )
}

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Starts a fresh member in a new folder under `base`.
    pub fn start(base: &Path) -> Result<Etcd> {
        let bin = binary()?;
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("etcd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut etcd = Etcd {
            client_port: super::free_port()?,
            peer_port: super::free_port()?,
            dir,
            bin,
            child: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts it again (same ports, same data) after [`Etcd::stop`].
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let child = Command::new(&self.bin)
            .args(["--name", "testbed"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("testbed={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        AT_EXIT.call_once(|| {
            // SAFETY: registers a plain extern "C" function.
            unsafe {
                libc::atexit(kill_at_exit);
            }
        });
        if let Ok(mut pids) = PIDS.lock() {
            pids.push(child.id());
        }
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = format!("127.0.0.1:{}", self.client_port);
        loop {
            // /health answers once the member has a leader (itself).
            if let Ok(mut stream) = std::net::TcpStream::connect(&addr) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let request = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
                let mut answer = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut answer).is_ok()
                    && answer.contains("\"health\":\"true\"")
                {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "etcd exited ({status}); see {}",
                    self.dir.join("etcd.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 (data kept, so [`Etcd::resume`] brings the same cluster back).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
