//! slirp-spawn against the real slirp4netns (and fake ones for failures), each test in
//! namespaces of its own inside the `cargo xtask itest` harness.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use slirp_spawn::process::{open_fds, HelperCommand, LogFile};
use slirp_spawn::{Netns, Slirp4netns, SlirpSpec};
use tests::{
    eventually, fake_slirp4netns, process_exists, processes_in_group, processes_mentioning,
    require_harness, TestNetns,
};

fn spec(ns: &TestNetns, dir: &tempfile::TempDir, opts: &[&str]) -> SlirpSpec {
    let mut s = SlirpSpec::new(ns.netns(), dir.path(), "ctr-test");
    s.options = slirp_config::parse_options(opts).unwrap();
    s
}

/// Everything a stopped slirp4netns must not leave: process, group, files.
fn assert_nothing_left(pid: Option<u32>, dir: &tempfile::TempDir) {
    if let Some(pid) = pid {
        assert!(
            eventually(5, || !process_exists(pid)),
            "slirp4netns {pid} (or its zombie) still there"
        );
        assert!(
            processes_in_group(pid).is_empty(),
            "processes left in group {pid}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with("slirp4netns")) // fake binaries
        .collect();
    assert!(left.is_empty(), "files left in the tmp dir: {left:?}");
}

fn accept_dad(ns: &TestNetns, dev: &str) -> String {
    ns.sh(&format!("cat /proc/sys/net/ipv6/conf/{dev}/accept_dad"))
        .trim()
        .to_owned()
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn default_network_mtu_ipv6_and_dad() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    ns.sh("echo 2 > /proc/sys/net/ipv6/conf/default/accept_dad");

    let slirp = Slirp4netns::start(&spec(&ns, &dir, &[])).unwrap();
    println!(
        "spawn-to-ready (default options): {:?}",
        slirp.ready_after()
    );
    assert_eq!(slirp.guest_ip().to_string(), "10.0.2.100");
    assert_eq!(slirp.gateway().to_string(), "10.0.2.2");
    assert_eq!(slirp.dns().to_string(), "10.0.2.3");
    assert_eq!(slirp.gateway6().unwrap().to_string(), "fd00::2");

    let link = ns.sh("ip -o link show tap0");
    assert!(link.contains("mtu 65520"), "{link}");
    assert!(link.contains(",UP"), "{link}");
    let v4 = ns.sh("ip -o -4 addr show dev tap0");
    assert!(v4.contains("inet 10.0.2.100/24"), "{v4}");
    let route = ns.sh("ip -4 route show default");
    assert!(route.contains("via 10.0.2.2 dev tap0"), "{route}");
    assert!(
        eventually(10, || ns
            .sh("ip -o -6 addr show dev tap0 scope global")
            .contains("inet6 fd00::")),
        "no fd00::/64 address on tap0: {}",
        ns.sh("ip -o -6 addr show dev tap0")
    );
    // tap0 was created while DAD was off; the default is back to what it was.
    assert_eq!(accept_dad(&ns, "tap0"), "0");
    assert_eq!(accept_dad(&ns, "default"), "2");

    let pid = slirp.pid();
    slirp.stop().unwrap();
    assert_nothing_left(Some(pid), &dir);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn custom_cidr_mtu_without_ipv6_in_pid_mode() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    ns.sh("echo 2 > /proc/sys/net/ipv6/conf/default/accept_dad");
    let mut s = spec(
        &ns,
        &dir,
        &["cidr=10.77.0.0/24", "mtu=1500", "enable_ipv6=false"],
    );
    s.netns = Netns::Pid(ns.pid());
    let slirp = Slirp4netns::start(&s).unwrap();
    assert_eq!(slirp.guest_ip().to_string(), "10.77.0.100");
    assert_eq!(slirp.gateway6(), None);
    let v4 = ns.sh("ip -o -4 addr show dev tap0");
    assert!(v4.contains("inet 10.77.0.100/24"), "{v4}");
    assert!(ns.sh("ip -o link show tap0").contains("mtu 1500"));
    assert!(ns
        .sh("ip -4 route show default")
        .contains("via 10.77.0.2 dev tap0"));
    // IPv6 off: no DAD dance, no fd00:: address.
    assert_eq!(accept_dad(&ns, "default"), "2");
    assert!(!ns.sh("ip -o -6 addr show dev tap0").contains("fd00::"));
    drop(slirp); // Drop stops it too.
}

/// A server on the harness's 127.0.0.1 that greets whoever connects.
fn greeter() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"hello from the host");
        }
    });
    addr
}

fn fetch_from_netns(ns: &TestNetns, to: SocketAddr) -> Result<String, String> {
    ns.run(move || {
        let mut c =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).map_err(|e| e.to_string())?;
        if s.is_empty() {
            Err("connection closed without data".into())
        } else {
            Ok(s)
        }
    })
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn host_loopback_allowed_only_when_asked() {
    require_harness();
    let host = greeter();
    let via_gateway = SocketAddr::from(([10, 0, 2, 2], host.port()));

    let allowed_ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        &allowed_ns,
        &dir,
        &["allow_host_loopback=true", "enable_ipv6=false"],
    );
    let slirp = Slirp4netns::start(&s).unwrap();
    assert_eq!(
        fetch_from_netns(&allowed_ns, via_gateway).unwrap(),
        "hello from the host"
    );
    slirp.stop().unwrap();

    let denied_ns = TestNetns::new();
    let dir2 = tempfile::tempdir().unwrap();
    let slirp = Slirp4netns::start(&spec(&denied_ns, &dir2, &["enable_ipv6=false"])).unwrap();
    let res = fetch_from_netns(&denied_ns, via_gateway);
    assert!(
        res.is_err(),
        "the default must refuse the host's loopback: {res:?}"
    );
    slirp.stop().unwrap();
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn failing_helper_reports_its_log_at_once_and_restores_dad() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    ns.sh("echo 2 > /proc/sys/net/ipv6/conf/default/accept_dad");
    let bin = fake_slirp4netns(
        dir.path(),
        "echo 'fatal: cannot frobnicate tap0' >&2\nexit 1",
    );
    let mut s = spec(&ns, &dir, &[]);
    s.binary = Some(bin.clone());
    // Warm the feature cache so the figure below is the launch alone.
    slirp_config::check_slirp_flags(&bin).unwrap();
    let t = Instant::now();
    let err = Slirp4netns::start(&s).unwrap_err();
    let took = t.elapsed();
    println!("death detected (fake slirp4netns exiting 1) in {took:?}");
    assert_eq!(
        err.to_string(),
        r#"slirp4netns failed: "fatal: cannot frobnicate tap0\n""#
    );
    assert_eq!(
        accept_dad(&ns, "default"),
        "2",
        "DAD not restored after a failure"
    );
    assert_nothing_left(None, &dir);

    let bin = fake_slirp4netns(dir.path(), "kill -9 $$");
    s.binary = Some(bin);
    let err = Slirp4netns::start(&s).unwrap_err();
    assert_eq!(err.to_string(), "slirp4netns killed by signal");
    assert_eq!(accept_dad(&ns, "default"), "2");
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn helper_that_never_gets_ready_hits_the_deadline() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_slirp4netns(dir.path(), "echo 'waiting forever'\nexec sleep 61.1");
    let mut s = spec(&ns, &dir, &["enable_ipv6=false"]);
    s.binary = Some(bin);
    s.ready_timeout = Duration::from_millis(400);
    let t = Instant::now();
    let err = Slirp4netns::start(&s).unwrap_err();
    println!("deadline error after {:?}", t.elapsed());
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        err.to_string(),
        r#"slirp4netns did not become ready within 400ms: "waiting forever\n""#
    );
    // The sleeping helper was killed and reaped: nothing is sleeping 61.1 s, a length
    // this test alone uses (the tests of this file run at once, and anyone on the
    // machine may be running `sleep 60`, which once failed this check; one left by a
    // killed run is gone a minute later).
    assert!(eventually(5, || processes_mentioning("sleep 61.1").is_empty()));
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn helper_that_closes_ready_without_writing() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_slirp4netns(dir.path(), "exec 4>&-\necho 'closed it'\nexec sleep 61.2");
    let mut s = spec(&ns, &dir, &["enable_ipv6=false"]);
    s.binary = Some(bin);
    let err = Slirp4netns::start(&s).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"slirp4netns closed its ready fd without signalling readiness: "closed it\n""#
    );
    // Killed and reaped on this path too.
    assert!(eventually(5, || processes_mentioning("sleep 61.2").is_empty()));
}

/// An fd opened without O_CLOEXEC, as careless code in an engine might: no helper may get it.
fn careless_fd(dir: &tempfile::TempDir) -> (OwnedFd, String) {
    let path = dir.path().join("careless");
    std::fs::write(&path, "x").unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: open(2) on a valid C string; we own the returned fd.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0);
    // SAFETY: fd was just opened and is owned by nobody else.
    (
        unsafe { OwnedFd::from_raw_fd(fd) },
        path.display().to_string(),
    )
}

fn fd_targets(pid: u32) -> Vec<(i32, String)> {
    open_fds(pid)
        .unwrap()
        .into_iter()
        .map(|fd| {
            let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (fd, t)
        })
        .collect()
}

fn pipe_inode(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .display()
        .to_string()
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn process_piece_leaks_exactly_the_chosen_fds() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let (_careless, careless_path) = careless_fd(&dir);
    let (a_r, a_w) = tests::cloexec_pipe();
    let (b_r, b_w) = tests::cloexec_pipe();
    let (a_name, b_name) = (pipe_inode(&a_r), pipe_inode(&b_w));
    let log = LogFile::create_unlinked(dir.path(), "helper.log").unwrap();
    assert!(
        !dir.path().join("helper.log").exists(),
        "log must be unlinked at once"
    );
    let mut helper = HelperCommand::new("sleep")
        .args(["30"])
        .leak_fd(a_r, 3)
        .leak_fd(b_w, 4)
        .log(&log)
        .unwrap()
        .new_mount_namespace(true)
        .spawn()
        .unwrap();
    let pid = helper.pid();
    // Right after exec the dynamic loader may still hold a library file open for a
    // moment; a leaked fd never closes.
    let settled = |fds: &[(i32, String)]| fds.iter().map(|(n, _)| *n).eq(0..5);
    tests::eventually(5, || settled(&fd_targets(pid)));
    let fds = fd_targets(pid);
    assert!(settled(&fds), "{fds:?}");
    assert_eq!(fds[3].1, a_name);
    assert_eq!(fds[4].1, b_name);
    assert_eq!(fds[0].1, "/dev/null");
    assert!(fds[1].1.ends_with("helper.log (deleted)"), "{fds:?}");
    assert!(!fds.iter().any(|(_, t)| *t == careless_path));
    // Its own process group and its own mount namespace.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let pgrp: u32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, pid);
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    drop((a_w, b_r));
    let status = helper.kill().unwrap();
    assert!(!status.success());
    assert!(!process_exists(pid));
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn process_piece_feeds_stdin_and_captures_the_log() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    // Bigger than a pipe buffer: the payload must not need a writer thread.
    for (repeat, expect_len) in [(4_000usize, None), (10_000, Some(64 * 1024))] {
        let log = LogFile::create_unlinked(dir.path(), "cat.log").unwrap();
        let payload = "{\"Mappings\":[]}\n".repeat(repeat);
        let mut helper = HelperCommand::new("sh")
            .args(["-c", "cat; echo done >&2"])
            .stdin_bytes(payload.clone())
            .log(&log)
            .unwrap()
            .spawn()
            .unwrap();
        let status = helper
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert!(status.success());
        let got = log.contents();
        let all = format!("{payload}done\n");
        match expect_len {
            // Small logs come back whole.
            None => assert_eq!(got, all),
            // Large ones are cut to their end, where the reason for a failure is.
            Some(n) => {
                assert_eq!(got.len(), n);
                assert!(all.ends_with(&got));
            }
        }
    }
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn real_slirp4netns_gets_only_its_pipes() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let (_careless, careless_path) = careless_fd(&dir);
    let slirp = Slirp4netns::start(&spec(&ns, &dir, &["enable_ipv6=false"])).unwrap();
    let fds = fd_targets(slirp.pid());
    let exit_end = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        slirp.exit_fd().unwrap().as_raw_fd()
    ))
    .unwrap();
    let fd3 = fds.iter().find(|(n, _)| *n == 3).map(|(_, t)| t.clone());
    assert_eq!(fd3.as_deref(), Some(exit_end.to_str().unwrap()), "{fds:?}");
    assert!(!fds.iter().any(|(_, t)| *t == careless_path), "{fds:?}");
    assert!(fds
        .iter()
        .any(|(_, t)| t.ends_with("slirp4netns-ctr-test.log (deleted)")));
    // The sandbox (1.2.0 has it) runs in a mount namespace of its own.
    assert_ne!(
        std::fs::read_link(format!("/proc/{}/ns/mnt", slirp.pid())).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    slirp.stop().unwrap();
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn stop_leaves_nothing_behind() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let s = spec(&ns, &dir, &["port_handler=slirp4netns"]);
    let slirp = Slirp4netns::start(&s).unwrap();
    let sock = slirp.api_socket().unwrap().to_owned();
    assert_eq!(sock, dir.path().join("ctr-test.net"));
    assert!(eventually(5, || sock.exists()));
    let pid = slirp.pid();
    slirp.stop().unwrap();
    assert!(!sock.exists());
    assert_nothing_left(Some(pid), &dir);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn drop_stops_and_release_hands_to_the_reaper() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let slirp = Slirp4netns::start(&spec(&ns, &dir, &["enable_ipv6=false"])).unwrap();
    let pid = slirp.pid();
    drop(slirp);
    assert_nothing_left(Some(pid), &dir);

    let ns2 = TestNetns::new();
    let mut slirp = Slirp4netns::start(&spec(&ns2, &dir, &["enable_ipv6=false"])).unwrap();
    let exit_fd = slirp.take_exit_fd().unwrap();
    let pid = slirp.release();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        process_exists(pid),
        "released slirp4netns must keep running"
    );
    assert_eq!(slirp_spawn::reaper::pending(), 1);
    // The monitor (here: us) closes the exit pipe: slirp4netns exits and is reaped.
    drop(exit_fd);
    assert!(
        eventually(5, || !process_exists(pid)),
        "released helper left a zombie"
    );
    assert!(eventually(5, || slirp_spawn::reaper::pending() == 0));
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn bad_inputs_give_clear_errors() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let mut s = SlirpSpec::new(Netns::Path("/nonexistent/netns".into()), dir.path(), "c1");
    let e = Slirp4netns::start(&s).unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot open network namespace /nonexistent/netns: No such file or directory (os error 2)"
    );
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "").unwrap();
    s.netns = Netns::Path(file.clone());
    let e = Slirp4netns::start(&s).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "cannot open network namespace {}: not a network namespace",
            file.display()
        )
    );
    std::fs::remove_file(&file).unwrap();

    // A namespace bind-mounted on a file, as podman names its netns (/run/netns/X):
    // opened by that path, it is one.
    let ns = TestNetns::new();
    let named = dir.path().join("named-netns");
    std::fs::write(&named, "").unwrap();
    nix::mount::mount(
        Some(&ns.path()),
        &named,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    // The fd is closed before the umount, which it would keep busy.
    let opened = slirp_spawn::open_netns(&Netns::Path(named.clone())).map(drop);
    nix::mount::umount(&named).unwrap();
    std::fs::remove_file(&named).unwrap();
    assert!(opened.is_ok(), "{opened:?}");

    for (id, why) in [
        ("", "it is empty"),
        ("a/b", "it contains '/'"),
        ("..", "it is a relative directory name"),
    ] {
        let s = SlirpSpec::new(ns.netns(), dir.path(), id);
        assert_eq!(
            Slirp4netns::start(&s).unwrap_err().to_string(),
            format!("invalid container id {}: {why}", slirp_config::go_quote(id))
        );
    }
    let mut s = SlirpSpec::new(ns.netns(), dir.path(), "c1").with_api_socket();
    s.api_socket = Some(dir.path().join("x".repeat(120)));
    let e = Slirp4netns::start(&s).unwrap_err().to_string();
    assert!(e.contains("unix sockets allow at most 107"), "{e}");

    let mut s = SlirpSpec::new(ns.netns(), "/nonexistent-tmp", "c1");
    s.options.enable_ipv6 = false;
    let e = Slirp4netns::start(&s).unwrap_err().to_string();
    assert_eq!(
        e,
        "creating the slirp4netns log file in /nonexistent-tmp: No such file or directory (os error 2)"
    );

    let mut s = SlirpSpec::new(ns.netns(), dir.path(), "c1");
    s.options = slirp_config::parse_options(["cidr=10.0.2.0/26"]).unwrap();
    assert_eq!(
        Slirp4netns::start(&s).unwrap_err().to_string(),
        "calculated ip address 10.0.2.100 is not within given subnet 10.0.2.0/26"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn old_binary_without_netns_type_gets_a_pid() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    // A slirp4netns that advertises 0.3.0's options (no --netns-type) but is the real one.
    let real = tests::slirp4netns();
    let help = std::fs::read_to_string(tests::fixture("slirp4netns-0.3.0-help.txt")).unwrap();
    let old = dir.path().join("slirp4netns");
    std::fs::write(
        &old,
        format!("#!/bin/sh\nif [ \"$1\" = --help ]; then cat <<'EOF'\n{help}EOF\nexit 0\nfi\necho \"$@\" > {}/args\nexec {} \"$@\"\n", dir.path().display(), real.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = spec(
        &ns,
        &dir,
        &["enable_ipv6=false", "port_handler=slirp4netns"],
    );
    s.binary = Some(old);
    let slirp = Slirp4netns::start(&s).unwrap();
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    assert!(!args.contains("--netns-type"), "{args}");
    assert!(
        !args.contains("--enable-sandbox"),
        "0.3.0 has no sandbox: {args}"
    );
    let pid: u32 = args
        .split_whitespace()
        .rev()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // The placeholder is gone once slirp4netns is ready, and the network still works.
    assert!(
        eventually(5, || !process_exists(pid)),
        "netns placeholder left running"
    );
    assert!(ns
        .sh("ip -o -4 addr show dev tap0")
        .contains("inet 10.0.2.100/24"));
    let id = slirp_portfwd::add_hostfwd(slirp.api_socket().unwrap(), "tcp", "127.0.0.1", 28700, 80)
        .unwrap();
    assert_eq!(
        slirp_portfwd::list_hostfwd(slirp.api_socket().unwrap()).unwrap()[0].id,
        id
    );
    std::fs::remove_file(dir.path().join("args")).unwrap();
    slirp.stop().unwrap();
}

/// slirp4netns's sandbox (a mount namespace of its own, then `pivot_root` and an
/// unmount of the old root) leaves the caller's mounts alone: a named netns (`ip netns
/// add` makes /run/netns a shared mount) is still mounted, and usable, after a run.
/// Before the child's mounts were made private, the sandbox's unmount reached
/// /run/netns through the shared mount and unmounted every named netns.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn sandbox_leaves_named_netns_mounted() {
    require_harness();
    let name = format!("rn-keep-{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
    let mounted = || {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some(&format!("/run/netns/{name}")))
    };
    let before = mounted();

    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let slirp = Slirp4netns::start(&spec(&ns, &dir, &[])).unwrap();
    let sandboxed = slirp.features().has_enable_sandbox;
    let pid = slirp.pid();
    slirp.stop().unwrap();
    let after = mounted();
    let usable = ip(&["netns", "exec", &name, "true"]);
    let deleted = ip(&["netns", "del", &name]);

    assert!(before, "ip netns add mounted nothing at /run/netns/{name}");
    assert!(
        sandboxed,
        "this slirp4netns has no --enable-sandbox to test"
    );
    assert!(
        after,
        "/run/netns/{name} unmounted by slirp4netns's sandbox"
    );
    assert!(usable, "ip netns exec {name} failed after slirp4netns ran");
    assert!(deleted, "ip netns del {name}");
    assert_nothing_left(Some(pid), &dir);
}
