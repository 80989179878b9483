//! The `replicator` command line: run the proxy, check a config, or start a demo cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
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
            run_async(loaded.proxy.worker_threads(), serve(loaded, config))
        }
        Command::Demo { listen } => {
            init_logging();
            run_async(1, demo(listen))
        }
    }
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
    wait_for_shutdown_signal().await;
    tracing::info!("shutting down: closing idle clients, letting open transactions finish");
    proxy.stop(grace).await;
    Ok(())
}

async fn demo(listen: String) -> anyhow::Result<()> {
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
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterOptions {
            ports,
            ..ClusterOptions::default()
        })
    })
    .await??;
    let toml = cluster.proxy_toml(&listen, "127.0.0.1:9930", "read_routing = \"round-robin\"");
    let config = Config::parse(&toml)
        .map_err(|issues| anyhow::anyhow!("demo config is invalid: {:?}", issues))?;
    let proxy = Proxy::start(config, None).await?;
    let o = &cluster.options;
    println!();
    println!("  primary   127.0.0.1:{}", cluster.primary.port);
    for r in &cluster.replicas {
        println!("  replica   127.0.0.1:{}", r.port);
    }
    println!("  proxy     {}", proxy.addr);
    println!();
    println!(
        "connect:  psql 'postgresql://{}:{}@{}/{}'",
        o.user, o.password, proxy.addr, o.database
    );
    println!(
        "try:      SELECT inet_server_port(), pg_is_in_recovery();   -- reads land on replicas"
    );
    println!("Ctrl-C stops the proxy and the cluster and removes its data.");
    wait_for_shutdown_signal().await;
    proxy.stop(std::time::Duration::from_secs(2)).await;
    drop(cluster);
    println!("stopped.");
    Ok(())
}
