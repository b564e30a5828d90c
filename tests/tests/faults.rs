//! Faults around a running helper: the container going away under live connections, a
//! server that stops reading, an exit pipe closed early, signals, slirp4netns dying at
//! the wrong time, a reload under 1,000 live connections. Each ends in the right error
//! or a clean exit, with no zombie and no fd growth.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rootlessport::launcher::{Launcher, RootlessPort};
use rootlessport::Config;
use slirp_config::PortMapping;
use slirp_spawn::process::open_fds;
use tests::{
    cloexec_pipe, eventually, process_exists, require_harness, rootlessport_bin, xtask_bin,
    KillOnDrop, TestNetns,
};

fn pm(host_port: u16, container_port: u16) -> PortMapping {
    PortMapping::new("127.0.0.1", host_port, container_port, 1, "tcp")
}

fn launch(
    ns: &TestNetns,
    tmp: &std::path::Path,
    mappings: Vec<PortMapping>,
    cni: bool,
) -> (RootlessPort, OwnedFd) {
    let cfg = Config::new(
        "faults",
        ns.path().display().to_string(),
        "127.0.0.1",
        tmp.display().to_string(),
    )
    .with_mappings(mappings)
    .with_rootless_cni(cni);
    let (r, w) = cloexec_pipe();
    (Launcher::new(rootlessport_bin()).start(&cfg, r).unwrap(), w)
}

fn finish(mut h: RootlessPort, w: OwnedFd) {
    let pid = h.pid();
    drop(w);
    let s = h
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("helper did not exit");
    assert!(s.success(), "{s}");
    assert!(!process_exists(pid), "zombie left");
}

/// An echo server process inside the netns (so that killing it closes its sockets),
/// killed and reaped when dropped: a failing test leaves no server behind.
fn echo_process(ns: &TestNetns, port: u16) -> KillOnDrop {
    let c = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(xtask_bin())
        .args(["echo-server", "--plain", "--tcp", &port.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(c)
}

fn echo(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    c.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    c.read_exact(&mut buf)?;
    if buf == msg {
        Ok(())
    } else {
        Err(std::io::Error::other("wrong echo"))
    }
}

fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

fn wait_port(port: u16) {
    assert!(eventually(10, || TcpStream::connect(("127.0.0.1", port))
        .map(|mut c| echo(&mut c, b"?").is_ok())
        .unwrap_or(false)));
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn container_goes_away_under_live_connections() {
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let tmp = tempfile::tempdir().unwrap();
    let mut server = echo_process(&ns, 80);
    let (h, w) = launch(&ns, tmp.path(), vec![pm(29200, 80)], false);
    wait_port(29200);
    let fds_before = open_fds(h.pid()).unwrap().len();
    let mut conns: Vec<TcpStream> = (0..3).map(|_| connect(29200)).collect();
    for c in &mut conns {
        echo(c, b"alive").unwrap();
    }
    // The container's processes die: its server and the namespace's holder.
    server.kill_now();
    drop(ns);
    for c in &mut conns {
        let mut buf = [0u8; 8];
        let r = c.read(&mut buf);
        assert!(
            matches!(r, Ok(0)) || r.is_err(),
            "a dead server must end the connection: {r:?}"
        );
    }
    drop(conns);
    // New connections fail cleanly; the helper is alive and holds no more fds than before.
    let mut c = connect(29200);
    let mut buf = [0u8; 8];
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    drop(c);
    assert!(process_exists(h.pid()));
    assert!(
        eventually(5, || open_fds(h.pid()).unwrap().len() <= fds_before),
        "fds grew"
    );
    finish(h, w);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn a_server_that_stops_reading_bounds_the_helper() {
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let tmp = tempfile::tempdir().unwrap();
    // Accepts, then never reads.
    let l = ns.run(|| TcpListener::bind("127.0.0.1:81").unwrap());
    let held = std::thread::spawn(move || l.accept().map(|(s, _)| s));
    let (h, w) = launch(&ns, tmp.path(), vec![pm(29210, 81)], false);
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = rss(h.pid());
    let mut c = connect(29210);
    c.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break, // blocked: backpressure reached the client
        }
    }
    let during = rss(h.pid());
    println!(
        "client pushed {} MiB before blocking; helper RSS {before} kB -> {during} kB",
        sent >> 20
    );
    assert!(
        sent < 256 << 20,
        "the helper kept accepting data: {sent} bytes"
    );
    assert!(
        during < before + 8 * 1024,
        "helper memory grew with the unread data: {before} -> {during} kB"
    );
    drop(c);
    drop(held.join().unwrap());
    finish(h, w);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn exit_pipe_closed_during_startup() {
    require_harness();
    let ns = TestNetns::new();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::new(
        "early",
        ns.path().display().to_string(),
        "",
        tmp.path().display().to_string(),
    )
    .with_mappings((0..500).map(|i| pm(30000 + i, 80)).collect())
    .with_rootless_cni(true);
    let (r, w) = cloexec_pipe();
    drop(w); // the container is already gone
    let mut h = Launcher::new(rootlessport_bin()).start(&cfg, r).unwrap();
    let s = h
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("must exit at once");
    assert!(s.success());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "reload socket or dir left"
    );
    assert!(TcpListener::bind("127.0.0.1:30000").is_ok());
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn signals_at_any_time() {
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let tmp = tempfile::tempdir().unwrap();
    let _server = echo_process(&ns, 80); // killed when the test ends
                                         // SIGPIPE is ignored: it keeps serving.
    let (h, w) = launch(&ns, tmp.path(), vec![pm(29220, 80)], true);
    wait_port(29220);
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(h.pid() as i32, libc::SIGPIPE) };
    std::thread::sleep(Duration::from_millis(100));
    assert!(process_exists(h.pid()));
    echo(&mut connect(29220), b"after SIGPIPE").unwrap();
    // SIGINT ends it cleanly, like SIGTERM: exit 0, reload socket gone.
    // SAFETY: as above.
    unsafe { libc::kill(h.pid() as i32, libc::SIGINT) };
    let mut h = h;
    assert!(h
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .success());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    drop(w);
    // SIGTERM during startup (10,000 ports to bind, below the ephemeral range so that no
    // connection of a test running beside this one holds one): whatever the moment, the process
    // ends, is reaped, and holds no port, and nothing it made is left: before anything
    // is made the signal's default action ends it; from then on the signal is kept, and
    // the helper stops cleanly right after ready (exit 0, control socket removed).
    let start = |tmp: &std::path::Path| {
        let mut cfg = Config::new(
            "sig",
            ns.path().display().to_string(),
            "",
            tmp.display().to_string(),
        )
        .with_mappings((0..10000).map(|i| pm(10000 + i as u16, 80)).collect());
        (cfg.exit_fd, cfg.ready_fd) = (3, 4);
        let (er, ew) = cloexec_pipe();
        let (rr, rw) = cloexec_pipe();
        let helper = slirp_spawn::process::HelperCommand::new(rootlessport_bin())
            .stdin_bytes(serde_json::to_vec(&cfg).unwrap())
            .leak_fd(er, 3)
            .leak_fd(rw, 4)
            .spawn()
            .unwrap();
        (helper, ew, rr)
    };
    // How long a start takes here, to spread the signals over it.
    let t0 = Instant::now();
    let (mut helper, ew, rr) = start(tmp.path());
    if let Err(e) = helper.await_ready(&rr, Instant::now() + Duration::from_secs(20)) {
        panic!("the 10,000-port helper never got ready: {e}");
    }
    let startup = t0.elapsed();
    drop(ew);
    assert!(helper
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .success());
    for step in 0..=20u32 {
        let delay = startup * step / 20;
        let (mut helper, _ew, _rr) = start(tmp.path());
        std::thread::sleep(delay);
        helper.signal(libc::SIGTERM).unwrap();
        let status = helper
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("SIGTERM after {delay:?} did not end it"));
        {
            use std::os::unix::process::ExitStatusExt;
            assert!(
                status.success() || status.signal() == Some(libc::SIGTERM),
                "SIGTERM after {delay:?} (start-up {startup:?}): {status}"
            );
        }
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "SIGTERM after {delay:?} (start-up {startup:?}) left the control socket"
        );
        // No listener left on the first or last port. (Binding them to find out could
        // fail on an ephemeral port another test's connection happens to hold.)
        assert!(
            eventually(5, || !listening(10000) && !listening(19999)),
            "a listener outlived the helper (SIGTERM after {delay:?})"
        );
    }
}

/// How a test sends a stop signal.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// To the process, twice at once: SIGTERM, then SIGINT while it stops.
    TermThenInt,
    /// To one thread that is not the main one (`tgkill`).
    ToAnotherThread(i32),
}

/// SIGTERM and SIGINT end the helper cleanly however they are sent: to the process (a
/// second one while it stops changes nothing), or to any one of its threads (`tgkill`:
/// a pool worker, or the binder thread of a single-threaded helper). Each time: exit 0
/// under live connections, which close, the reload socket removed, the port free.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn stop_signals_end_the_helper_cleanly_whichever_thread_gets_them() {
    use std::os::unix::process::ExitStatusExt;
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let _server = echo_process(&ns, 80); // killed when the test ends
    let bin = tempfile::tempdir().unwrap();
    let pool =
        tests::rootlessport_wrapper(bin.path(), "rootlessport", "export ROOTLESSPORT_THREADS=4");
    let cases = [
        (28696u16, 4, Sent::TermThenInt),
        (28697, 4, Sent::ToAnotherThread(libc::SIGINT)),
        (28698, 1, Sent::ToAnotherThread(libc::SIGTERM)),
    ];
    for (port, threads, sent) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = Config::new(
            "faults-stop",
            ns.path().display().to_string(),
            "127.0.0.1",
            tmp.path().display().to_string(),
        )
        .with_mappings(vec![pm(port, 80)])
        .with_rootless_cni(true);
        let launcher = if threads > 1 {
            Launcher::new(&pool)
        } else {
            Launcher::new(rootlessport_bin())
        };
        let (r, w) = cloexec_pipe();
        let mut h = launcher.start(&cfg, r).unwrap();
        wait_port(port);
        let pid = h.pid() as i32;
        let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            tids.len() > threads,
            "{threads} event-loop threads: {tids:?}"
        );
        let mut live: Vec<TcpStream> = (0..8).map(|_| connect(port)).collect();
        for c in &mut live {
            echo(c, b"before the signal").unwrap();
        }
        match sent {
            Sent::TermThenInt => {
                // SAFETY: signalling a child we own.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            Sent::ToAnotherThread(signal) => {
                let tid = *tids.iter().find(|&&t| t != pid).unwrap();
                // SAFETY: tgkill to a thread of a child we own, with a valid signal.
                let sent = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
                assert_eq!(sent, 0, "tgkill");
            }
        }
        let status = h
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("{sent:?} ({threads} threads) did not end the helper"));
        assert!(
            status.success(),
            "{sent:?} ({threads} threads): {status} (killed by {:?})",
            status.signal()
        );
        assert!(!process_exists(pid as u32), "zombie left");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        assert!(
            eventually(5, || !listening(port)),
            "port {port} still bound"
        );
        for c in &mut live {
            let mut b = [0u8; 1];
            assert!(
                matches!(c.read(&mut b), Ok(0) | Err(_)),
                "a connection outlived the helper"
            );
        }
        drop(w);
    }
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn reload_under_a_thousand_live_connections() {
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let tmp = tempfile::tempdir().unwrap();
    let _server = echo_process(&ns, 80); // killed when the test ends
    let (h, w) = launch(&ns, tmp.path(), vec![pm(29230, 80)], true);
    wait_port(29230);
    let fds_idle = open_fds(h.pid()).unwrap().len();
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| connect(29230)).collect();
    for c in &mut conns {
        echo(c, b"1").unwrap();
    }
    rootlessport::reload::reload(tmp.path(), "faults", "127.0.0.1").unwrap();
    let mut broken = 0;
    for c in &mut conns {
        if echo(c, b"2").is_err() {
            broken += 1;
        }
    }
    assert_eq!(broken, 0, "connections cut by the reload");
    for c in &conns {
        let _ = c.shutdown(Shutdown::Both);
    }
    drop(conns);
    assert!(
        eventually(10, || open_fds(h.pid()).unwrap().len() <= fds_idle + 2),
        "fds did not come back: {} vs {fds_idle}",
        open_fds(h.pid()).unwrap().len()
    );
    finish(h, w);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn slirp4netns_dying_while_ports_are_published() {
    require_harness();
    let ns = TestNetns::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = slirp_spawn::SlirpSpec::new(ns.netns(), tmp.path(), "dies").with_api_socket();
    spec.options = slirp_config::parse_options(["enable_ipv6=false"]).unwrap();
    let slirp = slirp_spawn::Slirp4netns::start(&spec).unwrap();
    let sock = slirp.api_socket().unwrap().to_owned();
    // SAFETY: killing the slirp4netns we started.
    unsafe { libc::kill(slirp.pid() as i32, libc::SIGKILL) };
    let t = Instant::now();
    let e = slirp_portfwd::publish_ports(&sock, slirp.pidfd(), &[pm(29240, 80)]).unwrap_err();
    println!("publication noticed the death after {:?}: {e}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));
    let text = e.to_string();
    assert_eq!(
        text,
        format!(
            "slirp4netns exited before its API socket {} was ready",
            sock.display()
        )
    );
    let pid = slirp.pid();
    slirp.stop().unwrap();
    assert!(!process_exists(pid));
    assert!(!sock.exists());
}

/// Whether a TCP socket listens on `port` in this netns (`ss`, from iproute2).
fn listening(port: u16) -> bool {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    assert!(out.status.success(), "ss failed");
    !out.stdout.is_empty()
}

/// A pool of event-loop threads (`ROOTLESSPORT_THREADS=2`) when no thread can be
/// started (here `clone` and `clone3` fail, as at a thread limit): one error line on
/// stdout and exit 1 before ready, not a panic or a helper that never answers (tokio
/// panics when it cannot start a worker, then waits forever for the ones it started).
/// Nothing stays bound.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn no_threads_for_the_event_loop_pool_is_one_error_line() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::process::CommandExt;
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(
        "faults-threads",
        ns.path().display().to_string(),
        "127.0.0.1",
        tmp.path().display().to_string(),
    )
    .with_mappings(vec![pm(28694, 80)]);
    (cfg.exit_fd, cfg.ready_fd) = (3, 4);
    // No thread can be made in the helper: clone and clone3 fail (ENOSYS).
    let program = tests::deny_filter(&[libc::SYS_clone, libc::SYS_clone3]);
    // The pipes' ends go to fds 3 (ExitFD) and 4 (ReadyFD): first moved above both.
    let high = |fd: OwnedFd| {
        let moved = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)).unwrap();
        // SAFETY: F_DUPFD_CLOEXEC just returned this fd, owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(moved) }
    };
    let (exit_r, exit_w) = cloexec_pipe();
    let (ready_r, ready_w) = cloexec_pipe();
    let (exit_r, ready_w) = (high(exit_r), high(ready_w));
    let (er, rw) = (exit_r.as_raw_fd(), ready_w.as_raw_fd());
    let mut cmd = Command::new(rootlessport_bin());
    cmd.env("ROOTLESSPORT_THREADS", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec this only calls dup2 and the seccomp syscalls
    // (the filter was compiled before the fork), all async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(er, 3) < 0 || libc::dup2(rw, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            seccompiler::apply_filter(&program).map_err(std::io::Error::other)
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop((exit_r, ready_w));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&cfg).unwrap())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the helper neither became ready nor exited within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "stdout {out:?}, stderr {err:?}");
    assert!(
        out.starts_with("starting the event loop: ")
            && out.ends_with('\n')
            && out.lines().count() == 1,
        "stdout {out:?}"
    );
    assert!(!err.contains("panicked"), "stderr {err:?}");
    let mut ready = Vec::new();
    std::fs::File::from(ready_r)
        .read_to_end(&mut ready)
        .unwrap();
    assert_eq!(ready, b"", "ReadyFD was written");
    assert!(!listening(28694), "port 28694 left bound");
    drop(exit_w);
}
