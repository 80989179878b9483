//! TCP keepalive on client and server sockets. Without it a peer that vanished
//! (a host powered off, a NAT entry dropped) holds its connection, and with it a pool
//! place or a client seat, until the next write fails, which for an idle connection
//! is never.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::ProxySettings;

/// `[proxy] tcp_keepalive*`: on by default, with the kernel's timings unless set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub enabled: bool,
    pub idle: Option<Duration>,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            enabled: true,
            idle: None,
            interval: None,
            count: None,
        }
    }
}

impl Keepalive {
    pub fn from_settings(proxy: &ProxySettings) -> Keepalive {
        Keepalive {
            enabled: proxy.tcp_keepalive,
            idle: proxy.tcp_keepalive_idle_ms.map(Duration::from_millis),
            interval: proxy.tcp_keepalive_interval_ms.map(Duration::from_millis),
            count: proxy.tcp_keepalive_count,
        }
    }

    /// Sets the socket's keepalive options. A failure only costs the protection, so it
    /// is logged, not returned.
    pub fn apply(&self, stream: &TcpStream) {
        let socket = SockRef::from(stream);
        let result = if self.enabled {
            let mut params = TcpKeepalive::new();
            if let Some(idle) = self.idle {
                params = params.with_time(idle);
            }
            if let Some(interval) = self.interval {
                params = params.with_interval(interval);
            }
            if let Some(count) = self.count {
                params = params.with_retries(count);
            }
            socket.set_tcp_keepalive(&params)
        } else {
            socket.set_keepalive(false)
        };
        if let Err(e) = result {
            tracing::debug!("cannot set TCP keepalive: {e}");
        }
    }
}
