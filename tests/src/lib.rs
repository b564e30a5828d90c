//! Helpers shared by the cross-crate integration tests.
//!
//! Tests marked `#[ignore = "itest: ..."]` need namespaces or system programs: `cargo
//! xtask itest` runs them inside fresh network and mount namespaces. Each of them calls
//! [`require_harness`] first so that `cargo test -- --ignored` on a bare host fails
//! with a clear message instead of touching the host's network.

use std::path::PathBuf;

/// The variable `cargo xtask itest` sets inside its namespaces.
pub const HARNESS_ENV: &str = "ROOTLESS_NET_ITEST";

/// Panic unless we run inside the `cargo xtask itest` namespaces.
pub fn require_harness() {
    assert!(
        std::env::var_os(HARNESS_ENV).is_some(),
        "this test changes network state: run it through `cargo xtask itest`"
    );
}

/// The installed slirp4netns, which `cargo xtask itest` makes sure is there.
pub fn slirp4netns() -> PathBuf {
    slirp_config::find_binary("slirp4netns")
        .expect("slirp4netns is not installed (cargo xtask itest installs it as root)")
}

/// A fixture file shipped with slirp-config.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/slirp-config/fixtures")
        .join(name)
}
