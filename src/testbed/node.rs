//! One PostgreSQL server of a test cluster: its commands, start, stop, crash and
//! promotion, and the SQL a test runs on it.

use super::*;

impl Node {
    pub(super) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.data_dir.parent().unwrap_or(Path::new("/")));
        cmd.env("PGPASSWORD", SUPERUSER_PASSWORD);
        // libpq (in psql, pg_basebackup and a replica's walreceiver) looks for client
        // certificates under $HOME/.postgresql: a home of the server user's own.
        cmd.env("HOME", &self.socket_dir);
        cmd.env_remove("PGDATABASE")
            .env_remove("PGUSER")
            .env_remove("PGHOST")
            .env_remove("PGPORT");
        cmd
    }

    pub(super) fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(out)
    }

    /// Runs SQL as the superuser over the node's Unix socket; returns unaligned output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        let socket = self.socket_dir.to_string_lossy().to_string();
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &socket,
                "-p",
                &port,
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A libpq/tokio-postgres connection string straight to this node.
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    pub fn start(&self) -> Result<()> {
        let log = self.data_dir.with_extension("log");
        let data = self.data_dir.to_string_lossy().to_string();
        let log = log.to_string_lossy().to_string();
        let mut cmd = self.command("pg_ctl");
        cmd.args(["-D", &data, "-l", &log, "-w", "-t", "60", "start"])
            .stdin(Stdio::null());
        // Its own session: a terminal's Ctrl-C reaches the demo, which then stops the
        // servers in order, and the kernel's autogroup scheduling gives the servers a CPU
        // share of their own rather than sharing the proxy's in benchmarks.
        // SAFETY: setsid is async-signal-safe and only affects the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let out = cmd.output().context("running pg_ctl")?;
        if !out.status.success() {
            // The reason (a port taken, a bad setting) is in the server's log, which goes
            // away with the cluster's directory.
            let server_log = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = server_log.lines().rev().take(10).collect();
            bail!(
                "pg_ctl start failed: {}{}server log, last lines:\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        register_live(&self.bin, &self.data_dir);
        Ok(())
    }

    /// Fast shutdown: clients are disconnected, the server exits cleanly.
    pub fn stop(&self) -> Result<()> {
        let data = self.data_dir.to_string_lossy().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])?;
        Ok(())
    }

    /// Immediate stop (`kill -9`-like for the data: no checkpoint, crash recovery on start).
    pub fn kill(&self) -> Result<()> {
        if let Some(pid) = postmaster_pid(&self.data_dir) {
            // SAFETY: plain signal to the postmaster we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        postmaster_pid(&self.data_dir).is_some_and(pid_alive)
    }
}
