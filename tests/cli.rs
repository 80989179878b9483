//! The command line as a user meets it: `check` names every problem, `serve` refuses a
//! broken config with the same message.

use std::process::Command;

fn replicator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(args)
        .output()
        .expect("run replicator")
}

#[test]
fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml");
    let out = replicator(&["check", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

/// `check` names weak setups as warnings (the config is still valid), and a hardened
/// version of the same config has none.
#[test]
fn check_warns_about_weak_setups() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("replicator-cli-weak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weak.toml");
    let weak = r#"
[proxy]
listen = "0.0.0.0:6432"
admin_listen = "0.0.0.0:9930"

[[users]]
name = "app"
password = "secret"

[projects.shop]
[[projects.shop.replicas]]
name = "a"
role = "primary"
uri = "postgresql://10.1.2.3:5432/shop"

[[projects.shop.replicas]]
name = "b"
role = "replica"
uri = "postgresql://10.1.2.4:5432/shop?sslmode=require"
"#;
    std::fs::write(&path, weak).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = path.to_string_lossy().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(["check", "--config", &file])
        .env_remove("REPLICATOR_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "warning: proxy.admin_listen: reachable from the network and no admin_token",
        "warning: proxy.listen: reachable from the network and client TLS is off",
        "warning: projects.shop.replicas[0].uri: 10.1.2.3:5432 across the network may be unencrypted",
        "warning: projects.shop.replicas[1].uri: 10.1.2.4:5432: encrypted but the server is not verified",
        "warning: the file holds passwords and others may read it (mode 644)",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    // A token, but no TLS: the token would cross the network in clear text; a short
    // token is named too.
    let with_token = weak.replacen("[proxy]\n", "[proxy]\nadmin_token = \"short\"\n", 1);
    std::fs::write(&path, &with_token).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(["check", "--config", &file])
        .env_remove("REPLICATOR_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the admin token would cross it in clear text"),
        "{stderr}"
    );
    assert!(
        stderr.contains("proxy.admin_token: shorter than 16"),
        "{stderr}"
    );
    // Loopback listeners, a long token, verified loopback-only nodes, mode 600: quiet.
    let hardened = r#"
[proxy]
listen = "127.0.0.1:6432"
admin_listen = "127.0.0.1:9930"
admin_token = "0123456789abcdef0123"

[[users]]
name = "app"
password = "secret"

[projects.shop]
[[projects.shop.replicas]]
name = "a"
role = "primary"
uri = "postgresql://127.0.0.1:5432/shop"
"#;
    std::fs::write(&path, hardened).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(["check", "--config", &file])
        .env_remove("REPLICATOR_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "no warnings expected"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_and_serve_name_every_problem_with_file_and_key() {
    let dir = std::env::temp_dir().join(format!("replicator-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        r#"
[proxy]
listen = "nowhere"
colour = "blue"

[[users]]
name = "app"
password = "secret"

[projects.shop]
read_routing = "fastest"

[[projects.shop.replicas]]
name = "a"
role = "replica"
uri = "postgresql://127.0.0.1:5432/shop"
"#,
    )
    .unwrap();
    let file = path.to_string_lossy().to_string();
    let out = replicator(&["check", "--config", &file]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{file}: proxy.colour: unknown key")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file}: projects.shop.read_routing:")),
        "{stderr}"
    );

    // Fix the type error: the semantic problems are all reported together.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"fastest\"", "\"random\"")
            .replace("colour = \"blue\"\n", ""),
    )
    .unwrap();
    let out = replicator(&["check", "--config", &file]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{file}: proxy.listen: must be an address")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}: projects.shop.replicas: needs exactly one replica with role = \"primary\""
        )),
        "{stderr}"
    );

    let out = replicator(&["serve", "--config", &file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.listen"));

    let out = replicator(&["check", "--config", "/no/such/file.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml: cannot read file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The connection string of the demo's `connect:  psql '...'` line.
fn connection_string(line: &str) -> Option<String> {
    let rest = line.strip_prefix("connect:")?;
    Some(
        rest.trim()
            .trim_start_matches("psql")
            .trim()
            .trim_matches('\'')
            .to_string(),
    )
}

/// The demos in this file run one at a time: each would take the example's ports.
static ONE_DEMO_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A file for a demo's stderr, read back when the demo does not come up.
fn demo_stderr(name: &str) -> (std::path::PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("{name}-{}.stderr", std::process::id()));
    let file = std::fs::File::create(&path).expect("stderr file");
    (path, file)
}

/// `replicator demo`: a cluster and the proxy come up, the printed connection string
/// works, and Ctrl-C (SIGINT) stops everything and removes the data.
#[test]
fn demo_serves_and_cleans_up_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let _one = ONE_DEMO_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (stderr_path, stderr) = demo_stderr("demo_serves_and_cleans_up_on_ctrl_c");
    let mut child = Command::new(env!("CARGO_BIN_EXE_replicator"))
        // Free ports for both listeners: a demo the developer left running keeps its own.
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut url = None;
    let mut primary_port = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("primary") {
            primary_port = rest.trim().rsplit(':').next().map(str::to_string);
        }
        if let Some(printed) = connection_string(&line) {
            url = Some(printed);
            break;
        }
    }
    let url = url.unwrap_or_else(|| {
        panic!(
            "demo printed no connection string; its stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    });
    let psql = replicator::testbed::bindir().unwrap().join("psql");
    let out = Command::new(&psql)
        .args([
            url.as_str(),
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT pg_is_in_recovery()",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "t",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit: {status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    // The primary no longer answers.
    let port = primary_port.expect("demo printed the primary");
    let out = Command::new(&psql)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-d",
            "app",
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", "secret")
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .unwrap();
    assert!(!out.status.success(), "primary still running after Ctrl-C");
    let _ = std::fs::remove_file(&stderr_path);
}

/// `replicator demo --proxies 3`: a fleet of three proxies on a local etcd, every one
/// listed, SHOW FLEET on the first one naming all three and one leader.
#[test]
fn demo_with_three_proxies_starts_a_fleet() {
    use std::io::{BufRead, BufReader};
    let _one = ONE_DEMO_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (stderr_path, stderr) = demo_stderr("demo_with_three_proxies_starts_a_fleet");
    let mut child = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--proxies",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start demo");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut proxies = Vec::new();
    let mut etcd = false;
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("proxy ") {
            proxies.push(rest.trim().to_string());
        }
        etcd |= line.trim().starts_with("etcd");
        if let Some(printed) = connection_string(&line) {
            url = Some(printed);
            break;
        }
    }
    assert_eq!(proxies.len(), 3, "{proxies:?}");
    assert!(etcd, "the demo names its etcd");
    let url = url.unwrap_or_else(|| {
        panic!(
            "demo printed no connection string; its stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    });
    let admin_url = format!(
        "{}/replicator",
        url.strip_suffix("/app").expect("the app database")
    );
    let psql = replicator::testbed::bindir().unwrap().join("psql");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let fleet = loop {
        let out = Command::new(&psql)
            .args([admin_url.as_str(), "-X", "-A", "-t", "-c", "SHOW FLEET"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.lines().count() == 3 && text.contains("|leader|") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fleet of three: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(fleet.matches("|leader|").count(), 1, "{fleet}");
    // SAFETY: plain signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "demo exit: {status:?}");
    let _ = std::fs::remove_file(&stderr_path);
}
