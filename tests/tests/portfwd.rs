//! Publishing ports through slirp4netns's API socket, against the real slirp4netns,
//! with servers inside the container namespace and clients on the harness's host side.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use slirp_config::PortMapping;
use slirp_portfwd::{add_hostfwd, list_hostfwd, publish_ports, remove_hostfwd, wait_for_socket};
use slirp_spawn::process::HelperCommand;
use slirp_spawn::{Slirp4netns, SlirpSpec};
use tests::{require_harness, ClientHost, TestNetns};

fn start(ns: &TestNetns, dir: &tempfile::TempDir) -> Slirp4netns {
    start_with(ns, dir, &[])
}

fn start_with(ns: &TestNetns, dir: &tempfile::TempDir, extra: &[&str]) -> Slirp4netns {
    let mut s = SlirpSpec::new(ns.netns(), dir.path(), "pf");
    let mut opts = vec!["port_handler=slirp4netns", "enable_ipv6=false"];
    opts.extend_from_slice(extra);
    s.options = slirp_config::parse_options(opts).unwrap();
    Slirp4netns::start(&s).unwrap()
}

/// Echo servers for TCP and UDP on `ports` inside the namespace. The sockets are made
/// by a thread that entered the namespace; they keep it when served from our threads.
fn echo_servers(ns: &TestNetns, ports: Vec<u16>) {
    let (tcp, udp) = ns.run(move || {
        let tcp: Vec<TcpListener> = ports
            .iter()
            .map(|p| TcpListener::bind(("0.0.0.0", *p)).unwrap())
            .collect();
        let udp: Vec<UdpSocket> = ports
            .iter()
            .map(|p| UdpSocket::bind(("0.0.0.0", *p)).unwrap())
            .collect();
        (tcp, udp)
    });
    for l in tcp {
        std::thread::spawn(move || {
            let port = l.local_addr().unwrap().port();
            for mut c in l.incoming().flatten() {
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf); // the client half-closes
                let _ = c.write_all(format!("tcp {port}: ").as_bytes());
                let _ = c.write_all(&buf);
            }
        });
    }
    for s in udp {
        std::thread::spawn(move || {
            let port = s.local_addr().unwrap().port();
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut reply = format!("udp {port}: ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, from);
            }
        });
    }
}

fn tcp_roundtrip(port: u16, msg: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(msg.as_bytes())?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    Ok(s)
}

fn udp_roundtrip(port: u16, msg: &str) -> std::io::Result<String> {
    udp_roundtrip_to(std::net::Ipv4Addr::LOCALHOST, port, msg)
}

fn udp_roundtrip_to(addr: std::net::Ipv4Addr, port: u16, msg: &str) -> std::io::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.connect((addr, port))?;
    s.send(msg.as_bytes())?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn publish_a_tcp_udp_range_then_list_and_remove() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    // slirp4netns drops the guest's UDP replies to host-loopback clients unless host
    // loopback is allowed (see udp_from_a_remote_client_with_podman_defaults).
    let slirp = start_with(&ns, &dir, &["allow_host_loopback=true"]);
    echo_servers(&ns, vec![80, 81, 82]);
    let sock = slirp.api_socket().unwrap().to_owned();

    let mapping = PortMapping::new("127.0.0.1", 18080, 80, 3, "tcp,udp");
    let ids = publish_ports(&sock, slirp.pidfd(), &[mapping]).unwrap();
    assert_eq!(ids.len(), 6);

    for i in 0..3u16 {
        assert_eq!(
            tcp_roundtrip(18080 + i, "hello").unwrap(),
            format!("tcp {}: hello", 80 + i)
        );
        assert_eq!(
            udp_roundtrip(18080 + i, "hi").unwrap(),
            format!("udp {}: hi", 80 + i)
        );
    }

    let list = list_hostfwd(&sock).unwrap();
    assert_eq!(list.len(), 6, "{list:?}");
    let mut seen: Vec<(String, u16, u16)> = list
        .iter()
        .map(|f| (f.proto.clone(), f.host_port, f.guest_port))
        .collect();
    seen.sort();
    let mut want = Vec::new();
    for i in 0..3u16 {
        want.push(("tcp".to_string(), 18080 + i, 80 + i));
        want.push(("udp".to_string(), 18080 + i, 80 + i));
    }
    want.sort();
    assert_eq!(seen, want);
    assert!(list
        .iter()
        .all(|f| f.host_addr == "127.0.0.1" && f.guest_addr == "10.0.2.100"));

    // Remove the TCP forward of 18081: that port stops answering, the others keep going.
    let tcp_18081 = list
        .iter()
        .find(|f| f.proto == "tcp" && f.host_port == 18081)
        .unwrap()
        .id;
    remove_hostfwd(&sock, tcp_18081).unwrap();
    assert_eq!(list_hostfwd(&sock).unwrap().len(), 5);
    assert!(tcp_roundtrip(18081, "x").is_err());
    assert_eq!(tcp_roundtrip(18082, "y").unwrap(), "tcp 82: y");
    let e = remove_hostfwd(&sock, tcp_18081).unwrap_err().to_string();
    assert!(e.starts_with("slirp4netns refused remove_hostfwd: "), "{e}");

    // A second forward of a host port in use: slirp4netns's own refusal, in podman's words.
    let e = add_hostfwd(&sock, "tcp", "127.0.0.1", 18080, 80).unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("from slirp4netns while setting up port redirection: "),
        "{text}"
    );
    println!("duplicate add: {text}");

    // An empty host address means every address.
    let id = add_hostfwd(&sock, "tcp", "", 18090, 80).unwrap();
    let f = list_hostfwd(&sock)
        .unwrap()
        .into_iter()
        .find(|f| f.id == id)
        .unwrap();
    assert_eq!(f.host_addr, "0.0.0.0");
    assert_eq!(tcp_roundtrip(18090, "any").unwrap(), "tcp 80: any");

    slirp.stop().unwrap();
    assert!(!sock.exists());
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn failed_publication_rolls_back() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let slirp = start(&ns, &dir);
    let sock = slirp.api_socket().unwrap().to_owned();
    // Something else holds host port 18102 already.
    let _busy = TcpListener::bind("127.0.0.1:18102").unwrap();
    let mapping = PortMapping::new("127.0.0.1", 18100, 80, 3, "tcp");
    let e = publish_ports(&sock, slirp.pidfd(), &[mapping]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("from slirp4netns while setting up port redirection: "),
        "{e}"
    );
    assert!(
        list_hostfwd(&sock).unwrap().is_empty(),
        "half-published ports left"
    );

    // Refused before anything is sent.
    let past_end = PortMapping::new("", 65534, 80, 3, "udp");
    let e = publish_ports(&sock, slirp.pidfd(), &[past_end]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "port range 65534-65536 (host) goes past 65535"
    );
    assert!(list_hostfwd(&sock).unwrap().is_empty());
    slirp.stop().unwrap();
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn waiting_for_the_socket_ends_when_the_helper_dies() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let mut helper = HelperCommand::new("sleep").args(["0.2"]).spawn().unwrap();
    let t = Instant::now();
    let e = wait_for_socket(
        &dir.path().join("never.sock"),
        helper.pidfd(),
        Duration::from_secs(30),
    )
    .unwrap_err();
    println!("helper death noticed after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(
        e.to_string(),
        format!(
            "slirp4netns exited before its API socket {} was ready",
            dir.path().join("never.sock").display()
        )
    );
    helper
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();

    // Without a helper to watch, the deadline ends the wait.
    let e = wait_for_socket(
        &dir.path().join("never.sock"),
        None,
        Duration::from_millis(100),
    )
    .unwrap_err();
    assert!(e.to_string().ends_with("did not appear within 0s"), "{e}");
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn api_errors_name_the_socket() {
    require_harness();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let e = list_hostfwd(&missing).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "cannot connect to the slirp4netns API socket {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    // A server that answers garbage, and one that never answers.
    let path = dir.path().join("fake.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut n = 0;
        for mut c in l.incoming().flatten() {
            let mut req = Vec::new();
            let _ = c.read_to_end(&mut req);
            n += 1;
            if n == 1 {
                let _ = c.write_all(b"not json");
            } else if n == 2 {
                // The shape slirp4netns's manual shows (1.2.0 itself sends it unwrapped).
                let _ = c.write_all(
                    br#"{"return":{"entries":[{"id":7,"proto":"udp","host_addr":"0.0.0.0","host_port":5353,"guest_addr":"10.0.2.100","guest_port":53}]}}"#,
                );
            } else {
                std::thread::sleep(Duration::from_secs(8));
            }
        }
    });
    let e = add_hostfwd(&path, "tcp", "", 1, 1).unwrap_err().to_string();
    assert_eq!(
        e,
        r#"unexpected reply from slirp4netns to add_hostfwd: "not json""#
    );
    let list = list_hostfwd(&path).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (
            list[0].id,
            list[0].proto.as_str(),
            list[0].host_port,
            list[0].guest_port
        ),
        (7, "udp", 5353, 53)
    );
    let t = Instant::now();
    let e = list_hostfwd(&path).unwrap_err().to_string();
    assert!(e.ends_with("did not answer within 5s"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(8));
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn udp_from_a_remote_client_with_podman_defaults() {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let slirp = start(&ns, &dir); // host loopback disabled, as podman defaults
    echo_servers(&ns, vec![90, 91, 92]);
    let sock = slirp.api_socket().unwrap().to_owned();
    let mapping = PortMapping::new("", 18190, 90, 3, "tcp,udp");
    publish_ports(&sock, slirp.pidfd(), &[mapping]).unwrap();
    let client = ClientHost::new(1);
    let to = client.host_addr;
    for i in 0..3u16 {
        let (t, u) = client.ns.run(move || {
            let t = {
                let mut c = TcpStream::connect((to, 18190 + i)).unwrap();
                c.write_all(b"remote").unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut s = String::new();
                c.read_to_string(&mut s).unwrap();
                s
            };
            (t, udp_roundtrip_to(to, 18190 + i, "remote").unwrap())
        });
        assert_eq!(t, format!("tcp {}: remote", 90 + i));
        assert_eq!(u, format!("udp {}: remote", 90 + i));
    }
    // TCP from the host's loopback works too; UDP replies to loopback clients are
    // dropped by slirp4netns while host loopback is disabled (a slirp4netns limit).
    assert_eq!(tcp_roundtrip(18190, "lo").unwrap(), "tcp 90: lo");
    println!(
        "UDP from host loopback with host loopback disabled: {:?}",
        udp_roundtrip(18190, "lo")
    );
    slirp.stop().unwrap();
}
