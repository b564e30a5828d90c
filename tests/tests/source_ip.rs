//! Keeping the client's address: a client in its own netns, joined to the host side by
//! a veth pair, reaches a container behind slirp4netns and our rootlessport; the
//! servers in the container report whom they see.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::Duration;

use rootlessport::launcher::{Launcher, RootlessPort};
use rootlessport::Config;
use slirp_config::PortMapping;
use slirp_spawn::{Slirp4netns, SlirpSpec};
use tests::{require_harness, rootlessport_bin, ClientHost, TestNetns};

/// Every table of ours is in 0x524c4ffe..0x524c6000 (decimal 138073xxxx): the
/// per-helper range, the marker and the probe table.
const TABLE: &str = "13807";

/// A container netns with slirp4netns (tap0 10.0.2.100, default route out through
/// slirp4netns) and an extra IPv6 address to forward IPv6 clients to.
fn container(dir: &tempfile::TempDir) -> (TestNetns, Slirp4netns) {
    let ns = TestNetns::new();
    ns.sh("ip link set lo up && ip -6 addr add fd00:beef::100/128 dev lo && ip addr add 10.0.2.101/32 dev lo");
    let mut spec = SlirpSpec::new(ns.netns(), dir.path(), "src");
    spec.options = slirp_config::parse_options(["enable_ipv6=false"]).unwrap();
    let slirp = Slirp4netns::start(&spec).unwrap();
    (ns, slirp)
}

fn launch(
    ns: &TestNetns,
    dir: &tempfile::TempDir,
    child_ip: &str,
    keep: bool,
    ports: Vec<PortMapping>,
) -> (RootlessPort, OwnedFd) {
    let cfg = Config::new(
        format!("src-{child_ip}"),
        ns.path().display().to_string(),
        child_ip,
        dir.path().display().to_string(),
    )
    .with_mappings(ports)
    .with_preserve_source_ip(keep)
    .with_rootless_cni(true); // a reload socket, for the reload check
    let (r, w) = tests::cloexec_pipe();
    (Launcher::new(rootlessport_bin()).start(&cfg, r).unwrap(), w)
}

fn pm(host_port: u16, container_port: u16, proto: &str) -> PortMapping {
    PortMapping::new("", host_port, container_port, 1, proto)
}

/// From the client netns: what the container saw, and from which local address.
fn ask(client: &ClientHost, to: SocketAddr) -> (String, SocketAddr, String, SocketAddr) {
    client.ns.run(move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let me = c.local_addr().unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        let u = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        u.connect(SocketAddr::new(to.ip(), to.port() + 1)).unwrap();
        u.send(b"?").unwrap();
        let mut buf = [0u8; 512];
        let n = u.recv(&mut buf).unwrap();
        (
            s,
            me,
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            u.local_addr().unwrap(),
        )
    })
}

fn rules(ns: &TestNetns) -> String {
    ns.sh("ip -4 rule; ip -6 rule; ip -4 route show table all; ip -6 route show table all")
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn container_sees_the_real_client_for_tcp_and_udp_v4_and_v6() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let (ns, slirp) = container(&dir);
    tests::start_peer_reporters(&ns, 80, 81);
    let before = rules(&ns);
    assert!(!before.contains(TABLE), "{before}");
    let fwmark_accept = ns.sh("cat /proc/sys/net/ipv4/tcp_fwmark_accept");
    let (h4, w4) = launch(
        &ns,
        &dir,
        "10.0.2.100",
        true,
        vec![pm(28900, 80, "tcp"), pm(28901, 81, "udp")],
    );
    let (h6, w6) = launch(
        &ns,
        &dir,
        "fd00:beef::100",
        true,
        vec![pm(28902, 80, "tcp"), pm(28903, 81, "udp")],
    );
    let during = rules(&ns);
    assert!(during.contains("fwmark 0x524c5"), "{during}");
    assert!(
        during.contains("ipproto udp sport 81 goto"),
        "a gate in front of the UDP flow rules: {during}"
    );
    assert!(
        !during.contains("ipproto udp sport 81 lookup"),
        "no UDP rule looks up our table before a flow exists: {during}"
    );

    let client = ClientHost::new(5);
    let (tcp, me, udp, ume) = ask(&client, SocketAddr::new(client.host_addr.into(), 28900));
    assert_eq!(tcp, format!("tcp peer {me}"), "IPv4 TCP");
    assert_eq!(me.ip(), IpAddr::from(client.client_addr));
    assert_eq!(udp, format!("udp peer {ume}"), "IPv4 UDP");
    // The flow has its own exact rule, naming the client's address and port.
    let flow_rule = format!("to {} ipproto udp sport 81 dport {}", ume.ip(), ume.port());
    assert!(rules(&ns).contains(&flow_rule), "{}", rules(&ns));

    let (tcp, me, udp, ume) = ask(&client, SocketAddr::new(client.host_addr6.into(), 28902));
    assert_eq!(tcp, format!("tcp peer {me}"), "IPv6 TCP");
    assert_eq!(me.ip(), IpAddr::from(client.client_addr6));
    assert_eq!(udp, format!("udp peer {ume}"), "IPv6 UDP");

    // A reload moves the reply routing to the new child IP; addresses are still kept.
    rootlessport::reload::reload(dir.path(), "src-10.0.2.100", "10.0.2.101").unwrap();
    let routes = ns.sh("ip -4 route show table all");
    assert!(routes.contains("src 10.0.2.101"), "{routes}");
    let (tcp, me, udp, ume) = ask(&client, SocketAddr::new(client.host_addr.into(), 28900));
    assert_eq!(tcp, format!("tcp peer {me}"), "IPv4 TCP after reload");
    assert_eq!(udp, format!("udp peer {ume}"), "IPv4 UDP after reload");
    rootlessport::reload::reload(dir.path(), "src-10.0.2.100", "10.0.2.100").unwrap();

    // Loopback clients fall back to today's behaviour and still work.
    let mut c = TcpStream::connect("127.0.0.1:28900").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert!(s.starts_with("tcp peer 10.0.2.100:"), "{s}");

    // The container's own outgoing traffic still leaves through slirp4netns, TCP and
    // UDP, to the very client host whose replies we divert.
    let (out_tcp, out_udp) = client.ns.run(|| {
        (
            TcpListener::bind("0.0.0.0:29000").unwrap(),
            UdpSocket::bind("0.0.0.0:29001").unwrap(),
        )
    });
    let to = client.client_addr;
    let sent = ns.run(move || {
        let tcp =
            TcpStream::connect_timeout(&SocketAddr::new(to.into(), 29000), Duration::from_secs(5))
                .map(|mut c| c.write_all(b"out"));
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        let udp = u.send_to(b"out", (to, 29001));
        (tcp.is_ok(), udp.is_ok())
    });
    assert_eq!(sent, (true, true));
    let (mut c, _) = out_tcp.accept().unwrap();
    let mut got = String::new();
    c.read_to_string(&mut got).unwrap();
    assert_eq!(got, "out");
    out_udp
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(out_udp.recv(&mut buf).unwrap(), 3);

    drop((w4, w6));
    for mut h in [h4, h6] {
        assert!(h
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap()
            .success());
    }
    let after = rules(&ns);
    assert!(
        !after.contains(TABLE),
        "rules or routes left behind:\n{after}"
    );
    assert_eq!(
        ns.sh("cat /proc/sys/net/ipv4/tcp_fwmark_accept"),
        fwmark_accept
    );
    slirp.stop().unwrap();
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn opt_out_gives_podmans_behaviour() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let (ns, slirp) = container(&dir);
    tests::start_peer_reporters(&ns, 90, 91);
    let client = ClientHost::new(6);
    // By config field.
    let (h, w) = launch(
        &ns,
        &dir,
        "10.0.2.100",
        false,
        vec![pm(28910, 90, "tcp"), pm(28911, 91, "udp")],
    );
    assert!(!rules(&ns).contains(TABLE));
    let (tcp, _, udp, _) = ask(&client, SocketAddr::new(client.host_addr.into(), 28910));
    assert!(tcp.starts_with("tcp peer 10.0.2.100:"), "{tcp}");
    assert!(udp.starts_with("udp peer 10.0.2.100:"), "{udp}");
    drop(w);
    drop(h);
    // By environment variable.
    std::env::set_var("ROOTLESSPORT_PRESERVE_SOURCE_IP", "0");
    let (h, w) = launch(
        &ns,
        &dir,
        "10.0.2.100",
        true,
        vec![pm(28912, 90, "tcp"), pm(28913, 91, "udp")],
    );
    std::env::remove_var("ROOTLESSPORT_PRESERVE_SOURCE_IP");
    let (tcp, _, _, _) = ask(&client, SocketAddr::new(client.host_addr.into(), 28912));
    assert!(tcp.starts_with("tcp peer 10.0.2.100:"), "{tcp}");
    drop(w);
    drop(h);
    slirp.stop().unwrap();
}

/// A started helper, the log of its stderr, and its exit pipe's write end.
type Started = (
    slirp_spawn::process::Helper,
    slirp_spawn::process::LogFile,
    OwnedFd,
);

/// Start the helper of `cfg` as podman does (fds 3 and 4) through `program args`
/// (the helper itself, or a wrapper that runs it), its stderr kept in a log, and wait
/// until it is ready. Returns it, the log and the exit pipe's write end.
fn start_logged(cfg: &Config, program: std::path::PathBuf, args: &[&str]) -> Started {
    let mut cfg = cfg.clone();
    (cfg.exit_fd, cfg.ready_fd) = (3, 4);
    let log = slirp_spawn::process::LogFile::anonymous("log").unwrap();
    let (exit_r, exit_w) = tests::cloexec_pipe();
    let (ready_r, ready_w) = tests::cloexec_pipe();
    let mut h = slirp_spawn::process::HelperCommand::new(program)
        .args(args)
        .stdin_bytes(serde_json::to_vec(&cfg).unwrap())
        .leak_fd(exit_r, 3)
        .leak_fd(ready_w, 4)
        .stderr_log(&log)
        .unwrap()
        .spawn()
        .unwrap();
    if let Err(why) = h.await_ready(
        &ready_r,
        std::time::Instant::now() + Duration::from_secs(10),
    ) {
        panic!("{why:?}: {}", log.contents());
    }
    (h, log, exit_w)
}

/// The helper fell back as podman's forwards, for `why`: one warning line saying so,
/// nothing of ours in the netns, and `port` (TCP, served by [`reporters`]) works, the
/// container seeing the helper's side, `seen`.
fn assert_fell_back(ns: &TestNetns, started: Started, why: &str, (port, seen): (u16, &str)) {
    let (mut h, log, exit_w) = started;
    let text = log.contents();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("warning")).collect();
    let expected = format!(
        "rootlessport: warning: client addresses are not kept (the container sees the helper's): {why}"
    );
    assert_eq!(warnings, [expected.as_str()]);
    assert!(!rules(ns).contains(TABLE));
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert!(s.starts_with(&format!("tcp peer {seen}:")), "{s}");
    drop(exit_w);
    assert!(h
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .success());
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn falls_back_with_one_warning_when_it_cannot_be_set_up() {
    require_harness();
    // No child IP: connections go to the container's loopback, where no client address
    // can be used. The ports work as podman's do, and the log says why, once.
    let dir = tempfile::tempdir().unwrap();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    tests::start_peer_reporters(&ns, 70, 71);
    let cfg = Config::new(
        "fallback",
        ns.path().display().to_string(),
        "",
        dir.path().display().to_string(),
    )
    .with_mappings(vec![pm(28920, 70, "tcp"), pm(28921, 71, "udp")]);
    let started = start_logged(&cfg, rootlessport_bin(), &[]);
    assert_fell_back(
        &ns,
        started,
        "no child IP (connections go to the container's loopback)",
        (28920, "127.0.0.1"),
    );
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn without_cap_net_admin_it_says_so_up_front() {
    require_harness();
    // A helper without CAP_NET_ADMIN (dropped from its bounding set by setpriv, which
    // then runs it) knows before any netlink request that it cannot keep addresses.
    let dir = tempfile::tempdir().unwrap();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up && ip addr add 10.0.2.101/32 dev lo");
    tests::start_peer_reporters(&ns, 72, 73);
    let cfg = Config::new(
        "nocap",
        ns.path().display().to_string(),
        "10.0.2.101",
        dir.path().display().to_string(),
    )
    .with_mappings(vec![pm(28922, 72, "tcp"), pm(28923, 73, "udp")]);
    let bin = rootlessport_bin();
    let args = [
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
        "--",
        bin.to_str().unwrap(),
    ];
    let started = start_logged(&cfg, "setpriv".into(), &args);
    assert_fell_back(
        &ns,
        started,
        "no CAP_NET_ADMIN (needed for its routing rules)",
        (28922, "10.0.2.101"),
    );
}
