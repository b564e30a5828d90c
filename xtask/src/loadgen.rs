//! `xtask bench-client MODE ...`: the load generators of `cargo xtask bench`, one
//! process each. Each prints one line of `key=value` results on stdout.
//!
//! - `conn ADDR COUNT`: COUNT short connections in a row (connect, 1 byte, half-close,
//!   read to EOF, close); latency of each.
//! - `pingpong ADDR COUNT`: one connection, COUNT 1-byte round trips; latency of each.
//! - `udp ADDR RATE SECS`: RATE datagrams/s of 64 bytes for SECS seconds; counts replies.
//! - `hold ADDR COUNT SECS`: opens COUNT connections (1 byte each way), holds them SECS.
//! - `udpflows ADDR COUNT`: COUNT new UDP flows in a row, each from a fresh socket (a
//!   fresh source port, as a resolver sends its queries): one datagram, wait up to 1 s
//!   for the answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::args::{self, Value};

pub fn run(args: &[String]) -> Result<(), String> {
    let mut words = Vec::new();
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "bench-client")? {
        match arg {
            Value(w) => words.push(args::utf8(w)?),
            flag => {
                return Err(format!(
                    "bench-client: unknown argument {:?}",
                    args::shown(&flag)
                ))
            }
        }
    }
    let arg = |i: usize, what: &str| -> Result<&String, String> {
        words
            .get(i)
            .ok_or_else(|| format!("bench-client: missing {what}"))
    };
    let addr: SocketAddr = arg(1, "ADDR")?
        .parse()
        .map_err(|e| format!("bench-client: {e}"))?;
    let num = |i: usize, what: &str| -> Result<u64, String> {
        arg(i, what)?
            .parse()
            .map_err(|_| format!("bench-client: bad {what}"))
    };
    match arg(0, "MODE")?.as_str() {
        "conn" => conn(addr, num(2, "COUNT")?),
        "pingpong" => pingpong(addr, num(2, "COUNT")?),
        "udp" => udp(addr, num(2, "RATE")?, num(3, "SECS")?),
        "hold" => hold(addr, num(2, "COUNT")?, num(3, "SECS")?),
        "udpflows" => udp_flows(addr, num(2, "COUNT")?),
        other => Err(format!("bench-client: unknown mode {other:?}")),
    }
}

fn print_latencies(lat: &mut [u32], secs: f64, done: u64, failed: u64) {
    lat.sort_unstable();
    let list: Vec<String> = lat.iter().map(|l| l.to_string()).collect();
    println!(
        "done={done} failed={failed} secs={secs:.6} lat_us={}",
        list.join(",")
    );
}

fn conn(addr: SocketAddr, count: u64) -> Result<(), String> {
    let mut lat = Vec::with_capacity(count as usize);
    let mut failed = 0;
    let start = Instant::now();
    let mut buf = [0u8; 64];
    for _ in 0..count {
        let t = Instant::now();
        let ok = (|| -> std::io::Result<()> {
            let mut c = TcpStream::connect(addr)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"x")?;
            c.shutdown(std::net::Shutdown::Write)?;
            while c.read(&mut buf)? > 0 {}
            Ok(())
        })();
        match ok {
            Ok(()) => lat.push(t.elapsed().as_micros() as u32),
            Err(_) => failed += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    print_latencies(&mut lat, secs, count - failed, failed);
    Ok(())
}

fn pingpong(addr: SocketAddr, count: u64) -> Result<(), String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut lat = Vec::with_capacity(count as usize);
    let mut b = [0u8; 1];
    // A few round trips to warm up.
    for _ in 0..100 {
        c.write_all(b"p").map_err(|e| e.to_string())?;
        c.read_exact(&mut b).map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        c.write_all(b"p").map_err(|e| e.to_string())?;
        c.read_exact(&mut b).map_err(|e| e.to_string())?;
        lat.push(t.elapsed().as_micros() as u32);
    }
    let secs = start.elapsed().as_secs_f64();
    print_latencies(&mut lat, secs, count, 0);
    Ok(())
}

fn udp(addr: SocketAddr, rate: u64, secs: u64) -> Result<(), String> {
    let s = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .map_err(|e| e.to_string())?;
    s.connect(addr).map_err(|e| e.to_string())?;
    let r = s.try_clone().map_err(|e| e.to_string())?;
    r.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let receiver = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = [0u8; 2048];
        while r.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let total = rate * secs;
    let payload = [b'u'; 64];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        // Pace by the clock: send what is due, then sleep a millisecond.
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let _ = s.send(&payload);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = receiver.join().map_err(|_| "receiver panicked")?;
    println!("sent={sent} received={got} secs={secs}");
    Ok(())
}

fn udp_flows(addr: SocketAddr, count: u64) -> Result<(), String> {
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let start = Instant::now();
    let (mut answered, mut lost) = (0u64, 0u64);
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        let s = UdpSocket::bind(any).map_err(|e| e.to_string())?;
        s.connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let _ = s.send(b"q");
        match s.recv(&mut buf) {
            Ok(_) => answered += 1,
            Err(_) => lost += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("done={answered} failed={lost} secs={secs:.3}");
    Ok(())
}

fn hold(addr: SocketAddr, count: u64, secs: u64) -> Result<(), String> {
    let mut conns = Vec::with_capacity(count as usize);
    let mut b = [0u8; 1];
    for _ in 0..count {
        let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"h").map_err(|e| e.to_string())?;
        c.read_exact(&mut b).map_err(|e| e.to_string())?;
        conns.push(c);
    }
    println!("open={}", conns.len());
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}
