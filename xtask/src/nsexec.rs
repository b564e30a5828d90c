//! Inside a fresh `unshare --net --mount` namespace: bring loopback up, give the tests
//! a private `/run/netns` so `ip netns add` never touches the host's, then exec.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::mount::{mount, MsFlags};

pub fn run(args: &[String]) -> Result<(), String> {
    let args = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    let (program, rest) = args.split_first().ok_or("ns-exec: no command given")?;

    // unshare(1) already made the mounts private; a tmpfs here hides the host's netns
    // bind mounts and keeps ours from leaking out.
    let netns_dir = std::path::Path::new("/run/netns");
    if netns_dir.exists() || std::fs::create_dir_all(netns_dir).is_ok() {
        mount(
            Some("tmpfs"),
            netns_dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755"),
        )
        .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", netns_dir.display()))?;
    } else {
        eprintln!("xtask: no /run/netns and cannot create it: tests that name netns by `ip netns` will fail");
    }

    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !status.success() {
        return Err(format!("ip link set lo up failed: {status}"));
    }

    let err = Command::new(program).args(rest).exec();
    Err(format!("cannot run {program}: {err}"))
}
