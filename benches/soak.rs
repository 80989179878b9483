//! The client side of `benches/soak.sh` (run as `cargo bench --bench soak -- <mode>`):
//!
//!   idle <host:port> <count> <pid>     `count` clients log in (SCRAM, app/secret, database
//!                                      app) and stay idle; prints the seconds it took and
//!                                      the RSS of process `pid` before and after
//!   load <host:port> <seconds> <count> `count` clients for `seconds`: well-behaved ones
//!                                      (simple and prepared queries, transactions,
//!                                      pipelines, COPY both ways, big results) whose every
//!                                      error is counted, and misbehaving ones (slow
//!                                      readers, disconnects in the middle of a query or a
//!                                      COPY) whose errors are theirs
//!
//! Prints `key value` lines for the script to read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["idle", addr, count, pid] => runtime.block_on(idle(
            addr.to_string(),
            count.parse().expect("count"),
            pid.parse().expect("pid"),
        )),
        ["load", addr, seconds, count] => runtime.block_on(load(
            addr.to_string(),
            Duration::from_secs(seconds.parse().expect("seconds")),
            count.parse().expect("count"),
        )),
        // `cargo bench` without arguments (e.g. `cargo bench` for everything): nothing.
        _ => {
            eprintln!("usage: soak idle <addr> <count> <pid> | soak load <addr> <seconds> <count>")
        }
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn idle(addr: String, count: usize, pid: u32) {
    let before = rss_kb(pid);
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for _ in 0..count {
        let (addr, gate) = (addr.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.ok()?;
            login(&addr).await.ok()
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        if let Ok(Some(stream)) = task.await {
            held.push(stream);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kb(pid);
    println!("idle_clients {}", held.len());
    println!("idle_seconds {seconds:.1}");
    println!("idle_rss_before_kb {before}");
    println!("idle_rss_after_kb {after}");
    println!(
        "idle_kb_per_client {:.1}",
        after.saturating_sub(before) as f64 / held.len().max(1) as f64
    );
}

/// Logs in over a raw socket with SCRAM; the socket after ReadyForQuery.
async fn login(addr: &str) -> std::io::Result<TcpStream> {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut startup = BytesMut::new();
    startup.put_u32(0);
    startup.put_u32(196_608);
    for (k, v) in [("user", "app"), ("database", "app")] {
        startup.put_slice(k.as_bytes());
        startup.put_u8(0);
        startup.put_slice(v.as_bytes());
        startup.put_u8(0);
    }
    startup.put_u8(0);
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    stream.write_all(&startup).await?;
    let mut scram = ScramSha256::new(b"secret", ChannelBinding::unrequested());
    let mut buf = BytesMut::new();
    loop {
        let frame = read_message(&mut stream, &mut buf).await?;
        match frame[0] {
            b'R' => {
                let code = i32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]);
                let mut out = BytesMut::new();
                match code {
                    10 => {
                        let m = scram.message();
                        out.put_u8(b'p');
                        out.put_u32((4 + 14 + 4 + m.len()) as u32);
                        out.put_slice(b"SCRAM-SHA-256\0");
                        out.put_i32(m.len() as i32);
                        out.put_slice(m);
                    }
                    11 => {
                        scram.update(&frame[9..])?;
                        let m = scram.message();
                        out.put_u8(b'p');
                        out.put_u32((4 + m.len()) as u32);
                        out.put_slice(m);
                    }
                    _ => {}
                }
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                }
            }
            b'Z' => return Ok(stream),
            b'E' => return Err(std::io::Error::other("login refused")),
            _ => {}
        }
    }
}

async fn read_message(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<BytesMut> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() > len {
                return Ok(buf.split_to(len + 1));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    errors: AtomicU64,
    misbehaved: AtomicU64,
}

async fn load(addr: String, length: Duration, count: usize) {
    let url = format!("postgresql://app:secret@{addr}/app");
    let setup = connect(&url).await.expect("connect for setup");
    setup
        .batch_execute("CREATE TABLE IF NOT EXISTS soak_items (id bigserial PRIMARY KEY, client int, payload text)")
        .await
        .expect("create soak_items");
    let counts = Arc::new(Counts::default());
    let first_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + length;
    let mut tasks = Vec::new();
    for client in 0..count {
        let (url, addr, counts, first_errors) = (
            url.clone(),
            addr.clone(),
            counts.clone(),
            first_errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = client as u64 * 7919 + 1;
            while Instant::now() < deadline {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // One client in ten misbehaves.
                if client % 10 == 9 {
                    misbehave(&addr, rng).await;
                    counts.misbehaved.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match behave(&url, client as i32, rng).await {
                    Ok(()) => counts.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if let Ok(mut first) = first_errors.lock()
                            && first.len() < 20
                        {
                            first.push(e);
                        }
                        counts.errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    println!("load_sessions_ok {}", counts.ok.load(Ordering::Relaxed));
    println!("load_errors {}", counts.errors.load(Ordering::Relaxed));
    println!(
        "load_misbehaving_sessions {}",
        counts.misbehaved.load(Ordering::Relaxed)
    );
    if let Ok(first) = first_errors.lock() {
        for e in first.iter() {
            println!("load_error_example {e}");
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// One well-behaved session: connects, does one kind of work a few times, leaves.
async fn behave(url: &str, client: i32, rng: u64) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: tokio_postgres::Error| format!("{what}: {err}")
    };
    let db = connect(url).await.map_err(e("connect"))?;
    for _ in 0..5 {
        match rng % 6 {
            0 => {
                db.simple_query("SELECT 1").await.map_err(e("simple"))?;
            }
            1 => {
                let statement = db
                    .prepare("SELECT count(*) FROM soak_items WHERE client = $1")
                    .await
                    .map_err(e("prepare"))?;
                db.query_one(&statement, &[&client])
                    .await
                    .map_err(e("prepared"))?;
            }
            2 => {
                db.batch_execute("BEGIN").await.map_err(e("begin"))?;
                let row = db
                    .query_one(
                        "INSERT INTO soak_items (client, payload) VALUES ($1, 'x') RETURNING id",
                        &[&client],
                    )
                    .await
                    .map_err(e("insert"))?;
                let id: i64 = row.get(0);
                db.query_one("SELECT payload FROM soak_items WHERE id = $1", &[&id])
                    .await
                    .map_err(e("read back"))?;
                db.batch_execute("COMMIT").await.map_err(e("commit"))?;
            }
            3 => {
                let numbers: Vec<i32> = (0..10).collect();
                let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
                    numbers.iter().map(|i| [i as _]).collect();
                let queries: Vec<_> = params
                    .iter()
                    .map(|p| db.query_one("SELECT $1::int", p))
                    .collect();
                for result in futures_util::future::join_all(queries).await {
                    result.map_err(e("pipeline"))?;
                }
            }
            4 => {
                let sink = db
                    .copy_in("COPY soak_items (client, payload) FROM STDIN")
                    .await
                    .map_err(e("copy in"))?;
                let mut sink = Box::pin(sink);
                let mut data = String::new();
                for i in 0..100 {
                    data.push_str(&format!("{client}\tline {i}\n"));
                }
                sink.send(bytes::Bytes::from(data))
                    .await
                    .map_err(e("copy data"))?;
                sink.as_mut().finish().await.map_err(e("copy done"))?;
                let out = db
                    .copy_out(
                        "COPY (SELECT * FROM soak_items WHERE client = 0 LIMIT 100) TO STDOUT",
                    )
                    .await
                    .map_err(e("copy out"))?;
                use futures_util::StreamExt;
                let mut out = Box::pin(out);
                while let Some(chunk) = out.next().await {
                    chunk.map_err(e("copy out data"))?;
                }
            }
            _ => {
                let rows = db
                    .simple_query("SELECT repeat('x', 1000000) FROM generate_series(1, 20)")
                    .await
                    .map_err(e("big result"))?;
                if rows.len() < 20 {
                    return Err(format!("big result: {} messages", rows.len()));
                }
            }
        }
    }
    Ok(())
}

/// One misbehaving session: a slow reader, a disconnect in the middle of a query, or a
/// client killed in the middle of a COPY.
async fn misbehave(addr: &str, rng: u64) {
    let Ok(mut stream) = login(addr).await else {
        return;
    };
    match rng % 3 {
        0 => {
            let sql = "SELECT repeat('x', 1000000) FROM generate_series(1, 200)";
            if stream.write_all(&query_message(sql)).await.is_ok() {
                let mut chunk = vec![0u8; 64 * 1024];
                for _ in 0..20 {
                    if stream.read(&mut chunk).await.unwrap_or(0) == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        1 => {
            let _ = stream.write_all(&query_message("SELECT pg_sleep(5)")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        _ => {
            let _ = stream
                .write_all(&query_message(
                    "COPY soak_items (client, payload) FROM STDIN",
                ))
                .await;
            let mut data = vec![b'd'];
            data.extend_from_slice(&(4 + 13u32).to_be_bytes());
            data.extend_from_slice(b"-1\tunfinished");
            let _ = stream.write_all(&data).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Dropped without a Terminate.
}
