//! The release `rootlessport` that podman, the demo and the bench run: linked
//! statically (non-PIE), since a dynamic glibc alone costs the helper ~1 MB of RSS
//! beside every container.

use std::path::PathBuf;
use std::process::Command;

use crate::workspace::{cargo, workspace_root};

fn host_triple() -> Option<String> {
    let out = Command::new("rustc").arg("-vV").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
}

fn build() -> Command {
    let mut c = cargo();
    c.args(["build", "--quiet", "--release", "-p", "rootlessport"])
        .args(["--bin", "rootlessport", "--bin", "rootlessport-ctl"]);
    c
}

/// Build the release helper (and `rootlessport-ctl` beside it, see [`ctl_beside`])
/// and return its path: the static build when the toolchain can make one, else the
/// ordinary dynamic one.
pub fn release_helper() -> Result<PathBuf, String> {
    if let Some(triple) = host_triple() {
        let status = build()
            .args(["--target", &triple])
            .env(
                "RUSTFLAGS",
                "-C target-feature=+crt-static -C relocation-model=static",
            )
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        let bin = workspace_root()
            .join("target")
            .join(&triple)
            .join("release/rootlessport");
        if status.success() && bin.exists() {
            return Ok(bin);
        }
        eprintln!("xtask: static build of rootlessport failed; using the dynamic one");
    }
    let status = build()
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building the release rootlessport failed".into());
    }
    Ok(workspace_root().join("target/release/rootlessport"))
}

/// The `rootlessport-ctl` that [`release_helper`] built beside `helper`.
pub fn ctl_beside(helper: &std::path::Path) -> PathBuf {
    helper.with_file_name("rootlessport-ctl")
}
