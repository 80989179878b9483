//! The session core without a server: client and server messages are handed to it as
//! bytes, and what it sends each way and the pool actions it takes are checked. A
//! "server" is a bare `ServerState` lent by a small pool that takes it back when the
//! core drops its handle, so a test sees checkouts, releases and what a reused
//! connection remembers (prepared statements, settings, a reset).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use bytes::{BufMut, BytesMut};

use super::*;
use crate::config::Config;

mod failures;
mod units;

const CONFIG: &str = r#"
[proxy]
listen = "127.0.0.1:0"
pool_mode = "transaction"

[[users]]
name = "app"
password = "secret"

[projects.app]
database = "app"
read_your_writes = false

[[projects.app.replicas]]
name = "primary"
role = "primary"
uri = "postgresql://127.0.0.1:1/app"

[[projects.app.replicas]]
name = "replica"
role = "replica"
uri = "postgresql://127.0.0.1:2/app"
"#;

/// Idle server states by node: what a pool would hand out again.
type Idle = Rc<RefCell<HashMap<String, Vec<ServerState>>>>;

/// A server on loan from the test's pool; dropping it gives it back.
struct TestConn {
    state: Option<ServerState>,
    node: String,
    idle: Idle,
}

impl ServerHandle for TestConn {
    fn state(&self) -> &ServerState {
        self.state.as_ref().unwrap()
    }
    fn state_mut(&mut self) -> &mut ServerState {
        self.state.as_mut().unwrap()
    }
}

impl Drop for TestConn {
    fn drop(&mut self) {
        if let Some(state) = self.state.take()
            && !state.broken
        {
            self.idle
                .borrow_mut()
                .entry(self.node.clone())
                .or_default()
                .push(state);
        }
    }
}

struct Bed {
    core: Core<TestConn>,
    shared: Arc<Context>,
    idle: Idle,
    /// Every checkout the core asked for, with the node that served it.
    checkouts: Vec<(Checkout, String)>,
    /// Checkouts fail (no node reachable).
    refuse: bool,
    next_pid: i32,
}

impl Bed {
    fn new() -> Bed {
        Bed::with_config(CONFIG)
    }

    fn with_config(text: &str) -> Bed {
        let config = Config::parse(text).expect("test config");
        let session_mode = config.proxy.pool_mode == crate::config::PoolMode::Session;
        let timeouts = Timeouts::from_settings(&config.proxy);
        let topology = crate::cluster::Topology::build(&config, None, None);
        let shared = Arc::new(Context::new(config, topology, None, None));
        let project = shared.topology.load().projects["app"].clone();
        let user = shared.users.load().get("app").cloned().expect("user");
        let (_, _, cancel_slot) = shared.cancels.register();
        let info = shared
            .clients
            .register("app", "app", "127.0.0.1:9".parse().unwrap());
        let core = Core::new(CoreParts {
            shared: shared.clone(),
            user,
            project,
            startup_settings: Settings::default(),
            session_mode,
            cancel_slot,
            info,
            timeouts,
        });
        Bed {
            core,
            shared,
            idle: Idle::default(),
            checkouts: Vec::new(),
            refuse: false,
            next_pid: 100,
        }
    }

    fn node(&self, route: Route) -> Arc<Node> {
        let wanted = match route {
            Route::Primary => NodeRole::Primary,
            Route::Replica => NodeRole::Replica,
        };
        self.core
            .project
            .nodes
            .iter()
            .find(|n| n.role() == wanted)
            .cloned()
            .unwrap()
    }

    /// A server of `node` from the idle ones, or a new one.
    fn conn(&mut self, node: &Node) -> TestConn {
        let reused = self
            .idle
            .borrow_mut()
            .get_mut(&node.name)
            .and_then(Vec::pop);
        let state = reused.unwrap_or_else(|| {
            self.next_pid += 1;
            let mut state = ServerState::new(Arc::new(node.addr.clone()));
            state.pid = self.next_pid;
            state.secret = 7;
            state
        });
        TestConn {
            state: Some(state),
            node: node.name.clone(),
            idle: self.idle.clone(),
        }
    }

    /// Does what the shell does after an event: sends on what is complete, checking
    /// out servers as the core asks.
    fn pump(&mut self) -> Result<(), End> {
        while let Some(planned) = self.core.dispatch_pending()? {
            let checkout = planned.checkout();
            if self.refuse {
                let error = BackendError::Timeout("no node reachable".into());
                self.core.checkout_failed(planned, &error);
                continue;
            }
            let node = self.node(checkout.route);
            let conn = self.conn(&node);
            self.checkouts.push((checkout, node.name.clone()));
            self.core.attach(node, conn);
            self.core.send_unit(planned)?;
        }
        Ok(())
    }

    fn client(&mut self, frames: impl IntoIterator<Item = BytesMut>) -> Result<(), End> {
        for frame in frames {
            self.core.client_piece(Piece::Frame(frame))?;
        }
        self.pump()
    }

    fn server(&mut self, frames: impl IntoIterator<Item = BytesMut>) -> Result<(), End> {
        for frame in frames {
            self.core.server_piece(Piece::Frame(frame))?;
        }
        self.pump()
    }

    /// The messages the core wrote for the server since the last look, by tag.
    fn sent(&mut self) -> Vec<BytesMut> {
        split(&mut self.core.server_out)
    }

    fn answered(&mut self) -> Vec<BytesMut> {
        split(&mut self.core.client_out)
    }

    fn held(&self) -> Option<&str> {
        self.core.server.as_ref().map(|h| h.node.name.as_str())
    }
}

fn split(buf: &mut BytesMut) -> Vec<BytesMut> {
    let mut frames = Vec::new();
    while !buf.is_empty() {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        frames.push(buf.split_to(len + 1));
    }
    frames
}

/// The tags of `frames`, as a string ("TDCZ").
fn tags(frames: &[BytesMut]) -> String {
    frames.iter().map(|f| f[0] as char).collect()
}

/// The text of a frame's first string field (a query, a statement name, a tag).
fn text(frame: &[u8]) -> String {
    let body = &frame[5..];
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

fn frame(tag: u8, parts: &[&[u8]]) -> BytesMut {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut buf = BytesMut::new();
    buf.put_u8(tag);
    buf.put_i32(len as i32 + 4);
    for part in parts {
        buf.extend_from_slice(part);
    }
    buf
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

// ---- the client's messages ----

fn query(sql: &str) -> BytesMut {
    frame(b'Q', &[&cstr(sql)])
}
fn parse(name: &str, sql: &str) -> BytesMut {
    frame(b'P', &[&cstr(name), &cstr(sql), &[0, 0]])
}
fn bind(portal: &str, statement: &str) -> BytesMut {
    frame(
        b'B',
        &[&cstr(portal), &cstr(statement), &[0, 0, 0, 0, 0, 0]],
    )
}
fn execute() -> BytesMut {
    frame(b'E', &[&cstr(""), &[0, 0, 0, 0]])
}
fn sync() -> BytesMut {
    frame(b'S', &[])
}
fn flush() -> BytesMut {
    frame(b'H', &[])
}
fn copy_data(data: &[u8]) -> BytesMut {
    frame(b'd', &[data])
}
fn copy_done() -> BytesMut {
    frame(b'c', &[])
}

// ---- the server's ----

fn ready(status: u8) -> BytesMut {
    frame(b'Z', &[&[status]])
}
fn complete(tag: &str) -> BytesMut {
    frame(b'C', &[&cstr(tag)])
}
fn row(value: &str) -> BytesMut {
    let len = (value.len() as i32).to_be_bytes();
    frame(b'D', &[&[0, 1], &len, value.as_bytes()])
}
fn parse_complete() -> BytesMut {
    frame(b'1', &[])
}
fn bind_complete() -> BytesMut {
    frame(b'2', &[])
}
fn close_complete() -> BytesMut {
    frame(b'3', &[])
}
fn error(code: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    msg::error_response(&mut buf, "ERROR", code, "it failed");
    buf
}
fn copy_in_response() -> BytesMut {
    frame(b'G', &[&[0, 0, 0]])
}

/// The server's answers to Parse, Bind, Execute and Sync of a one-row SELECT.
fn extended_select(value: &str) -> [BytesMut; 5] {
    [
        parse_complete(),
        bind_complete(),
        row(value),
        complete("SELECT 1"),
        ready(b'I'),
    ]
}

/// The server's answers to a deferred `BEGIN` (Parse, Bind, Execute, Close of its
/// portal) and the simple query sent behind it, which completes with `tag`.
fn begun_then(tag: &str) -> [BytesMut; 6] {
    [
        parse_complete(),
        bind_complete(),
        complete("BEGIN"),
        close_complete(),
        complete(tag),
        ready(b'T'),
    ]
}
