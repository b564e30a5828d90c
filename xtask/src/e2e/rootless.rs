//! `cargo xtask podman-e2e-rootless`: a real, ROOTLESS podman 4.x runs containers with
//! our release `rootlessport` (found first in `helper_binaries_dir`), as an
//! unprivileged user.
//!
//! # Who runs it
//!
//! As root, the test user `rootless-net-test` is set up (see [`crate::testuser`]:
//! subordinate ids, `/dev/net/tun` 0666, `/run/user/UID`), the release helper is
//! copied to `target/podman-e2e-rootless/helpers` (root-owned, world-readable), and
//! this program runs itself again as that user (`podman-e2e-rootless --inner BASE`).
//! Run by anyone else, it checks that this user can go rootless
//! ([`crate::testuser::current_user_can_go_rootless`]) and runs the checks as itself.
//!
//! # The podman it runs
//!
//! Private to this test, so the user's own podman setup is untouched:
//! `CONTAINERS_CONF` names our `containers.conf` (which then is the only one read) and
//! `CONTAINERS_STORAGE_CONF` our `storage.conf`; the state lives in
//! `target/podman-e2e-rootless/state-UID` (0700, the user's). What each setting is for:
//!
//! - `helper_binaries_dir = [OURS, ...]`: podman looks `rootlessport` up there first.
//! - `runtime = "runc"`, `cgroup_manager = "cgroupfs"`: crun fails on this machine,
//!   and there is no systemd user session to delegate cgroups; rootless podman on
//!   cgroups v1 runs containers without cgroups anyway.
//! - `default_ulimits = []` and `--ulimit nofile=N:N --ulimit nproc=M:M` on every run:
//!   runc fails here with podman's default ulimits. N and M are 20,000 and 1,000 as in
//!   `podman-e2e`, lowered to our own hard limits when those are lower (an unprivileged
//!   user cannot raise a hard limit; as root we keep ours when switching user).
//! - `events_logger = "file"`: no journald here.
//! - `network_backend = "netavark"`: the rootless bridge networks below.
//! - storage: driver `vfs` (no fuse-overlayfs or native rootless overlay needed; the
//!   busybox image is 2 MB). For a rootless user containers/storage ignores
//!   `graphroot`/`runroot` of a `storage.conf` that is not the user's own
//!   (`~/.config/containers/storage.conf`) and reads `rootless_storage_path` instead,
//!   so that names the store; the run root is given with `--runroot`
//!   (`XDG_RUNTIME_DIR/rootless-net-e2e`: rootless podman refuses a run root longer
//!   than 50 characters).
//! - The helper's log: `ROOTLESSPORT_LOG=debug` and
//!   `ROOTLESSPORT_LOG_FILE=STATE/rootlessport.log` (unless set by the caller) in
//!   podman's environment, which podman passes on to the helper.
//!
//! The image is imported from a tar of a directory holding `bin/busybox` and its
//! applet links; the containers run our `xtask echo-server` (the host's `/usr` and
//! xtask's directory are mounted read-only): TCP greets with `tcp PORT from PEER` and
//! echoes, UDP answers `udp PORT from PEER: DATA`.
//!
//! # What it checks, and the podman 4.x behaviour it relies on
//!
//! 1. `--network slirp4netns -p ...` with TCP and UDP ports: rootless podman's default
//!    `port_handler=rootlesskit` starts `rootlessport` for the container (ChildIP
//!    10.0.2.100, NetNSPath the container's netns, no reload socket). TCP and UDP
//!    through 127.0.0.1 reach the container; the helper running is ours
//!    (`/proc/PID/exe` is our copy, it is in the container's netns, no other
//!    `rootlessport` runs, and our log has its `ready` line under its pid); a client on
//!    a host address is seen by the container with its own address and port (our
//!    helper keeps client addresses; it needs `CAP_NET_ADMIN` in the container netns,
//!    which it has in the user's namespace); `podman rm -f` leaves no helper or
//!    slirp4netns of it.
//! 2. A rootless bridge network (netavark). Podman 4.3 keeps one "rootless netns" per
//!    user and store (its own slirp4netns, the bridge and aardvark-dns inside) and
//!    starts one `rootlessport` per container with ChildIP = the container's bridge
//!    address and RootlessCNI = true (so each helper has a reload socket). Its
//!    NetNSPath is the CONTAINER's netns (`configureNetNS` passes `ctrNS.Path()`), so in
//!    4.3 each helper lives in its own container's netns; only podman 5 and later put
//!    every helper into the shared rootless netns (see `REFERENCE.md` section 7), which
//!    a 4.3 cannot show. Three containers each publish TCP and UDP; then container 1
//!    is stopped, container 2 SIGKILLed (`podman kill -s KILL`), container 1 started
//!    again, container 3 restarted, container 2 started again, container 2's helper
//!    `kill -9`ed (only its ports stop) and container 2 restarted. After each step the
//!    others keep serving (fresh TCP and UDP, and a live TCP connection keeps
//!    echoing), the stopped or killed one's helper is gone, and the restarted one
//!    serves again.
//! 3. `podman network connect/disconnect` of a second network under a live
//!    connection: podman 4.3 reloads the helper (a request on `TMPDIR/rp/ID` with the
//!    child IP) on disconnect while other networks remain, and on connect only when it
//!    is the container's first network. Podman's own helper re-adds every port on a
//!    reload, cutting live connections; ours must keep them. Connecting the second
//!    network again and disconnecting the first then moves the child IP to the second
//!    network's address: the reload must re-aim new connections (the container sees
//!    its new address as the peer of a loopback client), and client addresses stay
//!    kept. The three bridge containers of part 2 stay up meanwhile: podman 4.3's
//!    `RootlessNetNS.Cleanup`, run after every network teardown including a
//!    disconnect, removes the rootless netns (and kills its slirp4netns) when it finds
//!    no container with a netns besides the one being torn down, even though that one
//!    still runs on its other network; the next connect then builds a new rootless
//!    netns, and the container's remaining interface vanishes with the old one
//!    (`netavark: failed to delete container veth eth0: ... No such device`). With
//!    other bridge containers running, nothing is torn down.
//! 4. `rootlessport-ctl` run as the user against a container of its rootless podman
//!    (`super::ctl`): the socket found under `XDG_RUNTIME_DIR/libpod/tmp/rp`, ports
//!    added and removed live, counters exact, errors one line.
//! 5. Clean-up: containers and networks removed, no helper, slirp4netns, conmon or
//!    aardvark-dns of the user left, and the user's podman pause process stopped
//!    (`podman system migrate`, else its pid from `XDG_RUNTIME_DIR/libpod/tmp/pause.pid`).
//!    Zombies are not counted: this machine's pid 1 reaps orphans late.
//!
//! Every podman command runs under `timeout` (60 s) and every network operation has a
//! deadline of a few seconds, so nothing hangs. Output: `ok - NAME` or
//! `not ok - NAME: WHY` per check, then `podman-e2e-rootless: N passed, N failed`.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    common_run_args, connect, containers_conf, ensure_image, greeting, install_helper, lo,
    netns_of, pids, read_line, set_mode, udp_echo, wait_for, wait_greeting, write, FailLine,
    Podman, Report, NEEDS,
};
use crate::sys::{self, Need};
use crate::testuser;
use crate::workspace::workspace_root;

/// What this test needs besides [`NEEDS`].
const MORE_NEEDS: &[Need] = &[
    Need {
        program: "newuidmap",
        package: "uidmap",
    },
    Need {
        program: "timeout",
        package: "coreutils",
    },
];

const LABEL: &str = "podman-e2e-rootless";
/// Every podman command is bounded by this (then SIGKILLed 5 s later).
const PODMAN_TIMEOUT_SECS: u32 = 60;
/// The whole inner run, as seen from the root side.
const RUN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long a helper or process may take to go away.
const GONE_WAIT: Duration = Duration::from_secs(15);

const NET1: &str = "e2enet";
const NET2: &str = "e2enet2";
const SLIRP_CTR: &str = "re2e-slirp";
const SLIRP_TCP: u16 = 28080;
/// The same container port published on every host address.
const SLIRP_TCP_ANY: u16 = 28081;
const SLIRP_UDP: u16 = 28053;
const BRIDGE_CTRS: [&str; 3] = ["re2e-b1", "re2e-b2", "re2e-b3"];
/// Container i publishes TCP 8080 and UDP 9090 on host port BRIDGE_PORT + i (both).
const BRIDGE_PORT: u16 = 28101;
const CONN_CTR: &str = "re2e-conn";
const CONN_PORT: u16 = 28120;
/// Process names the clean-up check looks for.
const NETWORK_PROCS: &[&str] = &[
    "rootlessport",
    "slirp4netns",
    "conmon",
    "aardvark-dns",
    "catatonit",
];

pub fn run(args: &[String]) -> Result<(), String> {
    match args {
        [flag, base] if flag == "--inner" => return inner(Path::new(base)),
        [] => {}
        _ => return Err(format!("usage: xtask {LABEL}")),
    }
    sys::ensure(&[NEEDS, MORE_NEEDS].concat())?;
    let base = workspace_root().join("target/podman-e2e-rootless");
    if !sys::is_root() {
        testuser::current_user_can_go_rootless()?;
        install_helper(&base)?;
        let uid = nix::unistd::getuid().as_raw();
        state_dir(&base, uid, nix::unistd::getgid().as_raw())?;
        return inner(&base);
    }
    let user = testuser::ensure_test_user()?;
    install_helper(&base)?;
    state_dir(&base, user.uid, user.gid)?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
    let mut child = user
        .command(&me)
        .args([LABEL, "--inner"])
        .arg(&base)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {} as {}: {e} (the user needs read access to it)",
                me.display(),
                user.name
            )
        })?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{LABEL} as {} did not finish within {} s",
                    user.name,
                    RUN_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(format!("waiting for {LABEL} as {}: {e}", user.name)),
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{LABEL} as {} failed ({status})", user.name))
    }
}

/// `BASE/state-UID`: 0700, owned by the user the checks run as.
fn state_dir(base: &Path, uid: u32, gid: u32) -> Result<PathBuf, String> {
    let d = base.join(format!("state-{uid}"));
    if !d.is_dir() {
        std::fs::create_dir(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let md = std::fs::metadata(&d).map_err(|e| format!("stat {}: {e}", d.display()))?;
    if md.uid() != uid || md.gid() != gid {
        std::os::unix::fs::chown(&d, Some(uid), Some(gid))
            .map_err(|e| format!("chown {uid}:{gid} {}: {e}", d.display()))?;
    }
    set_mode(&d, 0o700)?;
    Ok(d)
}

/// What the checks share.
struct Ctx {
    podman: Podman,
    uid: u32,
    /// Our helper, canonical (what `/proc/PID/exe` shows).
    ours: PathBuf,
    log: PathBuf,
    /// `podman run` arguments every container gets.
    common: Vec<String>,
    /// A non-loopback IPv4 address of this host, to connect from and to.
    host_ip: Option<Ipv4Addr>,
    /// Our `rootlessport-ctl`, beside the helper.
    ctl: PathBuf,
    /// This user's state directory.
    state: PathBuf,
}

/// The checks, as the user they run as. A setup failure counts as one failed check,
/// so the summary line is always there.
fn inner(base: &Path) -> Result<(), String> {
    let t0 = Instant::now();
    let mut r = Report::new(LABEL, FailLine::NotOk);
    if let Err(e) = run_checks(base, &mut r) {
        r.check("setup", Err::<(), _>(e));
    }
    println!("   {LABEL}: {:.1} s", t0.elapsed().as_secs_f64());
    r.finish()
}

fn run_checks(base: &Path, r: &mut Report) -> Result<(), String> {
    let uid = nix::unistd::getuid().as_raw();
    let _lock = one_run_at_a_time(&podman_runtime_dir(uid))?;
    let state = base.join(format!("state-{uid}"));
    let ours = std::fs::canonicalize(base.join("helpers/rootlessport"))
        .map_err(|e| format!("our helper in {}: {e}", base.display()))?;
    let helpers_dir = ours
        .parent()
        .ok_or("our helper has no directory")?
        .to_path_buf();
    let runtime_dir = podman_runtime_dir(uid);
    let conf = state.join("containers.conf");
    let storage_conf = state.join("storage.conf");
    let comment =
        format!("Written by cargo xtask {LABEL}; the reasons are in xtask/src/e2e/rootless.rs.");
    write(
        &conf,
        &(containers_conf(&comment, &helpers_dir)
            + "\n[network]\nnetwork_backend = \"netavark\"\n"),
    )?;
    let store = state.join("storage");
    write(
        &storage_conf,
        &format!(
            "# Written by cargo xtask {LABEL}.\n[storage]\ndriver = \"vfs\"\n\
             # A rootless user's store, when this file is not ~/.config/containers/storage.conf:\n\
             rootless_storage_path = {:?}\ngraphroot = {:?}\n",
            store.display().to_string(),
            store.display().to_string()
        ),
    )?;
    let log = std::env::var_os("ROOTLESSPORT_LOG_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| state.join("rootlessport.log"));
    let _ = std::fs::remove_file(&log);
    let run_root = run_root(&runtime_dir, uid)?;
    let mut env = vec![
        ("CONTAINERS_CONF".to_owned(), conf),
        ("CONTAINERS_STORAGE_CONF".to_owned(), storage_conf),
        ("ROOTLESSPORT_LOG_FILE".to_owned(), log.clone()),
    ];
    if std::env::var_os("ROOTLESSPORT_LOG").is_none() {
        env.push(("ROOTLESSPORT_LOG".to_owned(), PathBuf::from("debug")));
    }
    let podman = Podman {
        env,
        global: vec!["--runroot".to_owned(), run_root.clone()],
        timeout: Some(PODMAN_TIMEOUT_SECS),
    };

    let common = common_run_args(
        limit(nix::sys::resource::Resource::RLIMIT_NOFILE, 20_000),
        limit(nix::sys::resource::Resource::RLIMIT_NPROC, 1_000),
    )?;
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name);
    println!(
        "   {LABEL}: as {user}, helper {}, state {}",
        ours.display(),
        state.display()
    );

    let pause_file = runtime_dir.join("libpod/tmp/pause.pid");
    let pause_before = read_pid(&pause_file).filter(|p| alive(*p)).is_some();
    // Whatever an interrupted earlier run left in our private store.
    let _ = podman.run(&["rm", "-af", "-t", "0"]);
    let _ = podman.run(&["network", "rm", "-f", NET1, NET2]);
    forget_stale_dns(&podman, &run_root, uid);
    // What runs now is not this run's to clean up (the pause process is, when these
    // podman commands started it).
    let before: Vec<Proc> = network_procs(uid)
        .into_iter()
        .filter(|p| pause_before || p.comm != "catatonit")
        .collect();
    if !before.is_empty() {
        println!(
            "   note: already running for {user} before the checks: {}",
            describe(&before)
        );
    }
    let baseline: BTreeSet<i32> = before.iter().map(|p| p.pid).collect();
    ensure_image(&podman, &state)?;

    let cx = Ctx {
        podman,
        uid,
        ours,
        log,
        common,
        host_ip: host_ipv4(),
        ctl: helpers_dir.join(super::CTL),
        state,
    };
    slirp_checks(&cx, r);
    super::ctl::checks(
        r,
        &cx.podman,
        &cx.ctl,
        &cx.state,
        &cx.common,
        "re2e-ctl",
        &super::ctl::CtlPorts {
            a: 28130,
            b: 28131,
            u: 28132,
            busy: 28133,
            free: 28134,
        },
    );
    bridge_checks(&cx, r);
    connect_checks(&cx, r);

    // Clean-up.
    r.check(
        "cleanup: podman rm -af removes every container",
        cx.podman
            .run(&["rm", "-af", "-t", "0"])
            .and_then(|_| cx.podman.run(&["ps", "-aq"]))
            .and_then(|left| {
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still there: {}", left.replace('\n', " ")))
                }
            }),
    );
    r.check(
        "cleanup: both networks removed",
        cx.podman
            .run(&["network", "rm", "-f", NET1, NET2])
            .and_then(|_| cx.podman.run(&["network", "ls", "--format", "{{.Name}}"]))
            .and_then(|names| {
                let left: Vec<&str> = names.lines().filter(|n| *n == NET1 || *n == NET2).collect();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still there: {}", left.join(" ")))
                }
            }),
    );
    r.check(
        &format!("cleanup: no rootlessport, slirp4netns, conmon or aardvark-dns of {user} left"),
        wait_for(GONE_WAIT, || {
            let left: Vec<Proc> = network_procs(uid)
                .into_iter()
                .filter(|p| p.comm != "catatonit" && !baseline.contains(&p.pid))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {}", describe(&left)))
            }
        }),
    );
    r.check(
        &format!("cleanup: the podman pause process of {user} is stopped"),
        stop_pause(&cx.podman, &pause_file, pause_before),
    );
    r.check(
        &format!("cleanup: nothing of {user}'s podman left running"),
        wait_for(GONE_WAIT, || {
            let left: Vec<Proc> = network_procs(uid)
                .into_iter()
                .filter(|p| !baseline.contains(&p.pid))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {}", describe(&left)))
            }
        }),
    );
    Ok(())
}

/// Runs of this test by one user share the run root, the pause process and the host
/// ports (another worktree may run it too): the second waits for the first, through
/// an exclusive `flock` on `RUNTIME_DIR/rootless-net-e2e.lock` held until it ends.
fn one_run_at_a_time(runtime_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use nix::fcntl::{Flock, FlockArg};
    if !runtime_dir.is_dir() {
        std::fs::create_dir_all(runtime_dir)
            .map_err(|e| format!("creating {}: {e}", runtime_dir.display()))?;
        set_mode(runtime_dir, 0o700)?;
    }
    let path = runtime_dir.join("rootless-net-e2e.lock");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut said = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                if !said {
                    println!(
                        "   note: another {LABEL} run holds {}: waiting",
                        path.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Err((_, e)) => return Err(format!("locking {}: {e}", path.display())),
        }
    }
}

/// Where rootless podman 4.x keeps its runtime state (and `libpod/tmp/pause.pid`):
/// `XDG_RUNTIME_DIR`, else `/run/user/UID` when it is there, else
/// `/tmp/podman-run-UID`.
fn podman_runtime_dir(uid: u32) -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let run = PathBuf::from(format!("/run/user/{uid}"));
    if run.is_dir() {
        run
    } else {
        PathBuf::from(format!("/tmp/podman-run-{uid}"))
    }
}

/// The store's run root: rootless podman refuses one longer than 50 characters, so
/// `RUNTIME_DIR/rootless-net-e2e`, else `/tmp/rootless-net-e2e-UID` (0700, ours).
fn run_root(runtime_dir: &Path, uid: u32) -> Result<String, String> {
    let mut dir = runtime_dir.join("rootless-net-e2e");
    if dir.as_os_str().len() > 50 || !runtime_dir.is_dir() {
        dir = PathBuf::from(format!("/tmp/rootless-net-e2e-{uid}"));
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", dir.display())),
    }
    let md = std::fs::symlink_metadata(&dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
    if !md.is_dir() || md.uid() != uid {
        return Err(format!("{} is not a directory of ours", dir.display()));
    }
    set_mode(&dir, 0o700)?;
    Ok(dir.display().to_string())
}

/// With no container left in our store, aardvark-dns entries in our run root are
/// stale: left by a teardown that failed in an earlier run (podman 4.3 fails some, see
/// the module docs), and they keep an aardvark-dns running after its networks are
/// gone. Remove them, and stop an aardvark-dns of ours that serves them (found by our
/// private run root in its command line).
fn forget_stale_dns(podman: &Podman, run_root: &str, uid: u32) {
    if podman
        .run(&["ps", "-aq"])
        .map_or(true, |ids| !ids.is_empty())
    {
        return;
    }
    let config = format!("{run_root}/networks/aardvark-dns");
    let _ = std::fs::remove_dir_all(&config);
    for p in user_procs(uid) {
        let ours = cmdline(p.pid).split(' ').any(|arg| arg == config);
        if p.comm == "aardvark-dns" && ours {
            println!("   note: stopping a stale aardvark-dns ({})", p.pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = wait_for(Duration::from_secs(5), || {
                if alive(p.pid) {
                    Err(String::new())
                } else {
                    Ok(())
                }
            });
        }
    }
}

/// `want`, or our own hard limit when that is lower (a user cannot raise it).
fn limit(res: nix::sys::resource::Resource, want: u64) -> u64 {
    match nix::sys::resource::getrlimit(res) {
        Ok((_, hard)) if hard < want => hard,
        _ => want,
    }
}

/// Part 1: `--network slirp4netns` with TCP and UDP published.
fn slirp_checks(cx: &Ctx, r: &mut Report) {
    let before = our_helpers(cx);
    let started = r.check(
        &format!(
            "slirp4netns: podman run --network slirp4netns -p 127.0.0.1:{SLIRP_TCP}:80 -p {SLIRP_TCP_ANY}:80 -p {SLIRP_UDP}:53/udp"
        ),
        cx.podman.run_echo(
            SLIRP_CTR,
            "slirp4netns",
            &[
                format!("127.0.0.1:{SLIRP_TCP}:80"),
                format!("{SLIRP_TCP_ANY}:80"),
                format!("{SLIRP_UDP}:53/udp"),
            ],
            &cx.common,
            &["--tcp", "80", "--udp", "53"],
        ),
    );
    if started.is_none() {
        return;
    }
    r.check(
        &format!("slirp4netns: TCP through 127.0.0.1:{SLIRP_TCP} (greeting and echo)"),
        wait_greeting(lo(SLIRP_TCP), "tcp 80 from ").and_then(|g| {
            println!("   container saw: {g}");
            let mut live = Live::open(SLIRP_TCP)?;
            live.echo("hello through rootlessport")
        }),
    );
    r.check(
        &format!("slirp4netns: UDP through 127.0.0.1:{SLIRP_UDP}"),
        udp_echo(lo(SLIRP_UDP), "udp 53 from "),
    );
    check_client_seen(
        cx,
        r,
        "slirp4netns: a client on a host address is seen with its own address and port (TCP, UDP)",
        &[(SLIRP_TCP_ANY, 80, SLIRP_UDP, 53)],
    );
    r.check(
        "slirp4netns: the helper podman started is our rootlessport",
        new_helper(cx, &before).and_then(|pid| {
            let cpid = container_pid(cx, SLIRP_CTR)?;
            let (hns, cns) = (netns_of(pid)?, netns_of(cpid)?);
            if hns != cns {
                return Err(format!(
                    "helper {pid} is in {hns}, the container ({cpid}) in {cns}"
                ));
            }
            let others = foreign_helpers(cx);
            if !others.is_empty() {
                return Err(format!(
                    "another rootlessport runs too: {}",
                    describe(&others)
                ));
            }
            expect_log(cx, pid, "info: ready: 3 port(s) into ")
        }),
    );
    // Its slirp4netns: the one given the container's netns path.
    let slirps: Result<Vec<i32>, String> = cx
        .podman
        .run(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.SandboxKey}}",
            SLIRP_CTR,
        ])
        .and_then(|netns| {
            let pids: Vec<i32> = user_procs(cx.uid)
                .into_iter()
                .filter(|p| p.comm == "slirp4netns" && cmdline(p.pid).contains(&netns))
                .map(|p| p.pid)
                .collect();
            if pids.is_empty() {
                Err(format!("no slirp4netns for {netns} found"))
            } else {
                Ok(pids)
            }
        });
    r.check(
        "slirp4netns: podman rm -f leaves no rootlessport or slirp4netns of it",
        slirps
            .and_then(|slirps| {
                cx.podman
                    .run(&["rm", "-f", "-t", "0", SLIRP_CTR])
                    .map(|_| slirps)
            })
            .and_then(|slirps| {
                wait_for(GONE_WAIT, || {
                    let ours = our_helpers(cx);
                    let left: Vec<Proc> = user_procs(cx.uid)
                        .into_iter()
                        .filter(|p| slirps.contains(&p.pid) || ours.contains(&p.pid))
                        .collect();
                    if left.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("still running: {}", describe(&left)))
                    }
                })
            }),
    );
}

/// Part 2: three containers on one rootless bridge network, stopped, killed and
/// restarted one by one.
fn bridge_checks(cx: &Ctx, r: &mut Report) {
    let made = r.check(
        &format!("bridge: podman network create {NET1} and {NET2}"),
        cx.podman
            .run(&["network", "create", NET1])
            .and_then(|_| cx.podman.run(&["network", "create", NET2])),
    );
    if made.is_none() {
        return;
    }
    let port = |i: usize| BRIDGE_PORT + i as u16;
    let mut helper: [Option<i32>; 3] = [None; 3];
    let mut errors = Vec::new();
    for (i, name) in BRIDGE_CTRS.iter().enumerate() {
        let before = our_helpers(cx);
        let res = cx
            .podman
            .run_echo(
                name,
                NET1,
                &[
                    format!("{}:8080/tcp", port(i)),
                    format!("{}:9090/udp", port(i)),
                ],
                &cx.common,
                &["--tcp", "8080", "--udp", "9090"],
            )
            .and_then(|_| new_helper(cx, &before));
        match res {
            Ok(pid) => helper[i] = Some(pid),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    let all_started = r.check(
        &format!("bridge: three containers on {NET1}, each publishing TCP and UDP"),
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        },
    );
    if all_started.is_none() {
        return;
    }
    let serve = |which: &[usize]| -> Result<(), String> {
        for &i in which {
            serving(port(i), i + 1)?;
        }
        Ok(())
    };
    r.check("bridge: all three serve TCP and UDP", serve(&[0, 1, 2]));
    check_client_seen(
        cx,
        r,
        "bridge: a client on a host address is seen with its own address and port (TCP, UDP)",
        &[0, 1, 2].map(|i| (port(i), 8080, port(i), 9090)),
    );
    r.check(
        "bridge: one helper of ours per container, in its netns, aimed at its bridge address",
        own_netns(cx, &helper),
    );

    // Container 1 stopped.
    let mut live3 = Live::open(port(2));
    r.check(
        "bridge: podman stop container 1",
        cx.podman
            .run(&["stop", "-t", "2", BRIDGE_CTRS[0]])
            .map(|_| ()),
    );
    r.check(
        "bridge: container 1's helper exits, its port closes",
        helper_gone(helper[0]).and_then(|_| not_serving(port(0))),
    );
    r.check(
        "bridge: containers 2 and 3 keep serving; a live connection to 3 keeps echoing",
        serve(&[1, 2]).and_then(|_| echo_live(&mut live3, "after stop 1")),
    );

    // Container 2 killed.
    r.check(
        "bridge: podman kill -s KILL container 2",
        cx.podman
            .run(&["kill", "-s", "KILL", BRIDGE_CTRS[1]])
            .map(|_| ()),
    );
    r.check(
        "bridge: container 2's helper exits, its port closes",
        helper_gone(helper[1]).and_then(|_| not_serving(port(1))),
    );
    r.check(
        "bridge: container 3 keeps serving; the live connection keeps echoing",
        serve(&[2]).and_then(|_| echo_live(&mut live3, "after kill 2")),
    );

    // Container 1 started again.
    let before = our_helpers(cx);
    r.check(
        "bridge: podman start container 1: it serves again, 3 keeps serving",
        cx.podman
            .run(&["start", BRIDGE_CTRS[0]])
            .and_then(|_| new_helper(cx, &before))
            .map(|pid| helper[0] = Some(pid))
            .and_then(|_| serve(&[0, 2]))
            .and_then(|_| echo_live(&mut live3, "after start 1")),
    );

    // Container 3 restarted, with a live connection to container 1.
    let mut live1 = Live::open(port(0));
    let before = our_helpers(cx);
    r.check(
        "bridge: podman restart container 3: it serves again",
        cx.podman
            .run(&["restart", "-t", "2", BRIDGE_CTRS[2]])
            .and_then(|_| new_helper(cx, &before))
            .map(|pid| helper[2] = Some(pid))
            .and_then(|_| serve(&[2])),
    );
    r.check(
        "bridge: container 1 kept serving through the restart of 3 (live connection too)",
        serve(&[0]).and_then(|_| echo_live(&mut live1, "after restart 3")),
    );

    // Container 2 started again.
    let before = our_helpers(cx);
    r.check(
        "bridge: podman start container 2: all three serve",
        cx.podman
            .run(&["start", BRIDGE_CTRS[1]])
            .and_then(|_| new_helper(cx, &before))
            .map(|pid| helper[1] = Some(pid))
            .and_then(|_| serve(&[0, 1, 2]))
            .and_then(|_| echo_live(&mut live1, "after start 2")),
    );

    // Container 2's helper killed with SIGKILL: only its ports stop.
    r.check(
        "bridge: kill -9 of container 2's helper: only its ports stop, 1 and 3 keep serving",
        helper[1]
            .ok_or_else(|| "container 2 has no helper".to_owned())
            .and_then(|pid| {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .map_err(|e| format!("kill -9 {pid}: {e}"))?;
                helper_gone(Some(pid))
            })
            .and_then(|_| not_serving(port(1)))
            .and_then(|_| serve(&[0, 2]))
            .and_then(|_| echo_live(&mut live1, "after kill -9 of helper 2")),
    );
    let before = our_helpers(cx);
    r.check(
        "bridge: podman restart container 2 after its helper was killed: all three serve",
        cx.podman
            .run(&["restart", "-t", "2", BRIDGE_CTRS[1]])
            .and_then(|_| new_helper(cx, &before))
            .map(|pid| helper[1] = Some(pid))
            .and_then(|_| serve(&[0, 1, 2]))
            .and_then(|_| echo_live(&mut live1, "after restart 2")),
    );
    r.check(
        "bridge: three helpers of ours again, each in its container's netns",
        own_netns(cx, &helper),
    );
    // The three stay up through part 3 (see the module docs).
}

/// Part 3: `podman network connect/disconnect` under a live connection.
fn connect_checks(cx: &Ctx, r: &mut Report) {
    let before = our_helpers(cx);
    let helper = r.check(
        &format!("connect: a container on {NET1} publishes TCP and UDP and serves"),
        cx.podman
            .run_echo(
                CONN_CTR,
                NET1,
                &[
                    format!("{CONN_PORT}:8080/tcp"),
                    format!("{CONN_PORT}:9090/udp"),
                ],
                &cx.common,
                &["--tcp", "8080", "--udp", "9090"],
            )
            .and_then(|_| new_helper(cx, &before))
            .and_then(|pid| serving(CONN_PORT, 0).map(|_| pid)),
    );
    let Some(helper) = helper else { return };
    let mut live = Live::open(CONN_PORT);
    r.check(
        "connect: a live TCP connection echoes",
        echo_live(&mut live, "before connect"),
    );
    r.check(
        &format!("connect: podman network connect {NET2}"),
        cx.podman
            .run(&["network", "connect", NET2, CONN_CTR])
            .map(|_| ()),
    );
    r.check(
        "connect: the live connection still echoes; new TCP and UDP connections work",
        echo_live(&mut live, "after connect").and_then(|_| serving(CONN_PORT, 0)),
    );
    let n = reloads(cx, helper, "");
    r.check(
        &format!("disconnect: podman network disconnect {NET2} reloads our helper"),
        cx.podman
            .run(&["network", "disconnect", NET2, CONN_CTR])
            .and_then(|_| wait_reload(cx, helper, "", n)),
    );
    r.check(
        "disconnect: the live connection survives the reload; new TCP and UDP work",
        echo_live(&mut live, "after disconnect").and_then(|_| serving(CONN_PORT, 0)),
    );
    // The child IP moves: connect the second network again, then drop the first one
    // (its address, and so the live connection, goes with it).
    let moved = cx
        .podman
        .run(&["network", "connect", NET2, CONN_CTR])
        .and_then(|_| ctr_ip(cx, CONN_CTR, NET2))
        .and_then(|ip2| {
            let n = reloads(cx, helper, &ip2);
            cx.podman
                .run(&["network", "disconnect", NET1, CONN_CTR])
                .map(|_| (ip2, n))
        });
    r.check(
        &format!(
            "disconnect {NET1}: the helper is reloaded to the {NET2} address; new connections go there"
        ),
        moved.and_then(|(ip2, n)| {
            wait_reload(cx, helper, &ip2, n)?;
            let g = wait_greeting(lo(CONN_PORT), &format!("tcp 8080 from {ip2}:"))?;
            println!("   container saw: {g}");
            udp_echo(lo(CONN_PORT), "udp 9090 from ")
        }),
    );
    check_client_seen(
        cx,
        r,
        "reload: a client on a host address is still seen with its own address (TCP, UDP)",
        &[(CONN_PORT, 8080, CONN_PORT, 9090)],
    );
    r.check(
        "bridge: containers 1-3 kept serving through the reloads of another container",
        (0..3).try_for_each(|i| serving(BRIDGE_PORT + i as u16, i + 1)),
    );
    let _ = cx.podman.run(&["rm", "-f", "-t", "0", CONN_CTR]);
}

/// Reloads in `pid`'s log (to `ip`, when not empty).
fn reloads(cx: &Ctx, pid: i32, ip: &str) -> usize {
    let tag = format!("rootlessport[{pid}]: ");
    log_text(cx)
        .lines()
        .filter(|l| l.contains(&tag) && l.contains("reloaded child IP") && l.contains(ip))
        .count()
}

/// Wait for `pid`'s log to show more than `n` reloads (to `ip`, when not empty).
fn wait_reload(cx: &Ctx, pid: i32, ip: &str, n: usize) -> Result<(), String> {
    wait_for(Duration::from_secs(5), || {
        if reloads(cx, pid, ip) > n {
            Ok(())
        } else {
            Err(format!(
                "no new \"reloaded child IP {ip}\" line from helper {pid} in {}",
                cx.log.display()
            ))
        }
    })
}

fn container_pid(cx: &Ctx, name: &str) -> Result<i32, String> {
    let out = cx.podman.run(&["inspect", "-f", "{{.State.Pid}}", name])?;
    out.parse()
        .map_err(|_| format!("podman inspect {name}: pid {out:?}"))
}

fn ctr_ip(cx: &Ctx, name: &str, net: &str) -> Result<String, String> {
    let f = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
    cx.podman.run(&["inspect", "-f", &f, name])
}

/// TCP greeting (`tcp 8080 from ...`) and UDP answer (`udp 9090 from ...`) on `port`.
fn serving(port: u16, which: usize) -> Result<(), String> {
    let ctx = |e: String| {
        if which > 0 {
            format!("container {which}: {e}")
        } else {
            e
        }
    };
    wait_greeting(lo(port), "tcp 8080 from ").map_err(ctx)?;
    udp_echo(lo(port), "udp 9090 from ").map_err(ctx)
}

/// The first global IPv4 address of this host (`ip -4 -o addr show scope global`).
fn host_ipv4() -> Option<Ipv4Addr> {
    let out = Command::new(sys::find_in_path("ip")?)
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut w = l.split_whitespace().skip_while(|w| *w != "inet").skip(1);
        w.next()?.split('/').next()?.parse().ok()
    })
}

/// Clients on the host's own non-loopback address are "remote" to the helper: the
/// container must see their address and port, over TCP and UDP, for each
/// `(tcp host port, tcp container port, udp host port, udp container port)`. Not
/// counted (one line says so) when the host has no such address.
fn check_client_seen(cx: &Ctx, r: &mut Report, name: &str, ports: &[(u16, u16, u16, u16)]) {
    let Some(ip) = cx.host_ip else {
        println!("   skipped - {name}: this host has no global IPv4 address");
        return;
    };
    let res = ports.iter().try_for_each(|&(tcp, cport, udp, uport)| {
        let mut c = connect(SocketAddr::from((ip, tcp)))?;
        let me = c.local_addr().map_err(|e| e.to_string())?;
        let g = read_line(&mut c).map_err(|e| format!("{ip}:{tcp}: {e}"))?;
        let want = format!("tcp {cport} from {me}");
        if g != want {
            return Err(format!("{ip}:{tcp}: container saw {g:?}, want {want:?}"));
        }
        let s = UdpSocket::bind((ip, 0)).map_err(|e| format!("UDP bind {ip}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        let me = s.local_addr().map_err(|e| e.to_string())?;
        let want = format!("udp {uport} from {me}: ping");
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            s.send_to(b"ping", (ip, udp))
                .map_err(|e| format!("UDP to {ip}:{udp}: {e}"))?;
            if let Ok(n) = s.recv(&mut buf) {
                let got = String::from_utf8_lossy(&buf[..n]);
                return if got == want {
                    Ok(())
                } else {
                    Err(format!(
                        "{ip}:{udp}/udp: container saw {got:?}, want {want:?}"
                    ))
                };
            }
        }
        Err(format!("no UDP reply from {ip}:{udp}"))
    });
    r.check(name, res);
}

/// Nothing greets on `port` any more (refused, reset or closed).
fn not_serving(port: u16) -> Result<(), String> {
    wait_for(Duration::from_secs(5), || match greeting(lo(port)) {
        Ok(g) => Err(format!("127.0.0.1:{port} still answers: {g:?}")),
        Err(_) => Ok(()),
    })
}

/// A long-lived TCP connection to an echo server.
struct Live {
    c: TcpStream,
}

impl Live {
    fn open(port: u16) -> Result<Live, String> {
        let mut c = connect(lo(port))?;
        read_line(&mut c).map_err(|e| format!("live connection to {port}: {e}"))?;
        Ok(Live { c })
    }

    fn echo(&mut self, msg: &str) -> Result<(), String> {
        self.c
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| format!("live connection: sending {msg:?}: {e}"))?;
        let got = read_line(&mut self.c).map_err(|e| format!("live connection: {msg:?}: {e}"))?;
        if got == msg {
            Ok(())
        } else {
            Err(format!("live connection: sent {msg:?}, got {got:?}"))
        }
    }
}

fn echo_live(live: &mut Result<Live, String>, msg: &str) -> Result<(), String> {
    match live {
        Ok(l) => l.echo(msg),
        Err(e) => Err(e.clone()),
    }
}

/// A process of ours, not a zombie.
struct Proc {
    pid: i32,
    comm: String,
    exe: Option<PathBuf>,
}

/// Processes (not zombies) whose real uid is `uid`.
fn user_procs(uid: u32) -> Vec<Proc> {
    let mut out = Vec::new();
    for pid in pids() {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or("")
                .to_owned()
        };
        let real_uid = field("Uid:").split_whitespace().next().map(str::to_owned);
        if real_uid.as_deref() != Some(uid.to_string().as_str()) || field("State:").starts_with('Z')
        {
            continue;
        }
        out.push(Proc {
            pid,
            comm: field("Name:"),
            exe: std::fs::read_link(format!("/proc/{pid}/exe")).ok(),
        });
    }
    out
}

/// A process's command line, arguments joined by spaces.
fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn network_procs(uid: u32) -> Vec<Proc> {
    user_procs(uid)
        .into_iter()
        .filter(|p| NETWORK_PROCS.contains(&p.comm.as_str()))
        .collect()
}

fn describe(procs: &[Proc]) -> String {
    procs
        .iter()
        .map(|p| format!("{} ({})", p.comm, p.pid))
        .collect::<Vec<_>>()
        .join(", ")
}

fn our_helpers(cx: &Ctx) -> BTreeSet<i32> {
    user_procs(cx.uid)
        .into_iter()
        .filter(|p| p.exe.as_deref() == Some(cx.ours.as_path()))
        .map(|p| p.pid)
        .collect()
}

/// Helpers podman ran that are not ours (its own `rootlessport`).
fn foreign_helpers(cx: &Ctx) -> Vec<Proc> {
    user_procs(cx.uid)
        .into_iter()
        .filter(|p| {
            (p.comm == "rootlessport" || p.comm.starts_with("rootlessport-"))
                && p.exe.as_deref() != Some(cx.ours.as_path())
        })
        .collect()
}

/// The one helper of ours that was not running in `before`.
fn new_helper(cx: &Ctx, before: &BTreeSet<i32>) -> Result<i32, String> {
    let mut last = Vec::new();
    wait_for(Duration::from_secs(10), || {
        last = our_helpers(cx).difference(before).copied().collect();
        if last.len() == 1 {
            Ok(())
        } else {
            let foreign = foreign_helpers(cx);
            Err(format!(
                "{} new helper(s) of ours running (want 1){}",
                last.len(),
                if foreign.is_empty() {
                    String::new()
                } else {
                    format!("; not ours: {}", describe(&foreign))
                }
            ))
        }
    })?;
    last.first()
        .copied()
        .ok_or_else(|| "no new helper".to_owned())
}

fn helper_gone(pid: Option<i32>) -> Result<(), String> {
    let pid = pid.ok_or("no helper recorded")?;
    wait_for(GONE_WAIT, || {
        if alive(pid) {
            Err(format!("helper {pid} still running"))
        } else {
            Ok(())
        }
    })
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// Every recorded helper is ours and alive, and (podman 4.x) in its own container's
/// netns, aimed at the container's address on `NET1`.
fn own_netns(cx: &Ctx, helper: &[Option<i32>; 3]) -> Result<(), String> {
    let ours = our_helpers(cx);
    if ours.len() != 3 {
        return Err(format!("{} helpers of ours running, want 3", ours.len()));
    }
    let foreign = foreign_helpers(cx);
    if !foreign.is_empty() {
        return Err(format!("not ours: {}", describe(&foreign)));
    }
    for (i, (h, name)) in helper.iter().zip(BRIDGE_CTRS).enumerate() {
        let pid = h.ok_or_else(|| format!("container {} has no helper", i + 1))?;
        if !ours.contains(&pid) {
            return Err(format!(
                "helper {pid} of container {} is not running",
                i + 1
            ));
        }
        let (hns, cns) = (netns_of(pid)?, netns_of(container_pid(cx, name)?)?);
        if hns != cns {
            return Err(format!(
                "helper {pid} is in {hns}, container {} in {cns}",
                i + 1
            ));
        }
        let ip = ctr_ip(cx, name, NET1)?;
        expect_log(cx, pid, &format!("(child IP {ip})"))?;
    }
    Ok(())
}

fn log_text(cx: &Ctx) -> String {
    std::fs::read_to_string(&cx.log).unwrap_or_default()
}

fn count_log(cx: &Ctx, pid: i32, what: &str) -> usize {
    let tag = format!("rootlessport[{pid}]: ");
    log_text(cx)
        .lines()
        .filter(|l| l.contains(&tag) && l.contains(what))
        .count()
}

fn expect_log(cx: &Ctx, pid: i32, what: &str) -> Result<(), String> {
    wait_for(Duration::from_secs(5), || {
        if count_log(cx, pid, what) > 0 {
            Ok(())
        } else {
            Err(format!(
                "no \"rootlessport[{pid}]: {what}\" line in {}",
                cx.log.display()
            ))
        }
    })
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Stop the user's podman pause process: `podman system migrate` stops it; failing
/// that, SIGKILL to the pid in its pid file. Left alone when it ran before this test
/// and we are not the test user (it belongs to the user's own podman then).
fn stop_pause(podman: &Podman, pause_file: &Path, was_running: bool) -> Result<(), String> {
    let is_test_user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .is_some_and(|u| u.name == testuser::TEST_USER);
    if was_running && !is_test_user {
        println!("   (the pause process ran before this test: left alone)");
        return Ok(());
    }
    let pid = read_pid(pause_file);
    let migrate = podman.run(&["system", "migrate"]);
    let Some(pid) = pid.filter(|p| alive(*p)) else {
        return migrate.map(|_| ());
    };
    if wait_for(Duration::from_secs(5), || {
        if alive(pid) {
            Err(String::new())
        } else {
            Ok(())
        }
    })
    .is_ok()
    {
        return Ok(());
    }
    // Still there: kill it by its pid (it is ours: same uid, podman's pause process).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill -9 {pid} (pause process): {e}"))?;
    wait_for(GONE_WAIT, || {
        if alive(pid) {
            Err(format!("pause process {pid} still running"))
        } else {
            Ok(())
        }
    })?;
    match migrate {
        Ok(_) => Err(format!(
            "podman system migrate left the pause process {pid}; killed it"
        )),
        Err(e) => Err(format!("{e}; pause process {pid} killed")),
    }
}
