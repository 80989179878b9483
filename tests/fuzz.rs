//! The fuzz targets (src/fuzz.rs) for a bounded time each: every input of the checked-in
//! corpus (fuzz/corpus/<target>/), then mutations of it until FUZZ_SECONDS (default 20)
//! have passed. A panic, or an input that takes longer than INPUT_LIMIT, fails the test
//! and leaves the input under the target dir for `cargo fuzz run <target> <file>` or a
//! unit test. `cargo fuzz` (fuzz/) runs the same targets under libFuzzer, with coverage
//! guidance, for as long as one likes.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use replicator::fuzz::{Rng, TARGETS, mutate};

/// Longer than this on one input counts as a hang.
const INPUT_LIMIT: Duration = Duration::from_secs(10);

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .collect();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs.sort();
    inputs
}

/// Keeps `input` where a failure can be replayed from, and names it.
fn keep(target: &str, input: &[u8]) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "fuzz-{target}-{:016x}",
        input
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64)
                .wrapping_mul(0x100_0000_01b3))
    ));
    let _ = std::fs::write(&path, input);
    path
}

fn run(target_name: &str) {
    let target = TARGETS
        .iter()
        .find(|(name, _)| *name == target_name)
        .map(|(_, f)| *f)
        .expect("a known target");
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(1)
        });
    // The target runs on a thread of its own, so that a hang is noticed.
    let (to_worker, inputs) = mpsc::sync_channel::<Vec<u8>>(0);
    let (to_judge, outcomes) = mpsc::channel::<bool>();
    std::thread::spawn(move || {
        for input in inputs {
            let ok = std::panic::catch_unwind(|| target(&input)).is_ok();
            if to_judge.send(ok).is_err() {
                return;
            }
        }
    });
    let try_one = |input: Vec<u8>| {
        let kept = input.clone();
        to_worker.send(input).expect("worker alive");
        match outcomes.recv_timeout(INPUT_LIMIT) {
            Ok(true) => {}
            Ok(false) => panic!(
                "{target_name} panicked on {} (FUZZ_SEED={seed})",
                keep(target_name, &kept).display()
            ),
            Err(_) => panic!(
                "{target_name} took over {INPUT_LIMIT:?} on {} (FUZZ_SEED={seed})",
                keep(target_name, &kept).display()
            ),
        }
    };
    let seeds = corpus(target_name);
    for input in &seeds {
        try_one(input.clone());
    }
    let mut rng = Rng(seed);
    // Recent mutants are mutated further, for inputs a few steps from the corpus.
    let mut recent: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let base = if !recent.is_empty() && rng.below(2) == 0 {
            &recent[rng.below(recent.len())]
        } else {
            &seeds[rng.below(seeds.len())]
        };
        let other = &seeds[rng.below(seeds.len())];
        let input = mutate(base, other, &mut rng);
        if recent.len() < 256 {
            recent.push(input.clone());
        } else {
            let slot = rng.below(recent.len());
            recent[slot] = input.clone();
        }
        try_one(input);
        runs += 1;
    }
    eprintln!("{target_name}: {runs} mutated inputs in {seconds} s (FUZZ_SEED={seed})");
}

#[test]
fn frontend_messages() {
    run("frontend");
}

#[test]
fn classifier() {
    run("classifier");
}

#[test]
fn pgoutput() {
    run("pgoutput");
}

#[test]
fn config_loader() {
    run("config");
}
