//! The helper where users run it (issue 11): a container on podman's rootless bridge
//! network ([`BridgeTopology`]) with a sibling container on the same bridge and a remote
//! client, client addresses kept. The container's own UDP traffic and its neighbours'
//! must not be caught by the reply routing; UDP flows must survive a reload, a server
//! that starts late, many clients and sprayed source ports; two connections from one
//! client port must both work; a UDP flood must not starve TCP or the exit pipe.
//!
//! Every test's name starts with `shapes_`, so `cargo xtask itest shapes` runs them all.
//!
//! Servers report whom they see: UDP answers `TAG|PAYLOAD|PEER`, TCP writes `PEER\n`
//! and then echoes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slirp_config::PortMapping;
use tests::{netns_state, require_harness, unmap, BridgeTopology, ClientHost, TestNetns};

/// How long a single UDP answer may take (generous: a loaded 2-core machine).
const ANSWER: Duration = Duration::from_secs(3);

/// How long a reporter waits before answering a `later:` payload.
const LATER: Duration = Duration::from_secs(2);

/// The flood, the 6,000 queries and the spray run alone (write lock), the other tests
/// together (read lock), so that load from one cannot fail another.
static LOAD: RwLock<()> = RwLock::new(());

fn light() -> std::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|p| p.into_inner())
}

fn heavy() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|p| p.into_inner())
}

fn udp(host_port: u16, container_port: u16, range: u16) -> PortMapping {
    PortMapping::new("", host_port, container_port, range, "udp")
}

fn tcp(host_port: u16, container_port: u16) -> PortMapping {
    PortMapping::new("", host_port, container_port, 1, "tcp")
}

/// Servers on background threads, stopped and joined on drop (so that none of their
/// sockets keeps a namespace alive).
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn new() -> Servers {
        Servers {
            stop: Arc::default(),
            threads: Vec::new(),
        }
    }

    /// A UDP server in `ns` on `addr` answering `TAG|PAYLOAD|PEER` from the port it was
    /// sent to: at once, or [`LATER`] after it when the payload starts with `later:`.
    fn udp_reporter(&mut self, ns: &TestNetns, addr: SocketAddr, tag: &'static str) {
        let sock = ns.run(move || UdpSocket::bind(addr));
        let sock = sock.unwrap_or_else(|e| panic!("binding UDP {addr}: {e}"));
        self.serve_udp(sock, Some(tag));
    }

    /// A UDP server in `ns` on `addr` that reads and drops everything.
    fn udp_sink(&mut self, ns: &TestNetns, addr: SocketAddr) {
        let sock = ns.run(move || UdpSocket::bind(addr));
        let sock = sock.unwrap_or_else(|e| panic!("binding UDP {addr}: {e}"));
        self.serve_udp(sock, None);
    }

    fn serve_udp(&mut self, sock: UdpSocket, tag: Option<&'static str>) {
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // Answers due later: when, what, to whom.
            let mut later: Vec<(Instant, String, SocketAddr)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                for (_, answer, to) in later.extract_if(.., |(due, ..)| *due <= now) {
                    let _ = sock.send_to(answer.as_bytes(), to);
                }
                let wait = if later.is_empty() { 200 } else { 10 };
                sock.set_read_timeout(Some(Duration::from_millis(wait)))
                    .unwrap();
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(tag) = tag {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let answer = format!("{tag}|{text}|{}", unmap(from));
                    if text.starts_with("later:") {
                        later.push((Instant::now() + LATER, answer, from));
                    } else {
                        let _ = sock.send_to(answer.as_bytes(), from);
                    }
                }
            }
        }));
    }

    /// A TCP server in `ns` on `addr`: writes `PEER\n` first when `report`, then
    /// echoes everything.
    fn tcp_server(&mut self, ns: &TestNetns, addr: SocketAddr, report: bool) {
        let l = ns.run(move || TcpListener::bind(addr));
        let l = l.unwrap_or_else(|e| panic!("binding TCP {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, peer)) => {
                        let stop = stop.clone();
                        conns.push(std::thread::spawn(move || echo(c, peer, report, &stop)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        }));
    }
}

fn echo(mut c: TcpStream, peer: SocketAddr, report: bool, stop: &AtomicBool) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    if report
        && c.write_all(format!("{}\n", unmap(peer)).as_bytes())
            .is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Send `msg` to `to` and wait up to `wait` for the answer naming it (`TAG|msg|PEER`);
/// anything else that arrives meanwhile is listed in the error.
fn ask(sock: &UdpSocket, to: SocketAddr, msg: &str, wait: Duration) -> Result<String, String> {
    ask_seen_from(sock, to, msg, wait).map(|(text, _)| text)
}

/// The helper exited cleanly once its exit pipe closed (`status`), and the container
/// netns's routing state is `before` again.
fn exits_leaving(status: Option<std::process::ExitStatus>, container: &TestNetns, before: &str) {
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(netns_state(container), before, "routing state left changed");
}

/// In `ns`: a UDP socket bound to `bind`, one question to `to`, the answer or why not,
/// and the socket's own address.
fn ask_from(
    ns: &TestNetns,
    bind: SocketAddr,
    to: SocketAddr,
    msg: &'static str,
) -> (Result<String, String>, SocketAddr) {
    ask_from_within(ns, bind, to, msg, ANSWER)
}

/// [`ask_from`] with another time limit.
fn ask_from_within(
    ns: &TestNetns,
    bind: SocketAddr,
    to: SocketAddr,
    msg: &'static str,
    wait: Duration,
) -> (Result<String, String>, SocketAddr) {
    ns.run(move || {
        let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let me = s.local_addr().unwrap();
        (ask(&s, to, msg, wait), me)
    })
}

/// Read up to and including `\n` (5 s at most).
fn read_line(c: &mut TcpStream) -> Result<String, String> {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match c.read(&mut b) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&line)
                ))
            }
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
}

/// Write `msg` and read exactly as many bytes back (5 s at most).
fn echo_back(c: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(msg).map_err(|e| format!("writing: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)
        .map_err(|e| format!("reading the echo: {e}"))?;
    if got != msg {
        return Err(format!("echo {got:?} instead of {msg:?}"));
    }
    Ok(())
}

/// From the remote client: a TCP connection to `to`; what the container saw and
/// the client's own address.
fn tcp_peer(client: &ClientHost, to: SocketAddr) -> (Result<String, String>, SocketAddr) {
    client.ns.run(move || {
        let mut c = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => return (Err(format!("connecting to {to}: {e}")), to),
        };
        let me = c.local_addr().unwrap();
        let seen = read_line(&mut c).and_then(|line| {
            echo_back(&mut c, b"data both ways")?;
            Ok(line)
        });
        (seen, me)
    })
}

/// A bridge topology on `slot` whose container answers on `any`: UDP 53 with
/// `container|PAYLOAD|PEER`, TCP 80 with `PEER\n` and then an echo.
fn serving_53_and_80(slot: u8, any: IpAddr) -> (BridgeTopology, Servers) {
    let topo = BridgeTopology::new(slot);
    let mut servers = Servers::new();
    servers.udp_reporter(&topo.container, SocketAddr::new(any, 53), "container");
    servers.tcp_server(&topo.container, SocketAddr::new(any, 80), true);
    (topo, servers)
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Case 1a: a sibling on the bridge asks the container's published UDP port
/// directly (not through the helper): the container's reply from that port must
/// reach it.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_sibling_gets_answers_from_a_published_udp_port() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(20);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 53),
        "container",
    );
    let to = sock(topo.container_ip(), 53);
    let from = sock(topo.sibling_ip(), 0);
    let (before, me) = ask_from(&topo.sibling, from, to, "sibling");
    assert_eq!(
        before,
        Ok(format!("container|sibling|{me}")),
        "the topology itself is broken (no helper yet)"
    );

    let _helper = topo.launch(vec![udp(20053, 53, 1), udp(21000, 45000, 1000)]);
    let (during, me) = ask_from(&topo.sibling, from, to, "sibling");
    assert_eq!(
        during,
        Ok(format!("container|sibling|{me}")),
        "the sibling's query to the container's published UDP port 53, while the helper runs"
    );
}

/// Case 1b, WireGuard-style: the container's socket on its published UDP port talks
/// first to a peer on the bridge and must get the peer's answer.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_container_talks_first_from_its_published_udp_port() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(21);
    let mut servers = Servers::new();
    servers.udp_reporter(&topo.sibling, sock(Ipv4Addr::UNSPECIFIED, 51820), "sibling");
    let peer = sock(topo.sibling_ip(), 51820);
    let wg = sock(Ipv4Addr::UNSPECIFIED, 51820);
    let expect = format!("sibling|handshake|{}", sock(topo.container_ip(), 51820));
    let (before, _) = ask_from(&topo.container, wg, peer, "handshake");
    assert_eq!(
        before,
        Ok(expect.clone()),
        "the topology itself is broken (no helper yet)"
    );

    let _helper = topo.launch(vec![udp(20820, 51820, 1)]);
    let (during, _) = ask_from(&topo.container, wg, peer, "handshake");
    assert_eq!(
        during,
        Ok(expect),
        "the container's handshake from its published port 51820/udp to {peer}, \
         while the helper runs"
    );
}

/// Case 1c: the container's own query from an ephemeral port that happens to fall
/// in a published range (45500 in 45000-45999/udp) to a resolver on the sibling.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_container_query_from_a_port_in_a_published_range() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(22);
    let mut servers = Servers::new();
    servers.udp_reporter(&topo.sibling, sock(Ipv4Addr::UNSPECIFIED, 53), "resolver");
    let resolver = sock(topo.sibling_ip(), 53);
    let from = sock(Ipv4Addr::UNSPECIFIED, 45500);
    let expect = format!("resolver|query|{}", sock(topo.container_ip(), 45500));
    let (before, _) = ask_from(&topo.container, from, resolver, "query");
    assert_eq!(
        before,
        Ok(expect.clone()),
        "the topology itself is broken (no helper yet)"
    );

    let _helper = topo.launch(vec![udp(20153, 53, 1), udp(22000, 45000, 1000)]);
    let (during, _) = ask_from(&topo.container, from, resolver, "query");
    assert_eq!(
        during,
        Ok(expect),
        "the container's query from port 45500 (in the published 45000-45999/udp) to {resolver}"
    );
}

/// Case 1 (also): through the helper, the remote client is seen with its own
/// address on the bridge network, TCP and UDP; after the helper exits, the
/// container's routing state is what it was.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_remote_client_keeps_its_address_on_a_bridge_network() {
    remote_client_keeps_its_address(false);
}

/// The IPv6 variant: a remote IPv6 client, child IP 2001:db8:88::2.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_remote_ipv6_client_keeps_its_address_on_a_bridge_network() {
    remote_client_keeps_its_address(true);
}

fn remote_client_keeps_its_address(v6: bool) {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(if v6 { 24 } else { 23 });
    let mut servers = Servers::new();
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    servers.udp_reporter(&topo.container, SocketAddr::new(any, 53), "container");
    servers.tcp_server(&topo.container, SocketAddr::new(any, 80), true);
    let before = netns_state(&topo.container);
    let (udp_port, tcp_port) = if v6 { (20653, 20680) } else { (20253, 20280) };
    let child = if v6 {
        topo.container_ip6().to_string()
    } else {
        topo.container_ip().to_string()
    };
    let mut helper = topo.launch_with(vec![udp(udp_port, 53, 1), tcp(tcp_port, 80)], |c| {
        c.child_ip = child
    });
    let (host, me_ip): (IpAddr, IpAddr) = if v6 {
        (
            topo.client.host_addr6.into(),
            topo.client.client_addr6.into(),
        )
    } else {
        (topo.client.host_addr.into(), topo.client.client_addr.into())
    };

    let (seen, me) = tcp_peer(&topo.client, SocketAddr::new(host, tcp_port));
    assert_eq!(seen, Ok(me.to_string()), "TCP through the helper");
    assert_eq!(me.ip(), me_ip);
    let (answer, me) = ask_from(
        &topo.client.ns,
        SocketAddr::new(me_ip, 0),
        SocketAddr::new(host, udp_port),
        "client",
    );
    assert_eq!(
        answer,
        Ok(format!("container|client|{me}")),
        "UDP through the helper"
    );

    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// Case 3: a UDP flow that keeps sending across a reload to a new child IP (the old
/// address removed) must be answered again, with the client's address kept.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_udp_flow_survives_a_reload_to_a_new_child_ip() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(25);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 56),
        "container",
    );
    let helper = topo.launch(vec![udp(5356, 56, 1)]);

    // One socket, one port, a datagram every 0.5 s; answers are kept with their seq.
    let to = sock(topo.client.host_addr, 5356);
    let bind = sock(topo.client.client_addr, 0);
    let s = topo.client.ns.run(move || UdpSocket::bind(bind)).unwrap();
    let me = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let next = Arc::new(AtomicU32::new(0));
    let answers: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (next, answers, stop) = (next.clone(), answers.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut due = Instant::now();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= due {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let _ = s.send_to(format!("seq{n}").as_bytes(), to);
                    due += Duration::from_millis(500);
                }
                if let Ok(len) = s.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    let seq = text
                        .split('|')
                        .nth(1)
                        .and_then(|p| p.strip_prefix("seq"))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(u32::MAX);
                    answers.lock().unwrap().push((seq, text));
                }
            }
        })
    };
    let answered_from = |from: u32| {
        answers
            .lock()
            .unwrap()
            .iter()
            .find(|(seq, _)| *seq >= from && *seq != u32::MAX)
            .cloned()
    };

    let first = tests::eventually(10, || answered_from(0).is_some());
    let finish = |stop: &AtomicBool| stop.store(true, Ordering::Relaxed);
    if !first {
        finish(&stop);
    }
    assert!(first, "no answer before the reload");
    let (_, text) = answered_from(0).unwrap();
    assert!(
        text.ends_with(&format!("|{me}")),
        "before the reload: {text}"
    );

    // podman's network reload: the container gets a new address, the helper is told,
    // the old address goes.
    topo.container.sh("ip addr add 198.51.100.12/24 dev eth0");
    let reloaded = helper.reload("198.51.100.12");
    topo.container.sh("ip addr del 198.51.100.2/24 dev eth0");
    let after = next.load(Ordering::SeqCst);
    let again = tests::eventually(5, || answered_from(after).is_some());
    finish(&stop);
    sender.join().unwrap();
    reloaded.unwrap();
    let all = answers.lock().unwrap().clone();
    assert!(
        again,
        "no answer within 5 s to the datagrams seq{after}.. sent from {me} after the reload \
         (sent up to seq{}); answers: {all:?}",
        next.load(Ordering::SeqCst)
    );
    let (_, text) = answered_from(after).unwrap();
    assert!(
        text.starts_with("container|") && text.ends_with(&format!("|{me}")),
        "after the reload the container must see the client itself: {text}"
    );
}

/// Case 4: nothing listens in the container when the first datagram arrives; once the
/// server is up, the very next datagram from the same client socket is answered.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_udp_flow_answered_once_the_server_starts() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(26);
    let _helper = topo.launch(vec![udp(17005, 8080, 1)]);
    let to = sock(topo.client.host_addr, 17005);
    let bind = sock(topo.client.client_addr, 0);
    let s = topo.client.ns.run(move || UdpSocket::bind(bind)).unwrap();
    let me = s.local_addr().unwrap();
    s.send_to(b"early", to).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 8080),
        "container",
    );
    let answer = ask(&s, to, "late", Duration::from_secs(3));
    assert_eq!(
        answer,
        Ok(format!("container|late|{me}")),
        "the one datagram sent after the server started (same client socket, no resend)"
    );
}

/// Case 5: a resolver's load, 6,000 queries at 100 a second, each from a fresh
/// source port; every one is answered within 2 s and names the client itself.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_six_thousand_fresh_port_queries_are_all_answered() {
    require_harness();
    let _load = heavy();
    const QUERIES: u32 = 6000;
    const EVERY: Duration = Duration::from_millis(10);
    const TIMEOUT: Duration = Duration::from_secs(2);
    let topo = BridgeTopology::new(27);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 53),
        "container",
    );
    let helper = topo.launch(vec![udp(20353, 53, 1)]);
    let to = sock(topo.client.host_addr, 20353);
    let bind = sock(topo.client.client_addr, 0);

    let (answered, unanswered, wrong) = topo.client.ns.run(move || {
        let start = Instant::now();
        let mut pending: Vec<(u32, UdpSocket, Instant, SocketAddr)> = Vec::new();
        let (mut answered, mut unanswered, mut wrong) = (0u32, Vec::new(), Vec::new());
        let mut next = 0u32;
        let mut buf = [0u8; 512];
        loop {
            while next < QUERIES && start + EVERY * next <= Instant::now() {
                let s = UdpSocket::bind(bind).unwrap();
                s.set_nonblocking(true).unwrap();
                s.connect(to).unwrap();
                let me = s.local_addr().unwrap();
                let _ = s.send(format!("q{next}").as_bytes());
                pending.push((next, s, Instant::now(), me));
                next += 1;
            }
            pending.retain(|(n, s, sent, me)| match s.recv(&mut buf) {
                Ok(len) => {
                    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    if text == format!("container|q{n}|{me}") {
                        answered += 1;
                    } else {
                        wrong.push(format!("q{n} from {me}: {text:?}"));
                    }
                    false
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if sent.elapsed() < TIMEOUT {
                        return true;
                    }
                    unanswered.push(format!("q{n} (at {:?})", *sent - start));
                    false
                }
                Err(e) => {
                    unanswered.push(format!("q{n}: {e}"));
                    false
                }
            });
            if next == QUERIES && pending.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (answered, unanswered, wrong)
    });
    let fds = std::fs::read_dir(format!("/proc/{}/fd", helper.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        unanswered.is_empty() && wrong.is_empty() && answered == QUERIES,
        "{answered} of {QUERIES} answered; {} unanswered, first: {:?}; {} wrong, first: {:?} \
         (the helper has {fds} fds open)",
        unanswered.len(),
        &unanswered[..unanswered.len().min(5)],
        wrong.len(),
        &wrong[..wrong.len().min(5)],
    );
}

/// Case 5 (spray): one host sends from 6,000 source ports at once; another host's
/// single query must still be answered at once (2 s).
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_a_port_spraying_host_does_not_lock_out_others() {
    require_harness();
    let _load = heavy();
    let topo = BridgeTopology::new(28);
    let other = ClientHost::new(29);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 53),
        "container",
    );
    let helper = topo.launch(vec![udp(20453, 53, 1)]);

    let to = sock(topo.client.host_addr, 20453);
    let a = topo.client.client_addr;
    let started = Instant::now();
    let sent = topo.client.ns.run(move || {
        let mut sent = 0u32;
        for port in 20000..26000u16 {
            let s = UdpSocket::bind((a, port)).unwrap();
            if s.send_to(b"spray", to).is_ok() {
                sent += 1;
            }
            // Paced a little so that the helper sees them all (a full socket buffer
            // would drop them before they count).
            if port % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        sent
    });
    let spray_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", helper.pid()))
        .map(|d| d.count())
        .unwrap_or(0);

    let (answer, me) = ask_from_within(
        &other.ns,
        sock(other.client_addr, 0),
        sock(other.host_addr, 20453),
        "other",
        Duration::from_secs(2),
    );
    assert_eq!(
        answer,
        Ok(format!("container|other|{me}")),
        "after {sent} datagrams from 6,000 ports of {a} in {spray_time:?} \
         (the helper has {fds} fds open)"
    );
}

/// Case 6: two connections from one client port (SO_REUSEADDR) to two published
/// ports of the same container port: both must carry data both ways (the second may
/// see the child IP as its client).
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_two_connections_from_one_client_port_to_one_container_port() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(30);
    let mut servers = Servers::new();
    servers.tcp_server(&topo.container, sock(Ipv4Addr::UNSPECIFIED, 80), true);
    let _helper = topo.launch(vec![tcp(8011, 80), tcp(8012, 80)]);
    let from = sock(topo.client.client_addr, 50000);
    let host = topo.client.host_addr;
    let result = topo
        .client
        .ns
        .run(move || -> Result<(String, String), String> {
            let connect = |port: u16| -> Result<TcpStream, String> {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .map_err(|e| e.to_string())?;
                s.set_reuse_address(true).map_err(|e| e.to_string())?;
                s.bind(&from.into())
                    .map_err(|e| format!("binding {from}: {e}"))?;
                s.connect_timeout(&sock(host, port).into(), Duration::from_secs(5))
                    .map_err(|e| format!("connecting {from} to port {port}: {e}"))?;
                Ok(s.into())
            };
            let mut first = connect(8011)?;
            let seen1 = read_line(&mut first).map_err(|e| format!("first connection: {e}"))?;
            echo_back(&mut first, b"one").map_err(|e| format!("first connection: {e}"))?;
            let mut second = connect(8012)?;
            let seen2 = read_line(&mut second).map_err(|e| format!("second connection: {e}"))?;
            echo_back(&mut second, b"two").map_err(|e| format!("second connection: {e}"))?;
            echo_back(&mut first, b"one again")
                .map_err(|e| format!("first connection, after the second: {e}"))?;
            echo_back(&mut second, b"two again")
                .map_err(|e| format!("second connection, later: {e}"))?;
            Ok((seen1, seen2))
        });
    let (seen1, seen2) = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen1, from.to_string(), "the first connection's client");
    assert!(!seen2.is_empty(), "the second connection's client");
}

/// Case 8: while two threads flood a published UDP port, TCP connections to another
/// port of the same helper still work (at least 20 one-byte echoes in 3 s), and
/// closing the exit pipe still stops it within 5 s. A liveness check, not a
/// performance one.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_a_udp_flood_starves_neither_tcp_nor_the_exit_pipe() {
    require_harness();
    let _load = heavy();
    let topo = BridgeTopology::new(31);
    let mut servers = Servers::new();
    servers.udp_sink(&topo.container, sock(Ipv4Addr::UNSPECIFIED, 9000));
    servers.tcp_server(&topo.container, sock(Ipv4Addr::UNSPECIFIED, 7), false);
    let mut helper = topo.launch(vec![udp(20590, 9000, 1), tcp(20507, 7)]);
    let host = topo.client.host_addr;
    let bind = sock(topo.client.client_addr, 0);

    let flooders: Vec<UdpSocket> = topo
        .client
        .ns
        .run(move || (0..2).map(|_| UdpSocket::bind(bind).unwrap()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU32::new(0));
    let threads: Vec<_> = flooders
        .into_iter()
        .map(|s| {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                s.connect(sock(host, 20590)).unwrap();
                let payload = [0x55u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if s.send(&payload).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let end_flood = |stop: &AtomicBool, threads: Vec<JoinHandle<()>>| {
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    };

    std::thread::sleep(Duration::from_millis(300));
    let flood_start = Instant::now();
    let (mut ok, mut errors) = (0u32, Vec::new());
    while flood_start.elapsed() < Duration::from_secs(3) {
        let to = sock(host, 20507);
        let r = topo.client.ns.run(move || -> Result<(), String> {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            echo_back(&mut c, b"x")
        });
        match r {
            Ok(()) => ok += 1,
            Err(e) => errors.push(e),
        }
    }
    let tcp_time = flood_start.elapsed();

    // Still flooding: close the exit pipe.
    let closed = Instant::now();
    let status = helper.exit_within(Duration::from_secs(5));
    let exit_time = closed.elapsed();
    end_flood(&stop, threads);
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "flood: {sent} datagrams; {ok} TCP echoes in {tcp_time:?}; \
         exit {status:?} after {exit_time:?}"
    );
    assert!(
        ok >= 20,
        "only {ok} TCP echoes in {tcp_time:?} during the UDP flood ({sent} datagrams sent in all); \
         errors: {errors:?}"
    );
    assert!(
        status.is_some(),
        "the helper did not exit within 5 s of its exit pipe closing during the flood"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?} after {exit_time:?}"
    );
}

// ---------------------------------------------------------------------------------
// More shapes: the ICMP case where the helper's upstream socket gets the error, flow
// rules following the flows (idle expiry, eviction), one client port to two published
// UDP ports, and a sibling's traffic while remote clients are served.

/// Send `msg` to `to` once and wait up to `wait` for the answer naming it; returns the
/// answer and the address it came from (other datagrams are listed in the error).
fn ask_seen_from(
    sock: &UdpSocket,
    to: SocketAddr,
    msg: &str,
    wait: Duration,
) -> Result<(String, SocketAddr), String> {
    sock.send_to(msg.as_bytes(), to)
        .map_err(|e| format!("sending {msg:?} to {to}: {e}"))?;
    let deadline = Instant::now() + wait;
    let mut others = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no answer to {msg:?} sent to {to} within {wait:?}; other datagrams: {others:?}"
            ));
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if text.split('|').nth(1) == Some(msg) {
                    return Ok((text, from));
                }
                others.push(format!("{text:?} from {from}"));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("receiving the answer to {msg:?}: {e}")),
        }
    }
}

/// The exact per-flow rules (`to CLIENT ipproto udp sport P dport Q`) for `client` in
/// `ns`, as `ip -4 rule` lists them.
fn flow_rules(ns: &TestNetns, client: Ipv4Addr) -> Vec<String> {
    let needle = format!(" to {client} ipproto udp sport ");
    ns.sh("ip -4 rule")
        .lines()
        .filter(|l| l.contains(&needle) && l.contains(" dport "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Whether one of `rules` is the flow rule of client port `port`.
fn has_rule_for_port(rules: &[String], port: u16) -> bool {
    let dport = format!(" dport {port} ");
    rules.iter().any(|r| r.contains(&dport))
}

/// Open fds of a process (0 once it is gone).
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A helper started through a wrapper script that runs `prelude` (shell lines: an
/// `export` of extra environment variables, a `ulimit`) and then execs the real binary
/// (same pid, fds 3 and 4 and stdin passed on). The launcher has no knob for the
/// helper's environment or limits (the helper inherits the test process's), and
/// changing this process's would leak into the tests running beside this one.
/// Dropping it closes the exit pipe and waits up to 5 s (then the launcher's handle
/// kills it).
struct WrappedHelper {
    process: rootlessport::launcher::RootlessPort,
    exit: Option<std::os::fd::OwnedFd>,
    _wrapper_dir: tempfile::TempDir,
}

impl WrappedHelper {
    /// With `env` exported.
    fn with_env(cfg: &rootlessport::Config, env: &[(&str, &str)]) -> WrappedHelper {
        let assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
        WrappedHelper::start(cfg, &format!("export {}", assignments.join(" ")))
    }

    fn start(cfg: &rootlessport::Config, prelude: &str) -> WrappedHelper {
        let dir = tempfile::tempdir().unwrap();
        let wrapper = tests::rootlessport_wrapper(dir.path(), "rootlessport", prelude);
        // A fork elsewhere in this process may briefly hold the script open for
        // writing (ETXTBSY): try again a few times.
        let mut attempt = 0;
        loop {
            let (exit_r, exit_w) = tests::cloexec_pipe();
            match rootlessport::launcher::Launcher::new(&wrapper).start(cfg, exit_r) {
                Ok(process) => {
                    return WrappedHelper {
                        process,
                        exit: Some(exit_w),
                        _wrapper_dir: dir,
                    }
                }
                Err(rootlessport::launcher::LaunchError::Spawn(e))
                    if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 20 =>
                {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!(
                    "starting {} through {}: {e}",
                    tests::rootlessport_bin().display(),
                    wrapper.display()
                ),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.exit = None;
        self.process
            .wait_timeout(timeout)
            .expect("waiting for rootlessport")
    }
}

impl Drop for WrappedHelper {
    fn drop(&mut self) {
        self.exit = None;
        let _ = self.process.wait_timeout(Duration::from_secs(5));
    }
}

/// Case 4 where the ICMP reaches the helper: `client` sends once while nothing
/// listens on the container's 8080/udp (the port-unreachable comes back to the
/// helper's own upstream socket, as the flow does not keep the client's address),
/// then the server starts and ONE more datagram from the same socket must be
/// answered (no resend), seen from the child IP's side.
fn one_datagram_after_an_icmp_error(
    topo: &BridgeTopology,
    client: &UdpSocket,
    to: SocketAddr,
    what: &str,
) {
    let me = client.local_addr().unwrap();
    client.send_to(b"early", to).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 8080),
        "container",
    );
    let answer = ask_seen_from(client, to, "late", ANSWER);
    let (text, from) = answer.unwrap_or_else(|e| {
        panic!(
            "{what}: the one datagram sent from {me} after the server started \
             (same client socket, no resend) was lost: {e}"
        )
    });
    let child = format!("container|late|{}:", topo.container_ip());
    assert!(
        text.starts_with(&child),
        "{what}: the container should see the child IP's side: {text:?}"
    );
    assert_eq!(
        from, to,
        "{what}: the answer must come from the published port"
    );
}

/// Case 4, client on the harness's own loopback (127.0.0.1 -> published 17015 ->
/// container 8080): a loopback client's address is never kept, so the container's
/// ICMP port-unreachable reaches the helper's upstream socket.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_loopback_udp_client_answered_after_an_icmp_error() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(32);
    let _helper = topo.launch(vec![PortMapping::new("127.0.0.1", 17015, 8080, 1, "udp")]);
    let to = sock(Ipv4Addr::LOCALHOST, 17015);
    let client = UdpSocket::bind(sock(Ipv4Addr::LOCALHOST, 0)).unwrap();
    one_datagram_after_an_icmp_error(&topo, &client, to, "loopback client");
}

/// Case 4, remote client with client addresses turned off (`PreserveSourceIP:
/// false`): the flow's socket is an ordinary one, so the ICMP reaches it.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_unkept_remote_udp_client_answered_after_an_icmp_error() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(37);
    let _helper = topo.launch_with(vec![udp(17016, 8080, 1)], |c| c.preserve_source_ip = false);
    let to = sock(topo.client.host_addr, 17016);
    let bind = sock(topo.client.client_addr, 0);
    let client = topo.client.ns.run(move || UdpSocket::bind(bind)).unwrap();
    one_datagram_after_an_icmp_error(&topo, &client, to, "remote client, addresses not kept");
}

/// Flows end, nothing stays: with a 2 s idle timeout, 50 clients (50 ports of the
/// remote client host) are answered with their own address and have one exact rule
/// each while their flows live; 4 s of silence later no flow rule and no flow socket
/// is left, and after the helper exits the container's routing state is the one
/// before it started.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_no_flow_rule_left_after_udp_flows_end() {
    require_harness();
    let _load = light();
    const CLIENTS: usize = 50;
    let topo = BridgeTopology::new(33);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 53),
        "container",
    );
    let before = netns_state(&topo.container);
    let mut helper = WrappedHelper::with_env(
        &topo.config(vec![udp(23253, 53, 1)]),
        &[("ROOTLESSPORT_UDP_IDLE_SECS", "2")],
    );
    let idle_fds = fd_count(helper.pid());
    let a = topo.client.client_addr;
    let to = sock(topo.client.host_addr, 23253);

    // All at once, so that every flow is still live when the rules are counted.
    let results = topo.client.ns.run(move || {
        let socks: Vec<UdpSocket> = (0..CLIENTS)
            .map(|_| {
                let s = UdpSocket::bind(sock(a, 0)).unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        for (i, s) in socks.iter().enumerate() {
            let _ = s.send_to(format!("c{i}").as_bytes(), to);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got: Vec<Option<String>> = vec![None; CLIENTS];
        let mut buf = [0u8; 512];
        while got.iter().any(Option::is_none) && Instant::now() < deadline {
            for (i, s) in socks.iter().enumerate() {
                if got[i].is_none() {
                    if let Ok(n) = s.recv(&mut buf) {
                        got[i] = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        socks
            .iter()
            .map(|s| s.local_addr().unwrap())
            .zip(got)
            .collect::<Vec<_>>()
    });
    let answered_at = Instant::now();
    let rules = flow_rules(&topo.container, a);
    let live_fds = fd_count(helper.pid());

    let wrong: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(i, (me, got))| got.as_deref() != Some(&format!("container|c{i}|{me}")))
        .map(|(i, (me, got))| format!("c{i} from {me}: {got:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {CLIENTS} clients not answered with their own address: {wrong:?}",
        wrong.len()
    );
    let missing: Vec<SocketAddr> = results
        .iter()
        .map(|(me, _)| *me)
        .filter(|me| !has_rule_for_port(&rules, me.port()))
        .collect();
    assert!(
        rules.len() == CLIENTS && missing.is_empty(),
        "while the {CLIENTS} flows live (counted {:?} after the answers): {} exact flow \
         rules, none for {missing:?}; rules: {rules:?}",
        answered_at.elapsed(),
        rules.len()
    );

    std::thread::sleep(Duration::from_secs(4).saturating_sub(answered_at.elapsed()));
    let gone = tests::eventually(6, || flow_rules(&topo.container, a).is_empty());
    let left = flow_rules(&topo.container, a);
    assert!(
        gone,
        "{} flow rules left {:?} after the last datagram (idle timeout 2 s): {left:?}",
        left.len(),
        answered_at.elapsed()
    );
    let fds_back = tests::eventually(15, || fd_count(helper.pid()) <= idle_fds);
    assert!(
        fds_back,
        "the helper had {idle_fds} fds before the clients, {live_fds} with {CLIENTS} flows \
         and still {} after they expired",
        fd_count(helper.pid())
    );

    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// Eviction keeps the rules in step: one host opens 1,100 flows (more than its share
/// of 1,024) from 1,100 source ports, each answered with its own address; at the end
/// that host has between 1,000 and 1,024 exact flow rules, the newest ports among
/// them, and the newest clients are still answered. After the helper exits the
/// container's routing state is the one before it started.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_evicted_udp_flows_take_their_rules_with_them() {
    require_harness();
    let _load = heavy();
    const FIRST: u16 = 30000;
    const CLIENTS: u16 = 1100;
    const SHARE: usize = 1024; // udp::MAX_FLOWS_PER_SOURCE
    const NEWEST: u16 = 20;
    let topo = BridgeTopology::new(34);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 53),
        "container",
    );
    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![udp(23353, 53, 1)]);
    let a = topo.client.client_addr;
    let to = sock(topo.client.host_addr, 23353);

    // One socket per source port, a query every 2 ms, each waiting up to 3 s for its
    // own answer (sockets close once answered).
    let (answered, failures) = topo.client.ns.run(move || {
        let start = Instant::now();
        let every = Duration::from_millis(2);
        let mut pending: Vec<(u16, UdpSocket, Instant)> = Vec::new();
        let (mut answered, mut failures) = (0u32, Vec::new());
        let mut next = 0u16;
        let mut buf = [0u8; 512];
        loop {
            while next < CLIENTS && start + every * u32::from(next) <= Instant::now() {
                let port = FIRST + next;
                let s = UdpSocket::bind(sock(a, port)).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.send_to(format!("p{port}").as_bytes(), to);
                pending.push((port, s, Instant::now()));
                next += 1;
            }
            pending.retain(|(port, s, sent)| match s.recv(&mut buf) {
                Ok(len) => {
                    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    if text == format!("container|p{port}|{a}:{port}") {
                        answered += 1;
                    } else {
                        failures.push(format!("port {port}: {text:?}"));
                    }
                    false
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if sent.elapsed() < ANSWER {
                        return true;
                    }
                    failures.push(format!("port {port}: no answer"));
                    false
                }
                Err(e) => {
                    failures.push(format!("port {port}: {e}"));
                    false
                }
            });
            if next == CLIENTS && pending.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (answered, failures)
    });
    assert!(
        failures.is_empty() && answered == u32::from(CLIENTS),
        "{answered} of {CLIENTS} answered with their own address; {} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let rules = flow_rules(&topo.container, a);
    let newest: Vec<u16> = (FIRST + CLIENTS - NEWEST..FIRST + CLIENTS).collect();
    let newest_missing: Vec<u16> = newest
        .iter()
        .copied()
        .filter(|p| !has_rule_for_port(&rules, *p))
        .collect();
    let oldest_kept = has_rule_for_port(&rules, FIRST);
    assert!(
        (1000..=SHARE).contains(&rules.len()) && newest_missing.is_empty() && !oldest_kept,
        "after {CLIENTS} flows from {a}: {} exact flow rules (want 1000..={SHARE}); the \
         newest ports without one: {newest_missing:?}; the oldest port {FIRST} still has \
         one: {oldest_kept}",
        rules.len()
    );

    // The newest clients are answered again (their flows are live).
    for port in newest {
        let (answer, me) = topo.client.ns.run(move || {
            let s = UdpSocket::bind(sock(a, port)).unwrap();
            (
                ask(&s, to, &format!("again{port}"), ANSWER),
                s.local_addr().unwrap(),
            )
        });
        assert_eq!(
            answer,
            Ok(format!("container|again{port}|{me}")),
            "one of the newest clients, after the eviction"
        );
    }
    let after = flow_rules(&topo.container, a).len();
    assert!(
        after <= SHARE,
        "{after} flow rules for {a} after the newest asked again"
    );

    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// Case 6 for UDP: one client socket (port 50001) sends to two published ports of one
/// container port (8021->80/udp, 8022->80/udp). Both are answered, each from the port
/// it was sent to; the first names the client itself, the second may see the child IP.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_one_udp_client_port_to_two_published_ports_of_one_container_port() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(35);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 80),
        "container",
    );
    let _helper = topo.launch(vec![udp(8021, 80, 1), udp(8022, 80, 1)]);
    let host = topo.client.host_addr;
    let me = sock(topo.client.client_addr, 50001);
    let s = topo.client.ns.run(move || UdpSocket::bind(me)).unwrap();
    let (first, second) = (sock(host, 8021), sock(host, 8022));

    let (text, from) =
        ask_seen_from(&s, first, "first", ANSWER).unwrap_or_else(|e| panic!("to {first}: {e}"));
    assert_eq!(
        (text.as_str(), from),
        (format!("container|first|{me}").as_str(), first),
        "the first published port's answer"
    );
    let (text, from) = ask_seen_from(&s, second, "second", ANSWER)
        .unwrap_or_else(|e| panic!("to {second}, after {first}: {e}"));
    assert!(
        text.starts_with("container|second|") && from == second,
        "the second published port's answer: {text:?} from {from}"
    );
    // Both flows are live at once: each still answered on its own port.
    let (text, from) = ask_seen_from(&s, first, "first again", ANSWER)
        .unwrap_or_else(|e| panic!("to {first} again: {e}"));
    assert_eq!(
        (text.as_str(), from),
        (format!("container|first again|{me}").as_str(), first),
        "the first published port, once the second flow exists"
    );
    let (text, from) = ask_seen_from(&s, second, "second again", ANSWER)
        .unwrap_or_else(|e| panic!("to {second} again: {e}"));
    assert!(
        text.starts_with("container|second again|") && from == second,
        "the second published port, again: {text:?} from {from}"
    );
}

/// A sibling's TCP (to 198.51.100.2:80) and UDP (to :53) keep working while the
/// helper publishes both ports with client addresses kept and a remote client has a
/// TCP connection and a UDP flow through it: everyone is answered and sees the right
/// peer, in several rounds interleaved.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_sibling_tcp_and_udp_work_while_remote_clients_are_served() {
    require_harness();
    let _load = light();
    let (topo, _servers) = serving_53_and_80(36, Ipv4Addr::UNSPECIFIED.into());
    let tcp_to = sock(topo.container_ip(), 80);
    let udp_to = sock(topo.container_ip(), 53);
    let sibling_ip = topo.sibling_ip();
    let sibling_round = |round: u32| -> Result<(), String> {
        sibling_tcp_round(&topo.sibling, tcp_to, round)?;
        let (answer, me) = ask_from(&topo.sibling, sock(sibling_ip, 0), udp_to, "sibling");
        match answer {
            Ok(text) if text == format!("container|sibling|{me}") => Ok(()),
            other => Err(format!("round {round}: sibling UDP to {udp_to}: {other:?}")),
        }
    };
    sibling_round(0).unwrap_or_else(|e| panic!("the topology itself is broken: {e}"));

    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![tcp(23480, 80), udp(23453, 53, 1)]);
    let host = topo.client.host_addr;
    let remote_tcp_to = sock(host, 23480);
    let mut remote = topo
        .client
        .ns
        .run(move || TcpStream::connect_timeout(&remote_tcp_to, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("the remote client connecting to {remote_tcp_to}: {e}"));
    let remote_me = remote.local_addr().unwrap();
    assert_eq!(
        read_line(&mut remote),
        Ok(remote_me.to_string()),
        "the remote client's TCP connection through the helper"
    );
    let bind = sock(topo.client.client_addr, 0);
    let remote_udp = topo.client.ns.run(move || UdpSocket::bind(bind)).unwrap();
    let remote_udp_me = remote_udp.local_addr().unwrap();
    let remote_udp_to = sock(host, 23453);

    for round in 1..=5 {
        let msg = format!("remote{round}");
        assert_eq!(
            ask(&remote_udp, remote_udp_to, &msg, ANSWER),
            Ok(format!("container|{msg}|{remote_udp_me}")),
            "round {round}: the remote client's UDP flow through the helper"
        );
        sibling_round(round).unwrap_or_else(|e| {
            panic!("while the helper serves the remote client (TCP {remote_me}, UDP {remote_udp_me}): {e}")
        });
        echo_back(&mut remote, format!("tcp round {round}").as_bytes())
            .unwrap_or_else(|e| panic!("round {round}: the remote client's TCP connection: {e}"));
    }

    drop(remote);
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// From the sibling: a TCP connection to `to`; the container must see the sibling's
/// own address and echo.
fn sibling_tcp_round(ns: &TestNetns, to: SocketAddr, round: u32) -> Result<(), String> {
    ns.run(move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("round {round}: sibling connecting to {to}: {e}"))?;
        let me = c.local_addr().unwrap();
        let seen = read_line(&mut c).map_err(|e| format!("round {round}: sibling TCP: {e}"))?;
        if seen != me.to_string() {
            return Err(format!(
                "round {round}: the container saw {seen} for the sibling's {me}"
            ));
        }
        echo_back(&mut c, b"sibling data")
            .map_err(|e| format!("round {round}: sibling TCP echo: {e}"))
    })
}

// ---------------------------------------------------------------------------------
// The routing the helper adds must hold up against what containers and users do:
// a reset from a closed port must reach the client, a full-tunnel VPN brought up
// wg-quick's way must not swallow the kept replies, client ports and published ports
// at the edges of the port space are kept, the user's own policy rules are neither
// deleted nor jumped over, and a reload to another family (or to the loopback) and
// back keeps UDP client addresses again.

/// [`netns_state`] plus `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect` (a
/// From the remote client's `bind` (port 0: any), one UDP question to `to`: the
/// answer (or why not) and the socket's own address.
fn client_asks(
    client: &ClientHost,
    bind: SocketAddr,
    to: SocketAddr,
    msg: String,
) -> (Result<String, String>, SocketAddr) {
    client.ns.run(move || {
        let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let me = s.local_addr().unwrap();
        (ask(&s, to, &msg, ANSWER), me)
    })
}

/// A problem found, for a test that checks several things and reports them all.
fn check(problems: &mut Vec<String>, ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        problems.push(what());
    }
}

/// A TCP client of a published port whose container port nothing listens on, client
/// addresses kept: the container's kernel answers the helper's SYN with a RST, which
/// must come back to the helper (it carries no mark of its own unless
/// `fwmark_reflect` gives it the SYN's), so that the client is reset at once instead
/// of waiting for the helper's connect to time out (about 130 s). A port with a
/// server on the same helper is served with the client's address before and after;
/// after the helper exits, the routing state and both `fwmark_reflect` are what they
/// were.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_tcp_to_a_closed_container_port_is_reset_promptly() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(40);
    let mut servers = Servers::new();
    servers.tcp_server(&topo.container, sock(Ipv4Addr::UNSPECIFIED, 80), true);
    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![tcp(24080, 80), tcp(24081, 81)]);
    let host = topo.client.host_addr;

    let (seen, me) = tcp_peer(&topo.client, sock(host, 24080));
    assert_eq!(
        seen,
        Ok(me.to_string()),
        "TCP to the served port 24080 -> 80, before the closed one"
    );

    let closed = sock(host, 24081);
    let (outcome, took) = topo.client.ns.run(move || {
        let start = Instant::now();
        let outcome = match TcpStream::connect_timeout(&closed, Duration::from_secs(10)) {
            Err(e) => Ok(format!("connect: {e}")),
            Ok(mut c) => {
                // Never longer than 15 s, whatever the helper does.
                c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let mut buf = [0u8; 64];
                match c.read(&mut buf) {
                    Ok(0) => Ok("closed (EOF)".to_owned()),
                    Ok(n) => Err(format!("{n} bytes of data: {:?}", &buf[..n])),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        Err(format!("still open after {:?}", start.elapsed()))
                    }
                    Err(e) => Ok(format!("read: {e}")),
                }
            }
        };
        (outcome, start.elapsed())
    });
    let ended = outcome
        .unwrap_or_else(|e| panic!("TCP to {closed} (nothing listens on container port 81): {e}"));
    assert!(
        took < Duration::from_secs(10),
        "TCP to {closed} (nothing listens on container port 81) ended ({ended}) only after \
         {took:?}: the container's reset did not come back to the helper"
    );

    let (seen, me) = tcp_peer(&topo.client, sock(host, 24080));
    assert_eq!(
        seen,
        Ok(me.to_string()),
        "TCP to the served port 24080 -> 80, after the closed one"
    );
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// The container brings up a full-tunnel VPN the way wg-quick does, while the helper
/// runs: an interface `wgx` (here one end of a veth pair inside the container, so
/// nothing leaves it), `0.0.0.0/0 dev wgx` in table 51820, `not fwmark 51820 table
/// 51820` and `table main suppress_prefixlength 0`, both without a priority. The
/// kernel puts such a rule just before the second rule it has, so later ones come
/// first: the helper's rules must leave that order as it is without a helper
/// (`suppress_prefixlength` first, so the container's own LAN stays on `eth0` and only
/// the rest takes the tunnel). Replies to kept clients then take the tunnel too (a
/// documented limit: such a container turns keeping off); once the VPN is gone, the
/// remote client is answered and named again.
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_full_tunnel_vpn_in_the_container_keeps_its_own_rule_order() {
    require_harness();
    let _load = light();
    let (topo, _servers) = serving_53_and_80(41, Ipv4Addr::UNSPECIFIED.into());
    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![udp(24153, 53, 1), tcp(24180, 80)]);
    let host = topo.client.host_addr;
    let client = topo.client.client_addr;
    let sibling = topo.sibling_ip();

    topo.container.sh("set -e
         ip link add wgx type veth peer name wgy
         ip link set wgy up
         ip link set wgx up
         ip route add 0.0.0.0/0 dev wgx table 51820
         ip rule add not fwmark 51820 table 51820
         ip rule add table main suppress_prefixlength 0");
    let rules = topo.container.sh("ip -4 rule");
    let prio = |needle: &str| -> Option<u32> {
        rules
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split(':').next())
            .and_then(|p| p.trim().parse().ok())
    };
    let suppress = prio("suppress_prefixlength 0");
    let tunnel = prio("not from all fwmark 0xca6c lookup 51820");
    let lan = topo
        .container
        .sh(&format!("ip route get {sibling} 2>&1 || true"));
    let out = topo
        .container
        .sh(&format!("ip route get {client} 2>&1 || true"));
    topo.container.sh("ip rule del not fwmark 51820 table 51820
         ip rule del table main suppress_prefixlength 0
         ip link del wgx");
    assert!(
        suppress.is_some() && tunnel.is_some() && suppress < tunnel,
        "wg-quick's rules out of their order (suppress_prefixlength must come first):\n{rules}"
    );
    assert!(
        lan.contains("dev eth0"),
        "the LAN left eth0: {lan:?}\n{rules}"
    );
    assert!(
        out.contains("dev wgx"),
        "the VPN took nothing: {out:?}\n{rules}"
    );

    let (seen, me) = tcp_peer(&topo.client, sock(host, 24180));
    assert_eq!(seen, Ok(me.to_string()), "TCP after the VPN went");
    let (answer, me) = client_asks(
        &topo.client,
        sock(client, 0),
        sock(host, 24153),
        "after".into(),
    );
    assert_eq!(
        answer,
        Ok(format!("container|after|{me}")),
        "UDP after the VPN went"
    );
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// Client source ports at the edges of the port space (below 1024, from 64512 up) are
/// kept like any other: each of 999, 1023, 64512 and 65000 is answered and named with
/// its own address and port (40000 as a control). 65535 must at least be answered
/// (the container may see the child IP's side for it).
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_udp_client_ports_at_the_edges_are_kept() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(42);
    let mut servers = Servers::new();
    servers.udp_reporter(
        &topo.container,
        sock(Ipv4Addr::UNSPECIFIED, 53),
        "container",
    );
    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![udp(24253, 53, 1)]);
    let to = sock(topo.client.host_addr, 24253);
    let client = topo.client.client_addr;

    let mut problems = Vec::new();
    for port in [40000u16, 999, 1023, 64512, 65000] {
        let msg = format!("p{port}");
        let (answer, me) = client_asks(&topo.client, sock(client, port), to, msg.clone());
        check(
            &mut problems,
            answer == Ok(format!("container|{msg}|{me}")),
            || format!("client port {port}: {answer:?}"),
        );
    }
    let (answer, _) = client_asks(&topo.client, sock(client, 65535), to, "p65535".into());
    check(
        &mut problems,
        answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("container|p65535|")),
        || format!("client port 65535 not answered: {answer:?}"),
    );
    assert!(
        problems.is_empty(),
        "UDP from {client} to {to} (-> 53), by client port:\n{}",
        problems.join("\n")
    );
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// Publishing container port 65535/udp (the last port) beside 55/udp must not turn
/// off client addresses for 55: its client is named with its own address, and 65535
/// is answered (from whichever side).
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_publishing_udp_port_65535_keeps_the_other_udp_ports() {
    require_harness();
    let _load = light();
    let topo = BridgeTopology::new(43);
    let mut servers = Servers::new();
    for port in [55, 65535] {
        servers.udp_reporter(
            &topo.container,
            sock(Ipv4Addr::UNSPECIFIED, port),
            "container",
        );
    }
    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![udp(24355, 55, 1), udp(24335, 65535, 1)]);
    let host = topo.client.host_addr;
    let bind = sock(topo.client.client_addr, 0);

    let (answer55, me55) = client_asks(&topo.client, bind, sock(host, 24355), "to55".into());
    let (answer65535, _) = client_asks(&topo.client, bind, sock(host, 24335), "to65535".into());
    assert!(
        answer65535
            .as_deref()
            .is_ok_and(|a| a.starts_with("container|to65535|")),
        "UDP to 24335 -> 65535 not answered: {answer65535:?}"
    );
    assert_eq!(
        answer55,
        Ok(format!("container|to55|{me55}")),
        "UDP to 24355 -> 55, with 65535/udp published by the same helper"
    );
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// A container ID whose slot (FNV-1a of the ID modulo 240, as today's helper picks
/// it) is `slot`: `prefix-N` for the first N that fits.
fn container_id_in_slot(prefix: &str, slot: u32) -> String {
    (0u32..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| {
            let mut h: u32 = 0x811c_9dc5;
            for b in id.bytes() {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            }
            h % 240 == slot
        })
        .unwrap()
}

/// The user's own policy rules in the container netns are never deleted nor jumped
/// over: `400 goto 410`, `410 lookup main suppress_prefixlength 0` (a plain `lookup
/// main` there would route everything before 1600 is reached), IPv6 `5000 iif lo goto
/// 5005`, `5005 lookup main`, and `1600 to 192.0.2.250 lookup 100` with `unreachable
/// 192.0.2.250` in table 100. A helper publishing TCP and UDP serves a remote client (addresses
/// kept); meanwhile every one of those rules is still there and `ip route get
/// 192.0.2.250` still says unreachable; after the helper exits the state is the one
/// with the user's rules. (The container ID is picked so that today's layout puts the
/// helper's rule band over priority 1600; whatever the layout, the test must pass.)
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_users_own_policy_rules_are_kept_and_obeyed() {
    require_harness();
    let _load = light();
    let (topo, _servers) = serving_53_and_80(44, Ipv4Addr::UNSPECIFIED.into());
    topo.container.sh("set -e
         ip rule add pref 400 goto 410
         ip rule add pref 410 lookup main suppress_prefixlength 0
         ip -6 rule add pref 5000 iif lo goto 5005
         ip -6 rule add pref 5005 lookup main
         ip route add unreachable 192.0.2.250 table 100
         ip rule add pref 1600 to 192.0.2.250 lookup 100");
    let user_rules = [
        ("-4", "400:\tfrom all goto 410"),
        ("-4", "410:\tfrom all lookup main suppress_prefixlength 0"),
        ("-4", "1600:\tfrom all to 192.0.2.250 lookup 100"),
        ("-6", "5000:\tfrom all iif lo goto 5005"),
        ("-6", "5005:\tfrom all lookup main"),
    ];
    let missing_rules = |ns: &TestNetns| -> Vec<&str> {
        let (v4, v6) = (ns.sh("ip -4 rule"), ns.sh("ip -6 rule"));
        user_rules
            .iter()
            .filter(|(f, r)| !if *f == "-4" { &v4 } else { &v6 }.lines().any(|l| l == *r))
            .map(|(_, r)| *r)
            .collect()
    };
    let route_get = |ns: &TestNetns| ns.sh("ip route get 192.0.2.250 2>&1 || true");
    let unreachable = |text: &str| !text.contains(" via ") && text.contains("No route to host");
    let missing = missing_rules(&topo.container);
    assert!(
        missing.is_empty(),
        "the test's rules as ip lists them: {missing:?}"
    );
    let route = route_get(&topo.container);
    assert!(
        unreachable(&route),
        "the topology itself is broken (no helper yet): {route:?}"
    );
    let before = netns_state(&topo.container);

    let id = container_id_in_slot("users-rules", 11);
    let mut helper = topo.launch_with(vec![udp(24453, 53, 1), tcp(24480, 80)], |c| {
        c.container_id = id
    });
    let host = topo.client.host_addr;
    let mut problems = Vec::new();
    let (seen, me) = tcp_peer(&topo.client, sock(host, 24480));
    check(&mut problems, seen == Ok(me.to_string()), || {
        format!("TCP from {me}: {seen:?}")
    });
    let (answer, me) = client_asks(
        &topo.client,
        sock(topo.client.client_addr, 0),
        sock(host, 24453),
        "client".into(),
    );
    check(
        &mut problems,
        answer == Ok(format!("container|client|{me}")),
        || format!("UDP from {me}: {answer:?}"),
    );
    let missing = missing_rules(&topo.container);
    check(&mut problems, missing.is_empty(), || {
        format!("the user's rules gone while the helper runs: {missing:?}")
    });
    let route = route_get(&topo.container);
    check(&mut problems, unreachable(&route), || {
        format!("ip route get 192.0.2.250 while the helper runs: {route:?}")
    });
    let rules = topo.container.sh("ip -4 rule; ip -6 rule");
    assert!(
        problems.is_empty(),
        "{}\nrules while the helper runs:\n{rules}",
        problems.join("\n")
    );
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// Reloads across families and back: a helper with child IP 198.51.100.2 publishing
/// 53/udp and 80/tcp keeps the IPv4 client's address; reloaded to 2001:db8:88::2 it
/// keeps an IPv6 client's, UDP and TCP (the IPv4 client is still answered); reloaded
/// back to 198.51.100.2, a new IPv4 UDP flow is named with the client's own address
/// again; reloaded to "" (the container's loopback) both are still answered, and back
/// again the IPv4 client is kept. Servers are dual-stack on [::].
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_reload_to_another_family_and_back_keeps_udp_clients() {
    require_harness();
    let _load = light();
    let (topo, _servers) = serving_53_and_80(45, Ipv6Addr::UNSPECIFIED.into());
    let before = netns_state(&topo.container);
    let mut helper = topo.launch(vec![udp(24553, 53, 1), tcp(24580, 80)]);
    let c = &topo.client;
    let (v4, v6): (IpAddr, IpAddr) = (c.client_addr.into(), c.client_addr6.into());
    let (host4, host6): (IpAddr, IpAddr) = (c.host_addr.into(), c.host_addr6.into());
    let v4_ip = topo.container_ip().to_string();
    let v6_ip = topo.container_ip6().to_string();

    let mut problems = Vec::new();
    // One fresh UDP socket and one TCP connection from `me_ip`; `kept`: the container
    // must name the client, else it must only answer.
    let mut round = |stage: &str, me_ip: IpAddr, host: IpAddr, kept: bool| {
        let msg = format!("{stage}-{me_ip}");
        let (answer, me) = client_asks(
            c,
            SocketAddr::new(me_ip, 0),
            SocketAddr::new(host, 24553),
            msg.clone(),
        );
        let ok = if kept {
            answer == Ok(format!("container|{msg}|{me}"))
        } else {
            answer
                .as_deref()
                .is_ok_and(|a| a.starts_with(&format!("container|{msg}|")))
        };
        check(&mut problems, ok, || {
            format!(
                "{stage}: UDP from {me} ({}): {answer:?}",
                if kept { "kept" } else { "answered" }
            )
        });
        let (seen, me) = tcp_peer(c, SocketAddr::new(host, 24580));
        let ok = if kept {
            seen == Ok(me.to_string())
        } else {
            seen.is_ok()
        };
        check(&mut problems, ok, || {
            format!(
                "{stage}: TCP from {me} ({}): {seen:?}",
                if kept { "kept" } else { "answered" }
            )
        });
    };
    let reload = |ip: &str| {
        helper
            .reload(ip)
            .unwrap_or_else(|e| panic!("reloading to {ip:?}: {e}"))
    };

    round("start", v4, host4, true);
    reload(&v6_ip);
    round("reloaded to IPv6", v6, host6, true);
    round("reloaded to IPv6", v4, host4, false);
    reload(&v4_ip);
    round("back to IPv4", v4, host4, true);
    reload("");
    round("reloaded to the loopback", v4, host4, false);
    round("reloaded to the loopback", v6, host6, false);
    reload(&v4_ip);
    round("back to IPv4 from the loopback", v4, host4, true);

    assert!(
        problems.is_empty(),
        "reloads 198.51.100.2 -> {v6_ip} -> 198.51.100.2 -> \"\" -> 198.51.100.2:\n{}",
        problems.join("\n")
    );
    exits_leaving(
        helper.exit_within(Duration::from_secs(10)),
        &topo.container,
        &before,
    );
}

/// A client address at its helper-wide share of UDP flows is still served on a
/// published port where it holds none, and what gives way is its least recently used
/// flow on the ports where it holds the most: clients behind one NAT address, say.
/// With the helper at `ulimit -n 1024` an address's share is 64 flows. The client host
/// opens 32 on port B, then 32 on port A, and every flow asks for a later answer (B's
/// first); a new source port of it asks port C and is answered, and only the least
/// recently used flow, B's first, loses its later answer. Then A (32) is the busiest:
/// a new client on B costs A's least recently used flow, and C's flow is kept.
/// (Before, a new client on a port where its address held no flow was dropped until a
/// flow idled out, 90 s.)
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_flow_bounds_a_source_at_its_share_is_served_on_a_port_where_it_holds_none() {
    require_harness();
    let _load = light();
    /// Published UDP ports A, B, C: host 26300-26302 to container 10000-10002 (clear of
    /// the other tests' host ports: they share the harness netns).
    const HOST_UDP: u16 = 26300;
    const CHILD_UDP: u16 = 10000;
    /// Half the address's helper-wide share at an open-file limit of 1,024.
    const HALF: u16 = 32;

    let topo = BridgeTopology::new(52);
    let mut servers = Servers::new();
    for p in CHILD_UDP..CHILD_UDP + 3 {
        servers.udp_reporter(&topo.container, sock(Ipv4Addr::UNSPECIFIED, p), "c");
    }
    let cfg = topo.config(vec![udp(HOST_UDP, CHILD_UDP, 3)]);
    let mut helper = WrappedHelper::start(&cfg, "ulimit -n 1024");
    let (ns, a, host) = (
        &topo.client.ns,
        topo.client.client_addr,
        topo.client.host_addr,
    );
    let [port_a, port_b, port_c] = [0, 1, 2].map(|i| sock(host, HOST_UDP + i));
    let client = |port: u16| ns.run(move || UdpSocket::bind(sock(a, port)).unwrap());
    let me = |s: &UdpSocket| s.local_addr().unwrap();

    // One at a time, each answered before the next: the flows are made in this order.
    let b_flows: Vec<UdpSocket> = (0..HALF).map(|i| client(46000 + i)).collect();
    let a_flows: Vec<UdpSocket> = (0..HALF).map(|i| client(45000 + i)).collect();
    for (flows, to) in [(&b_flows, port_b), (&a_flows, port_a)] {
        for s in flows {
            assert_eq!(ask(s, to, "x", ANSWER), Ok(format!("c|x|{}", me(s))));
        }
    }
    // Every flow asks for a later answer, in order, B's a moment before A's.
    let ask_later = |flows: &[&UdpSocket], to: SocketAddr, text: &str| {
        for s in flows {
            s.send_to(text.as_bytes(), to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Which of `flows` got their later answer to `text` within LATER and 3 s more.
    let answered_later = |flows: &[&UdpSocket], text: &str| -> Vec<bool> {
        let until = Instant::now() + LATER + Duration::from_secs(3);
        flows
            .iter()
            .map(|s| {
                let want = format!("c|{text}|{}", me(s));
                let mut b = [0u8; 256];
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                        .unwrap();
                    match s.recv(&mut b) {
                        Ok(n) if b[..n] == *want.as_bytes() => return true,
                        Ok(_) => continue,
                        Err(_) => return false,
                    }
                }
            })
            .collect()
    };
    ask_later(&b_flows.iter().collect::<Vec<_>>(), port_b, "later:1");
    ask_later(&a_flows.iter().collect::<Vec<_>>(), port_a, "later:1");

    let c_flow = client(47000);
    assert_eq!(
        ask(&c_flow, port_c, "c", ANSWER),
        Ok(format!("c|c|{}", me(&c_flow))),
        "a new client of an address holding its {} flows on ports A and B, on port C",
        2 * HALF
    );
    let all: Vec<&UdpSocket> = b_flows.iter().chain(&a_flows).collect();
    let lost: Vec<SocketAddr> = all
        .iter()
        .zip(answered_later(&all, "later:1"))
        .filter(|(_, got)| !got)
        .map(|(s, _)| me(s))
        .collect();
    assert_eq!(
        lost,
        [me(&b_flows[0])],
        "the flows whose later answer was lost: only the least recently used should be"
    );

    // Now A holds 32, B 31, C 1. A new client on B: A's least recently used goes.
    ask_later(&a_flows.iter().collect::<Vec<_>>(), port_a, "later:2");
    ask_later(&[&c_flow], port_c, "later:2");
    let mut a_and_c = a_flows.iter().collect::<Vec<_>>();
    a_and_c.push(&c_flow);
    let new_b = client(46100);
    assert_eq!(
        ask(&new_b, port_b, "b", ANSWER),
        Ok(format!("c|b|{}", me(&new_b)))
    );
    let lost: Vec<SocketAddr> = a_and_c
        .iter()
        .zip(answered_later(&a_and_c, "later:2"))
        .filter(|(_, got)| !got)
        .map(|(s, _)| me(s))
        .collect();
    assert_eq!(
        lost,
        [me(&a_flows[0])],
        "port A's least recently used, only"
    );
    assert_eq!(
        ask(&c_flow, port_c, "c again", ANSWER),
        Ok(format!("c|c again|{}", me(&c_flow)))
    );

    let status = helper.exit_within(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "exit {status:?}");
}

/// The soft "Max open files" of a process.
fn nofile_of(pid: u32) -> Option<usize> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The helper-wide bound on UDP flows: a client spraying source ports over many
/// published ports (a published range, one listener per port) must not use up the
/// helper's open files. The helper runs with a low limit (1,024, soft and hard, set by
/// its wrapper script), a range of 16 UDP ports is published, and one remote host sends
/// from 3,000 source ports spread over them; afterwards a new UDP client (another host,
/// and another port of the sprayer) and new TCP connections are still served, and the
/// helper's open files stayed below the limit all along. (`flow_bounds` in the name:
/// `cargo xtask itest flow_bounds` runs it with the unit tests of the bound.)
#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn shapes_flow_bounds_a_spray_over_a_published_range_leaves_room_for_new_clients() {
    require_harness();
    let _load = heavy();
    /// The helper's open-file limit.
    const NOFILE: usize = 1024;
    /// Published UDP ports: host 21000-21015 to container 10000-10015.
    const HOST_UDP: u16 = 21000;
    const CHILD_UDP: u16 = 10000;
    const RANGE: u16 = 16;
    const HOST_TCP: u16 = 21100;
    /// Source ports the sprayer sends from, one datagram each.
    const SPRAY: u16 = 3000;

    let topo = BridgeTopology::new(50);
    let other = ClientHost::new(51);
    let mut servers = Servers::new();
    for p in CHILD_UDP..CHILD_UDP + RANGE {
        servers.udp_reporter(&topo.container, sock(Ipv4Addr::UNSPECIFIED, p), "c");
    }
    servers.tcp_server(&topo.container, sock(Ipv4Addr::UNSPECIFIED, 7), true);
    let cfg = topo.config(vec![
        PortMapping::new("", HOST_UDP, CHILD_UDP, RANGE, "udp"),
        PortMapping::new("", HOST_TCP, 7, 1, "tcp"),
    ]);
    let mut helper = WrappedHelper::start(&cfg, &format!("ulimit -n {NOFILE}"));
    let pid = helper.pid();
    assert_eq!(nofile_of(pid), Some(NOFILE), "the wrapper set the limit");

    // Another host's flow, made before the spray: it must survive it.
    let host = topo.client.host_addr;
    let other_to = sock(other.host_addr, HOST_UDP + 5);
    let other_addr = other.client_addr;
    let other_sock = other
        .ns
        .run(move || UdpSocket::bind(sock(other_addr, 0)).unwrap());
    let other_me = other_sock.local_addr().unwrap();
    assert_eq!(
        ask(&other_sock, other_to, "before", ANSWER),
        Ok(format!("c|before|{other_me}"))
    );

    // Watch the helper's fds while the spray runs.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(fd_count(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let a = topo.client.client_addr;
    let started = Instant::now();
    let sent = topo.client.ns.run(move || {
        let mut sent = 0u32;
        for i in 0..SPRAY {
            let s = UdpSocket::bind((a, 30000 + i)).unwrap();
            if s.send_to(b"spray", (host, HOST_UDP + i % RANGE)).is_ok() {
                sent += 1;
            }
            // Paced a little so that the helper sees them all (a full socket
            // buffer would drop them before they count).
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        sent
    });
    let spray_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let after = fd_count(pid);
    let what = format!(
        "after {sent} datagrams from {SPRAY} ports of {a} over {RANGE} published ports \
         in {spray_time:?} (the helper's fds: peak {peak}, now {after}, limit {NOFILE})"
    );
    eprintln!("{what}");

    // New UDP clients: another host, and another port of the sprayer itself. They
    // resend as resolvers do (three tries): on a loaded machine the helper may still be
    // draining the spray, and a datagram lost to a full buffer is UDP, not a bug.
    let retried = |ns: &TestNetns, bind: SocketAddr, to: SocketAddr, msg: &'static str| {
        let mut last = ask_from(ns, bind, to, msg);
        for _ in 1..3 {
            if last.0.is_ok() {
                break;
            }
            last = ask_from(ns, bind, to, msg);
        }
        last
    };
    let (answer, me) = retried(
        &other.ns,
        sock(other.client_addr, 41000),
        sock(other.host_addr, HOST_UDP + 3),
        "new",
    );
    assert_eq!(answer, Ok(format!("c|new|{me}")), "a new client; {what}");
    let (answer, me) = retried(
        &topo.client.ns,
        sock(a, 40000),
        sock(host, HOST_UDP + 9),
        "own",
    );
    assert_eq!(
        answer,
        Ok(format!("c|own|{me}")),
        "a new port of the sprayer; {what}"
    );
    // The flow made before the spray still works.
    assert_eq!(
        ask(&other_sock, other_to, "again", ANSWER),
        Ok(format!("c|again|{other_me}")),
        "the other host's flow from before the spray; {what}"
    );
    // New TCP connections, from both hosts.
    for (client, to) in [
        (&other, sock(other.host_addr, HOST_TCP)),
        (&topo.client, sock(host, HOST_TCP)),
    ] {
        let (seen, me) = tcp_peer(client, to);
        assert_eq!(
            seen,
            Ok(me.to_string()),
            "a new TCP connection to {to}; {what}"
        );
    }
    assert!(
        peak < NOFILE && after < NOFILE,
        "the helper's fds reached its limit; {what}"
    );
    // A quarter of the limit for live flows, a quarter of that more for sockets of
    // closed ones: room to spare for everything else.
    assert!(
        peak <= NOFILE / 2,
        "UDP flows held more than half the fds; {what}"
    );

    let status = helper.exit_within(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "exit {status:?}");
}
