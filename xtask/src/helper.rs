//! The release `rootlessport` that podman, the demo and the bench run: linked
//! statically (non-PIE), since a dynamic glibc alone costs the helper ~1 MB of RSS
//! beside every container; and, when the linker is lld, with the functions it runs laid
//! out together (`xtask/rootlessport.symbol-order`, see [`ORDER_FILE`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace::{cargo, workspace_root};

/// The static build's code generation flags (RUSTFLAGS).
const STATIC_FLAGS: &str = "-C target-feature=+crt-static -C relocation-model=static";

/// [`STATIC_FLAGS`] for the helper itself, as `CARGO_ENCODED_RUSTFLAGS` (0x1f between
/// flags, so that a workspace path with spaces stays one argument): the workspace's path
/// remapped to `.`, so that the code (and with it the `.llvm.N` suffixes ThinLTO gives
/// promoted local functions, which the symbol order names) does not depend on where the
/// checkout is. Measured: without it, a clone elsewhere named 4 of 752 ordered functions
/// differently. `xtask/symbol-order.sh` builds with the same flags.
fn helper_rustflags() -> String {
    let mut flags: Vec<String> = STATIC_FLAGS.split(' ').map(str::to_owned).collect();
    flags.push(format!(
        "--remap-path-prefix={}=.",
        workspace_root().display()
    ));
    flags.join("\x1f")
}

/// The symbols the helper executes, one mangled name a line, hottest first, made by
/// `xtask/symbol-order.sh` from a run under the bench's load. lld places their
/// sections first in `.text`, so the pages the helper touches (and the 64 KB the kernel
/// maps around each fault) are few: ~0.95 MB less resident text when idle. Names that
/// later code changes no longer produce are skipped (`--no-warn-symbol-ordering`).
const ORDER_FILE: &str = "xtask/rootlessport.symbol-order";

fn host_triple() -> Option<String> {
    let out = Command::new("rustc").arg("-vV").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
}

/// Where cargo puts the release build of binary `name`: under the target `triple` when
/// one was given (the static builds), else the host's default.
/// Building the helper needs cargo; a user without one is pointed at a built helper.
fn cannot_run_cargo(e: std::io::Error) -> String {
    format!(
        "cannot run cargo to build rootlessport: {e} (without a toolchain, set ROOTLESSPORT_BIN to a rootlessport built by someone who has one, such as {}; see the README)",
        release_bin(host_triple().as_deref(), "rootlessport").display()
    )
}

pub(crate) fn release_bin(triple: Option<&str>, name: &str) -> PathBuf {
    let target = workspace_root().join("target");
    match triple {
        Some(triple) => target.join(triple).join("release").join(name),
        None => target.join("release").join(name),
    }
}

fn build() -> Command {
    let mut c = cargo();
    c.args(["build", "--quiet", "--release", "-p", "rootlessport"])
        .args(["--bin", "rootlessport-ctl"]);
    c
}

/// The link arguments that order the helper's text by `order` (the text of
/// [`ORDER_FILE`], `None` without one), if the static link for `triple` accepts them:
/// lld knows `--symbol-ordering-file`, GNU ld refuses it. Probed once by linking an
/// empty program with the same flags; the success is remembered under
/// `target/symbol-order/` (a linker that later refuses them after all is caught by
/// [`release_helper`]'s relink without them). The list is passed as a copy named by
/// its content (there too): cargo relinks when an argument changes, not when a file
/// named in one does.
fn ordering_args(triple: &str, order: Option<&str>) -> Option<Vec<String>> {
    use std::hash::{Hash, Hasher};
    let text = order?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.as_bytes().hash(&mut h);
    let dir = workspace_root().join("target/symbol-order");
    let copy = dir.join(format!("rootlessport-{:016x}.order", h.finish()));
    if !copy.is_file() {
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(&copy, text).ok()?;
    }
    let args = vec![
        format!("-Clink-arg=-Wl,--symbol-ordering-file={}", copy.display()),
        "-Clink-arg=-Wl,--no-warn-symbol-ordering".to_string(),
    ];
    let accepted = dir.join(format!("linker-takes-symbol-order-{triple}"));
    if accepted.is_file() {
        return Some(args);
    }
    let probe = std::env::temp_dir().join(format!("xtask-ld-probe-{}", std::process::id()));
    std::fs::create_dir_all(&probe).ok()?;
    let src = probe.join("probe.rs");
    let linked = std::fs::write(&src, "fn main() {}\n").is_ok()
        && Command::new("rustc")
            .args(["--target", triple, "-o"])
            .arg(probe.join("probe"))
            .args(STATIC_FLAGS.split(' '))
            .args(&args)
            .arg(&src)
            .output()
            .is_ok_and(|o| o.status.success());
    let _ = std::fs::remove_dir_all(&probe);
    if linked {
        let _ = std::fs::write(&accepted, "");
    }
    linked.then_some(args)
}

/// Build the release helper (and `rootlessport-ctl` beside it, see [`ctl_beside`])
/// and return its path: the static build when the toolchain can make one, else the
/// ordinary dynamic one. The static helper is linked with [`ORDER_FILE`] when the
/// linker is lld (rustc's default on x86_64-unknown-linux-gnu since 1.90).
pub fn release_helper() -> Result<PathBuf, String> {
    if let Some(triple) = host_triple() {
        // The helper through `cargo rustc`: its link arguments apply to it alone. Should
        // the ordered link fail where the probe passed (a linker configured for cargo
        // only), the helper is linked once more without the ordering.
        let helper = |extra: Vec<String>| {
            cargo()
                .args(["rustc", "--quiet", "--release", "-p", "rootlessport"])
                .args(["--bin", "rootlessport", "--target", &triple, "--"])
                .args(extra)
                .env("CARGO_ENCODED_RUSTFLAGS", helper_rustflags())
                .status()
                .map_err(cannot_run_cargo)
        };
        let order = std::fs::read_to_string(workspace_root().join(ORDER_FILE)).ok();
        let ordered = ordering_args(&triple, order.as_deref());
        let mut status = match ordered.clone() {
            Some(order) => match helper(order)? {
                s if s.success() => s,
                _ => {
                    eprintln!("xtask: linking rootlessport with its symbol order failed; linking it without");
                    helper(Vec::new())?
                }
            },
            None => helper(Vec::new())?,
        };
        if status.success() {
            status = build()
                .args(["--target", &triple])
                .env("CARGO_ENCODED_RUSTFLAGS", helper_rustflags())
                .status()
                .map_err(cannot_run_cargo)?;
        }
        let bin = release_bin(Some(&triple), "rootlessport");
        if status.success() && bin.exists() {
            if let (Some(order), Some(_)) = (&order, &ordered) {
                warn_if_order_is_stale(&bin, order);
            }
            return Ok(bin);
        }
        eprintln!("xtask: static build of rootlessport failed; using the dynamic one");
    }
    let status = build()
        .args(["--bin", "rootlessport"])
        .status()
        .map_err(cannot_run_cargo)?;
    if !status.success() {
        return Err("building the release rootlessport failed".into());
    }
    Ok(release_bin(None, "rootlessport"))
}

/// Build `listen-floor` (xtask's second binary: the listeners of N published ports and
/// nothing else, the bench's limit for the time to ready) as the helper is built,
/// static and in release, so that both pay the same for being started; the ordinary
/// release build where the static one cannot be made.
pub fn release_floor() -> Result<PathBuf, String> {
    let build = |triple: Option<&str>| {
        let mut c = cargo();
        c.args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "xtask",
            "--bin",
            "listen-floor",
        ]);
        if let Some(triple) = triple {
            c.args(["--target", triple])
                .env("CARGO_ENCODED_RUSTFLAGS", helper_rustflags());
        }
        c.status().map_err(cannot_run_cargo)
    };
    if let Some(triple) = host_triple() {
        let bin = release_bin(Some(&triple), "listen-floor");
        if build(Some(&triple))?.success() && bin.exists() {
            return Ok(bin);
        }
        eprintln!("xtask: static build of listen-floor failed; using the dynamic one");
    }
    if !build(None)?.success() {
        return Err("building listen-floor failed".into());
    }
    Ok(release_bin(None, "listen-floor"))
}

/// The names of `order` (one a line) that `defined` (the helper's symbols) lacks.
fn stale_names<'a>(order: &'a str, defined: &std::collections::HashSet<&str>) -> Vec<&'a str> {
    order
        .lines()
        .filter(|l| !l.is_empty() && !defined.contains(l))
        .collect()
}

/// Say when [`ORDER_FILE`] names functions the helper no longer has: code changes
/// rename closures and generic instances (the hash in their mangled names), those
/// functions then land among the cold code, and the idle helper keeps a 64 KB window of
/// text resident for each (measured: 668 -> 1,112 KB of resident text after a day of
/// changes, docs/performance-analysis.md section 10). Needs binutils' `nm`; says
/// nothing without it.
fn warn_if_order_is_stale(bin: &Path, order: &str) {
    let Ok(out) = Command::new("nm").arg("--defined-only").arg(bin).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let defined: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.split(' ').nth(2)).collect();
    if !out.status.success() || defined.is_empty() {
        return;
    }
    let stale = stale_names(order, &defined);
    if !stale.is_empty() {
        eprintln!(
            "xtask: {} of the {} functions named in {ORDER_FILE} are no longer in the helper \
             (e.g. {}): its idle text grows; regenerate the order with \
             `xtask/symbol-order.sh` (root, valgrind, iperf3)",
            stale.len(),
            order.lines().filter(|l| !l.is_empty()).count(),
            stale[0]
        );
    }
}

/// The `rootlessport-ctl` that [`release_helper`] built beside `helper`.
pub fn ctl_beside(helper: &std::path::Path) -> PathBuf {
    helper.with_file_name("rootlessport-ctl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_order_file_the_helper_is_linked_as_before() {
        let triple = host_triple().expect("rustc -vV names the host");
        assert_eq!(
            ordering_args(
                &triple,
                std::fs::read_to_string(workspace_root().join("xtask/no-such.symbol-order"))
                    .ok()
                    .as_deref()
            ),
            None
        );
    }

    #[test]
    fn stale_names_are_those_the_helper_lacks() {
        let defined = ["_start", "malloc", "_ZN3foo3bar17h0123456789abcdefE"]
            .into_iter()
            .collect();
        let order = "_start\n_ZN3foo3bar17hfedcba9876543210E\n\nmalloc\ngone\n";
        assert_eq!(
            stale_names(order, &defined),
            ["_ZN3foo3bar17hfedcba9876543210E", "gone"]
        );
    }

    #[test]
    fn the_committed_order_file_names_the_helpers_forwarding_path() {
        let order = std::fs::read_to_string(workspace_root().join(ORDER_FILE))
            .expect("the order file is committed");
        // The per-connection and per-datagram paths, and the C start-up, must be in it.
        for part in ["3tcp7forward", "3udp4Port8flow_for", "_start"] {
            assert!(
                order.lines().any(|l| l.contains(part)),
                "{ORDER_FILE} lacks {part}"
            );
        }
    }
}
