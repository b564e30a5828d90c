//! `rootlessport/examples/engine.rs`, an engine's whole flow on the public API, run for
//! real: slirp4netns for a fresh netns holding the echo server, TCP and UDP published by
//! rootlessport, fetched from the host's loopback and from a remote client, a reload
//! to a new container address, teardown, and nothing left. The example binary is
//! `target/<profile>/examples/engine` (`cargo xtask itest` builds it).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use tests::{
    eventually, process_exists, processes_mentioning, require_harness, rootlessport_bin,
    start_echo_server, ClientHost, TestNetns,
};

/// The example's binary, beside the helper in `target/<profile>/examples/`.
fn engine_bin() -> PathBuf {
    let bin = rootlessport_bin()
        .parent()
        .expect("target/<profile>")
        .join("examples/engine");
    assert!(
        bin.exists(),
        "{} is missing: cargo build -p rootlessport --examples (cargo xtask itest does)",
        bin.display()
    );
    bin
}

/// A running example: its stdout line by line (with a deadline), stdin to drive it.
/// Killed on drop, so a failed test leaves nothing (its helpers follow their exit pipes).
struct Engine {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Engine {
    fn start(args: &[&str]) -> Engine {
        let mut child = Command::new(engine_bin())
            .args(args)
            .env("ROOTLESSPORT_BIN", rootlessport_bin())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("engine: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Engine {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line starting with `prefix` (skipping others), within 20 s.
    fn line(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!("no line {prefix:?} from the example; got {:?}", self.seen),
            }
        }
    }

    fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    fn pid_in(line: &str) -> u32 {
        line.split("pid ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"))
    }

    /// Wait for it to exit (within 20 s); its status.
    fn wait(&mut self) -> std::process::ExitStatus {
        assert!(
            eventually(20, || self.child.try_wait().unwrap().is_some()),
            "the example did not exit"
        );
        self.child.wait().unwrap()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The echo server (`xtask echo-server`) inside `ns`, as the container. Killed on drop.
struct Server(Child);

impl Server {
    fn start(ns: &TestNetns, tcp: u16, udp: u16) -> Server {
        let mut nsenter = Command::new("nsenter");
        nsenter
            .arg(format!("--net={}", ns.path().display()))
            .arg("--");
        let child = start_echo_server(nsenter, tcp, udp);
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The greeting of a TCP connection through `to`, opened by `connect` (in some netns),
/// with a byte echoed back: `tcp 80 from PEER`.
fn fetch_tcp(stream: TcpStream) -> String {
    let mut c = stream;
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"ping").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    let (greeting, echoed) = s.split_once('\n').unwrap_or((&s, ""));
    assert_eq!(
        echoed, "ping",
        "bytes must come back through the port: {s:?}"
    );
    greeting.to_owned()
}

/// The reply of the echo server to a datagram through `to`: `udp 53 from PEER: hi`.
fn ask_udp(sock: UdpSocket, to: SocketAddr) -> String {
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = (0..20)
        .find_map(|_| {
            sock.send_to(b"hi", to).unwrap();
            sock.recv(&mut buf).ok()
        })
        .expect("no UDP reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The peer address the server reported in `reply` (`tcp 80 from 10.0.2.100:4711`).
fn peer_ip(reply: &str) -> String {
    let addr = reply
        .split(" from ")
        .nth(1)
        .and_then(|s| s.split(": ").next())
        .unwrap_or_else(|| panic!("no peer in {reply:?}"));
    let addr: SocketAddr = addr.parse().unwrap();
    addr.ip().to_string()
}

/// Every file under `dir` (directories not counted), relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

const TCP_PORT: u16 = 28920;
const UDP_PORT: u16 = 28921;
/// The container's new address, the reload's target: in a subnet of its own, so that
/// it is also the source of connections to it (a second address of 10.0.2.0/24 would
/// have 10.0.2.100 as its source).
const NEW_IP: &str = "10.0.3.200";

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn engine_example_publishes_reloads_and_leaves_nothing() {
    require_harness();
    let ns = TestNetns::new();
    let server = Server::start(&ns, 80, 53);
    let client = ClientHost::new(0);
    let tmp = tempfile::tempdir().unwrap();
    let netns = ns.path().display().to_string();
    let tmp_dir = tmp.path().display().to_string();
    let mut engine = Engine::start(&[
        &netns,
        &tmp_dir,
        "engine-ctr",
        "-p",
        &format!("{TCP_PORT}:80"),
        "-p",
        &format!("{UDP_PORT}:53/udp"),
        "--reload-to",
        NEW_IP,
    ]);
    let slirp_pid = Engine::pid_in(&engine.line("slirp4netns: pid "));
    let helper_pid = Engine::pid_in(&engine.line("rootlessport: pid "));
    assert_eq!(
        engine.line("published "),
        format!("published tcp *:{TCP_PORT} -> 10.0.2.100:80")
    );
    assert_eq!(
        engine.line("published "),
        format!("published udp *:{UDP_PORT} -> 10.0.2.100:53")
    );
    assert_eq!(engine.line("guest "), "guest 10.0.2.100");
    engine.line("ready: ");

    // From the host's loopback the container sees its own address (as with podman);
    // from a remote client, that client.
    let local_tcp = fetch_tcp(TcpStream::connect(("127.0.0.1", TCP_PORT)).unwrap());
    assert_eq!(peer_ip(&local_tcp), "10.0.2.100", "{local_tcp}");
    let to = SocketAddr::from((client.host_addr, TCP_PORT));
    let remote = client.ns.run(move || TcpStream::connect(to).unwrap());
    let remote_tcp = fetch_tcp(remote);
    assert_eq!(
        peer_ip(&remote_tcp),
        client.client_addr.to_string(),
        "{remote_tcp}"
    );
    let to = SocketAddr::from((client.host_addr, UDP_PORT));
    let sock = client.ns.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    let remote_udp = ask_udp(sock, to);
    assert!(remote_udp.ends_with(": hi"), "{remote_udp}");
    assert_eq!(
        peer_ip(&remote_udp),
        client.client_addr.to_string(),
        "{remote_udp}"
    );
    let local_udp = ask_udp(
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, UDP_PORT)),
    );
    assert!(local_udp.starts_with("udp 53 from "), "{local_udp}");

    // A network reload gives the container a new address: new connections go there.
    ns.sh(&format!("ip addr add {NEW_IP}/24 dev tap0"));
    engine.send_line();
    assert_eq!(engine.line("reload to "), format!("reload to {NEW_IP}: OK"));
    engine.line("ready: ");
    let after = fetch_tcp(TcpStream::connect(("127.0.0.1", TCP_PORT)).unwrap());
    assert_eq!(peer_ip(&after), NEW_IP, "{after}");
    let to = SocketAddr::from((client.host_addr, TCP_PORT));
    let remote = client.ns.run(move || TcpStream::connect(to).unwrap());
    let remote_after = fetch_tcp(remote);
    assert_eq!(
        peer_ip(&remote_after),
        client.client_addr.to_string(),
        "{remote_after}"
    );

    // A signal ends it, as it ends an engine.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engine.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(engine.line("torn down"), "torn down");
    let status = engine.wait();
    assert!(status.success(), "{status}");
    assert!(
        engine.seen.iter().any(|l| l == "SIGTERM: tearing down"),
        "{:?}",
        engine.seen
    );

    assert!(!process_exists(slirp_pid), "slirp4netns left");
    assert!(!process_exists(helper_pid), "rootlessport left");
    drop(server);
    assert_eq!(
        processes_mentioning(&netns),
        [] as [String; 0],
        "a process for the netns is left"
    );
    // Logs unlinked, the reload socket and the rp/ the helper made removed.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in the tmp dir: {left:?}");
    assert!(
        TcpListener::bind(("0.0.0.0", TCP_PORT)).is_ok()
            && UdpSocket::bind(("0.0.0.0", UDP_PORT)).is_ok(),
        "a published port is still held"
    );
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn engine_example_ends_on_a_line_and_fails_in_one_line() {
    require_harness();
    let ns = TestNetns::new();
    let _server = Server::start(&ns, 80, 53);
    let tmp = tempfile::tempdir().unwrap();
    let netns = ns.path().display().to_string();
    let tmp_dir = tmp.path().display().to_string();

    // No reload: the first line on stdin tears down.
    let mut engine = Engine::start(&[&netns, &tmp_dir, "engine-line", "-p", "28922:80"]);
    let slirp_pid = Engine::pid_in(&engine.line("slirp4netns: pid "));
    engine.line("ready: ");
    let greeting = fetch_tcp(TcpStream::connect(("127.0.0.1", 28922)).unwrap());
    assert!(greeting.starts_with("tcp 80 from "), "{greeting}");
    engine.send_line();
    engine.line("torn down");
    assert!(engine.wait().success());
    assert!(!process_exists(slirp_pid), "slirp4netns left");
    assert!(TcpListener::bind(("0.0.0.0", 28922)).is_ok(), "port held");

    // Failures: one line on stderr, a non-zero status, nothing left running or on disk.
    let busy = TcpListener::bind(("127.0.0.1", 28923)).unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[&netns, &tmp_dir, "c", "-p", "80"],
            2,
            r#"engine: invalid -p "80": expected [IP:]HOST:CONTAINER[/PROTO]"#,
        ),
        (
            &[&netns, &tmp_dir, "c", "-p", "8080:80", "-p", "8080:81"],
            2,
            "engine: conflict with ID 1",
        ),
        (
            &[&netns, &tmp_dir, "c", "--network", "slirp4netns:mtu=10"],
            2,
            r#"engine: invalid mtu "10""#,
        ),
        (
            &[&netns, &tmp_dir],
            2,
            "engine: expected NETNS TMPDIR CONTAINER_ID (engine --help)",
        ),
        (
            &["/nonexistent/ns", &tmp_dir, "c", "-p", "8080:80"],
            1,
            "engine: cannot open network namespace /nonexistent/ns: No such file or directory (os error 2)",
        ),
        (
            &[&netns, &tmp_dir, "c", "-p", "127.0.0.1:28923:80"],
            1,
            "engine: rootlessport listen tcp 127.0.0.1:28923: bind: address already in use",
        ),
    ];
    for (args, code, want) in cases {
        let out = Command::new(engine_bin())
            .args(*args)
            .env("ROOTLESSPORT_BIN", rootlessport_bin())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), *want, "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert_eq!(files_under(tmp.path()), [] as [String; 0], "{args:?}");
    }
    drop(busy);
    // The failed launch stopped the slirp4netns it had started.
    assert!(
        eventually(5, || processes_mentioning(&netns).is_empty()),
        "slirp4netns left after a failed launch"
    );
}
