//! Many helpers in one netns (podman's rootless bridge networks: one `rootlessport` per
//! container, all in the shared rootless netns, coming and going as containers stop,
//! crash and restart). Each helper keeps client addresses with policy-routing state in
//! that netns; one helper leaving, cleanly or by `kill -9`, must not break the others,
//! and once the last one is gone the netns must be as it was before the first came
//! (`tcp_fwmark_accept` included, and only if a helper changed it).
//!
//! Every check goes through a remote client (its own netns, joined by a veth) and
//! looks at what the servers in the container answer: the container port that
//! answered and the peer address it saw, which must be the client's own.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use rootlessport::launcher::{Launcher, RootlessPort};
use rootlessport::Config;
use slirp_config::PortMapping;
use tests::{
    eventually, process_exists, require_harness, rootlessport_bin, unmap, ClientHost, TestNetns,
};

const CHILD4: &str = "198.51.100.2";
const CHILD6: &str = "2001:db8:88::2";
/// How long a client waits for an answer (each UDP try waits a third of it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(6);
/// How long a helper may take to exit once told to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// The container side (a netns with eth0 and servers on 80, 81, 82; eth0 is a veth
/// whose peer, also in that netns, is a gateway that never answers: a reply routed
/// out there is lost, as from a bridge to nowhere), a remote client,
/// and the TmpDir the helpers share, as podman's do.
struct Fixture {
    // Dropped in this order: the client's veth, then the container netns.
    client: ClientHost,
    ns: TestNetns,
    dir: tempfile::TempDir,
    /// The netns state before any helper started.
    original: String,
}

impl Fixture {
    /// `fwmark_accept`: a value someone else wrote to `tcp_fwmark_accept` before any
    /// helper started (None: the fresh netns's own).
    fn new(slot: u8, fwmark_accept: Option<&str>) -> Fixture {
        require_harness();
        eprintln!("rootlessport binary: {}", rootlessport_bin().display());
        let ns = TestNetns::new();
        ns.sh(&format!(
            "set -e
             ip link set lo up
             ip link add eth0 type veth peer name eth0peer
             ip link set eth0 addrgenmode none
             ip link set eth0peer addrgenmode none
             ip link set eth0peer up
             ip addr add {CHILD4}/24 dev eth0
             ip -6 addr add {CHILD6}/64 dev eth0 nodad
             ip link set eth0 up
             ip route add default via 198.51.100.1 dev eth0 onlink
             ip -6 route add default via 2001:db8:88::1 dev eth0 onlink"
        ));
        // The routes show `linkdown` until the carrier is seen (asynchronously).
        assert!(
            eventually(10, || ns.sh("ip link show eth0").contains("LOWER_UP")
                && !state(&ns).contains("linkdown")),
            "eth0 never got its carrier"
        );
        if let Some(v) = fwmark_accept {
            ns.sh(&format!("echo {v} > {FWMARK_ACCEPT}"));
        }
        servers(&ns, &[80, 81, 82]);
        let client = ClientHost::new(slot);
        let dir = tempfile::tempdir().unwrap();
        let original = state(&ns);
        Fixture {
            client,
            ns,
            dir,
            original,
        }
    }

    /// Start a helper keeping client addresses, publishing host port -> container
    /// port for TCP and UDP.
    fn start(&self, id: &str, child_ip: &str, ports: &[(u16, u16)]) -> Helper {
        let cfg = Config::new(
            id,
            self.ns.path().display().to_string(),
            child_ip,
            self.dir.path().display().to_string(),
        )
        .with_mappings(
            ports
                .iter()
                .map(|&(h, c)| PortMapping::new("", h, c, 1, "tcp,udp"))
                .collect(),
        )
        .with_preserve_source_ip(true)
        .with_rootless_cni(true); // as for podman's bridge networks
        let (r, w) = tests::cloexec_pipe();
        let handle = Launcher::new(rootlessport_bin())
            .start(&cfg, r)
            .unwrap_or_else(|e| panic!("starting helper {id}: {e}"));
        Helper {
            id: id.into(),
            handle: Some(handle),
            exit_w: Some(w),
        }
    }

    fn target(&self, v6: bool, host_port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.client.host_addr6.into()
        } else {
            self.client.host_addr.into()
        };
        SocketAddr::new(ip, host_port)
    }

    fn client_ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.client.client_addr6.into()
        } else {
            self.client.client_addr.into()
        }
    }

    /// New TCP and UDP clients through `host_port` reach `container_port` and are
    /// seen with their own address and port.
    fn check(&self, step: &str, v6: bool, host_port: u16, container_port: u16) {
        let problems = self.probe_new(v6, host_port, container_port);
        assert_no_problems(step, &problems);
    }

    /// As [`Fixture::check`], and the connection and flow opened earlier through
    /// that port still work too.
    fn check_with_open(
        &self,
        step: &str,
        v6: bool,
        host_port: u16,
        container_port: u16,
        open: &mut OpenConns,
    ) {
        let mut problems = self.probe_new(v6, host_port, container_port);
        problems.extend(self.probe_open(v6, open, container_port));
        assert_no_problems(step, &problems);
    }

    /// Open a TCP connection and a UDP flow through `host_port`, checked once.
    fn open(&self, step: &str, v6: bool, host_port: u16, container_port: u16) -> OpenConns {
        let to = self.target(v6, host_port);
        let (tcp, greeting) =
            TcpConn::open(&self.client, to).unwrap_or_else(|e| panic!("{step}: TCP to {to}: {e}"));
        let udp = UdpFlow::open(&self.client, to);
        let mut problems: Vec<String> = self
            .seen(
                &format!("TCP to {to}"),
                Ok(greeting),
                "tcp",
                container_port,
                tcp.local,
                v6,
            )
            .into_iter()
            .collect();
        problems.extend(self.seen(
            &format!("UDP to {to}"),
            udp.ask(),
            "udp",
            container_port,
            udp.local,
            v6,
        ));
        assert_no_problems(step, &problems);
        OpenConns { tcp, udp }
    }

    fn probe_new(&self, v6: bool, host_port: u16, container_port: u16) -> Vec<String> {
        let to = self.target(v6, host_port);
        let mut problems = Vec::new();
        let what = format!("new TCP connection to {to}");
        match TcpConn::open(&self.client, to) {
            Err(e) => problems.push(format!("{what}: {e}")),
            Ok((mut tcp, greeting)) => {
                let local = tcp.local;
                problems.extend(self.seen(&what, Ok(greeting), "tcp", container_port, local, v6));
                let again = tcp.ask();
                problems.extend(self.seen(
                    &format!("{what}, second question"),
                    again,
                    "tcp",
                    container_port,
                    local,
                    v6,
                ));
            }
        }
        let udp = UdpFlow::open(&self.client, to);
        problems.extend(self.seen(
            &format!("new UDP flow to {to}"),
            udp.ask(),
            "udp",
            container_port,
            udp.local,
            v6,
        ));
        problems
    }

    fn probe_open(&self, v6: bool, open: &mut OpenConns, container_port: u16) -> Vec<String> {
        let mut problems = Vec::new();
        let tcp_local = open.tcp.local;
        problems.extend(self.seen(
            &format!("TCP connection open from {tcp_local} since earlier"),
            open.tcp.ask(),
            "tcp",
            container_port,
            tcp_local,
            v6,
        ));
        problems.extend(self.seen(
            &format!("UDP flow open from {} since earlier", open.udp.local),
            open.udp.ask(),
            "udp",
            container_port,
            open.udp.local,
            v6,
        ));
        problems
    }

    /// What is wrong with `answer`, if anything: it must come from `container_port`
    /// and name the client's own address and port.
    fn seen(
        &self,
        what: &str,
        answer: Result<String, String>,
        proto: &str,
        container_port: u16,
        local: SocketAddr,
        v6: bool,
    ) -> Option<String> {
        if local.ip() != self.client_ip(v6) {
            return Some(format!(
                "{what}: sent from {local}, not from the client's own address"
            ));
        }
        let expected = format!("{proto} {container_port} peer {local}");
        match answer {
            Err(e) => Some(format!("{what}: {e}")),
            Ok(a) if a != expected => Some(format!(
                "{what}: the container answered {a:?}, expected {expected:?}"
            )),
            Ok(_) => None,
        }
    }

    /// Once every helper is gone, the netns must be as it was before the first one.
    fn assert_original_state(&self, step: &str) {
        let mut now = String::new();
        let same = eventually(5, || {
            now = state(&self.ns);
            now == self.original
        });
        if !same {
            let before: Vec<&str> = self.original.lines().collect();
            let after: Vec<&str> = now.lines().collect();
            let left: Vec<&str> = after
                .iter()
                .filter(|l| !before.contains(l))
                .copied()
                .collect();
            let gone: Vec<&str> = before
                .iter()
                .filter(|l| !after.contains(l))
                .copied()
                .collect();
            panic!(
                "{step}: the netns state differs from before the first helper\n\
                 only now:\n  {}\nonly before:\n  {}\n--- before ---\n{}--- now ---\n{}",
                left.join("\n  "),
                gone.join("\n  "),
                self.original,
                now
            );
        }
    }

    fn fwmark_accept(&self) -> String {
        self.ns
            .sh(&format!("cat {FWMARK_ACCEPT}"))
            .trim()
            .to_owned()
    }
}

fn assert_no_problems(step: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{step}:\n  {}", problems.join("\n  "));
}

/// What the helpers change in the container netns, as `ip` and procfs show it.
fn state(ns: &TestNetns) -> String {
    ns.sh(&format!(
        "echo '# ip -4 rule'; ip -4 rule
         echo '# ip -6 rule'; ip -6 rule
         echo '# ip -4 route show table all'; ip -4 route show table all
         echo '# ip -6 route show table all'; ip -6 route show table all
         echo '# tcp_fwmark_accept'; cat {FWMARK_ACCEPT}
         echo '# fwmark_reflect'; cat /proc/sys/net/ipv4/fwmark_reflect /proc/sys/net/ipv6/fwmark_reflect"
    ))
}

/// Servers in the container: on each port, TCP answers `tcp PORT peer ADDR` at once
/// and again for every line it reads; UDP answers every datagram `udp PORT peer ADDR`.
fn servers(ns: &TestNetns, ports: &[u16]) {
    let ports = ports.to_vec();
    let socks = ns.run(move || {
        ports
            .iter()
            .map(|&p| {
                (
                    TcpListener::bind(("::", p)).unwrap(),
                    UdpSocket::bind(("::", p)).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    });
    for (l, u) in socks {
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || serve_tcp(c, port));
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(format!("udp {port} peer {}", unmap(from)).as_bytes(), from);
            }
        });
    }
}

fn serve_tcp(mut c: TcpStream, port: u16) {
    let Ok(peer) = c.peer_addr() else { return };
    let answer = format!("tcp {port} peer {}\n", unmap(peer));
    let Ok(r) = c.try_clone() else { return };
    let mut r = BufReader::new(r);
    loop {
        if c.write_all(answer.as_bytes()).is_err() {
            return;
        }
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A TCP connection from the remote client.
struct TcpConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    local: SocketAddr,
}

impl TcpConn {
    /// Connect (from the client's netns) and read the server's greeting.
    fn open(client: &ClientHost, to: SocketAddr) -> Result<(TcpConn, String), String> {
        let stream = client
            .ns
            .run(move || TcpStream::connect_timeout(&to, ANSWER_TIMEOUT))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut conn = TcpConn {
            stream,
            reader,
            local,
        };
        let greeting = conn.read_answer()?;
        Ok((conn, greeting))
    }

    fn ask(&mut self) -> Result<String, String> {
        self.stream
            .write_all(b"?\n")
            .map_err(|e| format!("write: {e}"))?;
        self.read_answer()
    }

    fn read_answer(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed without an answer".into()),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => Err(format!("no answer within {ANSWER_TIMEOUT:?}: {e}")),
        }
    }
}

/// A UDP flow from the remote client (one socket, so one client address and port).
struct UdpFlow {
    sock: UdpSocket,
    local: SocketAddr,
}

impl UdpFlow {
    fn open(client: &ClientHost, to: SocketAddr) -> UdpFlow {
        let sock = client.ns.run(move || {
            let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
            s.connect(to).unwrap();
            s
        });
        sock.set_read_timeout(Some(ANSWER_TIMEOUT / 3)).unwrap();
        let local = sock.local_addr().unwrap();
        UdpFlow { sock, local }
    }

    /// Send a datagram and wait for the answer; a lost datagram is sent again.
    fn ask(&self) -> Result<String, String> {
        let mut buf = [0u8; 512];
        let mut last = String::new();
        for _ in 0..3 {
            self.sock.send(b"?").map_err(|e| format!("send: {e}"))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("no answer within {ANSWER_TIMEOUT:?}: {last}"))
    }
}

/// A TCP connection and a UDP flow held open across steps.
struct OpenConns {
    tcp: TcpConn,
    udp: UdpFlow,
}

/// A running helper. Dropping it kills it (cleanup when a test fails).
struct Helper {
    id: String,
    handle: Option<RootlessPort>,
    exit_w: Option<OwnedFd>,
}

impl Helper {
    /// Close its exit pipe, as the container's monitor does, and wait until it has
    /// exited (status 0) and is gone.
    fn stop(&mut self) {
        drop(self.exit_w.take());
        let mut h = self.handle.take().expect("helper already gone");
        let pid = h.pid();
        let status = h
            .wait_timeout(EXIT_TIMEOUT)
            .unwrap()
            .unwrap_or_else(|| panic!("helper {} did not exit within {EXIT_TIMEOUT:?}", self.id));
        assert!(status.success(), "helper {} exited with {status}", self.id);
        assert!(eventually(5, || !process_exists(pid)));
    }

    /// `kill -9` it and wait until it is gone.
    fn kill9(&mut self) {
        let mut h = self.handle.take().expect("helper already gone");
        let pid = h.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let status = h
            .wait_timeout(EXIT_TIMEOUT)
            .unwrap()
            .unwrap_or_else(|| panic!("helper {} survived SIGKILL", self.id));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "helper {}", self.id);
        drop(self.exit_w.take());
        assert!(eventually(5, || !process_exists(pid)));
    }
}

/// Two helpers, A (-> 80) and B (-> 81); A exits cleanly: B's new and already open
/// TCP connections and UDP flows still work with the client's address; then B exits
/// and nothing of either is left.
fn two_helpers_one_exits(slot: u8, v6: bool, ports: (u16, u16)) {
    let fx = Fixture::new(slot, None);
    let child = if v6 { CHILD6 } else { CHILD4 };
    let (pa, pb) = ports;
    let mut a = fx.start("aaaa-exits", child, &[(pa, 80)]);
    let mut b = fx.start("bbbb-stays", child, &[(pb, 81)]);
    fx.check("A and B running: A", v6, pa, 80);
    fx.check("A and B running: B", v6, pb, 81);
    let mut open_b = fx.open("A and B running: open through B", v6, pb, 81);

    a.stop();
    fx.check_with_open("after A exited cleanly: B", v6, pb, 81, &mut open_b);

    drop(open_b);
    b.stop();
    fx.assert_original_state("after A and B exited cleanly");
}

/// `tcp_fwmark_accept` set by someone else before any helper: after helpers came and
/// went (one cleanly, one by `kill -9`), the state and the value are as they were.
fn preset_fwmark_accept(slot: u8, preset: &str, base: u16) {
    let fx = Fixture::new(slot, Some(preset));
    assert_eq!(fx.fwmark_accept(), preset);
    let (pa, pb, pc) = (base, base + 1, base + 2);
    let mut a = fx.start("aaaa-preset", CHILD4, &[(pa, 80)]);
    let mut b = fx.start("bbbb-preset", CHILD4, &[(pb, 81)]);
    fx.check("A and B running: A", false, pa, 80);
    fx.check("A and B running: B", false, pb, 81);

    a.stop();
    fx.check("A stopped: B", false, pb, 81);

    b.kill9();
    let mut c = fx.start("cccc-preset", CHILD4, &[(pc, 82)]);
    fx.check("B killed, C started: C", false, pc, 82);
    c.stop();

    assert_eq!(
        fx.fwmark_accept(),
        preset,
        "tcp_fwmark_accept after every helper left (it was {preset} before the first)"
    );
    fx.assert_original_state("after A stopped, B killed, C stopped");
}

/// The tests, under a name that `cargo xtask itest shared_netns` selects.
mod shared_netns {
    use super::*;

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn one_helper_exiting_leaves_the_other_working_and_the_last_one_cleans_up() {
        require_harness();
        two_helpers_one_exits(40, false, (8101, 8102));
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn one_helper_exiting_leaves_the_other_working_ipv6() {
        require_harness();
        two_helpers_one_exits(41, true, (8111, 8112));
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn what_a_killed_helper_left_is_removed_by_later_helpers() {
        require_harness();
        let fx = Fixture::new(42, None);
        let mut a = fx.start("aaaa-killed", CHILD4, &[(8201, 80)]);
        let mut b = fx.start("bbbb-stays", CHILD4, &[(8202, 81)]);
        fx.check("A and B running: A", false, 8201, 80);
        fx.check("A and B running: B", false, 8202, 81);
        let mut open_b = fx.open("A and B running: open through B", false, 8202, 81);

        a.kill9();
        fx.check_with_open("after kill -9 A: B", false, 8202, 81, &mut open_b);

        let mut c = fx.start("cccc-later", CHILD4, &[(8203, 82)]);
        fx.check("C started after A was killed: C", false, 8203, 82);
        fx.check_with_open(
            "C started after A was killed: B",
            false,
            8202,
            81,
            &mut open_b,
        );

        c.stop();
        fx.check("after C exited: B", false, 8202, 81);
        drop(open_b);
        b.stop();
        fx.assert_original_state("after kill -9 A, then C and B exited cleanly");
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn a_killed_helper_restarted_with_the_same_id_cleans_up_at_exit() {
        require_harness();
        let fx = Fixture::new(43, None);
        let mut a = fx.start("aaaa-restarted", CHILD4, &[(8301, 80)]);
        fx.check("A running", false, 8301, 80);
        a.kill9();

        let mut a2 = fx.start("aaaa-restarted", CHILD4, &[(8301, 80)]);
        fx.check("A restarted after kill -9", false, 8301, 80);
        a2.stop();
        fx.assert_original_state("after kill -9 A, then A restarted and exited cleanly");
    }

    /// Helpers leaving at the same moment (podman stopping a pod, or a host
    /// shutting down): each sees the others and none may assume another one restores
    /// the sysctls; after every round the netns is exactly as before.
    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn helpers_leaving_at_once_leave_nothing() {
        require_harness();
        let fx = Fixture::new(47, None);
        for round in 0..5u16 {
            let mut hs: Vec<Helper> = (0..5u16)
                .map(|i| {
                    let port = 8600 + 10 * round + i;
                    fx.start(&format!("once-{round}-{i}"), CHILD4, &[(port, 80)])
                })
                .collect();
            fx.check(&format!("round {round}"), false, 8600 + 10 * round, 80);
            let handles: Vec<RootlessPort> =
                hs.iter_mut().filter_map(|h| h.handle.take()).collect();
            // Every exit pipe closes at once.
            drop(hs);
            for mut h in handles {
                let status = h.wait_timeout(EXIT_TIMEOUT).unwrap();
                assert!(status.is_some_and(|s| s.success()), "{status:?}");
            }
            fx.assert_original_state(&format!("after round {round} of helpers leaving at once"));
        }
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn three_helpers_with_overlapping_lifetimes() {
        require_harness();
        let fx = Fixture::new(44, None);
        let mut a = fx.start("aaaa-first", CHILD4, &[(8401, 80)]);
        fx.check("A started: A", false, 8401, 80);

        let mut b = fx.start("bbbb-second", CHILD4, &[(8402, 81)]);
        fx.check("B started: A", false, 8401, 80);
        fx.check("B started: B", false, 8402, 81);

        a.stop();
        fx.check("A stopped: B", false, 8402, 81);

        let mut c = fx.start("cccc-third", CHILD4, &[(8403, 82)]);
        fx.check("C started: B", false, 8402, 81);
        fx.check("C started: C", false, 8403, 82);

        b.kill9();
        fx.check("B killed: C", false, 8403, 82);

        c.stop();
        fx.assert_original_state("after A stopped, B killed, C stopped");
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn fwmark_accept_set_to_1_by_someone_else_stays_1() {
        require_harness();
        preset_fwmark_accept(45, "1", 8501);
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn fwmark_accept_set_to_0_goes_back_to_0() {
        require_harness();
        preset_fwmark_accept(46, "0", 8511);
    }
}
