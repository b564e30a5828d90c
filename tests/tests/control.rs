//! The control socket of the real `rootlessport` binary (started as podman does),
//! against echo servers in a container netns: `list` counts exactly what the clients
//! moved, and podman's reload still works on the same socket.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rootlessport::control::{self, PortStatus};
use rootlessport::launcher::Launcher;
use rootlessport::Config;
use slirp_config::PortMapping;
use tests::{eventually, require_harness, rootlessport_bin, TestNetns};

/// TCP servers on the container's loopback echoing every byte until EOF.
fn tcp_echo(ns: &TestNetns, port: u16) {
    let l = ns.run(move || TcpListener::bind(("127.0.0.1", port)).unwrap());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let (mut r, mut w) = (c.try_clone().unwrap(), c);
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
}

/// A UDP server on the container's loopback echoing every datagram.
fn udp_echo(ns: &TestNetns, port: u16) {
    let s = ns.run(move || UdpSocket::bind(("127.0.0.1", port)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
}

fn port(socket: &Path, host_port: u16) -> PortStatus {
    control::list(socket)
        .unwrap()
        .into_iter()
        .find(|p| p.host_port == host_port)
        .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn control_list_counts_exactly_what_clients_moved() {
    require_harness();
    let ns = TestNetns::new();
    ns.sh("ip link set lo up");
    tcp_echo(&ns, 80);
    udp_echo(&ns, 53);
    let tmp = tempfile::tempdir().unwrap();
    // No RootlessCNI: podman asked for no reloads, and the socket is there all the same.
    let cfg = Config::new(
        "c0ntrol",
        ns.path().display().to_string(),
        "",
        tmp.path().display().to_string(),
    )
    .with_mappings(vec![
        PortMapping::new("127.0.0.1", 28400, 80, 1, "tcp"),
        PortMapping::new("127.0.0.1", 28401, 53, 1, "udp"),
        // Nothing listens on 81 in the container.
        PortMapping::new("127.0.0.1", 28402, 81, 1, "tcp"),
    ]);
    let before = now();
    let (exit_r, exit_w) = tests::cloexec_pipe();
    let mut helper = Launcher::new(rootlessport_bin())
        .start(&cfg, exit_r)
        .unwrap();
    let after = now();
    let socket = control::socket_path(tmp.path(), "c0ntrol");
    assert!(socket.exists(), "no control socket without RootlessCNI");

    // Nothing moved yet: every port listed, every counter 0.
    let ports = control::list(&socket).unwrap();
    let shown: Vec<String> = ports
        .iter()
        .map(|p| {
            format!(
                "{}:{}:{}/{}",
                p.host_ip, p.host_port, p.container_port, p.protocol
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            "127.0.0.1:28400:80/tcp",
            "127.0.0.1:28401:53/udp",
            "127.0.0.1:28402:81/tcp"
        ]
    );
    for p in &ports {
        assert!(
            (before..=after).contains(&p.published_at),
            "published_at {} not in {before}..={after}",
            p.published_at
        );
        assert_eq!(p.counters, Default::default(), "{p:?}");
    }

    // TCP: 100,000 bytes each way on one connection, and one more left open.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = TcpStream::connect("127.0.0.1:28400").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let (mut w, payload) = (c.try_clone().unwrap(), payload.clone());
        std::thread::spawn(move || {
            w.write_all(&payload).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    c.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed, payload);
    drop(c);
    let mut open = TcpStream::connect("127.0.0.1:28400").unwrap();
    open.write_all(b"12345").unwrap();
    let mut five = [0u8; 5];
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    open.read_exact(&mut five).unwrap();
    let tcp_settled = |p: &PortStatus| {
        let c = &p.counters;
        (
            c.connections_open,
            c.connections_total,
            c.bytes_in,
            c.bytes_out,
            c.refused,
        ) == (1, 2, 100_005, 100_005, 0)
    };
    assert!(
        eventually(5, || tcp_settled(&port(&socket, 28400))),
        "{:?}",
        port(&socket, 28400)
    );
    let tcp = port(&socket, 28400).counters;
    assert_eq!(
        (tcp.flows_total, tcp.datagrams_in, tcp.datagrams_out),
        (0, 0, 0)
    );

    // A connection the container refuses: counted, and the client reset.
    let mut refused = TcpStream::connect("127.0.0.1:28402").unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(refused.read(&mut buf), Ok(0) | Err(_)));
    assert!(eventually(5, || {
        let c = port(&socket, 28402).counters;
        (c.connections_total, c.refused, c.connections_open) == (1, 1, 0)
    }));

    // UDP: two clients, three datagrams of 1,000 bytes each, every one echoed.
    for _ in 0..2 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..3u8 {
            u.send_to(&[i; 1000], "127.0.0.1:28401").unwrap();
            let mut back = [0u8; 2000];
            let n = u.recv(&mut back).unwrap();
            assert_eq!(&back[..n], &[i; 1000][..]);
        }
    }
    assert!(
        eventually(5, || {
            let c = port(&socket, 28401).counters;
            (
                c.flows_live,
                c.flows_total,
                c.datagrams_in,
                c.datagrams_out,
                c.bytes_in,
                c.bytes_out,
            ) == (2, 2, 6, 6, 6000, 6000)
        }),
        "{:?}",
        port(&socket, 28401)
    );
    let udp = port(&socket, 28401).counters;
    assert_eq!((udp.connections_total, udp.refused), (0, 0));

    // podman's reload, on the same socket: `OK`, and forwarding goes on.
    rootlessport::reload::reload(tmp.path(), "c0ntrol", "127.0.0.1").unwrap();
    open.write_all(b"after").unwrap();
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"after");
    assert!(eventually(5, || {
        let c = port(&socket, 28400).counters;
        (c.connections_open, c.bytes_in, c.bytes_out) == (0, 100_010, 100_010)
    }));

    // Removed at exit.
    drop(exit_w);
    let status = helper
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("helper did not exit on EOF");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "control socket left behind");
    assert!(!tmp.path().join("rp").exists());
}
