//! `cargo xtask soak [--minutes N | --seconds S]`: our `rootlessport` under steady churn
//! (TCP connections opened and closed, UDP flows made and left to expire) while its fd
//! count and RSS are sampled every second. After warm-up both must be flat: the slopes
//! are reported, and a growing one fails the run.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rootlessport::launcher::{Launcher, RootlessPort};
use slirp_config::PortMapping;

use crate::args::{self, Long};
use crate::sys;

/// Largest slopes still called flat, per minute. The load is about 24,000 operations a
/// minute, so these catch a leak of one fd per thousand operations, or of 43 bytes per
/// operation, while staying above the sampling noise of the live UDP flows.
const FD_SLOPE_MAX: f64 = 20.0;
const RSS_SLOPE_MAX_KB: f64 = 1024.0;
/// UDP flows expire after this many seconds during the soak (podman's 90 s would not
/// reach a steady state in a short run).
const UDP_IDLE_SECS: &str = "3";

pub fn run(args: &[String]) -> Result<(), String> {
    let mut secs: u64 = 600;
    let mut inner = false;
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "soak")? {
        match arg {
            Long("minutes") => secs = 60 * num(&mut p)?,
            Long("seconds") => secs = num(&mut p)?,
            Long("inner") => inner = true,
            other => {
                return Err(format!(
                    "soak: unknown argument {:?} (--minutes N or --seconds S)",
                    args::shown(&other)
                ))
            }
        }
    }
    if secs < 10 {
        return Err("soak: at least 10 seconds".into());
    }
    if !inner {
        sys::ensure(&[
            sys::Need {
                program: "unshare",
                package: "util-linux",
            },
            sys::Need {
                program: "nsenter",
                package: "util-linux",
            },
            sys::Need {
                program: "ip",
                package: "iproute2",
            },
        ])?;
        let helper = crate::helper::release_helper()?;
        let again: Vec<String> = ["soak", "--seconds", &secs.to_string(), "--inner"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let status = sys::rerun_in_private_netns(&again, &[("SOAK_HELPER", helper.as_os_str())])?;
        return if status.success() {
            Ok(())
        } else {
            Err("soak failed".into())
        };
    }
    inner_run(secs)
}

fn num(p: &mut args::Parser) -> Result<u64, String> {
    args::number(p).ok_or_else(|| "soak: a number must follow".to_string())
}

struct Rig {
    holder: Child,
    server: Child,
    helper: Option<(RootlessPort, OwnedFd)>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some((mut h, w)) = self.helper.take() {
            drop(w);
            let _ = h.wait_timeout(Duration::from_secs(5));
        }
        for c in [&mut self.server, &mut self.holder] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn inner_run(secs: u64) -> Result<(), String> {
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let (holder, netns) = sys::netns_holder("ip link set lo up")?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let server = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("--")
        .arg(&me)
        .args(["echo-server", "--plain", "--tcp", "7", "--udp", "7"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("nsenter: {e}"))?;
    let mut rig = Rig {
        holder,
        server,
        helper: None,
    };
    let bin = std::env::var_os("SOAK_HELPER")
        .map(PathBuf::from)
        .ok_or("SOAK_HELPER not set")?;
    let cfg = rootlessport::Config::new(
        format!("soak-{}", std::process::id()),
        netns,
        "127.0.0.1",
        std::env::temp_dir().display().to_string(),
    )
    .with_mappings(vec![PortMapping::new("127.0.0.1", 27007, 7, 1, "tcp,udp")]);
    std::env::set_var("ROOTLESSPORT_UDP_IDLE_SECS", UDP_IDLE_SECS);
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
    let helper = Launcher::new(&bin)
        .start(&cfg, r)
        .map_err(|e| e.to_string())?;
    let hpid = helper.pid();
    rig.helper = Some((helper, w));

    // Wait for the echo server behind it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_once().is_err() {
        if Instant::now() > deadline {
            return Err("the echo server never answered".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for kind in ["tcp", "udp"] {
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        load.push(std::thread::spawn(move || {
            // About 200 operations a second each, paced by the clock.
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ok = if kind == "tcp" {
                    tcp_once()
                } else {
                    udp_once()
                };
                match ok {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
                let due = start + Duration::from_millis(n * 5);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }));
    }
    let mut samples: Vec<(f64, f64, f64)> = Vec::new(); // (seconds, fds, rss kB)
    let start = Instant::now();
    for i in 1..=secs {
        let next = start + Duration::from_secs(i);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let fds = std::fs::read_dir(format!("/proc/{hpid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0) as f64;
        let rss = sys::rss_kb(hpid).unwrap_or(0) as f64;
        samples.push((start.elapsed().as_secs_f64(), fds, rss));
        if i % 10 == 0 || i == secs {
            eprintln!(
                "soak: {i:>4} s  fds {fds:>4}  RSS {rss:>7} kB  ops {}  errors {}",
                done.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed)
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    // Warm-up: the first third, at least 10 s (UDP flows reach their steady number
    // after the idle time, the event loop's tables after the peak load).
    let warm = (samples.len() / 3).max(10);
    let steady = &samples[warm.min(samples.len() - 2)..];
    let fd_slope = slope(steady.iter().map(|s| (s.0, s.1))) * 60.0;
    let rss_slope = slope(steady.iter().map(|s| (s.0, s.2))) * 60.0;
    let ops = done.load(Ordering::Relaxed);
    let errs = errors.load(Ordering::Relaxed);
    println!(
        "soak: {secs} s, {ops} operations ({errs} failed); after warm-up: fd slope {fd_slope:+.2}/min, RSS slope {rss_slope:+.1} kB/min (flat: |fd| <= {FD_SLOPE_MAX}/min, |RSS| <= {RSS_SLOPE_MAX_KB} kB/min)"
    );
    let mut problems = Vec::new();
    if fd_slope.abs() > FD_SLOPE_MAX {
        problems.push(format!("fd count grows by {fd_slope:.2}/min"));
    }
    if rss_slope.abs() > RSS_SLOPE_MAX_KB {
        problems.push(format!("RSS grows by {rss_slope:.1} kB/min"));
    }
    if errs > 0 {
        problems.push(format!("{errs} operations failed"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Least-squares slope of y over x.
fn slope(points: impl Iterator<Item = (f64, f64)>) -> f64 {
    let pts: Vec<(f64, f64)> = points.collect();
    let n = pts.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

fn tcp_once() -> std::io::Result<()> {
    let mut c = TcpStream::connect("127.0.0.1:27007")?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"s")?;
    c.shutdown(std::net::Shutdown::Write)?;
    let mut buf = [0u8; 8];
    let mut got = 0;
    loop {
        match c.read(&mut buf)? {
            0 => break,
            n => got += n,
        }
    }
    if got == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other("short echo"))
    }
}

fn udp_once() -> std::io::Result<()> {
    // A new socket each time: a new client port, so a new flow in the helper.
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.connect("127.0.0.1:27007")?;
    s.send(b"u")?;
    let mut buf = [0u8; 8];
    s.recv(&mut buf).map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn slope_of_a_line() {
        let s = super::slope((0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)));
        assert!((s - 3.0).abs() < 1e-9);
        assert_eq!(
            super::slope([(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)].into_iter()),
            0.0
        );
    }
}
