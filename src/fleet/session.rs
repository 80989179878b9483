//! This instance's etcd session: the lease (kept alive every tick; each confirmed
//! keepalive is a contact), its member record, and the campaign for the leader key.
//! Any failure ends the session: leadership is given up at once, and a new lease is
//! taken once etcd answers again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tracing::{info, warn};

use super::{Fleet, Member, keys, now_secs};

/// How often the lease is renewed: often enough that a few lost keepalives do not
/// let it lapse, at least every second so that leadership moves fast.
pub fn tick(fleet: &Fleet) -> Duration {
    (fleet.settings.lease_ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(1))
}

pub fn spawn(fleet: Arc<Fleet>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            let mut lease = 0;
            let ended = tokio::select! {
                ended = run(&fleet, &mut lease) => ended,
                _ = shutdown.changed() => {
                    resign(&fleet, lease).await;
                    return;
                }
            };
            if let Err(e) = ended {
                fleet.note_error();
                warn!(instance = %fleet.settings.instance, "etcd session ended: {e}");
            }
            set_leadership(&fleet, false);
            tokio::time::sleep(tick(&fleet)).await;
        }
    });
}

/// The shared client, connected on first use.
pub async fn connect(fleet: &Fleet) -> Result<Client, String> {
    if let Some(client) = fleet.client() {
        return Ok(client);
    }
    let wait = tick(fleet) * 2;
    let options = ConnectOptions::new()
        .with_connect_timeout(wait)
        .with_timeout(wait)
        .with_keep_alive(Duration::from_secs(1), wait);
    let client = tokio::time::timeout(
        wait * 2,
        Client::connect(fleet.settings.endpoints.clone(), Some(options)),
    )
    .await
    .map_err(|_| format!("no answer from etcd at {:?}", fleet.settings.endpoints))?
    .map_err(|e| format!("cannot reach etcd at {:?}: {e}", fleet.settings.endpoints))?;
    if let Ok(mut slot) = fleet.client.lock() {
        *slot = Some(client.clone());
    }
    Ok(client)
}

/// One etcd call, held to two ticks.
pub async fn call<T, F>(fleet: &Fleet, what: &str, future: F) -> Result<T, String>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(tick(fleet) * 2, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            fleet.note_error();
            Err(format!("etcd {what}: {e}"))
        }
        Err(_) => {
            fleet.note_error();
            Err(format!("etcd {what}: no answer"))
        }
    }
}

async fn run(fleet: &Fleet, lease_out: &mut i64) -> Result<(), String> {
    let mut client = connect(fleet).await?;
    let ttl_secs = fleet.settings.lease_ttl.as_millis().div_ceil(1000).max(2) as i64;
    let granted_at = fleet.now_ms();
    let lease = call(fleet, "lease grant", client.lease_grant(ttl_secs, None))
        .await?
        .id();
    *lease_out = lease;
    fleet.lease.store(lease, Ordering::SeqCst);
    fleet.note_contact(granted_at);
    let (mut keeper, mut stream) =
        call(fleet, "lease keepalive", client.lease_keep_alive(lease)).await?;
    info!(instance = %fleet.settings.instance, lease, ttl_secs, "joined the fleet");
    let mut refused = 0;
    loop {
        let sent = fleet.now_ms();
        call(fleet, "lease keepalive", keeper.keep_alive()).await?;
        match call(fleet, "lease keepalive", stream.message()).await? {
            Some(answer) if answer.ttl() > 0 => fleet.note_contact(sent),
            _ => return Err("the lease expired".into()),
        }
        let member = Member {
            instance: fleet.settings.instance.clone(),
            advertise: fleet.settings.advertise.clone(),
            cancel_tag: fleet.cancel_tag(),
            heartbeat: now_secs(),
        };
        let text = serde_json::to_string(&member).map_err(|e| e.to_string())?;
        let key = keys::member(&fleet.settings, &fleet.settings.instance);
        let put = client.put(key, text, Some(PutOptions::new().with_lease(lease)));
        call(fleet, "member put", put).await?;
        let holder = campaign(fleet, &mut client, lease).await?;
        refresh_members(fleet, &mut client).await?;
        if let Some((leader, leader_lease)) = holder {
            if leader == fleet.settings.instance {
                // This instance's own earlier session (before a restart) still holds it.
                info!(instance = %leader, "the leader key is held by this instance's previous session; revoking it");
                let _ = call(fleet, "lease revoke", client.lease_revoke(leader_lease)).await;
                continue;
            }
            if leader_process_gone(fleet, &leader).await {
                refused += 1;
            } else {
                refused = 0;
            }
            if refused >= DEAD_LEADER_CHECKS {
                // Its process is gone (the port refuses, twice); waiting for its lease
                // to expire would only delay the next failover.
                warn!(instance = %fleet.settings.instance, leader = %leader, "the fleet's leader refuses connections at its address: its process is gone; revoking its lease so that leadership moves now");
                let _ = call(fleet, "lease revoke", client.lease_revoke(leader_lease)).await;
                refused = 0;
                continue;
            }
        } else {
            refused = 0;
        }
        tokio::time::sleep(tick(fleet)).await;
    }
}

/// Consecutive ticks a leader's address must refuse connections before its lease is
/// revoked.
const DEAD_LEADER_CHECKS: u32 = 2;

/// The leader's process is certainly gone: its advertised address answers with a
/// refusal (the host is up and nothing listens). A timeout proves nothing (a
/// partition, a busy host) and leaves it to the lease.
async fn leader_process_gone(fleet: &Fleet, leader: &str) -> bool {
    let address = fleet
        .members
        .lock()
        .ok()
        .and_then(|m| m.get(leader).map(|member| member.advertise.clone()));
    let Some(address) = address else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(&address)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Takes the leader key if nobody holds it (bound to this lease), else learns who
/// does: returns another instance's name and lease when it leads.
async fn campaign(
    fleet: &Fleet,
    client: &mut Client,
    lease: i64,
) -> Result<Option<(String, i64)>, String> {
    let key = keys::leader(&fleet.settings);
    let me = fleet.settings.instance.clone();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            me.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let answer = call(fleet, "leader campaign", client.txn(txn)).await?;
    let mut other = None;
    let (holder, ours) = if answer.succeeded() {
        (Some(me.clone()), true)
    } else {
        let held = answer.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())),
            _ => None,
        });
        match held {
            Some((name, holder_lease)) => {
                let ours = name == me && holder_lease == lease;
                if !ours {
                    other = Some((name.clone(), holder_lease));
                }
                (Some(name), ours)
            }
            None => (None, false),
        }
    };
    if let Ok(mut leader) = fleet.leader.lock() {
        *leader = holder;
    }
    set_leadership(fleet, ours);
    Ok(other)
}

fn set_leadership(fleet: &Fleet, ours: bool) {
    let before = fleet.holds_leadership.swap(ours, Ordering::SeqCst);
    if before != ours {
        if ours {
            warn!(instance = %fleet.settings.instance, "this proxy is now the fleet's leader");
        } else {
            warn!(instance = %fleet.settings.instance, "this proxy is no longer the fleet's leader");
        }
        fleet.leadership.send_replace(ours);
    }
}

async fn refresh_members(fleet: &Fleet, client: &mut Client) -> Result<(), String> {
    let folder = keys::members(&fleet.settings);
    let get = client.get(folder.clone(), Some(GetOptions::new().with_prefix()));
    let answer = call(fleet, "members", get).await?;
    let members = answer
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Member>(kv.value()).ok())
        .map(|m| (m.instance.clone(), m))
        .collect::<std::collections::BTreeMap<String, Member>>();
    let mine = fleet.cancel_tag();
    if let Some(twin) = members
        .values()
        .find(|m| m.cancel_tag == mine && m.instance != fleet.settings.instance)
    {
        warn!(instance = %fleet.settings.instance, other = %twin.instance, "two instances share a cancel tag; cancel requests between them may go astray (rename one with coordination.instance)");
    }
    if let Ok(mut slot) = fleet.members.lock() {
        *slot = members;
    }
    Ok(())
}

/// On shutdown: hand leadership over at once instead of after the lease's TTL.
async fn resign(fleet: &Fleet, lease: i64) {
    set_leadership(fleet, false);
    let Some(mut client) = fleet.client() else {
        return;
    };
    if lease != 0 {
        let _ = call(fleet, "lease revoke", client.lease_revoke(lease)).await;
        info!(instance = %fleet.settings.instance, "left the fleet");
    }
}
