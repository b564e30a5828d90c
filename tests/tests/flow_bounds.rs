//! The helper-wide bound on UDP flows: a client spraying source ports over many
//! published ports (a published range, one listener per port) must not use up the
//! helper's open files. The helper runs with a low limit (1,024, set by a wrapper
//! script), a range of 16 UDP ports is published, and one remote host sends from
//! 3,000 source ports spread over them; afterwards a new UDP client (another host, and
//! another port of the sprayer) and new TCP connections are still served, and the
//! helper's open files stayed below the limit all along.
//!
//! Every test's name contains `flow_bounds`, so `cargo xtask itest flow_bounds` runs
//! them (with the unit tests of the bound arithmetic in `rootlessport::udp`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod flow_bounds {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use slirp_config::PortMapping;
    use tests::{
        cloexec_pipe, require_harness, rootlessport_bin, unmap, BridgeTopology, ClientHost,
        TestNetns,
    };

    /// The helper's open-file limit (soft and hard: it cannot raise it).
    const NOFILE: usize = 1024;
    /// Published UDP ports: host 21000-21015 to container 10000-10015.
    const HOST_UDP: u16 = 21000;
    const CHILD_UDP: u16 = 10000;
    const RANGE: u16 = 16;
    const HOST_TCP: u16 = 21100;
    /// Source ports the sprayer sends from, one datagram each.
    const SPRAY: u16 = 3000;

    fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
        SocketAddr::new(ip.into(), port)
    }

    /// Servers on background threads, stopped and joined on drop.
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

        /// A UDP server in `ns` on `addr` answering `PAYLOAD|PEER`.
        fn udp_reporter(&mut self, ns: &TestNetns, addr: SocketAddr) {
            let sock = ns.run(move || UdpSocket::bind(addr));
            let sock = sock.unwrap_or_else(|e| panic!("binding UDP {addr}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let stop = self.stop.clone();
            self.threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let _ = sock.send_to(format!("{text}|{}", unmap(from)).as_bytes(), from);
                }
            }));
        }

        /// A TCP server in `ns` on `addr`: writes `PEER\n`, then echoes.
        fn tcp_reporter(&mut self, ns: &TestNetns, addr: SocketAddr) {
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
                            conns.push(std::thread::spawn(move || echo(c, peer, &stop)));
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

    impl Drop for Servers {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn echo(mut c: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
        let _ = c.set_nonblocking(false);
        let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
        if c.write_all(format!("{}\n", unmap(peer)).as_bytes())
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

    /// From `ns`, bound to `bind`: one question to `to`, and the answer (`msg|PEER`)
    /// within 3 s, or why not; with the socket's own address.
    fn ask(
        ns: &TestNetns,
        bind: SocketAddr,
        to: SocketAddr,
        msg: &'static str,
    ) -> (Result<String, String>, SocketAddr) {
        ns.run(move || {
            let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
            let me = s.local_addr().unwrap();
            (ask_on(&s, to, msg), me)
        })
    }

    fn ask_on(s: &UdpSocket, to: SocketAddr, msg: &str) -> Result<String, String> {
        s.send_to(msg.as_bytes(), to)
            .map_err(|e| format!("sending to {to}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no answer to {msg:?} sent to {to} within 3 s"));
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.recv_from(&mut buf) {
                Ok((n, _)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if text.split('|').next() == Some(msg) {
                        return Ok(text);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(format!("receiving the answer to {msg:?}: {e}")),
            }
        }
    }

    /// From `client`'s netns: a new TCP connection to `to`; what the container saw, or
    /// why it failed, and the client's own address.
    fn tcp_peer(ns: &TestNetns, to: SocketAddr) -> Result<(String, SocketAddr), String> {
        ns.run(move || {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connecting to {to}: {e}"))?;
            let me = c.local_addr().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            loop {
                match c.read(&mut b) {
                    Ok(0) => return Err(format!("{to} closed the connection")),
                    Ok(_) if b[0] == b'\n' => break,
                    Ok(_) => line.push(b[0]),
                    Err(e) => return Err(format!("reading from {to}: {e}")),
                }
            }
            c.write_all(b"ping").map_err(|e| format!("writing: {e}"))?;
            let mut got = [0u8; 4];
            c.read_exact(&mut got)
                .map_err(|e| format!("reading the echo: {e}"))?;
            if &got != b"ping" {
                return Err(format!("echo {got:?}"));
            }
            Ok((String::from_utf8_lossy(&line).into_owned(), me))
        })
    }

    /// Open fds of a process (0 once it is gone).
    fn fd_count(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The soft "Max open files" of a process.
    fn nofile_of(pid: u32) -> Option<usize> {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    }

    /// A script in `dir` that runs the helper with an open-file limit of `nofile`
    /// (soft and hard, so that the helper cannot raise it).
    fn limited_helper(dir: &std::path::Path, nofile: usize) -> PathBuf {
        let path = dir.join("rootlessport-limited");
        let real = rootlessport_bin();
        let script = format!(
            "#!/bin/sh\nulimit -n {nofile} || exit 1\nexec '{}'\n",
            real.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A helper started through [`limited_helper`]; dropping it closes its exit pipe
    /// and waits for it (killed after 5 s).
    struct Helper {
        process: rootlessport::launcher::RootlessPort,
        exit: Option<std::os::fd::OwnedFd>,
    }

    impl Helper {
        fn exit_within(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
            self.exit = None;
            self.process.wait_timeout(t).unwrap()
        }
    }

    impl Drop for Helper {
        fn drop(&mut self) {
            self.exit = None;
            let _ = self.process.wait_timeout(Duration::from_secs(5));
        }
    }

    #[test]
    #[ignore = "itest: needs the cargo xtask itest namespaces"]
    fn flow_bounds_a_spray_over_a_published_range_leaves_room_for_new_clients() {
        require_harness();
        let topo = BridgeTopology::new(50);
        let other = ClientHost::new(51);
        let mut servers = Servers::new();
        for p in CHILD_UDP..CHILD_UDP + RANGE {
            servers.udp_reporter(&topo.container, sock(Ipv4Addr::UNSPECIFIED, p));
        }
        servers.tcp_reporter(&topo.container, sock(Ipv4Addr::UNSPECIFIED, 7));
        let cfg = topo.config(vec![
            PortMapping::new("", HOST_UDP, CHILD_UDP, RANGE, "udp"),
            PortMapping::new("", HOST_TCP, 7, 1, "tcp"),
        ]);
        let (exit_r, exit_w) = cloexec_pipe();
        let wrapper = limited_helper(topo.dir.path(), NOFILE);
        let process = rootlessport::launcher::Launcher::new(&wrapper)
            .start(&cfg, exit_r)
            .unwrap_or_else(|e| panic!("starting {}: {e}", wrapper.display()));
        let mut helper = Helper {
            process,
            exit: Some(exit_w),
        };
        let pid = helper.process.pid();
        assert_eq!(nofile_of(pid), Some(NOFILE), "the wrapper set the limit");

        // Another host's flow, made before the spray: it must survive it.
        let host = topo.client.host_addr;
        let other_to = sock(other.host_addr, HOST_UDP + 5);
        let other_sock = other
            .ns
            .run(move || UdpSocket::bind(sock(other.client_addr, 0)).unwrap());
        let other_me = other_sock.local_addr().unwrap();
        assert_eq!(
            ask_on(&other_sock, other_to, "before"),
            Ok(format!("before|{other_me}"))
        );

        // Watch the helper's fds while the spray runs.
        let done = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
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

        // New UDP clients: another host, and another port of the sprayer itself.
        let (answer, me) = ask(
            &other.ns,
            sock(other.client_addr, 0),
            sock(other.host_addr, HOST_UDP + 3),
            "new",
        );
        assert_eq!(answer, Ok(format!("new|{me}")), "a new client; {what}");
        let (answer, me) = ask(
            &topo.client.ns,
            sock(a, 40000),
            sock(host, HOST_UDP + 9),
            "own",
        );
        assert_eq!(
            answer,
            Ok(format!("own|{me}")),
            "a new port of the sprayer; {what}"
        );
        // The flow made before the spray still works.
        assert_eq!(
            ask_on(&other_sock, other_to, "again"),
            Ok(format!("again|{other_me}")),
            "the other host's flow from before the spray; {what}"
        );
        // New TCP connections, from both hosts.
        for (ns, to) in [
            (&other.ns, sock(other.host_addr, HOST_TCP)),
            (&topo.client.ns, sock(host, HOST_TCP)),
        ] {
            match tcp_peer(ns, to) {
                Ok((seen, me)) => assert_eq!(seen, me.to_string(), "{what}"),
                Err(e) => panic!("a new TCP connection to {to}: {e}; {what}"),
            }
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
}
