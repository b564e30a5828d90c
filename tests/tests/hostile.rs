//! Bad input and untrusted peers: the `rootlessport` binary gets every kind of bad
//! config and fd, and must answer with one exact line on stdout, exit 1, and leave
//! nothing behind; the reload socket lets in only its own user.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::{TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use slirp_spawn::process::{HelperCommand, LogFile};
use tests::{cloexec_pipe, eventually, require_harness, rootlessport_bin, xtask_bin, TestNetns};

/// What the helper may leave behind after a failure: checked to be nothing.
struct Leftovers<'a> {
    tmp: &'a Path,
    ports: &'a [u16],
}

impl Leftovers<'_> {
    fn assert_none(&self, case: &str) {
        let entries: Vec<_> = std::fs::read_dir(self.tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(entries.is_empty(), "{case}: left in TmpDir: {entries:?}");
        // A moment allowed: a child that another test of this file forks holds a copy
        // of the test's own sockets until it execs.
        for &p in self.ports {
            assert!(
                eventually(2, || TcpListener::bind(("::", p)).is_ok()),
                "{case}: TCP port {p} still held"
            );
            assert!(
                eventually(2, || UdpSocket::bind(("::", p)).is_ok()),
                "{case}: UDP port {p} still held"
            );
        }
    }
}

/// Run the binary with `stdin` and the given fds as 3 and 4; (stdout, exit code).
fn run(stdin: Vec<u8>, fd3: Option<OwnedFd>, fd4: Option<OwnedFd>) -> (String, Option<i32>) {
    let out = LogFile::anonymous("out").unwrap();
    let mut cmd = HelperCommand::new(rootlessport_bin())
        .stdin_bytes(stdin)
        .stdout_log(&out)
        .unwrap();
    if let Some(fd) = fd3 {
        cmd = cmd.leak_fd(fd, 3);
    }
    if let Some(fd) = fd4 {
        cmd = cmd.leak_fd(fd, 4);
    }
    let mut h = cmd.spawn().unwrap();
    let status = h
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("the helper hung on bad input");
    (out.contents(), status.code())
}

fn pipes() -> (Option<OwnedFd>, Option<OwnedFd>, OwnedFd, OwnedFd) {
    let (er, ew) = cloexec_pipe();
    let (rr, rw) = cloexec_pipe();
    (Some(er), Some(rw), ew, rr)
}

/// A fresh container netns, its path as a config names it, and a TmpDir.
fn netns_and_tmp() -> (TestNetns, String, tempfile::TempDir) {
    let ns = TestNetns::new();
    let netns = ns.path().display().to_string();
    (ns, netns, tempfile::tempdir().unwrap())
}

fn config(netns: &str, tmp: &Path, mappings: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"Mappings":[{mappings}],"NetNSPath":"{netns}","ExitFD":3,"ReadyFD":4,"TmpDir":"{}","ChildIP":"","ContainerID":"hostile"{extra}}}"#,
        tmp.display()
    )
    .into_bytes()
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn bad_input_matrix() {
    require_harness();
    let (_ns, netns, tmp) = netns_and_tmp();
    let left = Leftovers {
        tmp: tmp.path(),
        ports: &[29100, 29101, 29102],
    };
    let m = |proto: &str, host: u16, range: u16| {
        format!(
            r#"{{"host_ip":"","container_port":80,"host_port":{host},"range":{range},"protocol":"{proto}"}}"#
        )
    };
    let good = m("tcp", 29100, 1);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty stdin", vec![], "unexpected end of JSON input"),
        (
            "invalid JSON",
            b"{\"Mappings\":[".to_vec(),
            "invalid config JSON: EOF while parsing a list at line 1 column 13",
        ),
        (
            "JSON that is not an object",
            b"[\"a\"]".to_vec(),
            "invalid config JSON: expected an object",
        ),
        (
            "wrong field type",
            br#"{"ExitFD":"3"}"#.to_vec(),
            "invalid config JSON: invalid type: string \"3\", expected i32",
        ),
        (
            "unknown protocol",
            config(&netns, tmp.path(), &m("icmp", 29100, 1), ""),
            r#"unknown proto: "icmp""#,
        ),
        (
            "sctp",
            config(&netns, tmp.path(), &m("sctp", 29100, 1), ""),
            r#"unsupported proto: "sctp" (rootlessport forwards tcp and udp only)"#,
        ),
        (
            "port 0",
            config(&netns, tmp.path(), &m("tcp", 0, 1), ""),
            "invalid ParentPort: 0",
        ),
        (
            "range past 65535",
            config(&netns, tmp.path(), &m("udp", 65534, 3), ""),
            "invalid port range: host port 65534 with range 3 goes past 65535",
        ),
        (
            "host IP not an IP",
            config(
                &netns,
                tmp.path(),
                r#"{"host_ip":"example.com","container_port":80,"host_port":29100,"range":1,"protocol":"tcp"}"#,
                "",
            ),
            r#"invalid ParentIP: "example.com""#,
        ),
        (
            "same port twice",
            config(
                &netns,
                tmp.path(),
                &format!("{},{}", m("tcp", 29100, 2), m("tcp", 29101, 1)),
                "",
            ),
            "conflict with ID 2",
        ),
        (
            "NetNSPath missing",
            config("", tmp.path(), &good, ""),
            "missing NetNSPath",
        ),
        (
            "NetNSPath not a netns",
            config("/etc/hostname", tmp.path(), &good, ""),
            r#"cannot enter NetNSPath "/etc/hostname": not a network namespace"#,
        ),
        (
            "NetNSPath does not exist",
            config("/nonexistent/ns", tmp.path(), &good, ""),
            r#"cannot enter NetNSPath "/nonexistent/ns": no such file or directory"#,
        ),
        (
            "TmpDir does not exist (reload socket)",
            config(
                &netns,
                Path::new("/nonexistent/tmp"),
                &good,
                r#","RootlessCNI":true"#,
            ),
            r#"reload socket "/nonexistent/tmp/rp/hostile": mkdir /nonexistent/tmp/rp: no such file or directory"#,
        ),
        (
            "a 10 MB stdin",
            {
                let mut v = b"{\"Mappings\":[".to_vec();
                v.resize(10 * 1024 * 1024, b' ');
                v
            },
            "invalid config JSON: EOF while parsing a list at line 1 column 10485760",
        ),
        (
            "a 20 MB stdin",
            vec![b' '; 20 * 1024 * 1024],
            "config on stdin is larger than 16777216 bytes",
        ),
    ];
    for (case, stdin, want) in cases {
        let (fd3, fd4, _ew, _rr) = pipes();
        let (out, code) = run(stdin, fd3, fd4);
        assert_eq!(
            (out.as_str(), code),
            (format!("{want}\n").as_str(), Some(1)),
            "{case}"
        );
        left.assert_none(case);
    }

    // A host port some other process holds.
    let _busy = TcpListener::bind("0.0.0.0:29102").unwrap();
    let (fd3, fd4, _ew, _rr) = pipes();
    let (out, code) = run(
        config(
            &netns,
            tmp.path(),
            &format!("{},{}", m("tcp", 29100, 1), m("tcp", 29102, 1)),
            "",
        ),
        fd3,
        fd4,
    );
    assert_eq!(
        out,
        "listen tcp 0.0.0.0:29102: bind: address already in use\n"
    );
    assert_eq!(code, Some(1));
    drop(_busy);
    left.assert_none("port in use");
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn bad_fds() {
    require_harness();
    let (_ns, netns, tmp) = netns_and_tmp();
    let cfg = |exit: i64, ready: i64| {
        format!(r#"{{"Mappings":[],"NetNSPath":"{netns}","ExitFD":{exit},"ReadyFD":{ready},"TmpDir":"{}"}}"#, tmp.path().display()).into_bytes()
    };
    let file = || -> OwnedFd { std::fs::File::open("/etc/hostname").unwrap().into() };
    type Case<'a> = (&'a str, Vec<u8>, Option<OwnedFd>, Option<OwnedFd>, &'a str);
    let cases: Vec<Case> = vec![
        ("ExitFD missing", cfg(0, 4), None, None, "missing ExitFD"),
        ("ExitFD negative", cfg(-5, 4), None, None, "missing ExitFD"),
        ("ExitFD not open", cfg(3, 4), None, None, "invalid ExitFD"),
        (
            "ExitFD not a pipe",
            cfg(3, 4),
            Some(file()),
            pipes().1,
            "invalid ExitFD",
        ),
        (
            "ReadyFD missing",
            cfg(3, 0),
            pipes().0,
            None,
            "missing ReadyFD",
        ),
        (
            "ReadyFD negative",
            cfg(3, -1),
            pipes().0,
            None,
            "missing ReadyFD",
        ),
        (
            "ReadyFD not open",
            cfg(3, 4),
            pipes().0,
            None,
            "invalid ReadyFD",
        ),
        (
            "ReadyFD not a pipe",
            cfg(3, 4),
            pipes().0,
            Some(file()),
            "invalid ReadyFD",
        ),
        (
            "ReadyFD same as ExitFD",
            cfg(3, 3),
            pipes().0,
            None,
            "invalid ReadyFD",
        ),
        (
            "ExitFD out of range",
            cfg(99999999999, 4),
            None,
            None,
            "invalid config JSON: invalid value: integer `99999999999`, expected i32",
        ),
    ];
    for (case, stdin, fd3, fd4, want) in cases {
        let stdin_text = String::from_utf8_lossy(&stdin).into_owned();
        let (out, code) = run(stdin, fd3, fd4);
        let first = out.lines().next().unwrap_or("").to_owned();
        assert_eq!(
            (first.as_str(), code),
            (want, Some(1)),
            "{case}: {stdin_text}"
        );
        assert_eq!(out.lines().count(), 1, "{case}: one line");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// Whether `uid` exists in this process's user namespace (`/proc/self/uid_map`).
fn uid_mapped(uid: u32) -> bool {
    let Ok(map) = std::fs::read_to_string("/proc/self/uid_map") else {
        return false;
    };
    map.lines().any(|line| {
        let v: Vec<u32> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        matches!(v[..], [inside, _, count] if uid >= inside && uid - inside < count)
    })
}

/// The number of ports of a large config: enough that the helper binds them on several
/// threads (and that a start-up binding while it decodes would have made many before
/// it sees a defect at the end; docs/performance-analysis.md section 13).
const LARGE: u16 = 2000;

/// The first port of each large-config test's own range (the tests of this file run at
/// once, in one netns).
const LARGE_FIRST: u16 = 25000;
const REFUSED_LATE_FIRST: u16 = 21000;
const NO_PROC_FIRST: u16 = 23000;
const TWICE_FIRST: u16 = 27000;

/// `count` one-port TCP mappings, host ports from `first` on, as the items of a JSON list.
fn tcp_mappings(first: u16, count: u16) -> String {
    let one = |p: u16| {
        format!(
            r#"{{"host_ip":"","container_port":80,"host_port":{p},"range":1,"protocol":"tcp"}}"#
        )
    };
    (first..first + count)
        .map(one)
        .collect::<Vec<_>>()
        .join(",")
}

/// A defect at the end of a large config (after all its mappings, or in its last one):
/// the same one line as for a one-port config, exit 1, and no port of the config left
/// listening, TmpDir empty.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn late_defects_in_a_large_config() {
    require_harness();
    let (_ns, netns, tmp) = netns_and_tmp();
    let ports: Vec<u16> = (LARGE_FIRST..LARGE_FIRST + LARGE).collect();
    let left = Leftovers {
        tmp: tmp.path(),
        ports: &ports,
    };
    let m = |host: u16| tcp_mappings(host, 1);
    // `count` mappings from the range's first port on, then `last`.
    let mappings = |count: u16, last: &str| -> String {
        match count {
            0 => last.to_owned(),
            _ => format!("{},{last}", tcp_mappings(LARGE_FIRST, count)),
        }
    };
    let doc = |mappings: &str, rest: &str| -> Vec<u8> {
        format!(
            r#"{{"Mappings":[{mappings}],"TmpDir":"{}","ContainerID":"late",{rest}}}"#,
            tmp.path().display()
        )
        .into_bytes()
    };
    let fine = format!(r#""NetNSPath":"{netns}","ExitFD":3,"ReadyFD":4"#);
    let sctp = r#"{"host_ip":"","container_port":1,"host_port":1,"range":1,"protocol":"sctp"}"#;
    // (case, the defect made in a config of `n` ports before it)
    type Defect<'a> = (&'a str, Box<dyn Fn(u16) -> Vec<u8> + 'a>);
    let defects: Vec<Defect> = vec![
        (
            "a wrong type after the mappings",
            Box::new(|n| doc(&mappings(n, &m(LARGE_FIRST + n)), r#""ExitFD":"3""#)),
        ),
        (
            "JSON cut off after the mappings",
            Box::new(|n| {
                let mut d = doc(&mappings(n, &m(LARGE_FIRST + n)), &fine);
                d.truncate(d.len() - 3);
                d
            }),
        ),
        (
            "no NetNSPath",
            Box::new(|n| {
                doc(
                    &mappings(n, &m(LARGE_FIRST + n)),
                    r#""ExitFD":3,"ReadyFD":4"#,
                )
            }),
        ),
        (
            // A number that no fd has when the helper starts, but that one of its
            // listeners would have, were they made before the fds are checked.
            "ExitFD not open at start",
            Box::new(|n| {
                let rest = format!(r#""NetNSPath":"{netns}","ExitFD":40,"ReadyFD":4"#);
                doc(&mappings(n, &m(LARGE_FIRST + n)), &rest)
            }),
        ),
        (
            "ReadyFD not open at start",
            Box::new(|n| {
                let rest = format!(r#""NetNSPath":"{netns}","ExitFD":3,"ReadyFD":41"#);
                doc(&mappings(n, &m(LARGE_FIRST + n)), &rest)
            }),
        ),
        (
            "the last mapping unsupported",
            Box::new(|n| doc(&mappings(n, sctp), &fine)),
        ),
        (
            "a NetNSPath that does not exist",
            Box::new(|n| {
                let rest = r#""NetNSPath":"/run/netns/no-such-netns","ExitFD":3,"ReadyFD":4"#;
                doc(&mappings(n, &m(LARGE_FIRST + n)), rest)
            }),
        ),
    ];
    for (case, make) in &defects {
        let (fd3, fd4, _ew, _rr) = pipes();
        let (small, small_code) = run(make(0), fd3, fd4);
        assert_eq!(small_code, Some(1), "{case}, one port: {small}");
        let (fd3, fd4, _ew, _rr) = pipes();
        let (large, code) = run(make(LARGE - 1), fd3, fd4);
        // JSON errors name a position, which the longer config moves.
        let unplaced = |line: &str| line.split(" at line ").next().unwrap_or("").to_owned();
        assert_eq!(
            (unplaced(&large), code),
            (unplaced(&small), Some(1)),
            "{case}: {LARGE} ports"
        );
        assert_eq!(large.lines().count(), 1, "{case}: one line: {large}");
        left.assert_none(case);
    }

    // A conflict at the end: the first port again.
    let (fd3, fd4, _ew, _rr) = pipes();
    let (out, code) = run(doc(&mappings(LARGE - 1, &m(LARGE_FIRST)), &fine), fd3, fd4);
    assert_eq!((out.as_str(), code), ("conflict with ID 1\n", Some(1)));
    left.assert_none("a conflict at the end");

    // A port in use far into the config.
    let busy_port = LARGE_FIRST + LARGE * 3 / 4;
    let busy = TcpListener::bind(("::", busy_port)).unwrap();
    let (fd3, fd4, _ew, _rr) = pipes();
    let (out, code) = run(
        doc(&mappings(LARGE - 1, &m(LARGE_FIRST + LARGE - 1)), &fine),
        fd3,
        fd4,
    );
    assert_eq!(
        (out.as_str(), code),
        (
            format!("listen tcp 0.0.0.0:{busy_port}: bind: address already in use\n").as_str(),
            Some(1)
        )
    );
    drop(busy);
    left.assert_none("a port in use");
}

/// A large config refused for a defect found before its ports are made (here a netns
/// that does not exist) never holds them: another program (another helper, podman's)
/// can bind and listen on one of them with `SO_REUSEADDR` all along, and no client is
/// accepted only to be reset. (A start-up that made listeners while it decoded failed
/// this until they waited for the whole config to be good. A failure after binding,
/// such as the reload socket's, still holds the ports while they are made.)
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn a_config_refused_late_takes_no_port_from_others() {
    require_harness();
    let tmp = tempfile::tempdir().unwrap();
    let json = config(
        "/run/netns/no-such-netns",
        tmp.path(),
        &tcp_mappings(REFUSED_LATE_FIRST, LARGE),
        "",
    );
    // Among the first ports made.
    let port = REFUSED_LATE_FIRST + 50;
    for round in 0..5 {
        let mut probe = std::process::Command::new(xtask_bin())
            .args(["bind-probe", &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut said = std::io::BufReader::new(probe.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut said, &mut line).unwrap();
        assert_eq!(line, "probing\n");
        let (fd3, fd4, _ew, _rr) = pipes();
        let (out, code) = run(json.clone(), fd3, fd4);
        drop(probe.stdin.take());
        line.clear();
        std::io::BufRead::read_line(&mut said, &mut line).unwrap();
        assert!(probe.wait().unwrap().success(), "bind-probe: {line}");
        assert_eq!(code, Some(1), "round {round}: {out}");
        assert!(
            out.starts_with("cannot enter NetNSPath"),
            "round {round}: {out}"
        );
        let (in_use, tries) = line.trim().split_once(' ').unwrap();
        assert_eq!(
            in_use, "0",
            "round {round}: {in_use} of {tries} binds of port {port} found it in use"
        );
    }
}

/// Without `/proc` (so without a list of the fds it was started with), an ExitFD that
/// was not open at start is still refused, whatever files the helper opens while it
/// starts: a start-up that opens files before it checks the fds, and relies on `/proc`
/// to tell them apart, took one of its own as ExitFD here and never exited. (`/proc` is
/// covered by an empty tmpfs, which a user namespace may do; the netns is reached
/// through a bind mount made before.)
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn without_proc_a_closed_exit_fd_is_still_refused() {
    require_harness();
    let ns = TestNetns::new();
    let tmp = tempfile::tempdir().unwrap();
    let netns = tmp.path().join("netns");
    std::fs::File::create(&netns).unwrap();
    let mappings = tcp_mappings(NO_PROC_FIRST, LARGE);
    for exit_fd in [7, 40] {
        let json = format!(
            r#"{{"Mappings":[{}],"NetNSPath":"{}","ExitFD":{exit_fd},"ReadyFD":4,"TmpDir":"{}","ContainerID":"noproc"}}"#,
            mappings,
            netns.display(),
            tmp.path().display()
        );
        let (fd3, fd4, _ew, _rr) = pipes();
        let out = LogFile::anonymous("out").unwrap();
        let script = format!(
            "mount --bind {} {} && mount -t tmpfs none /proc && exec {}",
            ns.path().display(),
            netns.display(),
            rootlessport_bin().display()
        );
        let mut h = HelperCommand::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin_bytes(json.into_bytes())
            .stdout_log(&out)
            .unwrap()
            .leak_fd(fd3.unwrap(), 3)
            .leak_fd(fd4.unwrap(), 4)
            .spawn()
            .unwrap();
        let status = h
            .wait_timeout(Duration::from_secs(20))
            .unwrap()
            .expect("the helper took a file of its own as ExitFD and kept running");
        assert_eq!(
            (out.contents().as_str(), status.code()),
            ("invalid ExitFD\n", Some(1)),
            "ExitFD {exit_fd}"
        );
    }
}

/// `Mappings` given twice: the one-pass decode refuses it, and the helper serves what
/// Go's decoder would (the last one), and nothing of the first.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn mappings_given_twice_serve_the_last() {
    require_harness();
    let (_ns, netns, tmp) = netns_and_tmp();
    let last_port = 29130;
    // The second `Mappings` key comes after the first's whole config.
    let json = config(
        &netns,
        tmp.path(),
        &tcp_mappings(TWICE_FIRST, LARGE),
        &format!(r#","Mappings":[{}]"#, tcp_mappings(last_port, 1)),
    );
    let (er, ew) = cloexec_pipe();
    let (rr, rw) = cloexec_pipe();
    let out = LogFile::anonymous("out").unwrap();
    let mut h = HelperCommand::new(rootlessport_bin())
        .stdin_bytes(json)
        .stdout_log(&out)
        .unwrap()
        .leak_fd(er, 3)
        .leak_fd(rw, 4)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = h.await_ready(&rr, deadline).map_err(|e| e.to_string());
    // Read after the wait: the helper closes ReadyFD before it prints why.
    assert_eq!(ready, Ok(b"1".to_vec()), "not ready: {}", out.contents());
    assert!(
        TcpListener::bind(("::", last_port)).is_err(),
        "the last Mappings' port is not served"
    );
    for p in TWICE_FIRST..TWICE_FIRST + LARGE {
        assert!(
            TcpListener::bind(("::", p)).is_ok(),
            "port {p} of the first Mappings listens"
        );
    }
    drop(ew);
    let status = h.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn unwritable_tmpdir_and_unenterable_netns() {
    require_harness();
    // A read-only TmpDir (a read-only bind mount in our private mount namespace).
    let (_ns, netns, tmp) = netns_and_tmp();
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let status = std::process::Command::new("mount")
        .args(["--bind", "-o", "ro"])
        .arg(&ro)
        .arg(&ro)
        .status()
        .unwrap();
    assert!(status.success());
    let (fd3, fd4, _ew, _rr) = pipes();
    let (out, code) = run(
        config(
            &netns,
            &ro,
            r#"{"host_ip":"","container_port":80,"host_port":29110,"range":1,"protocol":"tcp"}"#,
            r#","RootlessCNI":true"#,
        ),
        fd3,
        fd4,
    );
    let _ = std::process::Command::new("umount").arg(&ro).status();
    assert_eq!(code, Some(1));
    assert_eq!(
        out,
        format!(
            "reload socket \"{}/rp/hostile\": mkdir {}/rp: read-only file system\n",
            ro.display(),
            ro.display()
        )
    );
    assert!(
        TcpListener::bind(("::", 29110)).is_ok(),
        "listener left behind"
    );

    // A netns the helper has no privilege over: it runs in a user namespace of its own
    // (unshare -U), which owns nothing here.
    let out_log = LogFile::anonymous("out").unwrap();
    let (er, _ew) = cloexec_pipe();
    let (_rr, rw) = cloexec_pipe();
    let mut h = HelperCommand::new("unshare")
        .args(["--user", "--", &rootlessport_bin().display().to_string()])
        .stdin_bytes(config(
            &netns,
            tmp.path(),
            r#"{"host_ip":"","container_port":80,"host_port":29111,"range":1,"protocol":"tcp"}"#,
            "",
        ))
        .leak_fd(er, 3)
        .leak_fd(rw, 4)
        .stdout_log(&out_log)
        .unwrap()
        .spawn()
        .unwrap();
    let status = h.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        out_log.contents(),
        format!("cannot enter NetNSPath \"{netns}\": permission denied\n")
    );
    assert!(
        TcpListener::bind(("::", 29111)).is_ok(),
        "listener left behind"
    );
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn reload_socket_is_for_its_own_user_only() {
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = rootlessport::Config::new(
        "guarded",
        ns.path().display().to_string(),
        "",
        tmp.path().display().to_string(),
    )
    .with_mappings(vec![slirp_config::PortMapping::new(
        "127.0.0.1",
        29120,
        80,
        1,
        "tcp",
    )])
    .with_rootless_cni(true);
    let (r, w) = cloexec_pipe();
    let mut h = rootlessport::launcher::Launcher::new(rootlessport_bin())
        .start(&cfg, r)
        .unwrap();
    let rp = tmp.path().join("rp");
    assert_eq!(
        std::fs::metadata(&rp).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let reload_cmd = || {
        let mut c = std::process::Command::new(xtask_bin());
        c.args([
            "reload-send",
            &tmp.path().display().to_string(),
            "guarded",
            "10.0.0.9",
        ]);
        c
    };
    let as_nobody = |mut c: std::process::Command| {
        // SAFETY: setgroups/setgid/setuid between fork and exec.
        unsafe {
            c.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(65534) < 0
                    || libc::setuid(65534) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().unwrap()
    };
    // Another user: only where one exists (an ordinary user's `cargo xtask itest` runs
    // this in a user namespace that maps its own uid alone, as 0).
    if uid_mapped(65534) {
        // First line of defence: the 0700 directory.
        let out = as_nobody(reload_cmd());
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{out:?}"
        );
        // Second: the peer's uid, even when the directory is opened up.
        std::fs::set_permissions(&rp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(rp.join("guarded"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let out = as_nobody(reload_cmd());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            "xtask: port reloading failed: reload refused: uid 65534 may not reload this helper"
        );
        // The same for control requests, which say whose they are.
        let mut ctl =
            std::process::Command::new(rootlessport_bin().with_file_name("rootlessport-ctl"));
        ctl.arg("--socket").arg(rp.join("guarded")).arg("list");
        let out = as_nobody(ctl);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!(
                "rootlessport-ctl: socket {}: list: refused: uid 65534 may not control this \
                 helper (only its own user, uid 0, may)",
                rp.join("guarded").display()
            )
        );
    } else {
        eprintln!(
            "reload_socket_is_for_its_own_user_only: no uid 65534 in this user namespace: \
             the checks of another user's requests are left out"
        );
    }
    // Its own user still may.
    rootlessport::reload::reload(tmp.path(), "guarded", "127.0.0.1").unwrap();

    // It listens on what the config names and nothing else.
    let ss = std::process::Command::new("ss")
        .args(["-Hlntup"])
        .output()
        .unwrap();
    let mine: Vec<String> = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={},", h.pid())))
        .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_owned())
        .collect();
    assert_eq!(mine, ["127.0.0.1:29120"]);
    drop(w);
    assert!(h
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .success());
    assert!(!rp.exists(), "the rp directory it created stays behind");
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn state_files_never_follow_symlinks() {
    require_harness();
    let ns = TestNetns::new();
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // Someone planted TmpDir/rp as a link to a directory of theirs.
    std::os::unix::fs::symlink(elsewhere.path(), tmp.path().join("rp")).unwrap();
    let (fd3, fd4, _ew, _rr) = pipes();
    let (out, code) = run(
        config(
            &ns.path().display().to_string(),
            tmp.path(),
            "",
            r#","RootlessCNI":true"#,
        ),
        fd3,
        fd4,
    );
    assert_eq!(code, Some(1));
    assert_eq!(
        out,
        format!(
            "reload socket \"{0}/rp/hostile\": {0}/rp is a symbolic link; refusing to use it\n",
            tmp.path().display()
        )
    );
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);

    // slirp4netns's log file: a planted symlink is replaced, its target untouched.
    let victim = elsewhere.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&victim, log_dir.path().join("slirp4netns-c1.log")).unwrap();
    let log = LogFile::create_unlinked(log_dir.path(), "slirp4netns-c1.log").unwrap();
    drop(log);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read_dir(log_dir.path()).unwrap().count(), 0);
}
