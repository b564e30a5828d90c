//! How each figure is measured: a bench client process (or iperf3) through one column,
//! its `key=value` line read back; RSS from `/proc`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use slirp_config::PortMapping;

use super::rig::{
    addr, client_cmd, client_cmd_at, forwarder_pid, helper_config, launch, where_of, Col, Rig,
    Where,
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

pub(super) fn iperf(rig: &Rig, c: Col, reverse: bool, secs: u64) -> Result<f64, String> {
    iperf_at(&where_of(rig, c), reverse, secs)
}

/// iperf3 through `w`; retried a few times, as its server takes one test at a time and
/// refuses a client that comes while the previous test is still closing.
pub(super) fn iperf_at(w: &Where, reverse: bool, secs: u64) -> Result<f64, String> {
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

fn iperf_once(w: &Where, reverse: bool, secs: u64) -> Result<f64, String> {
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
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| format!("iperf3: {}", j["error"]))
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

/// Two client processes of COUNT short connections each: (conn/s, p50 µs, p99 µs).
pub(super) fn short_conns(rig: &Rig, c: Col, count: u64) -> Result<(f64, f64, f64), String> {
    short_conns_at(&where_of(rig, c), count)
}

pub(super) fn short_conns_at(w: &Where, count: u64) -> Result<(f64, f64, f64), String> {
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
    Ok((
        done as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    ))
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

/// Total RSS in MB of a process and its children.
pub(super) fn rss_mb(pid: u32) -> f64 {
    let mut pids = vec![pid];
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    let kb: u64 = pids.iter().filter_map(|p| sys::rss_kb(*p)).sum();
    kb as f64 / 1024.0
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

/// Start a helper with `n` published ports: (ms to ready, RSS MB, ms to exit).
pub(super) fn ports_figures(rig: &Rig, bin: &Path, n: u32) -> Result<(f64, f64, f64), String> {
    let mappings: Vec<PortMapping> = (0..n)
        .map(|i| PortMapping::new("", (10000 + i) as u16, (10000 + i) as u16, 1, "tcp"))
        .collect();
    let cfg = helper_config(&rig.netns, &rig.tmp, "bench-ports", mappings);
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
