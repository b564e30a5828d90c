//! How each figure is measured: a bench client process (or iperf3) through one column,
//! its `key=value` line read back; RSS and CPU time of the forwarder's processes from
//! `/proc`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use slirp_config::PortMapping;

use super::rig::{
    addr, client_cmd, client_cmd_at, forwarder_pid, helper_config, launch, start_pasta, stop_pid,
    wait_gone, where_of, Col, NamedNetns, Rig, Where,
};
use crate::sys;

/// The value of `key=value` in a bench client's result line.
fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The value of `key=value` in a bench client's result line, parsed.
pub(super) fn num<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    kv(line, key)?.parse().ok()
}

/// What an iperf3 test moved: its rate and the bytes received.
pub(super) struct Transfer {
    pub gbit_s: f64,
    pub bytes: f64,
}

pub(super) fn iperf(rig: &Rig, c: Col, reverse: bool, secs: u64) -> Result<Transfer, String> {
    iperf_at(&where_of(rig, c), reverse, secs)
}

/// iperf3 through `w`; retried a few times, as its server takes one test at a time and
/// refuses a client that comes while the previous test is still closing.
pub(super) fn iperf_at(w: &Where, reverse: bool, secs: u64) -> Result<Transfer, String> {
    let mut last = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(300 * attempt));
        }
        match iperf_once(w, reverse, secs) {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn iperf_once(w: &Where, reverse: bool, secs: u64) -> Result<Transfer, String> {
    let mut cmd = match &w.netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={ns}")).args(["--", "iperf3"]);
            cmd
        }
        None => Command::new("iperf3"),
    };
    let (host, port) = w
        .iperf
        .split_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap_or_default();
    cmd.args(["-c", &host, "-p", &port, "-t", &secs.to_string(), "-J"]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.output().map_err(|e| format!("iperf3: {e}"))?;
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    let sum = &j["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bits), Some(bytes)) => Ok(Transfer {
            gbit_s: bits / 1e9,
            bytes,
        }),
        _ => Err(format!("iperf3: {}", j["error"])),
    }
}

pub(super) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64
}

pub(super) fn latencies(line: &str) -> Vec<u32> {
    kv(line, "lat_us")
        .map(|l| l.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// The figures of a run of short connections.
pub(super) struct Conns {
    /// Connections per second, both clients together.
    pub rate: f64,
    /// Connect-to-echo latency percentiles, in µs.
    pub p50: f64,
    pub p99: f64,
    /// Connections completed.
    pub done: u64,
}

/// Two client processes of COUNT short connections each.
pub(super) fn short_conns(rig: &Rig, c: Col, count: u64) -> Result<Conns, String> {
    short_conns_at(&where_of(rig, c), count)
}

pub(super) fn short_conns_at(w: &Where, count: u64) -> Result<Conns, String> {
    let a = w.echo.clone();
    let n = count.to_string();
    let kids: Vec<Child> = (0..2)
        .map(|_| {
            client_cmd_at(w, &["conn", &a, &n])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut done = 0u64;
    let mut secs = 0f64;
    let mut lat = Vec::new();
    for k in kids {
        let out = k.wait_with_output().map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        done += num(&line, "done").unwrap_or(0);
        secs = secs.max(num(&line, "secs").unwrap_or(0.0));
        lat.extend(latencies(&line));
    }
    lat.sort_unstable();
    Ok(Conns {
        rate: done as f64 / secs,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        done,
    })
}

/// New UDP flows per second, one after another, each answered (a lost one fails).
pub(super) fn udp_flows_at(w: &Where, count: u64) -> Result<f64, String> {
    let out = client_cmd_at(w, &["udpflows", &w.echo, &count.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let done: f64 = num(&line, "done").unwrap_or(0.0);
    let failed: u64 = num(&line, "failed").unwrap_or(1);
    let secs: f64 = num(&line, "secs").unwrap_or(0.0);
    if failed > 0 || secs <= 0.0 {
        return Err(format!("UDP flows through {}: {}", w.echo, line.trim()));
    }
    Ok(done / secs)
}

/// A process and all its descendants (children of any of its threads: podman's helper
/// starts its child from whichever Go thread runs the call).
pub(super) fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&p) = tree.get(i) {
        i += 1;
        let Ok(tasks) = procfs::process::Process::new(p as i32).and_then(|p| p.tasks()) else {
            continue;
        };
        for task in tasks.flatten() {
            tree.extend(task.children().unwrap_or_default());
        }
    }
    tree
}

/// Total RSS in MB of a process and its descendants.
pub(super) fn rss_mb(pid: u32) -> f64 {
    let kb: u64 = process_tree(pid)
        .iter()
        .filter_map(|p| sys::rss_kb(*p))
        .sum();
    kb as f64 / 1024.0
}

/// User + system CPU seconds used so far by a process and its descendants (every
/// thread: `utime`/`stime` of `/proc/PID/stat`).
pub(super) fn cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = process_tree(pid)
        .iter()
        .filter_map(|p| procfs::process::Process::new(*p as i32).ok()?.stat().ok())
        .map(|s| s.utime + s.stime)
        .sum();
    ticks as f64 / procfs::ticks_per_second() as f64
}

/// Run `f` and return its result with the CPU seconds the forwarder of column `c`
/// spent meanwhile (`None` for the column without a forwarder).
pub(super) fn with_cpu<T>(
    rig: &Rig,
    c: Col,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<(T, Option<f64>), String> {
    let pid = forwarder_pid(rig, c);
    let before = pid.map(cpu_secs);
    let out = f()?;
    let used = pid.zip(before).map(|(p, b)| cpu_secs(p) - b);
    Ok((out, used))
}

/// RSS with `n` connections held open through the forwarder.
pub(super) fn rss_with_conns(rig: &Rig, c: Col, n: u64) -> Result<f64, String> {
    let pid = forwarder_pid(rig, c).ok_or("no forwarder")?;
    let mut kid = client_cmd(rig, c, &["hold", &addr(c, false), &n.to_string(), "30"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    if let Some(out) = kid.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let rss = rss_mb(pid);
    let _ = kid.kill();
    let _ = kid.wait();
    if !line.starts_with("open=") {
        return Err(format!("could not hold {n} connections"));
    }
    Ok(rss)
}

/// Start a helper with `n` published ports: (ms to ready, RSS MB, ms to exit). Also the
/// limit of the time to ready, with `listen-floor` as `bin`: the same launch of a
/// process that makes the same listeners and nothing else.
pub(super) fn ports_figures(rig: &Rig, bin: &Path, n: u32) -> Result<(f64, f64, f64), String> {
    let cfg = helper_config(&rig.netns, &rig.tmp, "bench-ports", port_range_mappings(n));
    let (mut h, exit_w, ready) = launch(bin, &cfg)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss = rss_mb(h.pid());
    let t = Instant::now();
    drop(exit_w);
    let exited = h
        .wait_timeout(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let exit = t.elapsed();
    if exited.is_none() {
        return Err(format!("{} did not exit", bin.display()));
    }
    Ok((
        ready.as_secs_f64() * 1000.0,
        rss,
        exit.as_secs_f64() * 1000.0,
    ))
}

/// The same for pasta, as podman 5 runs and ends it: started for a fresh container
/// netns, ready when its first process exits; it exits on its own once the netns is
/// removed (it notices that by polling, so this figure is mostly pasta's poll
/// interval, not the work of unpublishing).
pub(super) fn pasta_ports_figures(bin: &Path, n: u32) -> Result<(f64, f64, f64), String> {
    let mut netns = NamedNetns::new("bench-pasta-ports")?;
    let (pid, ready) = start_pasta(bin, &port_range_mappings(n), &netns.file)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss = rss_mb(pid);
    let t = Instant::now();
    netns.remove();
    let gone = wait_gone(pid, Duration::from_secs(60));
    let exit = t.elapsed();
    if !gone {
        stop_pid(pid);
        return Err(format!(
            "pasta with {n} ports did not exit once its netns was removed"
        ));
    }
    Ok((
        ready.as_secs_f64() * 1000.0,
        rss,
        exit.as_secs_f64() * 1000.0,
    ))
}

/// `n` published TCP ports, 10000 up, each to the same container port.
fn port_range_mappings(n: u32) -> Vec<PortMapping> {
    (0..n)
        .map(|i| PortMapping::new("", (10000 + i) as u16, (10000 + i) as u16, 1, "tcp"))
        .collect()
}
