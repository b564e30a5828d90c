//! The `rootlessport` binary driven exactly as podman drives it (config on stdin, exit
//! pipe as fd 3, ready pipe as fd 4), against servers inside a container netns.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rootlessport::launcher::{LaunchError, Launcher, RootlessPort};
use rootlessport::Config;
use slirp_config::PortMapping;
use slirp_spawn::process::{open_fds, HelperCommand, LogFile};
use tests::{eventually, process_exists, require_harness, rootlessport_bin, TestNetns};

/// A container netns with loopback up (the helper forwards to its 127.0.0.1 when the
/// config names no child IP).
fn container() -> TestNetns {
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    ns
}

fn config(ns: &TestNetns, tmp: &Path, mappings: Vec<PortMapping>) -> Config {
    Config::new(
        "c0ffee",
        ns.path().display().to_string(),
        "",
        tmp.display().to_string(),
    )
    .with_mappings(mappings)
}

/// Start the helper as podman does; returns it and the exit pipe's write end.
fn launch(cfg: &Config) -> Result<(RootlessPort, OwnedFd), LaunchError> {
    let (exit_r, exit_w) = tests::cloexec_pipe();
    Launcher::new(rootlessport_bin())
        .start(cfg, exit_r)
        .map(|h| (h, exit_w))
}

/// Close the exit pipe and check the helper exits 0 with nothing left.
fn finish(mut helper: RootlessPort, exit_w: OwnedFd) {
    let pid = helper.pid();
    drop(exit_w);
    let status = helper
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("helper did not exit on EOF");
    assert!(status.success(), "{status}");
    assert!(!process_exists(pid));
}

/// TCP servers inside the netns: each greets, then echoes what it read until EOF,
/// then closes.
fn tcp_echo(ns: &TestNetns, addr: &'static str, port: u16) {
    let l = ns.run(move || TcpListener::bind((addr, port)).unwrap());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.write_all(format!("hello from {addr}:{port}\n").as_bytes());
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf);
                let _ = c.write_all(&buf);
            });
        }
    });
}

fn talk(to: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.write_all(msg)?;
    c.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    c.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn tcp_both_ways_with_half_close_and_dual_stack() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    tcp_echo(&ns, "127.0.0.1", 80);
    tcp_echo(&ns, "127.0.0.1", 81);
    let cfg = config(
        &ns,
        tmp.path(),
        vec![
            PortMapping::new("", 28080, 80, 1, "tcp"),
            PortMapping::new("127.0.0.1", 28081, 81, 1, "tcp"),
        ],
    );
    let t = Instant::now();
    let (helper, exit_w) = launch(&cfg).unwrap();
    println!("rootlessport ready after {:?}", t.elapsed());
    // Once ready, its stdout and stderr point at /dev/null (a closed log pipe cannot
    // SIGPIPE it), and fd 4 is closed.
    for fd in [1, 2] {
        let target = std::fs::read_link(format!("/proc/{}/fd/{fd}", helper.pid())).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    assert!(eventually(5, || !open_fds(helper.pid())
        .unwrap()
        .contains(&4)));

    // The wildcard answers on IPv4 and IPv6 loopback; the client's half-close reaches
    // the server as EOF while the server still answers.
    for addr in ["127.0.0.1:28080", "[::1]:28080"] {
        let got = talk(addr.parse().unwrap(), b"ping").unwrap();
        assert_eq!(got, b"hello from 127.0.0.1:80\nping", "{addr}");
    }
    assert_eq!(
        talk("127.0.0.1:28081".parse().unwrap(), b"x").unwrap(),
        b"hello from 127.0.0.1:81\nx"
    );
    // A specific host IP binds only that address.
    assert!(talk("[::1]:28081".parse().unwrap(), b"x").is_err());

    // Bulk both ways: 32 MiB up, the same back, bytes intact.
    let data: Vec<u8> = (0..32 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut c = TcpStream::connect("127.0.0.1:28080").unwrap();
    let back = tests::echo_round_trip(&mut c, &data);
    assert_eq!(&back[..24], b"hello from 127.0.0.1:80\n");
    assert!(back[24..] == data[..], "bulk data corrupted");
    finish(helper, exit_w);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn server_half_close_and_resets_are_carried() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    // Port 90: the server says hi, shuts down its write side, then reads to EOF and
    // reports how much it got on a side channel. Port 91: the server resets.
    let l90 = ns.run(|| TcpListener::bind("127.0.0.1:90").unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut c in l90.incoming().flatten() {
            c.write_all(b"bye").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got);
            tx.send(got).unwrap();
        }
    });
    let l91 = ns.run(|| TcpListener::bind("127.0.0.1:91").unwrap());
    let (rst_tx, rst_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut conns = l91.incoming().flatten();
        // First connection: the server resets it.
        if let Some(c) = conns.next() {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(c);
        }
        // Second: the client resets; the server must see ECONNRESET.
        if let Some(mut c) = conns.next() {
            let mut buf = [0u8; 16];
            let r = c.read(&mut buf);
            rst_tx.send(r.map_err(|e| e.kind())).unwrap();
        }
    });
    let cfg = config(
        &ns,
        tmp.path(),
        vec![PortMapping::new("127.0.0.1", 28090, 90, 2, "tcp")],
    );
    let (helper, exit_w) = launch(&cfg).unwrap();

    let mut c = TcpStream::connect("127.0.0.1:28090").unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap(); // the server's FIN arrives ...
    assert_eq!(got, b"bye");
    c.write_all(b"still talking").unwrap(); // ... while we can still send
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"still talking"
    );

    let mut c = TcpStream::connect("127.0.0.1:28091").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert_eq!(
        r.map_err(|e| e.kind()).unwrap_err(),
        std::io::ErrorKind::ConnectionReset
    );

    let c = TcpStream::connect("127.0.0.1:28091").unwrap();
    std::thread::sleep(Duration::from_millis(200)); // let the helper connect upstream
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let r = rst_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(r.unwrap_err(), std::io::ErrorKind::ConnectionReset);

    // Nothing listening in the container: the client is reset, as on a closed port.
    let cfg2 = config(
        &ns,
        tmp.path(),
        vec![PortMapping::new("127.0.0.1", 28095, 95, 1, "tcp")],
    );
    let (helper2, exit_w2) = launch(&cfg2).unwrap();
    let mut c = TcpStream::connect("127.0.0.1:28095").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = c.read(&mut buf).map_err(|e| e.kind());
    assert!(
        matches!(r, Err(std::io::ErrorKind::ConnectionReset) | Ok(0)),
        "{r:?}"
    );
    finish(helper2, exit_w2);
    finish(helper, exit_w);
}

fn udp_echo(ns: &TestNetns, port: u16) {
    let s = ns.run(move || UdpSocket::bind(("127.0.0.1", port)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut reply = format!("{from} said ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, from);
        }
    });
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn udp_flows_per_client_and_expiry() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    udp_echo(&ns, 53);
    udp_echo(&ns, 54);
    let cfg = config(
        &ns,
        tmp.path(),
        vec![PortMapping::new("", 28053, 53, 2, "udp")],
    );
    let (exit_r, exit_w) = tests::cloexec_pipe();
    // Short idle timeout for the test (podman's is 90 s).
    std::env::set_var("ROOTLESSPORT_UDP_IDLE_SECS", "1");
    let helper = Launcher::new(rootlessport_bin())
        .start(&cfg, exit_r)
        .unwrap();
    std::env::remove_var("ROOTLESSPORT_UDP_IDLE_SECS");
    // ReadyFD is closed right after the "1" is read: count once it is gone.
    assert!(eventually(5, || !open_fds(helper.pid())
        .unwrap()
        .contains(&4)));
    let fds_idle = open_fds(helper.pid()).unwrap().len();

    let clients: Vec<UdpSocket> = (0..3)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        })
        .collect();
    let mut upstream_addrs = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for round in 0..2 {
            let port = 28053 + (i as u16 % 2);
            c.send_to(format!("m{i}.{round}").as_bytes(), ("127.0.0.1", port))
                .unwrap();
            let mut buf = [0u8; 256];
            let (n, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(from.port(), port, "reply must come from the published port");
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(text.ends_with(&format!(" said m{i}.{round}")), "{text}");
            upstream_addrs.push((i, text.split(' ').next().unwrap().to_owned()));
        }
    }
    // Each client is one flow: the same upstream source for both of its rounds, and a
    // different one per client.
    for i in 0..3 {
        let mine: Vec<_> = upstream_addrs
            .iter()
            .filter(|(c, _)| *c == i)
            .map(|(_, a)| a)
            .collect();
        assert_eq!(mine[0], mine[1]);
    }
    let distinct: std::collections::HashSet<_> =
        upstream_addrs.iter().map(|(_, a)| a.clone()).collect();
    assert_eq!(distinct.len(), 3);
    // Three flows hold three sockets; after the idle timeout they are gone.
    assert_eq!(open_fds(helper.pid()).unwrap().len(), fds_idle + 3);
    assert!(
        eventually(5, || open_fds(helper.pid()).unwrap().len() == fds_idle),
        "idle UDP flows did not expire"
    );
    finish(helper, exit_w);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn ipv6_host_ips_and_families() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    tcp_echo(&ns, "127.0.0.1", 80);
    let l6 = ns.run(|| TcpListener::bind("[::1]:80").unwrap());
    std::thread::spawn(move || {
        for mut c in l6.incoming().flatten() {
            let _ = c.write_all(b"v6 server");
        }
    });
    let cfg = config(
        &ns,
        tmp.path(),
        vec![
            PortMapping::new("::1", 28100, 80, 1, "tcp"),
            PortMapping::new("", 28101, 80, 1, "tcp4"),
            PortMapping::new("", 28102, 80, 1, "tcp6"),
        ],
    );
    let (helper, exit_w) = launch(&cfg).unwrap();
    assert_eq!(
        talk("[::1]:28100".parse().unwrap(), b"").unwrap(),
        b"hello from 127.0.0.1:80\n"
    );
    assert!(talk("127.0.0.1:28100".parse().unwrap(), b"").is_err());
    assert!(talk("127.0.0.1:28101".parse().unwrap(), b"").is_ok());
    assert!(
        talk("[::1]:28101".parse().unwrap(), b"").is_err(),
        "tcp4 must not listen on IPv6"
    );
    // tcp6 with no child IP goes to the container's ::1.
    assert_eq!(
        talk("[::1]:28102".parse().unwrap(), b"").unwrap(),
        b"v6 server"
    );
    assert!(
        talk("127.0.0.1:28102".parse().unwrap(), b"").is_err(),
        "tcp6 must not listen on IPv4"
    );
    finish(helper, exit_w);
}

/// Run the binary directly with `stdin` and fds 3/4 as given; (stdout, exit code).
fn run_raw(stdin: &[u8], with_fds: bool) -> (String, i32) {
    let out = LogFile::anonymous("out").unwrap();
    let mut cmd = HelperCommand::new(rootlessport_bin())
        .stdin_bytes(stdin.to_vec())
        .stdout_log(&out)
        .unwrap();
    let mut keep = Vec::new();
    if with_fds {
        let (exit_r, exit_w) = tests::cloexec_pipe();
        let (ready_r, ready_w) = tests::cloexec_pipe();
        cmd = cmd.leak_fd(exit_r, 3).leak_fd(ready_w, 4);
        keep.push(exit_w);
        keep.push(ready_r);
    }
    let mut h = cmd.spawn().unwrap();
    let status = h
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("helper hung on bad input");
    (out.contents(), status.code().unwrap_or(-1))
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn every_error_text() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();

    // Arguments: podman's words on stderr, exit 1.
    let out = std::process::Command::new(rootlessport_bin())
        .arg("x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "too many arguments, rootlessport expects a json config via STDIN\n"
    );

    let netns = ns.path().display().to_string();
    let table: Vec<(String, bool, &str)> = vec![
        ("".into(), true, "unexpected end of JSON input"),
        (
            "{".into(),
            true,
            "invalid config JSON: EOF while parsing an object at line 1 column 1",
        ),
        (
            "[1]".into(),
            true,
            "invalid config JSON: expected an object",
        ),
        ("{}".into(), true, "missing NetNSPath"),
        (
            format!(r#"{{"NetNSPath":"{netns}"}}"#),
            true,
            "missing ExitFD",
        ),
        (
            format!(r#"{{"NetNSPath":"{netns}","ExitFD":-1}}"#),
            true,
            "missing ExitFD",
        ),
        (
            format!(r#"{{"NetNSPath":"{netns}","ExitFD":77,"ReadyFD":4}}"#),
            true,
            "invalid ExitFD",
        ),
        (
            format!(r#"{{"NetNSPath":"{netns}","ExitFD":3}}"#),
            true,
            "missing ReadyFD",
        ),
        (
            format!(r#"{{"NetNSPath":"{netns}","ExitFD":3,"ReadyFD":77}}"#),
            true,
            "invalid ReadyFD",
        ),
        (
            format!(r#"{{"NetNSPath":"{netns}","ExitFD":3,"ReadyFD":3}}"#),
            true,
            "invalid ReadyFD",
        ),
        // fd 0 is stdin (a memfd here, not a pipe).
        (
            format!(r#"{{"NetNSPath":"{netns}","ExitFD":0,"ReadyFD":4}}"#),
            true,
            "missing ExitFD",
        ),
    ];
    for (stdin, fds, want) in &table {
        let (out, code) = run_raw(stdin.as_bytes(), *fds);
        assert_eq!(
            (out.as_str(), code),
            (format!("{want}\n").as_str(), 1),
            "stdin {stdin:?}"
        );
    }

    // Port errors, through the launcher as podman sees them: "rootlessport <line>".
    let e = |mappings: Vec<PortMapping>, child_ip: &str| {
        let mut cfg = config(&ns, tmp.path(), mappings);
        cfg.child_ip = child_ip.into();
        launch(&cfg).unwrap_err().to_string()
    };
    assert_eq!(
        e(vec![PortMapping::new("", 28200, 80, 1, "icmp")], ""),
        r#"rootlessport unknown proto: "icmp""#
    );
    assert_eq!(
        e(vec![PortMapping::new("", 28200, 80, 1, "sctp")], ""),
        r#"rootlessport unsupported proto: "sctp" (rootlessport forwards tcp and udp only)"#
    );
    assert_eq!(
        e(vec![PortMapping::new("300.1.1.1", 28200, 80, 1, "tcp")], ""),
        r#"rootlessport invalid ParentIP: "300.1.1.1""#
    );
    assert_eq!(
        e(vec![PortMapping::new("", 28200, 80, 1, "tcp")], "10.0.2"),
        r#"rootlessport invalid ChildIP: "10.0.2""#
    );
    assert_eq!(
        e(vec![PortMapping::new("", 0, 80, 1, "tcp")], ""),
        "rootlessport invalid ParentPort: 0"
    );
    assert_eq!(
        e(vec![PortMapping::new("", 65535, 80, 2, "udp")], ""),
        "rootlessport invalid port range: host port 65535 with range 2 goes past 65535"
    );
    assert_eq!(
        e(
            vec![
                PortMapping::new("", 28200, 80, 1, "tcp"),
                PortMapping::new("", 28200, 81, 1, "tcp")
            ],
            ""
        ),
        "rootlessport conflict with ID 1"
    );
    let _busy = TcpListener::bind("127.0.0.1:28201").unwrap();
    assert_eq!(
        e(vec![PortMapping::new("127.0.0.1", 28201, 80, 1, "tcp")], ""),
        "rootlessport listen tcp 127.0.0.1:28201: bind: address already in use"
    );
    assert_eq!(
        e(
            vec![PortMapping::new("192.0.2.99", 28202, 80, 1, "udp")],
            ""
        ),
        "rootlessport listen udp 192.0.2.99:28202: bind: cannot assign requested address"
    );
    let mut cfg = config(
        &ns,
        tmp.path(),
        vec![PortMapping::new("", 28203, 80, 1, "tcp")],
    );
    cfg.netns_path = "/nonexistent/ns".into();
    assert_eq!(
        launch(&cfg).unwrap_err().to_string(),
        r#"rootlessport cannot enter NetNSPath "/nonexistent/ns": no such file or directory"#
    );
    // Nothing was left listening by any of the failures.
    TcpListener::bind("0.0.0.0:28200").unwrap();
    TcpListener::bind("[::]:28203").unwrap();
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn reload_keeps_live_connections_and_redirects_new_ones() {
    require_harness();
    let ns = container();
    // A long TmpDir: the reload socket path is far over 108 bytes.
    let tmp = tempfile::tempdir().unwrap();
    let long = tmp.path().join("a-rather-long-directory-name-".repeat(5));
    std::fs::create_dir_all(&long).unwrap();
    let id = "f".repeat(64);
    let sock_path = long.join("rp").join(&id);
    assert!(sock_path.as_os_str().len() > 108);

    tcp_echo(&ns, "127.0.0.1", 80);
    tcp_echo(&ns, "127.0.0.2", 80);
    let mut cfg = config(
        &ns,
        &long,
        vec![PortMapping::new("127.0.0.1", 28300, 80, 1, "tcp")],
    );
    cfg.child_ip = "127.0.0.1".into();
    cfg.container_id = id.clone();
    cfg.rootless_cni = true;
    let (helper, exit_w) = launch(&cfg).unwrap();
    assert!(sock_path.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(long.join("rp"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);

    // A live connection to the first server...
    let mut live = TcpStream::connect("127.0.0.1:28300").unwrap();
    let mut line = [0u8; 24];
    live.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"hello from 127.0.0.1:80\n");

    rootlessport::reload::reload(&long, &id, "127.0.0.2").unwrap();
    // ... new connections go to the new child IP ...
    assert_eq!(
        talk("127.0.0.1:28300".parse().unwrap(), b"").unwrap(),
        b"hello from 127.0.0.2:80\n"
    );
    // ... and the live one still flows both ways.
    live.write_all(b"after reload").unwrap();
    live.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"after reload");

    // Bad requests get podman's error texts.
    let e = rootlessport::reload::reload(&long, &id, "not-an-ip")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        r#"port reloading failed: rootless port failed to add port: invalid ChildIP: "not-an-ip""#
    );
    let raw = raw_reload(&sock_path, b"10.0.0.1\n");
    assert!(
        raw.starts_with("rootless port failed to decode ports: "),
        "{raw}"
    );
    let over = rootlessport::reload::MAX_REQUEST + 1;
    let raw = raw_reload(&sock_path, &vec![b' '; over]);
    assert!(
        raw.starts_with(&format!("reload refused: request of {over} bytes")),
        "{raw}"
    );
    // The helper still works after them.
    assert_eq!(
        talk("127.0.0.1:28300".parse().unwrap(), b"").unwrap(),
        b"hello from 127.0.0.2:80\n"
    );
    let e = rootlessport::reload::reload(&long, "nope", "10.0.0.1")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("could not reload rootless port mappings, port forwarding may no longer work correctly: "), "{e}");

    finish(helper, exit_w);
    assert!(!sock_path.exists(), "reload socket left behind");
}

/// Send raw bytes on the reload socket (through /proc/self/fd, the path is long).
fn raw_reload(path: &Path, msg: &[u8]) -> String {
    let dir = std::fs::File::open(path.parent().unwrap()).unwrap();
    use std::os::fd::AsRawFd;
    let via = format!(
        "/proc/self/fd/{}/{}",
        dir.as_raw_fd(),
        path.file_name().unwrap().to_string_lossy()
    );
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = nix::sys::socket::UnixAddr::new(via.as_str()).unwrap();
    nix::sys::socket::connect(fd.as_raw_fd(), &addr).unwrap();
    nix::sys::socket::send(fd.as_raw_fd(), msg, nix::sys::socket::MsgFlags::empty()).unwrap();
    let mut buf = [0u8; 4096];
    let n = nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn sigterm_exits_cleanly() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(
        &ns,
        tmp.path(),
        vec![PortMapping::new("", 28400, 80, 1, "tcp")],
    );
    cfg.rootless_cni = true;
    let (helper, exit_w) = launch(&cfg).unwrap();
    let sock = tmp.path().join("rp").join("c0ffee");
    assert!(sock.exists());
    let status = helper.stop(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "SIGTERM must end it cleanly: {status}");
    assert!(!sock.exists());
    TcpListener::bind("[::]:28400").unwrap();
    drop(exit_w);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn rootless_in_a_user_namespace() {
    require_harness();
    // The container netns belongs to a user namespace; the helper runs in that user
    // namespace (as podman's does) but in our network namespace, with no privilege
    // over it.
    let holder = std::process::Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--net",
            "--",
            "sh",
            "-c",
            "ip link set lo up && exec sleep 3600",
        ])
        .spawn()
        .unwrap();
    let pid = holder.id();
    // Killed and reaped even when an assertion fails first.
    let mut holder = tests::KillOnDrop(holder);
    assert!(eventually(10, || std::fs::read_to_string(format!(
        "/proc/{pid}/comm"
    ))
    .unwrap_or_default()
    .trim()
        == "sleep"));
    let netns = format!("/proc/{pid}/ns/net");
    let userns = format!("/proc/{pid}/ns/user");
    assert_ne!(
        std::fs::read_link(&userns).unwrap(),
        std::fs::read_link("/proc/self/ns/user").unwrap()
    );

    // Server inside the container netns (made by a thread that joined it).
    let fd = slirp_spawn::open_netns(&slirp_spawn::Netns::Path(netns.clone().into())).unwrap();
    let l = slirp_spawn::in_netns(&fd, || TcpListener::bind("127.0.0.1:80").unwrap()).unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"rootless hello");
        }
    });

    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::new(
        "rootless",
        netns.clone(),
        "",
        tmp.path().display().to_string(),
    )
    .with_mappings(vec![PortMapping::new("", 28500, 80, 1, "tcp,udp")]);
    let mut cfg34 = cfg.clone();
    cfg34.exit_fd = 3;
    cfg34.ready_fd = 4;
    // The helper, started inside the container's user namespace as podman's is.
    let start = |cfg: &Config| {
        let (exit_r, exit_w) = tests::cloexec_pipe();
        let (ready_r, ready_w) = tests::cloexec_pipe();
        let out = LogFile::anonymous("out").unwrap();
        let h = HelperCommand::new("nsenter")
            .args([
                format!("--user={userns}"),
                "--".into(),
                rootlessport_bin().display().to_string(),
            ])
            .stdin_bytes(serde_json::to_vec(cfg).unwrap())
            .leak_fd(exit_r, 3)
            .leak_fd(ready_w, 4)
            .stdout_log(&out)
            .unwrap()
            .spawn()
            .unwrap();
        (h, exit_w, ready_r, out)
    };
    let (mut h, exit_w, ready_r, out) = start(&cfg34);
    let ready = h.await_ready(&ready_r, Instant::now() + Duration::from_secs(10));
    assert!(
        matches!(ready, Ok(ref b) if b == b"1"),
        "{ready:?}: {}",
        out.contents()
    );
    // It really runs inside the user namespace.
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/user", h.pid())).unwrap(),
        std::fs::read_link(&userns).unwrap()
    );
    let mut c = TcpStream::connect("127.0.0.1:28500").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert_eq!(s, "rootless hello");
    drop(exit_w);
    let status = h.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert!(status.success());

    // Without privilege over our netns it cannot take a privileged port.
    let mut low = cfg34.clone();
    low.mappings = vec![PortMapping::new("", 80, 80, 1, "tcp")];
    let (mut h, _exit_w, _ready_r, out) = start(&low);
    let status = h.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        out.contents(),
        "listen tcp 0.0.0.0:80: bind: permission denied\n"
    );
    holder.kill_now();
}

/// A helper that held many connections goes back to its idle size once they are gone
/// (the heap they used is given back, not kept by the allocator for good).
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn memory_of_closed_connections_is_given_back() {
    require_harness();
    const CONNS: usize = 1000;
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    // A server that keeps every connection it accepts, answering one byte on each.
    let l = ns.run(|| TcpListener::bind(("127.0.0.1", 90)).unwrap());
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() && held_tx.send(c).is_err() {
                return;
            }
        }
    });
    let cfg = config(
        &ns,
        tmp.path(),
        vec![PortMapping::new("127.0.0.1", 28098, 90, 1, "tcp")],
    );
    let (helper, exit_w) = launch(&cfg).unwrap();
    let idle = tests::rss_anon_kb(helper.pid());
    let mut clients = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut c = TcpStream::connect("127.0.0.1:28098").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"m").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"m");
        clients.push(c);
    }
    let servers: Vec<TcpStream> = held_rx.iter().take(CONNS).collect();
    let loaded = tests::rss_anon_kb(helper.pid());
    // Each live connection holds heap: the figure below means something.
    assert!(
        loaded > idle + 1024,
        "{CONNS} live connections: {loaded} KB anonymous, idle {idle} KB"
    );
    drop(clients);
    drop(servers);
    let mut now = loaded;
    let back = eventually(10, || {
        now = tests::rss_anon_kb(helper.pid());
        now < idle + 512
    });
    assert!(
        back,
        "{CONNS} connections closed: {now} KB anonymous stays, idle was {idle} KB, loaded {loaded} KB"
    );
    println!("anonymous RSS: idle {idle} KB, {CONNS} live {loaded} KB, closed {now} KB");
    finish(helper, exit_w);
}

/// Many ports are bound by several threads; a port taken in the later part of the
/// batch (by someone else, or by an earlier mapping of the same batch) is still the
/// sequential start-up's error, and nothing of the batch stays bound.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn many_ports_bind_failure_names_the_port_and_leaves_nothing() {
    require_harness();
    let ns = container();
    let tmp = tempfile::tempdir().unwrap();
    // Below the ephemeral range (32768 up), where other tests' clients take ports.
    let (first, n) = (12000u16, 2000u16);
    let mappings = |extra: Option<PortMapping>| {
        let mut m: Vec<PortMapping> = (0..n)
            .map(|i| PortMapping::new("", first + i, 80, 1, "tcp"))
            .collect();
        m.extend(extra);
        config(&ns, tmp.path(), m)
    };
    // Taken by someone else, three quarters in (another binding thread's slice).
    let taken = first + n * 3 / 4;
    let busy = TcpListener::bind(("0.0.0.0", taken)).unwrap();
    assert_eq!(
        launch(&mappings(None)).unwrap_err().to_string(),
        format!("rootlessport listen tcp 0.0.0.0:{taken}: bind: address already in use")
    );
    drop(busy);
    // Taken by the batch itself: the first port again as tcp4, last in the batch.
    assert_eq!(
        launch(&mappings(Some(PortMapping::new("", first, 80, 1, "tcp4"))))
            .unwrap_err()
            .to_string(),
        format!("rootlessport listen tcp4 0.0.0.0:{first}: bind: address already in use")
    );
    for port in first..first + n {
        TcpListener::bind(("::", port)).unwrap_or_else(|e| panic!("port {port} left bound: {e}"));
    }
    // And the batch itself works: every port is served.
    tcp_echo(&ns, "127.0.0.1", 80);
    let (helper, exit_w) = launch(&mappings(None)).unwrap();
    for port in [first, taken, first + n - 1] {
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(
            talk(to, b"x").unwrap(),
            b"hello from 127.0.0.1:80\nx",
            "{port}"
        );
    }
    finish(helper, exit_w);
}

/// `ROOTLESSPORT_LOG` as documented: level words, `module=level`, and a value with a
/// word that is not a level replaced by the default with one warning line.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn log_filter_from_rootlessport_log() {
    // Empty stdin: the helper fails before ready, with a debug line naming why.
    let stderr = |value: &str| {
        let out = std::process::Command::new(rootlessport_bin())
            .env("ROOTLESSPORT_LOG", value)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{value}");
        assert_eq!(out.stdout, b"unexpected end of JSON input\n", "{value}");
        String::from_utf8(out.stderr).unwrap()
    };
    let debug = "rootlessport: debug: failed before ready: unexpected end of JSON input\n";
    for shown in [
        "debug",
        "DEBUG",
        "4",
        "rootlessport=debug",
        "warn,rootlessport=trace",
    ] {
        assert_eq!(stderr(shown), debug, "{shown}");
    }
    for quiet in [
        "",
        "warn",
        "info",
        "rootlessport::tcp=debug",
        "rootlessport=info,debug",
    ] {
        assert_eq!(stderr(quiet), "", "{quiet}");
    }
    for bad in ["degub", "rootlessport=degub", "rootlessport[conn]=debug"] {
        let said = stderr(bad);
        assert!(
            said.starts_with(&format!(
                "rootlessport: warning: ROOTLESSPORT_LOG={bad:?} is not a valid filter ("
            )) && said.ends_with("); using \"warn\"\n")
                && said.lines().count() == 1,
            "{bad}: {said}"
        );
    }
    // Not UTF-8: refused the same way, not dropped unsaid.
    let out = std::process::Command::new(rootlessport_bin())
        .env(
            "ROOTLESSPORT_LOG",
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"debug\xff"),
        )
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8(out.stderr).unwrap();
    assert!(
        said.starts_with(
            "rootlessport: warning: ROOTLESSPORT_LOG=\"debug\u{fffd}\" is not a valid filter ("
        ) && said.lines().count() == 1,
        "{said}"
    );
}
