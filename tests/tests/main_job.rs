//! The newcomer's commands: `cargo xtask demo` and `cargo xtask run`, end to end.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{
    eventually, process_exists, processes_mentioning, require_harness, rootlessport_bin, xtask_bin,
};

fn xtask() -> Command {
    let mut c = Command::new(xtask_bin());
    // The debug build of the helper: no release build inside the test.
    c.env("ROOTLESSPORT_BIN", rootlessport_bin());
    c
}

/// What a child writes on a pipe or a pty, read on a thread, so that a line that never
/// comes fails the test instead of hanging it.
struct Output {
    rx: std::sync::mpsc::Receiver<String>,
    log: String,
}

impl Output {
    fn of(mut from: impl Read + Send + 'static) -> Output {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Output {
            rx,
            log: String::new(),
        }
    }

    /// Read until `want` has come (20 s at most); false if it did not.
    fn until(&mut self, want: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.log.contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.log.push_str(&chunk),
                Err(_) => return false,
            }
        }
        true
    }

    /// [`Output::until`], failing the test if `want` does not come.
    fn wait_for(&mut self, want: &str) {
        assert!(self.until(want), "no {want:?} in the output: {}", self.log);
    }

    /// The rest, up to the end of output or 200 ms of quiet.
    fn drain(&mut self) -> &str {
        while let Ok(chunk) = self.rx.recv_timeout(Duration::from_millis(200)) {
            self.log.push_str(&chunk);
        }
        &self.log
    }
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn demo_runs_and_cleans_up() {
    require_harness();
    let out = xtask()
        .args(["demo", "--download-mib", "64"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "slirp4netns ready in ",
        "GET http://127.0.0.1:",
        "GET http://[::1]:",
        "200 OK: hello from net:",
        "download of 64 MiB through rootlessport: ",
        "torn down",
    ] {
        assert!(stdout.contains(want), "demo output lacks {want:?}");
    }
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn run_publishes_tcp_and_udp_and_returns_the_status() {
    require_harness();
    let x = xtask_bin();
    let script = format!(
        "{} echo-server --tcp 80 --udp 53 --exit-after 2; exit 7",
        x.display()
    );
    let mut child = xtask()
        .args([
            "run",
            "-p",
            "127.0.0.1:28800:80",
            "-p",
            "28801:53/udp",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    // The command serves two TCP connections, then exits with 7.
    let connect = || TcpStream::connect("127.0.0.1:28800");
    assert!(
        eventually(30, || connect().is_ok()),
        "the published port never opened"
    );
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut reply = [0u8; 256];
    let got = (0..30).find_map(|_| {
        udp.send_to(b"hi", "127.0.0.1:28801").unwrap();
        udp.recv(&mut reply).ok()
    });
    let n = got.expect("no UDP reply");
    assert!(String::from_utf8_lossy(&reply[..n]).ends_with(": hi"));
    // eventually() above may have used up the first of the two connections.
    for _ in 0..2 {
        if let Ok(mut c) = connect() {
            let _ = c.write_all(b"x");
            let _ = c.shutdown(std::net::Shutdown::Write);
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
        }
    }
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    println!("{log}");
    assert_eq!(
        status.code(),
        Some(7),
        "exit status of the command must come back"
    );
    assert!(
        log.contains("[run] published tcp 127.0.0.1:28800 -> 80 (rootlessport)"),
        "{log}"
    );
    assert!(
        log.contains("[run] published udp *:28801 -> 53 (rootlessport)"),
        "{log}"
    );
    let pid: u32 = log
        .split("namespace: pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert!(!process_exists(pid));
    assert!(
        processes_mentioning(&format!("/proc/{pid}/ns/net")).is_empty(),
        "slirp4netns left"
    );
    assert!(!std::env::temp_dir()
        .join(format!("rootless-net-run-{pid}"))
        .exists());
    assert!(
        std::net::TcpListener::bind("127.0.0.1:28800").is_ok(),
        "port still held"
    );
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn bad_arguments_fail_before_anything_starts() {
    require_harness();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "-p", "80", "--", "true"],
            r#"xtask run: invalid -p "80": expected [IP:]HOST:CONTAINER[/PROTO]"#,
        ),
        (
            &["run", "-p", "8080:80/sctp", "--", "true"],
            r#"xtask run: invalid -p "8080:80/sctp": protocol "sctp" is not tcp or udp"#,
        ),
        (
            &["run", "-p", "65535-65536:1-2", "--", "true"],
            r#"xtask run: invalid -p "65535-65536:1-2": "65536" is not a port (1-65535)"#,
        ),
        (
            &["run", "--network", "slirp4netns:mtu=10", "--", "true"],
            r#"xtask run: invalid mtu "10""#,
        ),
        (
            &["run", "--network", "bridge", "--", "true"],
            r#"xtask run: network mode "bridge" is not slirp4netns (expected "slirp4netns" or "slirp4netns:OPTIONS")"#,
        ),
        (
            &["run", "-p", "8080:80", "-p", "8080:81", "--", "true"],
            "xtask run: conflict with ID 1",
        ),
    ];
    for (args, want) in cases {
        let out = xtask().args(*args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert_eq!(stderr.trim_end(), *want, "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    let out = xtask().args(["run", "-p", "8080:80"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("xtask run: no command given"));
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn run_leaves_nothing_of_the_command_behind() {
    require_harness();
    // Something the command leaves running in the background ends with it.
    let out = xtask()
        .args(["run", "--", "sh", "-c", "sleep 31.4159 & sleep 0.2; exit 4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        eventually(5, || processes_mentioning("sleep 31.4159").is_empty()),
        "the command's background child outlived the run"
    );

    // xtask killed with SIGKILL: the command goes with it; the tmp dir it could not
    // remove is swept by the next run.
    let mut run = xtask()
        .args(["run", "--", "sleep", "31.2718"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = run.stderr.take().unwrap();
    let mut log = String::new();
    let mut buf = [0u8; 512];
    while !log.contains("[run] running sleep") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "run ended early: {log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let pid: u32 = log
        .split("namespace: pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert!(!processes_mentioning("sleep 31.2718").is_empty());
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(
        eventually(5, || processes_mentioning("sleep 31.2718").is_empty()),
        "the command outlived a killed xtask"
    );
    assert!(eventually(5, || !process_exists(pid)), "unshare left");
    let stale = std::env::temp_dir().join(format!("rootless-net-run-{pid}"));
    assert!(
        stale.exists(),
        "a killed run cannot have removed its tmp dir"
    );
    let out = xtask().args(["run", "--", "true"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!stale.exists(), "the next run sweeps a dead run's tmp dir");
}

/// `run` says at once when its port helper dies under the running command (the ports
/// no longer forward), lets the command go on, tears everything down, and exits with the
/// command's status.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn run_says_when_its_helper_dies() {
    require_harness();
    let mut run = xtask()
        .args(["run", "-p", "28802:80", "--", "sleep", "31.0103"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Output::of(run.stderr.take().unwrap());
    out.wait_for("[run] running sleep");
    let pid: i32 = out
        .log
        .split("rootlessport: pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no helper pid in {}", out.log));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    out.wait_for(&format!(
        "[run] rootlessport (pid {pid}) exited while the command runs: the published ports no longer forward"
    ));
    assert!(
        !processes_mentioning("sleep 31.0103").is_empty(),
        "the command goes on"
    );
    // Ctrl-C: the command ends, and the teardown names what went wrong.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let status = exit_within(&mut run, 20, &mut out);
    let log = out.drain();
    // sleep's status: killed by SIGINT.
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        log.contains(&format!("rootlessport (pid {pid}) had exited: signal: 9")),
        "the teardown names the helper's end: {log}"
    );
    assert!(
        eventually(5, || processes_mentioning("sleep 31.0103").is_empty()),
        "the command outlived the run"
    );
    // Teardown checks that none of the session's processes is left (slirp4netns too).
    assert!(!log.contains("left behind"), "{log}");
}

/// `run`'s status within `secs` (killed, and the test failed, if it does not end).
fn exit_within(
    run: &mut std::process::Child,
    secs: u64,
    out: &mut Output,
) -> std::process::ExitStatus {
    if eventually(secs, || matches!(run.try_wait(), Ok(Some(_)))) {
        return run.wait().unwrap();
    }
    let mut dump = String::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("31.0107") {
            let st = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let sig: Vec<&str> = st
                .lines()
                .filter(|l| l.starts_with("Sig") || l.starts_with("PPid") || l.starts_with("NSpid"))
                .collect();
            dump.push_str(&format!("{:?} {cmd}: {sig:?}\n", e.file_name()));
        }
    }
    let _ = run.kill();
    panic!("run did not end: {}\n{dump}", out.drain());
}

/// Exit statuses as a shell gives them: 127 for a command that is not there, 126 for
/// one that cannot be run, 128 + N for one a signal ended; a SIGHUP (a closed terminal)
/// sent to `run` reaches the command, and everything is torn down after it.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn run_exits_as_a_shell_would() {
    require_harness();
    let out = xtask()
        .args(["run", "--", "/nonexistent/command"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("cannot run /nonexistent/command"),
        "{stderr}"
    );
    let out = xtask()
        .args(["run", "--", "/etc/hostname"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(126), "{out:?}");

    let mut run = xtask()
        .args(["run", "--", "sleep", "31.0107"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Output::of(run.stderr.take().unwrap());
    out.wait_for("[run] running sleep");
    let tmp = out
        .log
        .split("namespace: pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|pid| std::env::temp_dir().join(format!("rootless-net-run-{pid}")))
        .unwrap();
    assert!(tmp.exists(), "{}", out.log);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::SIGHUP,
    )
    .unwrap();
    let status = exit_within(&mut run, 20, &mut out);
    let log = out.drain();
    assert_eq!(status.code(), Some(129), "sleep ended by SIGHUP: {log}");
    assert!(log.contains("tearing down"), "{log}");
    assert!(!tmp.exists(), "{} left: {log}", tmp.display());
    assert!(processes_mentioning("sleep 31.0107").is_empty());
}

/// One Ctrl-C at the terminal reaches the command once. The terminal sends it to its
/// whole foreground process group, `run` and the command alike; neither `run` nor the
/// namespace's init may pass on a second copy (a program that takes a second Ctrl-C
/// as "quit now" would quit at once). The command counts its SIGINTs for a second
/// after the first and exits with the count.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn run_gives_the_command_one_ctrl_c_once() {
    use std::os::unix::process::CommandExt;
    require_harness();
    let pty = nix::pty::openpty(None, None).unwrap();
    let script = "n=0; trap 'n=$((n+1))' INT; echo COUNT\"\"ING; \
                  while [ $n -lt 1 ]; do sleep 0.05; done; sleep 1; exit $n";
    let mut cmd = xtask();
    cmd.args(["run", "--", "sh", "-c", script])
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(pty.slave.try_clone().unwrap());
    // SAFETY: between fork and exec: setsid and ioctl only, nothing allocated.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            // The pty becomes run's controlling terminal, its process group the
            // foreground one.
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut run = cmd.spawn().unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let mut out = Output::of(master.try_clone().unwrap());
    // The command's own line (its text, echoed by run, reads COUNT""ING).
    if !out.until("COUNTING") {
        let _ = run.kill();
        panic!("the command never started: {}", out.log);
    }
    master.write_all(b"\x03").unwrap(); // Ctrl-C, once
    let status = exit_within(&mut run, 20, &mut out);
    let log = out.drain();
    assert_eq!(
        status.code(),
        Some(1),
        "the number of SIGINTs the command got from one Ctrl-C: {log}"
    );
}

/// The command resolves names through slirp4netns's DNS, as a podman container does,
/// whatever the host's resolver is: here a host whose resolv.conf names a server on its
/// own loopback (systemd-resolved's 127.0.0.53), which the command's netns cannot reach.
/// The host's `search` and `options` lines are kept, and the host's file is untouched.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn run_gives_the_command_slirp4netns_dns() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("resolv.conf");
    std::fs::write(
        &host,
        "# stub resolver\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch example.org\n",
    )
    .unwrap();
    let before = std::fs::read("/etc/resolv.conf").unwrap();
    // That host, in a mount namespace of the test's own.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$0\" run \
         --network slirp4netns:cidr=192.0.2.0/24 -- cat /etc/resolv.conf",
        host.display()
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
        .arg(&script)
        .arg(xtask_bin())
        .env("ROOTLESSPORT_BIN", rootlessport_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nameserver 192.0.2.3\noptions edns0 trust-ad\nsearch example.org\n"
    );
    assert_eq!(std::fs::read("/etc/resolv.conf").unwrap(), before);
}
