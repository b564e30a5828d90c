//! `cargo xtask demo`: the whole stack in one command. A small HTTP server runs in a
//! fresh namespace behind slirp4netns and our rootlessport, published on a free host
//! port; the demo fetches a page over IPv4 and IPv6, measures a download, and tears
//! everything down.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use slirp_config::{PortMapping, SlirpOptions};

use crate::args::{self, Long};
use crate::session::{Session, SessionSpec};

/// Bytes downloaded for the throughput figure.
const DOWNLOAD: u64 = 512 * 1024 * 1024;

pub fn run(args: &[String]) -> Result<(), String> {
    let mut download = DOWNLOAD;
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "demo")? {
        match arg {
            Long("download-mib") => {
                let v = args::string(&mut p).ok_or("--download-mib needs a number")?;
                download = v
                    .parse::<u64>()
                    .map_err(|_| format!("bad --download-mib {v:?}"))?
                    * 1024
                    * 1024;
            }
            other => {
                return Err(format!(
                    "demo: unknown argument {:?} (try --download-mib N)",
                    args::shown(&other)
                ))
            }
        }
    }
    let port = free_port()?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    // Loopback only: the demo fetches from this host, and publishes nothing beyond it.
    let spec = SessionSpec {
        ports: vec![
            PortMapping::new("127.0.0.1", port, 80, 1, "tcp"),
            PortMapping::new("::1", port, 80, 1, "tcp"),
        ],
        options: SlirpOptions::default(),
        command: vec![
            me.into(),
            OsString::from("http-server"),
            OsString::from("80"),
        ],
    };
    let say = |line: String| println!("{line}");
    println!("rootless-net demo: an HTTP server in a new user+network+mount namespace");
    let mut session = Session::start(&spec, &|l| say(format!("  {l}")))?;
    let (slirp_ready, ports_ready) = (session.slirp_ready, session.ports_ready);
    let f = session.features;
    let mut feats = Vec::new();
    for (on, name) in [
        (f.has_enable_sandbox, "sandbox"),
        (f.has_enable_seccomp, "seccomp"),
        (f.has_ipv6, "ipv6"),
        (f.has_cidr, "cidr"),
        (f.has_mtu, "mtu"),
        (f.has_disable_host_loopback, "disable-host-loopback"),
        (f.has_outbound_addr, "outbound-addr"),
        (f.has_netns_type, "netns-type"),
        (f.has_userns_path, "userns-path"),
        (f.has_disable_dns, "disable-dns"),
        (f.has_macaddress, "macaddress"),
    ] {
        if on {
            feats.push(name);
        }
    }
    say(format!("  slirp4netns features: {}", feats.join(" ")));
    session.go();
    let result = exercise(port, download);
    let torn = session.teardown();
    let (v4, v6, rate, first) = result?;
    torn.map_err(|e| format!("teardown: {e}"))?;
    say(format!("  GET http://127.0.0.1:{port}/  -> {v4}"));
    say(format!("  GET http://[::1]:{port}/      -> {v6}"));
    say(format!(
        "  download of {} MiB through rootlessport: {:.2} Gbit/s",
        download / (1024 * 1024),
        rate
    ));
    say(format!(
        "  time to ready: slirp4netns {:.1} ms, then rootlessport {:.1} ms; first answer {:.1} ms after go",
        slirp_ready.as_secs_f64() * 1000.0,
        ports_ready.as_secs_f64() * 1000.0,
        first.as_secs_f64() * 1000.0
    ));
    say("  torn down: no process, socket or namespace left".into());
    Ok(())
}

/// A port free on both 127.0.0.1 and ::1 (the kernel's pick for a dual-stack socket).
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("[::]:0")
        .or_else(|_| TcpListener::bind("0.0.0.0:0"))
        .map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

type Outcome = (String, String, f64, Duration);

fn exercise(port: u16, download: u64) -> Result<Outcome, String> {
    let t = Instant::now();
    let v4: SocketAddr = ([127, 0, 0, 1], port).into();
    let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    let page4 = loop {
        match get(v4, "/") {
            Ok(p) => break p,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("the server never answered: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let first = t.elapsed();
    let page6 = get(v6, "/").map_err(|e| format!("GET over IPv6 failed: {e}"))?;
    let t = Instant::now();
    let got = download_bytes(v4, download)?;
    let secs = t.elapsed().as_secs_f64();
    Ok((page4, page6, got as f64 * 8.0 / secs / 1e9, first))
}

fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut c =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: demo\r\n\r\n").map_err(|e| e.to_string())?;
    let mut all = String::new();
    c.read_to_string(&mut all).map_err(|e| e.to_string())?;
    let status = all.lines().next().unwrap_or("").trim().to_string();
    let body = all
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    if !status.contains(" 200 ") {
        return Err(format!("unexpected answer {status:?}"));
    }
    Ok(format!("{status}: {body}"))
}

fn download_bytes(addr: SocketAddr, n: u64) -> Result<u64, String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    write!(c, "GET /bytes/{n} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut r = BufReader::with_capacity(1 << 20, c);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = r.read(&mut buf).map_err(|e| e.to_string())?;
        if k == 0 {
            break;
        }
        total += k as u64;
    }
    if total != n {
        return Err(format!("download ended after {total} of {n} bytes"));
    }
    Ok(total)
}

/// `xtask http-server PORT`: `/` answers who it is and who asked; `/bytes/N` sends N
/// bytes. Dual-stack, a thread per connection, HTTP/1.0.
pub fn http_server(args: &[String]) -> Result<(), String> {
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .ok_or("usage: xtask http-server PORT")?;
    let l = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| format!("http-server: {e}"))?;
    for c in l.incoming().flatten() {
        std::thread::spawn(move || serve(c));
    }
    Ok(())
}

fn serve(mut c: TcpStream) {
    let peer = c.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut r = BufReader::new(match c.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request = String::new();
    if r.read_line(&mut request).is_err() {
        return;
    }
    let mut line = String::new();
    while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {n}\r\n\r\n");
        let chunk = vec![b'x'; 1 << 20];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            if c.write_all(&chunk[..k]).is_err() {
                return;
            }
            left -= k as u64;
        }
        return;
    }
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let body = format!("hello from {netns}, you are {peer}\n");
    let _ = write!(
        c,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}
