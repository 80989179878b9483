//! The client listener: accepts connections and runs one session task per client until
//! shutdown is requested.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::atomic::Ordering;
use tokio::net::{TcpListener, TcpStream};
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
                            tokio::spawn(serve_connection(accept_shared.clone(), stream, peer));
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
    /// lets clients inside a transaction finish it until `grace` has passed and then
    /// closes them too (57P01, their transactions rolled back), finishes a promotion
    /// under way and starts none, and waits for the monitors and CDC rules to stop.
    pub async fn stop(self, grace: std::time::Duration) {
        let _ = self.shared.shutdown.send(true);
        // A session that registers after this sees the flag above when it starts.
        self.shared.clients.stop_all();
        let _ = self.task.await;
        let deadline = tokio::time::Instant::now() + grace;
        // Held until the end: a promotion under way finishes, none starts after.
        let projects: Vec<_> = self
            .shared
            .topology
            .load()
            .projects
            .values()
            .cloned()
            .collect();
        let mut promotions_held = Vec::new();
        for project in &projects {
            promotions_held.push(project.failover.hold_promotions().await);
        }
        if !wait_for_clients(&self.shared, deadline).await {
            let active = self.shared.active_clients.load(Ordering::Relaxed);
            tracing::warn!(
                active,
                "shutdown grace period over; closing the clients still in a transaction"
            );
            self.shared.clients.terminate_all();
            let closing = tokio::time::Instant::now() + CLOSING_CLIENTS;
            wait_for_clients(&self.shared, closing).await;
        }
        // Monitors leave their loop at the shutdown flag; one that found the
        // promotion lock taken above would wait for it forever, and is stopped.
        let monitors = match self.shared.monitors.lock() {
            Ok(mut monitors) => std::mem::take(&mut *monitors),
            Err(_) => Vec::new(),
        };
        for mut monitor in monitors {
            if tokio::time::timeout(MONITOR_STOP, &mut monitor)
                .await
                .is_err()
            {
                monitor.abort();
            }
        }
        // CDC rules confirm what they wrote and close their streams, so that a proxy
        // started next finds the slots free.
        self.shared.cdc.stopped(grace).await;
        drop(promotions_held);
    }
}

/// Waits until no client session runs, or `deadline`; whether they all ended.
async fn wait_for_clients(shared: &Shared, deadline: tokio::time::Instant) -> bool {
    loop {
        if shared.active_clients.load(Ordering::Relaxed) == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How long clients closed at the end of the grace period may take to go.
const CLOSING_CLIENTS: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a monitor may take to finish its round once the proxy stops.
const MONITOR_STOP: std::time::Duration = std::time::Duration::from_secs(5);

/// One client connection: the handshake, then its session (in a task of its own) or
/// the admin console.
async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    // Taken before anything else, held until the client leaves; a client over the
    // limit still gets its answer (after its startup packet, so that it can read it)
    // and a cancel request still works.
    let seat = crate::session::limits::ClientLimits::connection(&shared.sessions);
    let full = seat.as_ref().err().copied();
    // Boxed, as the console: the handshake's futures (TLS, authentication) are large
    // and short-lived.
    let Some(admission) =
        Box::pin(crate::session::admit(&shared.sessions, stream, peer, full)).await
    else {
        return;
    };
    match admission {
        crate::session::Admission::Session(admitted) => {
            // The session runs in a task of its own: a task keeps the space of
            // everything its future ever held (this one's socket, address and
            // handshake among them) for its whole life, and an idle client's session
            // should keep only the session.
            tokio::spawn(session_task(shared.sessions.clone(), admitted, peer, seat));
        }
        crate::session::Admission::Console {
            reader,
            writer,
            login,
        } => {
            Box::pin(crate::admin::console::serve(
                shared, reader, writer, login, peer,
            ))
            .await;
        }
    }
}

/// A client's session, with its place under `max_client_conn`.
fn session_task(
    shared: Arc<crate::session::Context>,
    admitted: crate::session::Admitted,
    peer: SocketAddr,
    seat: Result<crate::session::limits::ConnectionSeat, usize>,
) -> impl std::future::Future<Output = ()> + Send {
    crate::session::serve(shared, admitted, peer, seat)
}

#[cfg(test)]
mod task_size {
    use super::*;

    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Arc<Shared>, TcpStream, SocketAddr) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    fn session_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(
            Arc<crate::session::Context>,
            crate::session::Admitted,
            SocketAddr,
            Result<crate::session::limits::ConnectionSeat, usize>,
        ) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every client's session task keeps the space of its largest await point for as
    /// long as the client is connected, idle or not (10,000 idle clients: 10,000 of
    /// them). Connecting to a server and the rare paths are boxed, and the handshake
    /// runs in a task of its own; what is left is the session's own state and the
    /// loop's.
    #[test]
    fn a_client_task_stays_small() {
        let task = session_size(session_task);
        assert!(task <= 640, "the client's session task takes {task} bytes");
        // The handshake's task is short-lived, but every client has one while it
        // logs in (a flood of logins: as many of them).
        let handshake = future_size(serve_connection);
        assert!(
            handshake <= 384,
            "the handshake task takes {handshake} bytes"
        );
    }
}
