//! Failpoints: named places where the real binary can be told to crash or fail, so that
//! the tests can prove what a crash or a failed write at that moment leaves behind.
//! `REPLICATOR_FAILPOINT` holds a comma-separated list of names; unset, every check is
//! one load of a cached flag.

use std::sync::OnceLock;

/// The process exit code of a failpoint crash, so a test can tell it from other exits.
pub const CRASH_EXIT_CODE: i32 = 86;

fn armed_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        std::env::var("REPLICATOR_FAILPOINT")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Whether the failpoint `name` is armed in this process.
pub fn armed(name: &str) -> bool {
    armed_names().iter().any(|n| n == name)
}

/// Ends the process at once, as a kill -9 would, when `name` is armed.
pub fn crash_if_armed(name: &str) {
    if armed(name) {
        tracing::warn!(failpoint = name, "failpoint reached: exiting");
        std::process::exit(CRASH_EXIT_CODE);
    }
}

/// Waits `pause` when `name` is armed: a window for a test to act in (a signal in the
/// middle of a promotion).
pub async fn pause_if_armed(name: &str, pause: std::time::Duration) {
    if armed(name) {
        tracing::warn!(failpoint = name, "failpoint reached: pausing for {pause:?}");
        tokio::time::sleep(pause).await;
    }
}
