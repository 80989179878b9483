//! Fleet mode: several proxies that share one view of the cluster through etcd (v3).
//!
//! Every instance holds a lease (`lease_ttl_ms`) and registers itself under it. One
//! instance at a time is the leader: it holds the leader key, created only if absent
//! and bound to its lease (as Patroni does). Only the leader decides failovers, runs
//! switchovers and CDC rules; followers route, and keep their own health view for reads.
//! The topology of every project (primary, fenced nodes, an unfinished promotion, its
//! generation) lives in etcd and changes only by compare-and-swap; every instance
//! watches it and applies each change to its routing. An instance that has not heard
//! from etcd for `lease_ttl_ms` (or has not read the topology yet) sends no writes.
//!
//! Modules: `session` keeps the lease and campaigns for leadership, `topology` reads,
//! watches and swaps the topology, `keys` names everything stored.

mod keys;
pub mod runtime;
mod session;
mod topology;

pub use topology::cache as cache_topology;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::state_file::{ProjectState, now_secs};
use crate::config::Config;

/// What `[coordination]` resolves to for this instance.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub lease_ttl: Duration,
    pub instance: String,
    pub advertise: String,
}

impl FleetSettings {
    /// `None` without a `[coordination]` section (single-instance mode).
    pub fn from_config(config: &Config, listen: std::net::SocketAddr) -> Option<FleetSettings> {
        let c = config.coordination.as_ref()?;
        let listen = listen.to_string();
        Some(FleetSettings {
            endpoints: c.etcd.clone(),
            prefix: c.prefix.trim_end_matches('/').to_string(),
            lease_ttl: Duration::from_millis(c.lease_ttl_ms),
            instance: c.instance.clone().unwrap_or_else(|| listen.clone()),
            advertise: c.advertise.clone().unwrap_or(listen),
        })
    }
}

/// What an instance publishes about itself under its lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub instance: String,
    pub advertise: String,
    /// The tag in the secret keys this instance hands out.
    #[serde(default)]
    pub cancel_tag: u16,
    /// Seconds since the Unix epoch of its last heartbeat.
    pub heartbeat: u64,
}

pub use crate::cluster::coordination::Knowledge;

/// One row of SHOW FLEET.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    pub instance: String,
    pub address: String,
    pub role: String,
    pub last_heartbeat: u64,
    pub this_instance: bool,
}

/// The fleet as this instance sees it (SHOW FLEET, /status).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetView {
    pub instance: String,
    pub leader: Option<String>,
    pub is_leader: bool,
    pub etcd_reachable: bool,
    /// Milliseconds since the last confirmed contact with etcd (None: never).
    pub last_contact_ms: Option<u64>,
    pub writes_allowed: bool,
    pub why_no_writes: Option<String>,
    /// Per project, the topology generation applied here.
    pub generations: BTreeMap<String, u64>,
    pub members: Vec<MemberView>,
    pub etcd_errors: u64,
}

pub struct Fleet {
    pub settings: FleetSettings,
    client: Mutex<Option<etcd_client::Client>>,
    epoch: Instant,
    /// Milliseconds after `epoch` when a lease keepalive that etcd confirmed was sent
    /// (0: never). The lease lives at least `lease_ttl` past it.
    last_contact_ms: AtomicU64,
    /// This instance holds the leader key (valid only while contact is fresh).
    holds_leadership: AtomicBool,
    /// The lease of the current session (0: none); the leader key is bound to it.
    lease: AtomicI64,
    leader: Mutex<Option<String>>,
    /// The topology was read from etcd at least once.
    topology_read: AtomicBool,
    /// Per project: the record in etcd and its key's mod revision.
    records: Mutex<BTreeMap<String, (ProjectState, i64)>>,
    knowledge: Mutex<BTreeMap<String, Knowledge>>,
    /// When this instance last published each project's knowledge (ms after `epoch`).
    published_at: Mutex<BTreeMap<String, u64>>,
    members: Mutex<BTreeMap<String, Member>>,
    pub etcd_errors: AtomicU64,
    /// Runtime changes made in the fleet, and the revision of their key.
    runtime: Mutex<(Vec<runtime::Entry>, i64)>,
    /// Leadership changes are told to whoever starts and stops leader-only work.
    leadership: tokio::sync::watch::Sender<bool>,
}

impl Fleet {
    pub fn new(settings: FleetSettings) -> Arc<Fleet> {
        Arc::new(Fleet {
            settings,
            client: Mutex::new(None),
            epoch: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            holds_leadership: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            leader: Mutex::new(None),
            topology_read: AtomicBool::new(false),
            records: Mutex::new(BTreeMap::new()),
            knowledge: Mutex::new(BTreeMap::new()),
            published_at: Mutex::new(BTreeMap::new()),
            members: Mutex::new(BTreeMap::new()),
            etcd_errors: AtomicU64::new(0),
            runtime: Mutex::new((Vec::new(), 0)),
            leadership: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Starts the lease keeper, the campaign and the topology watch.
    pub fn start(self: &Arc<Fleet>, shared: &Arc<crate::state::Shared>) {
        session::spawn(self.clone(), shared.shutdown.subscribe());
        topology::spawn(self.clone(), shared);
        // Leader-only work follows leadership.
        let mut changes = self.leadership_changes();
        let weak = Arc::downgrade(shared);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                crate::cdc::Cdc::reconcile(&shared);
            }
        });
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn contact_age(&self) -> Option<Duration> {
        match self.last_contact_ms.load(Ordering::SeqCst) {
            0 => None,
            at => Some(Duration::from_millis(self.now_ms().saturating_sub(at))),
        }
    }

    /// The lease is certainly alive: etcd confirmed a keepalive sent less than
    /// `lease_ttl` ago.
    fn in_contact(&self) -> bool {
        self.contact_age()
            .is_some_and(|age| age < self.settings.lease_ttl)
    }

    fn note_contact(&self, sent_at_ms: u64) {
        self.last_contact_ms
            .fetch_max(sent_at_ms.max(1), Ordering::SeqCst);
    }

    fn note_error(&self) {
        self.etcd_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Leader now: holds the leader key and its lease is certainly alive.
    pub fn is_leader(&self) -> bool {
        self.holds_leadership.load(Ordering::SeqCst) && self.in_contact()
    }

    pub fn leader(&self) -> Option<String> {
        self.leader.lock().ok().and_then(|l| l.clone())
    }

    /// Whether this instance may send writes now, and if not, why.
    pub fn writes_allowed(&self) -> Result<(), String> {
        if !self.topology_read.load(Ordering::SeqCst) {
            return Err("this proxy has not read the fleet's topology from etcd yet".into());
        }
        if !self.in_contact() {
            return Err(format!(
                "this proxy has lost contact with etcd for more than {} ms, so it cannot \
                 know the current primary",
                self.settings.lease_ttl.as_millis()
            ));
        }
        Ok(())
    }

    /// The topology record of `project` in etcd, as last read.
    pub fn record(&self, project: &str) -> Option<ProjectState> {
        self.records
            .lock()
            .ok()
            .and_then(|r| r.get(project).map(|(state, _)| state.clone()))
    }

    /// The lag of `node` the leader last published, for a leader that has none of its
    /// own yet.
    pub fn published_lag(&self, project: &str, node: &str) -> Option<u64> {
        self.knowledge
            .lock()
            .ok()
            .and_then(|k| k.get(project).and_then(|k| k.lag_ms.get(node).copied()))
    }

    pub fn published_primary_lsn(&self, project: &str) -> Option<u64> {
        self.knowledge
            .lock()
            .ok()
            .and_then(|k| k.get(project).map(|k| k.primary_lsn))
            .filter(|lsn| *lsn > 0)
    }

    /// Tells leader-only work (CDC rules) when this instance gains or loses leadership.
    pub fn leadership_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leadership.subscribe()
    }

    fn client(&self) -> Option<etcd_client::Client> {
        self.client.lock().ok().and_then(|c| c.clone())
    }

    pub fn view(&self) -> FleetView {
        let leader = self.leader();
        let generations = self
            .records
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(name, (state, _))| (name.clone(), state.generation))
                    .collect()
            })
            .unwrap_or_default();
        let members = self
            .members
            .lock()
            .map(|m| {
                m.values()
                    .map(|member| MemberView {
                        instance: member.instance.clone(),
                        address: member.advertise.clone(),
                        role: if leader.as_deref() == Some(member.instance.as_str()) {
                            "leader".into()
                        } else {
                            "follower".into()
                        },
                        last_heartbeat: member.heartbeat,
                        this_instance: member.instance == self.settings.instance,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let writes = self.writes_allowed();
        FleetView {
            instance: self.settings.instance.clone(),
            leader,
            is_leader: self.is_leader(),
            etcd_reachable: self.in_contact(),
            last_contact_ms: self.contact_age().map(|a| a.as_millis() as u64),
            writes_allowed: writes.is_ok(),
            why_no_writes: writes.err(),
            generations,
            members,
            etcd_errors: self.etcd_errors.load(Ordering::Relaxed),
        }
    }

    /// A decision of the leader: `next` replaces the project's topology if nobody
    /// changed it since this instance read it (compare-and-swap on the generation).
    pub async fn swap_topology(
        &self,
        project: &str,
        next: ProjectState,
    ) -> Result<ProjectState, String> {
        if !self.is_leader() {
            return Err("this proxy is not the fleet's leader (or lost contact with etcd); nothing was changed".into());
        }
        topology::swap(self, project, next).await
    }

    /// A CDC rule's slot record, as the leader that runs it last wrote it.
    pub async fn cdc_state(
        &self,
        rule: &str,
    ) -> Result<Option<crate::cluster::state_file::CdcState>, String> {
        let mut client = session::connect(self).await?;
        let key = keys::cdc(&self.settings, rule);
        let answer = session::call(self, "cdc read", client.get(key, None)).await?;
        match answer.kvs().first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(Some)
                .map_err(|e| format!("unreadable CDC record of {rule} in etcd: {e}")),
        }
    }

    /// Records a CDC rule's slot for whoever runs the rule next; only the leader may.
    pub async fn record_cdc_state(
        &self,
        rule: &str,
        state: &crate::cluster::state_file::CdcState,
    ) -> Result<(), String> {
        if !self.is_leader() {
            return Err("this proxy is no longer the fleet's leader".into());
        }
        let text = serde_json::to_string(state).map_err(|e| e.to_string())?;
        let mut client = session::connect(self).await?;
        let key = keys::cdc(&self.settings, rule);
        session::call(self, "cdc record", client.put(key, text, None)).await?;
        Ok(())
    }

    /// The tag this instance puts in its clients' secret keys.
    pub fn cancel_tag(&self) -> u16 {
        crate::session::cancel::instance_tag_for(&self.settings.instance)
    }

    /// A CancelRequest whose key another instance issued is sent on to it; true when
    /// it was not this instance's to handle.
    pub async fn forward_cancel_elsewhere(&self, pid: i32, secret: i32) -> bool {
        let tag = crate::session::cancel::instance_tag_of(secret);
        if tag == self.cancel_tag() {
            return false;
        }
        let address = self.members.lock().ok().and_then(|m| {
            m.values()
                .find(|member| {
                    member.cancel_tag == tag && member.instance != self.settings.instance
                })
                .map(|member| member.advertise.clone())
        });
        let Some(address) = address else {
            tracing::debug!(
                tag,
                "cancel request for an instance not in the fleet; ignored"
            );
            return true;
        };
        let mut buf = bytes::BytesMut::new();
        crate::protocol::messages::cancel_request(&mut buf, pid, secret);
        let sent = async {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(&address).await?;
            stream.write_all(&buf).await?;
            stream.shutdown().await
        };
        match tokio::time::timeout(Duration::from_secs(2), sent).await {
            Ok(Ok(())) => {
                tracing::info!(to = %address, "cancel request forwarded to the instance that holds the client")
            }
            Ok(Err(e)) => tracing::warn!(to = %address, "cannot forward a cancel request: {e}"),
            Err(_) => tracing::warn!(to = %address, "cannot forward a cancel request: no answer"),
        }
        true
    }

    /// The leader publishes what a successor needs (at most once a second per project).
    pub async fn publish_knowledge(&self, project: &str, knowledge: Knowledge) {
        topology::publish_knowledge(self, project, knowledge).await;
    }
}

/// The fleet as the sessions see it.
impl crate::session::Peers for Fleet {
    fn writes_allowed(&self) -> Result<(), String> {
        Fleet::writes_allowed(self)
    }

    fn forward_cancel<'a>(
        &'a self,
        pid: i32,
        secret: i32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(self.forward_cancel_elsewhere(pid, secret))
    }
}

/// The fleet, if there is one, as failover sees it.
pub fn coordination(
    fleet: &Option<Arc<Fleet>>,
) -> Option<Arc<dyn crate::cluster::coordination::Coordination>> {
    fleet
        .clone()
        .map(|fleet| fleet as Arc<dyn crate::cluster::coordination::Coordination>)
}

/// The fleet as failover sees it.
impl crate::cluster::coordination::Coordination for Fleet {
    fn is_leader(&self) -> bool {
        Fleet::is_leader(self)
    }

    fn leader(&self) -> Option<String> {
        Fleet::leader(self)
    }

    fn instance(&self) -> &str {
        &self.settings.instance
    }

    fn record(&self, project: &str) -> Option<ProjectState> {
        Fleet::record(self, project)
    }

    fn published_primary_lsn(&self, project: &str) -> Option<u64> {
        Fleet::published_primary_lsn(self, project)
    }

    fn published_lag(&self, project: &str, node: &str) -> Option<u64> {
        Fleet::published_lag(self, project, node)
    }

    fn swap_topology<'a>(
        &'a self,
        project: &'a str,
        next: ProjectState,
    ) -> crate::cluster::coordination::Pending<'a, Result<ProjectState, String>> {
        Box::pin(Fleet::swap_topology(self, project, next))
    }

    fn cache_topology(&self, state_path: &std::path::Path, project: &str, stored: ProjectState) {
        cache_topology(state_path, project, stored)
    }

    fn publish_knowledge<'a>(
        &'a self,
        project: &'a str,
        knowledge: Knowledge,
    ) -> crate::cluster::coordination::Pending<'a, ()> {
        Box::pin(Fleet::publish_knowledge(self, project, knowledge))
    }
}
