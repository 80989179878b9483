//! Live reload: edits to proxy.toml under continuous load change routing within about a
//! second and fail no client statement; a broken file changes nothing.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use replicator::config::Config;
use replicator::server::Proxy;

fn config_with(replicas: &[usize], project_extra: &str, more: &str) -> String {
    let c = cluster();
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{}\"\nstate_file = \"{}\"\n\n\
         # Comments and layout are the operator's.\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\nadmin = true\n\n\
         [projects.app]\nlag_check_interval_ms = 100\n{project_extra}\n\n\
         [[projects.app.replicas]]\nname = \"master\"\nrole = \"primary\"\nuri = \"postgresql://127.0.0.1:{}/app\"\n\n",
        replicator::testbed::ADMIN_TOKEN,
        c.dir.join("reload-state.json").display(),
        c.primary.port
    );
    for i in replicas {
        text.push_str(&format!(
            "[[projects.app.replicas]]\nname = \"slave-{}\"\nrole = \"replica\"\nuri = \"postgresql://127.0.0.1:{}/app\"\n\n",
            i + 1,
            c.replicas[*i].port
        ));
    }
    text.push_str(more);
    text
}

/// Writes `text` the way editors do (a new file renamed over the old one).
fn save(path: &PathBuf, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls until `check` holds; returns how long it took.
async fn within(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_under_load_apply_live_and_a_broken_file_changes_nothing() {
    create_table("reload_t", "writer int, seq int, PRIMARY KEY (writer, seq)").await;
    let c = cluster();
    let dir = std::env::temp_dir().join(format!("replicator-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    let text = config_with(&[0], "", "");
    std::fs::write(&path, &text).unwrap();
    init_logs();
    let config = Config::load(&path).unwrap();
    let proxy = Proxy::start(config, Some(path.clone())).await.unwrap();
    let url = proxy_url(&proxy, "app", "secret", "app");

    // Load: clients writing and reading back, every result checked.
    let running = Arc::new(AtomicBool::new(true));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let statements = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for writer in 0..4 {
        let (running, failures, statements, url) = (
            running.clone(),
            failures.clone(),
            statements.clone(),
            url.clone(),
        );
        load.push(tokio::spawn(async move {
            let client = connect(&url).await.unwrap();
            let mut seq = 0;
            while running.load(Ordering::Relaxed) {
                seq += 1;
                let wrote = client
                    .execute("INSERT INTO reload_t VALUES ($1, $2)", &[&writer, &seq])
                    .await;
                let read = client.query_one(WHO, &[]).await;
                match (wrote, read) {
                    (Ok(1), Ok(_)) => {
                        statements.fetch_add(2, Ordering::Relaxed);
                    }
                    (w, r) => failures.lock().unwrap().push(format!("{w:?} {r:?}")),
                }
            }
        }));
    }
    let reader = app_client(&proxy).await;
    let second = c.replicas[1].port;
    let first = c.replicas[0].port;

    // 1. Add a replica.
    save(&path, &config_with(&[0, 1], "", ""));
    let took = within(
        "reads on the added replica",
        Duration::from_secs(10),
        async || who(&reader, WHO).await.0 == second,
    )
    .await;
    // The time is reported, not asserted (machines are noisy); `within` bounds it.
    eprintln!("replica added: reads reach it after {took:?}");

    // 2. Change the strategy.
    save(
        &path,
        &config_with(&[0, 1], "read_routing = \"random\"", ""),
    );
    let took = within("strategy change", Duration::from_secs(10), async || {
        status(&proxy).await.projects[0].read_routing == "random"
    })
    .await;
    eprintln!("strategy changed after {took:?}");

    // 3. Remove a replica.
    save(&path, &config_with(&[1], "read_routing = \"random\"", ""));
    within("replica removed", Duration::from_secs(10), async || {
        !status(&proxy).await.projects[0]
            .nodes
            .iter()
            .any(|n| n.name == "slave-1")
    })
    .await;
    for _ in 0..20 {
        assert_ne!(
            who(&reader, WHO).await.0,
            first,
            "a removed replica got a read"
        );
    }

    // 4. Add a project.
    let second_project = format!(
        "[projects.app2]\ndatabase = \"app\"\n[[projects.app2.replicas]]\nname = \"master\"\nrole = \"primary\"\nuri = \"postgresql://127.0.0.1:{}/app\"\n",
        c.primary.port
    );
    let good = config_with(&[1], "read_routing = \"random\"", &second_project);
    save(&path, &good);
    let app2 = proxy_url(&proxy, "app", "secret", "app2");
    within("new project", Duration::from_secs(10), async || {
        connect(&app2).await.is_ok()
    })
    .await;

    // 5. Break the file: rejected, nothing changes.
    let before = status(&proxy).await;
    save(
        &path,
        &good.replace(
            "read_routing = \"random\"",
            "read_routing = \"fastest\"\ncolour = 1",
        ),
    );
    within("rejection", Duration::from_secs(10), async || {
        status(&proxy).await.reloads.failed > before.reloads.failed
    })
    .await;
    let after = status(&proxy).await;
    let last = after.reloads.last.clone().unwrap();
    assert!(!last.ok);
    assert!(last.message.contains("read_routing"), "{last:?}");
    assert!(last.message.contains("colour"), "{last:?}");
    assert_eq!(after.projects.len(), 2);
    assert_eq!(after.projects[0].read_routing, "random");
    assert!(connect(&app2).await.is_ok());

    // 6. Fix it.
    save(
        &path,
        &good.replace(
            "read_routing = \"random\"",
            "read_routing = \"round-robin\"",
        ),
    );
    within("fixed file applied", Duration::from_secs(10), async || {
        status(&proxy).await.projects[0].read_routing == "round-robin"
    })
    .await;

    // Also on request, from the admin console.
    let admin = connect(&proxy_url(&proxy, "app", "secret", "replicator"))
        .await
        .unwrap();
    admin.simple_query("RELOAD").await.expect("RELOAD");

    // Runtime changes are saved into the file, comments and all.
    admin
        .simple_query(&format!(
            "ADD REPLICA app slave-1 replica 'postgresql://127.0.0.1:{first}/app'"
        ))
        .await
        .expect("ADD REPLICA");
    within(
        "reads on the re-added replica",
        Duration::from_secs(10),
        async || who(&reader, WHO).await.0 == first,
    )
    .await;
    admin
        .simple_query("SET READ_ROUTING app least-lag")
        .await
        .expect("SET READ_ROUTING");
    let refused = admin
        .simple_query("ADD REPLICA app boss primary 'postgresql://127.0.0.1:1/app'")
        .await
        .expect_err("a second primary");
    assert_sqlstate(
        &refused,
        tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE,
    );
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(
        saved.contains("# Comments and layout are the operator's."),
        "{saved}"
    );
    assert!(!saved.contains("boss"), "{saved}");
    let mut expected = Config::parse(&good).unwrap();
    {
        let app = expected.projects.get_mut("app").unwrap();
        app.read_routing = replicator::config::ReadRouting::LeastLag;
        app.replicas.push(replicator::config::Replica {
            name: "slave-1".into(),
            role: replicator::config::Role::Replica,
            uri: format!("postgresql://127.0.0.1:{first}/app"),
            lag_tolerance_ms: 5000,
            weight: 1,
        });
    }
    assert_eq!(Config::parse(&saved).unwrap(), expected);
    assert_eq!(status(&proxy).await.projects[0].read_routing, "least-lag");
    // SHOW CONFIG says where each value comes from.
    let shown = admin.simple_query("SHOW CONFIG").await.unwrap();
    let source_of = |key: &str| {
        shown.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("key") == Some(key) => {
                r.get("source").map(str::to_string)
            }
            _ => None,
        })
    };
    assert_eq!(
        source_of("projects.app.read_routing").as_deref(),
        Some("proxy.toml")
    );
    assert_eq!(
        source_of("proxy.connect_timeout_ms").as_deref(),
        Some("default")
    );
    // The same over HTTP.
    let addr = proxy.admin_addr.unwrap().to_string();
    let (code, body) = admin_http(&addr)
        .request(
            hyper::Method::DELETE,
            "/replicas/app/slave-1",
            String::new(),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!std::fs::read_to_string(&path).unwrap().contains("slave-1"));
    for _ in 0..20 {
        assert_ne!(
            who(&reader, WHO).await.0,
            first,
            "a removed replica got a read"
        );
    }

    running.store(false, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "client statements failed: {failures:?}"
    );
    assert!(statements.load(Ordering::Relaxed) > 100);
    let _ = std::fs::remove_dir_all(&dir);
}
