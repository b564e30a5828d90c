//! System programs the tests need, installed on demand when we are root with apt.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// A program and the Debian package that provides it.
#[derive(Clone, Copy)]
pub struct Need {
    pub program: &'static str,
    pub package: &'static str,
}

/// What every integration test run needs.
pub const ITEST_NEEDS: &[Need] = &[
    Need {
        program: "slirp4netns",
        package: "slirp4netns",
    },
    Need {
        program: "ip",
        package: "iproute2",
    },
    Need {
        program: "unshare",
        package: "util-linux",
    },
];

/// A program in `PATH`, else in the sbin directories a user's `PATH` may lack.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    slirp_config::find_binary(program)
        .filter(|p| is_executable(p))
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(program))
                .find(|p| is_executable(p))
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Make sure every program in `needs` is there: install the missing ones when root
/// with apt-get, or fail with one line naming the packages.
pub fn ensure(needs: &[Need]) -> Result<(), String> {
    let missing: Vec<&Need> = needs
        .iter()
        .filter(|n| find_in_path(n.program).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|n| n.package).collect();
    let programs: Vec<&str> = missing.iter().map(|n| n.program).collect();
    if !is_root() || find_in_path("apt-get").is_none() {
        return Err(format!(
            "missing {}: install the package(s) {} (as root: apt-get install {})",
            programs.join(", "),
            packages.join(" "),
            packages.join(" ")
        ));
    }
    eprintln!(
        "xtask: installing {} for {}",
        packages.join(" "),
        programs.join(", ")
    );
    apt_install(&packages)?;
    match needs.iter().find(|n| find_in_path(n.program).is_none()) {
        Some(n) => Err(format!(
            "{} still missing after installing the package {}",
            n.program, n.package
        )),
        None => Ok(()),
    }
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

pub fn apt_install(packages: &[&str]) -> Result<(), String> {
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        run_quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    }
    run_quiet(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
    )
}

fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            stderr.lines().last().unwrap_or("")
        ))
    }
}

/// A fresh network namespace held by a [`slirp_spawn::NetnsHolder`], with `setup` (a
/// shell snippet, may be empty) run inside it first. Returns the holder as a plain
/// `Child` (the caller kills and reaps it) and the netns path.
pub fn netns_holder(setup: &str) -> Result<(std::process::Child, String), String> {
    let holder =
        slirp_spawn::NetnsHolder::new().map_err(|e| format!("cannot hold a new netns: {e}"))?;
    if !setup.is_empty() {
        let ns = slirp_spawn::open_netns(&holder.netns()).map_err(|e| e.to_string())?;
        let script = setup.to_owned();
        // A child forked by a thread inside the namespace starts there too.
        let status = slirp_spawn::in_netns(&ns, move || {
            Command::new("sh").args(["-c", &script]).status()
        })
        .and_then(|r| r)
        .map_err(|e| format!("cannot run {setup:?} in the netns: {e}"))?;
        if !status.success() {
            return Err(format!("{setup:?} failed in the netns ({status})"));
        }
    }
    let path = holder.path().display().to_string();
    Ok((holder.into_child(), path))
}

/// Run `xtask ARGS` again inside fresh network and mount namespaces (and a user
/// namespace when not root), through `ns-exec`, with `env` added.
pub fn rerun_in_private_netns(
    args: &[String],
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<std::process::ExitStatus, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
    let mut cmd = Command::new(find_in_path("unshare").ok_or("unshare not found")?);
    if !is_root() {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(&me)
        .args(["ns-exec", "--"])
        .arg(&me)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.status().map_err(|e| format!("cannot run unshare: {e}"))
}

/// Resident memory of a process in kB (`VmRSS`), if it exists.
pub fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
