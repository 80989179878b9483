//! The `replicator` command line: run the proxy, check a config, start a demo cluster,
//! or ask a running proxy for its status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use replicator::admin::http::AdminClient;
use replicator::config::Config;
use replicator::server::Proxy;
use replicator::testbed::{Cluster, ClusterOptions};

/// A PostgreSQL proxy that sends writes to the primary and reads to replicas.
#[derive(Parser)]
#[command(name = "replicator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Serve {
        /// Path to the config file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print every problem found (exit code 1 if any).
    Check {
        /// Path to the config file.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Start a local primary and two streaming replicas from this machine's PostgreSQL
    /// binaries, with the proxy in front; Ctrl-C stops everything and removes the data.
    Demo {
        /// Address the proxy listens on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        /// Address of the HTTP admin endpoints (/status, /metrics, /health).
        #[arg(long, default_value = "127.0.0.1:9930")]
        admin_listen: String,
        /// Proxies to start; more than one forms a fleet on a local etcd (needs the
        /// etcd binary), listening on consecutive ports from --listen and --admin-listen.
        #[arg(long, default_value_t = 1)]
        proxies: usize,
    },
    /// Promote a replica of a running proxy's project: a planned switchover with no loss
    /// when the primary is healthy, a failover to that replica when it is not.
    Promote {
        /// The project (the database name clients connect to).
        project: String,
        /// The replica to promote, by its name in proxy.toml.
        replica: String,
        /// Config file of the running proxy: its admin_listen is where to ask.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Ask this admin address instead of the config's admin_listen.
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
    },
    /// Run a CDC rule of a running proxy now and print what the run did. Returns once
    /// the rule has caught up with the source's current position.
    Sync {
        /// The rule's `name` in proxy.toml.
        rule: String,
        /// Config file of the running proxy: its admin_listen is where to ask.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Ask this admin address instead of the config's admin_listen.
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
    },
    /// Print the nodes and CDC rules of a running proxy (from its HTTP /status endpoint).
    Status {
        /// Config file of the running proxy: its admin_listen is where to ask.
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Ask this admin address instead of the config's admin_listen.
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
        /// Print the full JSON status instead of the table.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging() {
    replicator::logging::init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} project(s), {} user(s), {} rule(s))",
                    config.display(),
                    c.projects.len(),
                    c.users.len(),
                    c.rules.len()
                );
                for w in weak_setups(&c, &config) {
                    let at = if w.key.is_empty() {
                        String::new()
                    } else {
                        format!("{}: ", w.key)
                    };
                    eprintln!("{}: warning: {at}{}", config.display(), w.text);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            init_logging();
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            for w in weak_setups(&loaded, &config) {
                tracing::warn!(key = %w.key, "weak setup: {}", w.text);
            }
            run_async(loaded.proxy.worker_threads(), serve(loaded, config))
        }
        Command::Demo {
            listen,
            admin_listen,
            proxies,
        } => {
            init_logging();
            run_async(1, demo(listen, admin_listen, proxies))
        }
        Command::Status {
            config,
            admin,
            json,
        } => match admin_client(admin, &config) {
            Ok(admin) => run_async(1, status(admin, json)),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Sync {
            rule,
            config,
            admin,
        } => match admin_client(admin, &config) {
            Ok(admin) => run_async(1, sync(admin, rule)),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Promote {
            project,
            replica,
            config,
            admin,
        } => match admin_client(admin, &config) {
            Ok(admin) => run_async(1, promote(admin, project, replica)),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The weak spots of a loaded config (with its file's permissions).
fn weak_setups(
    config: &Config,
    path: &std::path::Path,
) -> Vec<replicator::config::warnings::Warning> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok().map(|m| m.permissions().mode());
    replicator::config::warnings::weak_setups(config, mode)
}

/// Runs the proxy's event loop. One worker is a single-threaded runtime (the fastest
/// choice on small machines, where the proxy shares the cores with Postgres); more
/// workers use tokio's multi-threaded scheduler.
fn run_async(
    workers: usize,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let grace = std::time::Duration::from_millis(config.proxy.shutdown_timeout_ms);
    let proxy = Proxy::start(config, Some(path)).await?;
    let shared = proxy.shared.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangup.recv().await.is_some() {
            let _ = replicator::reload::reload(&shared, "SIGHUP").await;
        }
    });
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down: closing idle clients, letting open transactions finish");
    proxy.stop(grace).await;
    Ok(())
}

/// Where a running proxy's HTTP admin endpoints are (`--admin`, else the config's
/// admin_listen) and the token to show there (REPLICATOR_ADMIN_TOKEN, else the
/// config's admin_token).
fn admin_client(admin: Option<String>, config: &std::path::Path) -> Result<AdminClient, String> {
    let loaded = Config::load(config);
    let token = match &loaded {
        Ok(c) => replicator::admin::access::configured_token(&c.proxy),
        Err(_) => std::env::var(replicator::admin::access::TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty()),
    };
    // The proxy's own certificate, pinned: HTTPS when the proxy has one.
    let tls = match &loaded {
        Ok(c) => match &c.proxy.tls_cert_file {
            Some(cert) => Some(replicator::tls::connect::pinned_client_config(cert)?),
            None => None,
        },
        Err(_) => None,
    };
    let addr = match (admin, loaded) {
        (Some(a), _) => a,
        (None, Ok(c)) if !c.proxy.admin_listen.is_empty() => c.proxy.admin_listen,
        (None, Ok(_)) => {
            return Err(format!(
                "{}: proxy.admin_listen is empty; pass --admin HOST:PORT",
                config.display()
            ));
        }
        (None, Err(e)) => return Err(e.to_string()),
    };
    let client = AdminClient::new(addr, token.as_deref());
    Ok(match tls {
        Some(tls) => client.with_tls(tls),
        None => client,
    })
}

async fn promote(admin: AdminClient, project: String, replica: String) -> anyhow::Result<()> {
    let (code, body) = admin.post(&format!("/promote/{project}/{replica}")).await?;
    if code != 200 {
        anyhow::bail!("{}", body.trim());
    }
    print!("{body}");
    Ok(())
}

async fn sync(admin: AdminClient, rule: String) -> anyhow::Result<()> {
    use replicator::admin::{commands, status};
    let (code, body) = admin.post(&format!("/sync/{rule}")).await?;
    if code != 200 {
        anyhow::bail!("{}", body.trim());
    }
    let report: replicator::cdc::stats::RunReport = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("unexpected /sync answer from {}: {e}", admin.addr))?;
    print!(
        "{}",
        status::render_table(&commands::SYNC_COLUMNS, &[commands::sync_row(&report)])
    );
    Ok(())
}

async fn status(admin: AdminClient, json: bool) -> anyhow::Result<()> {
    use replicator::admin::status;
    let (code, body) = admin.get("/status").await?;
    if code != 200 {
        anyhow::bail!("{}/status answered {code}: {}", admin.addr, body.trim());
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let parsed: status::Status = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("unexpected /status answer from {}: {e}", admin.addr))?;
    print!(
        "{}",
        status::render_table(&status::REPLICA_COLUMNS, &status::replica_rows(&parsed))
    );
    for p in &parsed.projects {
        println!(
            "project {}: primary={} read_routing={} read_your_writes={} fallback_reads={} causal_primary_reads={}",
            p.name,
            p.primary.as_deref().unwrap_or("none"),
            p.read_routing,
            p.read_your_writes,
            p.fallback_reads,
            p.causal_primary_reads
        );
        println!(
            "  failover ({}): {}{}",
            p.failover.mode,
            p.failover.state,
            p.failover
                .last_event
                .as_ref()
                .map(|e| format!("; last: {e}"))
                .unwrap_or_default()
        );
    }
    if !parsed.rules.is_empty() {
        print!(
            "{}",
            status::render_table(&status::RULE_COLUMNS, &status::rule_rows(&parsed))
        );
    }
    println!(
        "clients: {}  uptime: {} s",
        parsed.clients, parsed.uptime_seconds
    );
    Ok(())
}

/// `addr` with its port moved on by `n` (port 0 stays 0: any free port).
fn nth_address(addr: &str, n: usize) -> String {
    match addr.rsplit_once(':') {
        Some((host, port)) => match port.parse::<usize>() {
            Ok(0) | Err(_) => addr.to_string(),
            Ok(port) => format!("{host}:{}", port + n),
        },
        None => addr.to_string(),
    }
}

async fn demo(listen: String, admin_listen: String, proxies: usize) -> anyhow::Result<()> {
    let proxies = proxies.max(1);
    // A fleet needs etcd: say how to get it before starting anything.
    if proxies > 1 {
        replicator::testbed::etcd::binary()?;
    }
    // Ports of the example proxy.toml when free, so it works unchanged against the demo.
    let wanted = [15432u16, 15433, 15434];
    let ports = if wanted
        .iter()
        .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
    {
        wanted.to_vec()
    } else {
        Vec::new()
    };
    println!("starting a primary and two replicas (initdb + pg_basebackup)...");
    let start = |ports: Vec<u16>| {
        tokio::task::spawn_blocking(move || {
            Cluster::start(ClusterOptions {
                ports,
                ..ClusterOptions::default()
            })
        })
    };
    let cluster = match start(ports.clone()).await? {
        Ok(cluster) => cluster,
        // Another program took one of the example's ports after the check above:
        // any free ports will do, the demo prints the ones it got.
        Err(e) if !ports.is_empty() => {
            eprintln!("example ports {ports:?} unavailable ({e:#}); using free ports");
            start(Vec::new()).await??
        }
        Err(e) => return Err(e),
    };
    // A token of its own: the demo's admin endpoints are as closed as a real setup's.
    let admin_token = format!("{:032x}", rand::random::<u128>());
    let mut toml = cluster
        .proxy_toml(&listen, &admin_listen, "read_routing = \"round-robin\"")
        .replacen(replicator::testbed::ADMIN_TOKEN, &admin_token, 1);
    // The superuser promotes replicas and reads the WAL for CDC rules.
    toml.push_str(&format!(
        "[failover]\nuser = \"{}\"\npassword = \"{}\"\n\n",
        replicator::testbed::SUPERUSER,
        replicator::testbed::SUPERUSER_PASSWORD
    ));
    // A MongoDB-protocol server for the CDC part of the tour, when one can be had.
    let mongo = tokio::task::spawn_blocking(|| {
        replicator::testbed::mongo::MongoServer::start(
            &std::env::temp_dir().join("replicator-jongodb"),
        )
    })
    .await?;
    match &mongo {
        Ok(server) => toml.push_str(&format!(
            "[targets.analytics]\nkind = \"mongodb\"\nuri = \"{}\"\n\n\
             # Uncomment to mirror a table (create it first), then watch SHOW RULES:\n\
             # [[rules]]\n# name = \"demo\"\n# source = \"{}\"\n# target = \"analytics\"\n\
             # collections = [\"t\"]\n# interval_ms = 0\n",
            server.uri("analytics"),
            cluster.options.database
        )),
        Err(e) => {
            eprintln!("no MongoDB for the CDC part of the tour ({e}); set MONGODB_URI to use one")
        }
    }
    let etcd = if proxies > 1 {
        let dir = cluster.dir.clone();
        Some(
            tokio::task::spawn_blocking(move || replicator::testbed::etcd::Etcd::start(&dir))
                .await??,
        )
    } else {
        None
    };
    let mut fleet = Vec::new();
    let mut config_path = cluster.dir.join("proxy.toml");
    for i in 0..proxies {
        let mut text = toml.clone();
        let path = if let Some(etcd) = &etcd {
            let base_state = cluster.dir.join("replicator-state.json");
            let own_state = cluster.dir.join(format!("replicator-state-{}.json", i + 1));
            text = text
                .replacen(
                    &format!("listen = \"{listen}\""),
                    &format!("listen = \"{}\"", nth_address(&listen, i)),
                    1,
                )
                .replacen(
                    &format!("admin_listen = \"{admin_listen}\""),
                    &format!("admin_listen = \"{}\"", nth_address(&admin_listen, i)),
                    1,
                )
                .replace(
                    &base_state.display().to_string(),
                    &own_state.display().to_string(),
                );
            text.push_str(&format!(
                "\n[coordination]\netcd = [\"{}\"]\nprefix = \"/replicator-demo\"\ninstance = \"demo-{}\"\n",
                etcd.endpoint(),
                i + 1
            ));
            cluster.dir.join(format!("proxy-{}.toml", i + 1))
        } else {
            cluster.dir.join("proxy.toml")
        };
        std::fs::write(&path, &text)?;
        let config = Config::parse(&text)
            .map_err(|issues| anyhow::anyhow!("demo config is invalid: {:?}", issues))?;
        fleet.push(Proxy::start(config, Some(path.clone())).await?);
        if i == 0 {
            config_path = path;
        }
    }
    let proxy = &fleet[0];
    let o = &cluster.options;
    println!();
    println!("  primary   127.0.0.1:{}", cluster.primary.port);
    for r in &cluster.replicas {
        println!("  replica   127.0.0.1:{}", r.port);
    }
    for p in &fleet {
        println!("  proxy     {}", p.addr);
        if let Some(admin) = p.admin_addr {
            println!("  admin     http://{admin}/status  /metrics  /health");
        }
    }
    if let Some(etcd) = &etcd {
        println!(
            "  etcd      {} (fleet prefix /replicator-demo; SHOW FLEET on any proxy)",
            etcd.endpoint()
        );
    }
    if let Ok(server) = &mongo {
        println!("  mongodb   {}", server.uri("analytics"));
    }
    println!("  config    {} (edits apply live)", config_path.display());
    println!(
        "  token     {admin_token} (admin HTTP: 'Authorization: Bearer ...'; replicator status --config {} reads it)",
        config_path.display()
    );
    println!();
    println!(
        "connect:  psql 'postgresql://{}:{}@{}/{}'",
        o.user, o.password, proxy.addr, o.database
    );
    println!(
        "try:      SELECT inet_server_port(), pg_is_in_recovery();   -- reads land on replicas"
    );
    println!(
        "admin:    psql 'postgresql://{}:{}@{}/replicator' -c 'SHOW REPLICAS'",
        o.user, o.password, proxy.addr
    );
    let superuser = format!(
        "{}:{}",
        replicator::testbed::SUPERUSER,
        replicator::testbed::SUPERUSER_PASSWORD
    );
    println!();
    println!("tour (README, \"A five-minute tour\"), with this cluster's addresses:");
    if let Some(replica) = cluster.replicas.first() {
        println!(
            "  pause a replica    psql 'postgresql://{superuser}@127.0.0.1:{}/{}' -c 'SELECT pg_wal_replay_pause()'",
            replica.port, o.database
        );
    }
    println!(
        "  kill the primary   kill -9 $(head -1 {})",
        cluster.primary.data_dir.join("postmaster.pid").display()
    );
    if mongo.is_ok() {
        println!(
            "  add a CDC rule     uncomment [[rules]] in {}",
            config_path.display()
        );
    }
    println!();
    println!("Ctrl-C stops the proxy and the cluster and removes its data.");
    wait_for_shutdown_signal().await;
    for p in fleet {
        p.stop(std::time::Duration::from_secs(2)).await;
    }
    drop(etcd);
    if let Ok(server) = &mongo {
        server.stop();
    }
    drop(cluster);
    println!("stopped.");
    Ok(())
}
