//! `xtask echo-server --tcp P,P --udp P,P`: the test server put inside containers and
//! namespaces. TCP: greets with `tcp PORT from PEER`, echoes until EOF, closes. UDP:
//! answers each datagram with `udp PORT from PEER: DATA`. Listens dual-stack.
//! `--exit-after N` exits (status 0) once N TCP connections have been served.
//! `--plain`: no greeting and no prefix, bytes back as they came (for benchmarks).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};

use crate::args::{self, Long};

pub fn run(args: &[String]) -> Result<(), String> {
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    let mut exit_after: Option<usize> = None;
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "echo-server")? {
        let list = match arg {
            Long("tcp") => &mut tcp,
            Long("udp") => &mut udp,
            Long("plain") => {
                PLAIN.store(true, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            Long("exit-after") => {
                let n = args::number(&mut p).ok_or("echo-server: --exit-after N")?;
                exit_after = Some(n);
                continue;
            }
            other => {
                return Err(format!(
                    "echo-server: unknown argument {:?}",
                    args::shown(&other)
                ))
            }
        };
        let ports = args::string(&mut p).ok_or("echo-server: a port list must follow")?;
        for p in ports.split(',') {
            list.push(
                p.parse::<u16>()
                    .map_err(|_| format!("echo-server: bad port {p:?}"))?,
            );
        }
    }
    let mut threads = Vec::new();
    for port in tcp {
        let l = TcpListener::bind(("::", port))
            .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
            .map_err(|e| format!("echo-server: tcp {port}: {e}"))?;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                if let Some(n) = exit_after {
                    serve_tcp(c, port);
                    if SERVED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= n {
                        std::process::exit(0);
                    }
                } else {
                    std::thread::spawn(move || serve_tcp(c, port));
                }
            }
        }));
    }
    for port in udp {
        let s = UdpSocket::bind(("::", port))
            .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
            .map_err(|e| format!("echo-server: udp {port}: {e}"))?;
        threads.push(std::thread::spawn(move || serve_udp(s, port)));
    }
    println!("echo-server: ready");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

static PLAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SERVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

fn serve_tcp(mut c: std::net::TcpStream, port: u16) {
    let plain = PLAIN.load(std::sync::atomic::Ordering::Relaxed);
    let _ = c.set_nodelay(true);
    let peer = c
        .peer_addr()
        .map(unmapped)
        .map(|a| a.to_string())
        .unwrap_or_default();
    if !plain
        && c.write_all(format!("tcp {port} from {peer}\n").as_bytes())
            .is_err()
    {
        return;
    }
    let mut buf = [0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

fn serve_udp(s: UdpSocket, port: u16) {
    let mut buf = [0u8; 65536];
    let plain = PLAIN.load(std::sync::atomic::Ordering::Relaxed);
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        if plain {
            let _ = s.send_to(&buf[..n], from);
            continue;
        }
        let mut reply = format!("udp {port} from {}: ", unmapped(from)).into_bytes();
        reply.extend_from_slice(&buf[..n]);
        let _ = s.send_to(&reply, from);
    }
}
