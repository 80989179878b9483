use super::*;

const MINIMAL: &str = r#"
[proxy]
listen = "127.0.0.1:6432"

[[users]]
name = "app"
password = "secret"

[projects.shop]
[[projects.shop.replicas]]
name = "master"
role = "master"
uri = "postgresql://127.0.0.1:5432/shop"

[[projects.shop.replicas]]
name = "slave-1"
role = "slave"
uri = "postgresql://127.0.0.1:5433/shop"
"#;

#[test]
fn minimal_config_gets_defaults_and_aliases() {
    let config = Config::parse(MINIMAL).unwrap();
    let shop = &config.projects["shop"];
    assert_eq!(shop.replicas[0].role, Role::Primary);
    assert_eq!(shop.replicas[1].role, Role::Replica);
    assert_eq!(shop.pool_size, 20);
    assert_eq!(config.proxy.pool_mode, PoolMode::Transaction);
    assert_eq!(config.project_database("shop"), Some("shop"));
}

#[test]
fn unknown_keys_are_all_reported_with_their_path() {
    let text =
        MINIMAL.replace("[proxy]", "[proxy]\nlisten_port = 1\n") + "\n[failover]\nmod = \"auto\"\n";
    let text = text.replace("role = \"slave\"", "role = \"slave\"\nlag = 3");
    let issues = Config::parse(&text).unwrap_err();
    let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
    assert!(keys.contains(&"proxy.listen_port"), "{keys:?}");
    assert!(keys.contains(&"failover.mod"), "{keys:?}");
    assert!(keys.contains(&"projects.shop.replicas[1].lag"), "{keys:?}");
}

#[test]
fn wrong_types_name_the_key() {
    let text = MINIMAL.replace("role = \"slave\"", "role = \"slave\"\nweight = \"heavy\"");
    let issues = Config::parse(&text).unwrap_err();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].key, "projects.shop.replicas[1].weight");
}

#[test]
fn semantic_errors_are_collected() {
    let text = MINIMAL
        .replace("role = \"slave\"", "role = \"primary\"")
        .replace("postgresql://127.0.0.1:5433/shop", "not a uri://");
    let issues = Config::parse(&text).unwrap_err();
    let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
    assert!(keys.contains(&"projects.shop.replicas"), "{keys:?}");
    assert!(keys.contains(&"projects.shop.replicas[1].uri"), "{keys:?}");
}

#[test]
fn rules_must_point_somewhere() {
    let text = MINIMAL.to_string()
        + "\n[[rules]]\nname = \"r\"\nsource = \"nope\"\ntarget = \"nowhere\"\ncollections = [\"t\"]\n";
    let issues = Config::parse(&text).unwrap_err();
    assert!(
        issues
            .iter()
            .any(|i| i.key == "rules[0].source" && i.reason.contains("rule \"r\""))
    );
    assert!(issues.iter().any(|i| i.key == "rules[0].target"));
}

#[test]
fn syntax_errors_are_reported() {
    let issues = Config::parse("[proxy\nlisten=").unwrap_err();
    assert!(issues[0].reason.starts_with("invalid TOML"));
}

#[test]
fn example_proxy_toml_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    if let Err(e) = Config::load(&path) {
        panic!("{e}");
    }
}

#[test]
fn a_relative_state_file_is_found_beside_the_config_file() {
    let folder = std::env::temp_dir().join(format!("replicator-config-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join("proxy.toml");
    let with_state = |state: &str| {
        MINIMAL.replacen(
            "[proxy]\n",
            &format!("[proxy]\nstate_file = \"{state}\"\n"),
            1,
        )
    };
    std::fs::write(&path, with_state("state/replicator.json")).unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(
        std::path::Path::new(&config.proxy.state_file),
        std::path::absolute(&folder)
            .unwrap()
            .join("state/replicator.json")
    );
    // The default name too, and an absolute path stays as it is.
    std::fs::write(&path, MINIMAL).unwrap();
    let config = Config::load(&path).unwrap();
    assert!(std::path::Path::new(&config.proxy.state_file).starts_with(&folder));
    std::fs::write(&path, with_state("/var/lib/replicator/state.json")).unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.proxy.state_file, "/var/lib/replicator/state.json");
    std::fs::remove_dir_all(&folder).unwrap();
}

#[test]
fn target_uris_are_checked_for_their_kind() {
    let with = |kind: &str, uri: &str| {
        format!("{MINIMAL}\n[targets.t]\nkind = \"{kind}\"\nuri = \"{uri}\"\n")
    };
    let issues = |text: String| match Config::parse(&text) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .iter()
            .map(|i| format!("{}: {}", i.key, i.reason))
            .collect::<Vec<_>>(),
    };
    let fine = issues(with(
        "mongodb",
        "mongodb://127.0.0.1:27017/analytics?w=majority",
    ));
    assert!(fine.is_empty(), "{fine:?}");
    let fine = issues(with("postgres", "postgresql://u:p@127.0.0.1:5432/mirror"));
    assert!(fine.is_empty(), "{fine:?}");
    let no_db = issues(with("mongodb", "mongodb://127.0.0.1:27017"));
    assert!(
        no_db
            .iter()
            .any(|i| i.starts_with("targets.t.uri") && i.contains("database")),
        "{no_db:?}"
    );
    let wrong = issues(with("mongodb", "postgresql://127.0.0.1/x"));
    assert!(wrong.iter().any(|i| i.contains("mongodb://")), "{wrong:?}");
    let bad_pg = issues(with("postgres", "postgresql://127.0.0.1:notaport/x"));
    assert!(
        bad_pg.iter().any(|i| i.starts_with("targets.t.uri")),
        "{bad_pg:?}"
    );
}
