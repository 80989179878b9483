//! The client listener: accepts connections and runs one session task per client until
//! shutdown is requested.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tracing::{error, info};

use crate::config::Config;
use crate::state::Shared;

/// A running proxy: its address and the handle that stops it.
pub struct Proxy {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    /// Where the HTTP admin endpoints listen (`None` when `admin_listen` is empty).
    pub admin_addr: Option<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Binds the client port and starts accepting. Returns once the port is open.
    pub async fn start(
        config: Config,
        config_path: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(&config.proxy.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.proxy.listen))?;
        let addr = listener.local_addr()?;
        let fleet =
            crate::fleet::FleetSettings::from_config(&config, addr).map(crate::fleet::Fleet::new);
        let tls = crate::tls::load_server_tls(&config.proxy)
            .map_err(|e| anyhow::anyhow!("cannot set up client TLS: {e}"))?;
        let shared = Shared::new(config, config_path.clone(), fleet.clone(), tls);
        if let Some(fleet) = &fleet {
            shared.cancels.set_instance_tag(fleet.cancel_tag());
            fleet.start(&shared);
        }
        crate::reload::spawn_monitors(&shared, &shared.topology.load(), &shared.config.load());
        crate::cdc::Cdc::reconcile(&shared);
        if let Some(path) = &config_path
            && let Err(e) = crate::reload::watch(&shared, path)
        {
            tracing::warn!(
                "cannot watch {}: {e}; reload with SIGHUP or RELOAD",
                path.display()
            );
        }
        let admin_listen = shared.config.load().proxy.admin_listen.clone();
        let admin_addr = if admin_listen.is_empty() {
            None
        } else {
            Some(crate::admin::http::start(shared.clone(), &admin_listen).await?)
        };
        let mut stop = shared.shutdown.subscribe();
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            tokio::spawn(crate::session::serve_client(accept_shared.clone(), stream, peer));
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            error!("accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                    _ = stop.changed() => break,
                }
            }
        });
        info!(%addr, "listening for Postgres clients");
        Ok(Proxy {
            shared,
            addr,
            admin_addr,
            task,
        })
    }

    /// Graceful shutdown: stops accepting, closes idle clients at once (FATAL 57P01),
    /// lets clients inside a transaction finish it, and returns when every client is
    /// gone or `grace` has passed.
    pub async fn stop(self, grace: std::time::Duration) {
        let _ = self.shared.shutdown.send(true);
        // A session that registers after this sees the flag above when it starts.
        self.shared.clients.stop_all();
        let _ = self.task.await;
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let active = self.shared.active_clients.load(Ordering::Relaxed);
            if active == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    active,
                    "shutdown grace period over; closing remaining clients"
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // CDC rules confirm what they wrote and close their streams, so that a proxy
        // started next finds the slots free.
        self.shared.cdc.stopped(grace).await;
    }
}
