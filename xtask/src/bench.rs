//! `cargo xtask bench [--quick] [--rounds N] [--save-docs]`: our `rootlessport` side by
//! side with podman's, slirp4netns's own forwarder and no forwarder at all, on the same
//! servers in the same container netns, interleaved, median of the rounds, every
//! figure also as a ratio against podman's helper from the same run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rootlessport::launcher::{Launcher, RootlessPort};
use slirp_config::PortMapping;

use crate::itest::workspace_root;
use crate::sys::{self, Need};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Col {
    Direct,
    Podman,
    Slirp,
    Ours,
}

const COLS: [Col; 4] = [Col::Direct, Col::Podman, Col::Slirp, Col::Ours];

impl Col {
    fn title(self) -> &'static str {
        match self {
            Col::Direct => "direct (no forwarder)",
            Col::Podman => "podman rootlessport",
            Col::Slirp => "slirp4netns hostfwd",
            Col::Ours => "our rootlessport",
        }
    }
    /// Host ports of this column: (iperf3, echo).
    fn ports(self) -> (u16, u16) {
        match self {
            Col::Direct => (5201, 7),
            // Outside 10000-19999, which the published-ports figures use.
            Col::Podman => (21201, 21007),
            Col::Slirp => (23201, 23007),
            Col::Ours => (22201, 22007),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

struct Figure {
    key: String,
    label: String,
    unit: &'static str,
    better: Better,
    /// The ratio against podman's helper that issue 6 asks for.
    target: Option<f64>,
}

struct Settings {
    quick: bool,
    rounds: usize,
    iperf_secs: u64,
    conns: u64,
    pings: u64,
    udp_rate: u64,
    udp_secs: u64,
    hold: u64,
    port_counts: Vec<u32>,
}

const BENCH_NEEDS: &[Need] = &[
    Need {
        program: "iperf3",
        package: "iperf3",
    },
    Need {
        program: "slirp4netns",
        package: "slirp4netns",
    },
    Need {
        program: "nsenter",
        package: "util-linux",
    },
    Need {
        program: "unshare",
        package: "util-linux",
    },
    Need {
        program: "ip",
        package: "iproute2",
    },
];

fn podman_helper() -> Option<PathBuf> {
    [
        "/usr/lib/podman/rootlessport",
        "/usr/libexec/podman/rootlessport",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

pub fn run(args: &[String]) -> Result<(), String> {
    let inner = args.iter().any(|a| a == "--inner");
    if !inner {
        sys::ensure(BENCH_NEEDS)?;
        if podman_helper().is_none() && sys::is_root() && sys::find_in_path("apt-get").is_some() {
            eprintln!("xtask bench: installing podman for the reference column");
            if let Err(e) = sys::apt_install(&["podman"]) {
                eprintln!("xtask bench: podman not installed ({e}); its column says so");
            }
        }
        let helper = crate::helper::release_helper()?;
        let mut again = vec!["bench".to_string()];
        again.extend(args.iter().cloned());
        again.push("--inner".into());
        let status = sys::rerun_in_private_netns(&again, &[("BENCH_OURS", helper.as_os_str())])?;
        return if status.success() {
            Ok(())
        } else {
            Err("bench failed".into())
        };
    }
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let settings = if quick {
        Settings {
            quick,
            rounds,
            iperf_secs: 1,
            conns: 200,
            pings: 500,
            udp_rate: 2000,
            udp_secs: 1,
            hold: 100,
            port_counts: vec![1, 100],
        }
    } else {
        Settings {
            quick,
            rounds,
            iperf_secs: 4,
            conns: 2000,
            pings: 5000,
            udp_rate: 20000,
            udp_secs: 2,
            hold: 1000,
            port_counts: vec![1, 1000, 10000],
        }
    };
    let save_docs = args.iter().any(|a| a == "--save-docs");
    inner_run(&settings, save_docs)
}

/// Everything the bench set up; dropped in reverse at the end.
struct Rig {
    netns: String,
    holder: Child,
    servers: Vec<Child>,
    tmp: PathBuf,
    podman: Option<(RootlessPort, OwnedFd)>,
    ours: (RootlessPort, OwnedFd),
    slirp: slirp_spawn::Slirp4netns,
    podman_bin: Option<PathBuf>,
    ours_bin: PathBuf,
    /// A client host on a veth pair (198.18.0.2 -> 198.18.0.1), and our helper with and
    /// without keeping client addresses, for the cost of that feature.
    client_netns: String,
    client_holder: Child,
    _kept: (RootlessPort, OwnedFd),
    _plain: (RootlessPort, OwnedFd),
}

/// Where a client runs and what it talks to.
struct Where {
    netns: Option<String>,
    iperf: String,
    echo: String,
}

const VETH_KEPT: (u16, u16) = (24201, 24007);
const VETH_PLAIN: (u16, u16) = (25201, 25007);

fn veth_where(rig: &Rig, ports: (u16, u16)) -> Where {
    Where {
        netns: Some(rig.client_netns.clone()),
        iperf: format!("198.18.0.1:{}", ports.0),
        echo: format!("198.18.0.1:{}", ports.1),
    }
}

fn where_of(rig: &Rig, c: Col) -> Where {
    Where {
        netns: (c == Col::Direct).then(|| rig.netns.clone()),
        iperf: addr(c, true),
        echo: addr(c, false),
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.client_holder.kill();
        let _ = self.client_holder.wait();
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn mapping(host_port: u16, container_port: u16, proto: &str) -> PortMapping {
    PortMapping::new("127.0.0.1", host_port, container_port, 1, proto)
}

fn helper_config(
    netns: &str,
    tmp: &Path,
    id: &str,
    mappings: Vec<PortMapping>,
) -> rootlessport::Config {
    rootlessport::Config::new(id, netns, "127.0.0.1", tmp.display().to_string())
        .with_mappings(mappings)
}

fn launch(
    bin: &Path,
    cfg: &rootlessport::Config,
) -> Result<(RootlessPort, OwnedFd, Duration), String> {
    let (exit_r, exit_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
    let mut l = Launcher::new(bin);
    l.ready_timeout = Duration::from_secs(60);
    let t = Instant::now();
    let h = l
        .start(cfg, exit_r)
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    Ok((h, exit_w, t.elapsed()))
}

fn setup() -> Result<Rig, String> {
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let (holder, netns) =
        sys::netns_holder("ip link set lo up && ip addr add 10.0.3.100/32 dev lo")?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let enter = |prog: &Path, args: &[&str]| -> Result<Child, String> {
        Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg("--")
            .arg(prog)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("nsenter: {e}"))
    };
    let iperf = sys::find_in_path("iperf3").ok_or("iperf3 not found")?;
    let servers = vec![
        enter(&iperf, &["-s", "-p", "5201"])?,
        enter(&me, &["echo-server", "--plain", "--tcp", "7", "--udp", "7"])?,
    ];
    let tmp = std::env::temp_dir().join(format!("rootless-net-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let podman_bin = podman_helper();
    let ours_bin = std::env::var_os("BENCH_OURS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/rootlessport"));
    let ports = |c: Col| {
        let (i, e) = c.ports();
        vec![mapping(i, 5201, "tcp"), mapping(e, 7, "tcp,udp")]
    };
    let podman = match &podman_bin {
        Some(b) => {
            let (h, w, _) = launch(
                b,
                &helper_config(&netns, &tmp, "bench-podman", ports(Col::Podman)),
            )?;
            Some((h, w))
        }
        None => None,
    };
    let (h, w, _) = launch(
        &ours_bin,
        &helper_config(&netns, &tmp, "bench-ours", ports(Col::Ours)),
    )?;
    // slirp4netns with host loopback allowed: otherwise it drops UDP replies to the
    // loopback clients used here.
    let mut spec = slirp_spawn::SlirpSpec::new(
        slirp_spawn::Netns::Path(netns.clone().into()),
        &tmp,
        "bench",
    )
    .with_api_socket();
    spec.options = slirp_config::parse_options(["allow_host_loopback=true", "enable_ipv6=false"])
        .map_err(|e| e.to_string())?;
    let slirp = slirp_spawn::Slirp4netns::start(&spec).map_err(|e| e.to_string())?;
    let sock = slirp.api_socket().ok_or("no API socket")?.to_path_buf();
    let (i, e) = Col::Slirp.ports();
    for (proto, host, guest) in [("tcp", i, 5201), ("tcp", e, 7), ("udp", e, 7)] {
        slirp_portfwd::add_hostfwd(&sock, proto, "127.0.0.1", host, guest)
            .map_err(|e| e.to_string())?;
    }
    let (client_holder, client_netns) = sys::netns_holder("")?;
    let cpid = client_holder.id();
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let cpid_s = cpid.to_string();
    run(&[
        "ip", "link", "add", "bv", "type", "veth", "peer", "name", "bc", "netns", &cpid_s,
    ])?;
    run(&["ip", "addr", "add", "198.18.0.1/30", "dev", "bv"])?;
    run(&["ip", "link", "set", "bv", "up"])?;
    let in_client = format!("--net={client_netns}");
    run(&[
        "nsenter",
        &in_client,
        "ip",
        "addr",
        "add",
        "198.18.0.2/30",
        "dev",
        "bc",
    ])?;
    run(&["nsenter", &in_client, "ip", "link", "set", "bc", "up"])?;
    run(&["nsenter", &in_client, "ip", "link", "set", "lo", "up"])?;
    // UDP too: each kept flow has an exact rule of its own, so slirp4netns's column
    // (the same container port, other clients) is not touched.
    let veth_cfg = |id: &str, (i, e): (u16, u16), keep: bool| {
        let mut cfg = helper_config(
            &netns,
            &tmp,
            id,
            vec![
                PortMapping::new("", i, 5201, 1, "tcp"),
                PortMapping::new("", e, 7, 1, "tcp,udp"),
            ],
        );
        cfg.child_ip = "10.0.3.100".into();
        cfg.preserve_source_ip = keep;
        cfg
    };
    let (hk, wk, _) = launch(&ours_bin, &veth_cfg("bench-kept", VETH_KEPT, true))?;
    let (hp, wp, _) = launch(&ours_bin, &veth_cfg("bench-plain", VETH_PLAIN, false))?;
    let rig = Rig {
        netns,
        holder,
        servers,
        tmp,
        podman,
        ours: (h, w),
        slirp,
        podman_bin,
        ours_bin,
        client_netns,
        client_holder,
        _kept: (hk, wk),
        _plain: (hp, wp),
    };
    // Wait until every column answers.
    for c in COLS {
        if c == Col::Podman && rig.podman.is_none() {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while client(&rig, c, &["conn", &addr(c, false), "1"]).map(|o| o.contains("failed=0"))
            != Ok(true)
        {
            if Instant::now() > deadline {
                return Err(format!("{} never answered", c.title()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(rig)
}

fn addr(c: Col, iperf: bool) -> String {
    let (i, e) = c.ports();
    format!("127.0.0.1:{}", if iperf { i } else { e })
}

/// Run a bench client (inside the container netns for the direct column).
fn client_cmd(rig: &Rig, c: Col, args: &[&str]) -> Command {
    client_cmd_at(&where_of(rig, c), args)
}

fn client_cmd_at(w: &Where, args: &[&str]) -> Command {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xtask"));
    let mut cmd = match &w.netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={ns}")).arg("--").arg(me);
            cmd
        }
        None => Command::new(me),
    };
    cmd.arg("bench-client").args(args);
    cmd
}

fn client(rig: &Rig, c: Col, args: &[&str]) -> Result<String, String> {
    let out = client_cmd(rig, c, args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn iperf(rig: &Rig, c: Col, reverse: bool, secs: u64) -> Result<f64, String> {
    iperf_at(&where_of(rig, c), reverse, secs)
}

/// iperf3 through `w`; retried a few times, as its server takes one test at a time and
/// refuses a client that comes while the previous test is still closing.
fn iperf_at(w: &Where, reverse: bool, secs: u64) -> Result<f64, String> {
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

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64
}

fn latencies(line: &str) -> Vec<u32> {
    kv(line, "lat_us")
        .map(|l| l.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// Two client processes of COUNT short connections each: (conn/s, p50 µs, p99 µs).
fn short_conns(rig: &Rig, c: Col, count: u64) -> Result<(f64, f64, f64), String> {
    short_conns_at(&where_of(rig, c), count)
}

fn short_conns_at(w: &Where, count: u64) -> Result<(f64, f64, f64), String> {
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
        done += kv(&line, "done").and_then(|d| d.parse().ok()).unwrap_or(0);
        secs = secs.max(
            kv(&line, "secs")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0),
        );
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
fn udp_flows_at(w: &Where, count: u64) -> Result<f64, String> {
    let out = client_cmd_at(w, &["udpflows", &w.echo, &count.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let done: f64 = kv(&line, "done")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    let failed: u64 = kv(&line, "failed")
        .and_then(|d| d.parse().ok())
        .unwrap_or(1);
    let secs: f64 = kv(&line, "secs")
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    if failed > 0 || secs <= 0.0 {
        return Err(format!("UDP flows through {}: {}", w.echo, line.trim()));
    }
    Ok(done / secs)
}

/// Total RSS in MB of a process and its children.
fn rss_mb(pid: u32) -> f64 {
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

fn forwarder_pid(rig: &Rig, c: Col) -> Option<u32> {
    match c {
        Col::Direct => None,
        Col::Podman => rig.podman.as_ref().map(|(h, _)| h.pid()),
        Col::Slirp => Some(rig.slirp.pid()),
        Col::Ours => Some(rig.ours.0.pid()),
    }
}

/// RSS with `n` connections held open through the forwarder.
fn rss_with_conns(rig: &Rig, c: Col, n: u64) -> Result<f64, String> {
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
fn ports_figures(rig: &Rig, bin: &Path, n: u32) -> Result<(f64, f64, f64), String> {
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

type Results = BTreeMap<(String, Col), Vec<f64>>;

fn inner_run(s: &Settings, save_docs: bool) -> Result<(), String> {
    crate::sys::raise_nofile_limit();
    let rig = setup()?;
    let mut figures: Vec<Figure> = Vec::new();
    let mut fig =
        |key: &str, label: String, unit: &'static str, better: Better, target: Option<f64>| {
            figures.push(Figure {
                key: key.into(),
                label,
                unit,
                better,
                target,
            });
        };
    fig(
        "tcp_up",
        "TCP throughput, host to container (iperf3, 1 stream)".into(),
        "Gbit/s",
        Better::Higher,
        Some(1.15),
    );
    fig(
        "tcp_down",
        "TCP throughput, container to host (iperf3 -R)".into(),
        "Gbit/s",
        Better::Higher,
        Some(1.15),
    );
    fig(
        "conn_rate",
        "short connections, 2 clients".into(),
        "conn/s",
        Better::Higher,
        Some(2.5),
    );
    fig(
        "conn_p50",
        "connection latency p50".into(),
        "us",
        Better::Lower,
        Some(0.4),
    );
    fig(
        "conn_p99",
        "connection latency p99".into(),
        "us",
        Better::Lower,
        None,
    );
    fig(
        "pp_p50",
        "1-byte ping-pong latency p50".into(),
        "us",
        Better::Lower,
        Some(0.8),
    );
    fig(
        "pp_p99",
        "1-byte ping-pong latency p99".into(),
        "us",
        Better::Lower,
        None,
    );
    fig(
        "udp_pps",
        format!("UDP echo replies at {}/s offered", s.udp_rate),
        "pkt/s",
        Better::Higher,
        None,
    );
    fig(
        "udp_loss",
        format!("UDP loss at {}/s offered", s.udp_rate),
        "%",
        Better::Lower,
        None,
    );
    fig(
        "rss_idle",
        "RSS of the forwarder, idle".into(),
        "MB",
        Better::Lower,
        Some(0.2),
    );
    fig(
        "rss_conns",
        format!("RSS with {} open connections", s.hold),
        "MB",
        Better::Lower,
        None,
    );
    for &n in &s.port_counts {
        let big = n >= 10000;
        fig(
            &format!("ports{n}_ready"),
            format!("{n} published ports: time to ready"),
            "ms",
            Better::Lower,
            big.then_some(0.33),
        );
        fig(
            &format!("ports{n}_rss"),
            format!("{n} published ports: RSS"),
            "MB",
            Better::Lower,
            big.then_some(0.25),
        );
        fig(
            &format!("ports{n}_exit"),
            format!("{n} published ports: time to exit"),
            "ms",
            Better::Lower,
            big.then_some(0.5),
        );
    }

    let mut res: Results = BTreeMap::new();
    let mut put = |k: &str, c: Col, v: f64| res.entry((k.to_string(), c)).or_default().push(v);
    let has = |c: Col| c != Col::Podman || rig.podman.is_some();
    for round in 1..=s.rounds {
        eprintln!("xtask bench: round {round} of {}", s.rounds);
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            put("tcp_up", c, iperf(&rig, c, false, s.iperf_secs)?);
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            put("tcp_down", c, iperf(&rig, c, true, s.iperf_secs)?);
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let (rate, p50, p99) = short_conns(&rig, c, s.conns)?;
            put("conn_rate", c, rate);
            put("conn_p50", c, p50);
            put("conn_p99", c, p99);
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let line = client(
                &rig,
                c,
                &["pingpong", &addr(c, false), &s.pings.to_string()],
            )?;
            let lat = latencies(&line);
            put("pp_p50", c, percentile(&lat, 0.5));
            put("pp_p99", c, percentile(&lat, 0.99));
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let line = client(
                &rig,
                c,
                &[
                    "udp",
                    &addr(c, false),
                    &s.udp_rate.to_string(),
                    &s.udp_secs.to_string(),
                ],
            )?;
            let sent: f64 = kv(&line, "sent")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let got: f64 = kv(&line, "received")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            put("udp_pps", c, got / s.udp_secs as f64);
            put(
                "udp_loss",
                c,
                if sent > 0.0 {
                    100.0 * (1.0 - got / sent)
                } else {
                    f64::NAN
                },
            );
        }
        for c in COLS
            .iter()
            .copied()
            .filter(|c| has(*c) && *c != Col::Direct)
        {
            put("rss_idle", c, rss_mb(forwarder_pid(&rig, c).unwrap_or(0)));
            put("rss_conns", c, rss_with_conns(&rig, c, s.hold)?);
        }
        for &n in &s.port_counts {
            let mut bins = vec![(Col::Ours, rig.ours_bin.clone())];
            if let Some(p) = &rig.podman_bin {
                bins.insert(0, (Col::Podman, p.clone()));
            }
            for (c, bin) in bins {
                let (ready, rss, exit) = ports_figures(&rig, &bin, n)?;
                put(&format!("ports{n}_ready"), c, ready);
                put(&format!("ports{n}_rss"), c, rss);
                put(&format!("ports{n}_exit"), c, exit);
            }
        }
        // The cost of keeping client addresses: a client on a veth pair, our helper
        // with and without it, interleaved.
        for (tag, ports) in [("kept", VETH_KEPT), ("plain", VETH_PLAIN)] {
            let w = veth_where(&rig, ports);
            put(
                &format!("veth_tcp_{tag}"),
                Col::Ours,
                iperf_at(&w, false, s.iperf_secs)?,
            );
            put(
                &format!("veth_conn_{tag}"),
                Col::Ours,
                short_conns_at(&w, s.conns)?.0,
            );
            put(
                &format!("veth_udpflow_{tag}"),
                Col::Ours,
                udp_flows_at(&w, s.conns)?,
            );
        }
    }
    let mut report = render(s, &figures, &res, rig.podman.is_some());
    report.push_str(&render_source_cost(&res));
    println!("{report}");
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("report.md"), &report).map_err(|e| e.to_string())?;
    std::fs::write(out.join("ratios.svg"), svg(&figures, &res)).map_err(|e| e.to_string())?;
    eprintln!("xtask bench: wrote target/bench/report.md and target/bench/ratios.svg");
    if save_docs {
        let docs = workspace_root().join("docs");
        std::fs::create_dir_all(&docs).map_err(|e| e.to_string())?;
        let text = format!(
            "# Benchmarks\n\nOne full run of `cargo xtask bench`, kept as a reference; rerun it to compare.\n\n{}\n\n{report}",
            machine()
        );
        std::fs::write(docs.join("benchmarks.md"), text).map_err(|e| e.to_string())?;
        std::fs::write(docs.join("benchmarks.svg"), svg(&figures, &res))
            .map_err(|e| e.to_string())?;
        eprintln!("xtask bench: wrote docs/benchmarks.md");
    }
    drop(rig);
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn get(res: &Results, key: &str, c: Col) -> Option<f64> {
    res.get(&(key.to_string(), c))
        .map(|v| median(v))
        .filter(|x| !x.is_nan())
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "—".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn ratio(res: &Results, f: &Figure) -> Option<f64> {
    let ours = get(res, &f.key, Col::Ours)?;
    let podman = get(res, &f.key, Col::Podman)?;
    if podman == 0.0 {
        return None;
    }
    Some(ours / podman)
}

fn verdict(f: &Figure, r: Option<f64>) -> &'static str {
    match (f.target, r) {
        (Some(t), Some(r)) => match f.better {
            Better::Higher if r >= t => "met",
            Better::Lower if r <= t => "met",
            _ => "NOT met",
        },
        _ => "",
    }
}

fn render_source_cost(res: &Results) -> String {
    let cell = |k: &str| get(res, k, Col::Ours);
    let mut out = String::from(
        "\nCost of keeping client addresses (our helper, client on a veth pair, container address 10.0.3.100):\n\n| figure | unit | kept | not kept | kept / not kept |\n|---|---|---:|---:|---:|\n",
    );
    for (key, label, unit) in [
        ("veth_tcp", "TCP throughput, host to container", "Gbit/s"),
        ("veth_conn", "short connections, 2 clients", "conn/s"),
        (
            "veth_udpflow",
            "new UDP flows (fresh source port, 1 query each), 1 client",
            "flows/s",
        ),
    ] {
        let (k, p) = (cell(&format!("{key}_kept")), cell(&format!("{key}_plain")));
        let r = match (k, p) {
            (Some(k), Some(p)) if p > 0.0 => format!("{:.2}x", k / p),
            _ => "—".into(),
        };
        out.push_str(&format!(
            "| {label} | {unit} | {} | {} | {r} |\n",
            fmt(k),
            fmt(p)
        ));
    }
    out
}

fn render(s: &Settings, figures: &[Figure], res: &Results, podman: bool) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Median of {} round(s){}; ratio = ours / podman's helper, same run.{}\n\n",
        s.rounds,
        if s.quick {
            " (quick mode: short runs, not for conclusions)"
        } else {
            ""
        },
        if podman {
            ""
        } else {
            " podman's helper: not installed."
        }
    ));
    out.push_str(
        "| figure | unit | direct | podman | slirp4netns | ours | ours/podman | target | |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for f in figures {
        let r = ratio(res, f);
        let target = match (f.target, f.better) {
            (Some(t), Better::Higher) => format!(">= {t}"),
            (Some(t), Better::Lower) => format!("<= {t}"),
            _ => String::new(),
        };
        let podman_cell = if podman {
            fmt(get(res, &f.key, Col::Podman))
        } else {
            "not installed".into()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            f.label,
            f.unit,
            fmt(get(res, &f.key, Col::Direct)),
            podman_cell,
            fmt(get(res, &f.key, Col::Slirp)),
            fmt(get(res, &f.key, Col::Ours)),
            r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "—".into()),
            target,
            verdict(f, r),
        ));
    }
    for key in ["tcp_up", "tcp_down"] {
        if let (Some(o), Some(d)) = (get(res, key, Col::Ours), get(res, key, Col::Direct)) {
            out.push_str(&format!(
                "\nOur {key} is {:.0}% of direct loopback.",
                100.0 * o / d
            ));
        }
    }
    out.push_str("\n\nslirp4netns runs with host loopback allowed (with it disabled it drops UDP replies to loopback clients); its RSS is that of slirp4netns itself.\n");
    out
}

/// A bar per figure: how many times better than podman's helper ours is (ratio for
/// higher-is-better figures, 1/ratio otherwise), on a log scale, with the target.
fn svg(figures: &[Figure], res: &Results) -> String {
    let rows: Vec<(&Figure, f64, Option<f64>)> = figures
        .iter()
        .filter_map(|f| {
            let r = ratio(res, f)?;
            let (good, target) = match f.better {
                Better::Higher => (r, f.target),
                Better::Lower => (1.0 / r, f.target.map(|t| 1.0 / t)),
            };
            Some((f, good, target))
        })
        .collect();
    let (w, left, row_h) = (900.0, 330.0, 26.0);
    let h = 60.0 + row_h * rows.len() as f64;
    // log2 scale from 1/4x to 16x.
    let x = |v: f64| left + (v.clamp(0.25, 16.0).log2() + 2.0) / 6.0 * (w - left - 70.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s.push_str("<text x=\"10\" y=\"20\" font-size=\"14\">our rootlessport vs podman's (times better, log scale; | = target)</text>\n");
    for v in [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0] {
        let xv = x(v);
        s.push_str(&format!(
            "<line x1=\"{xv:.1}\" y1=\"35\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"{}\"/>\n",
            h - 15.0,
            if v == 1.0 { "black" } else { "#ddd" }
        ));
        s.push_str(&format!(
            "<text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{v}x</text>\n",
            h - 2.0
        ));
    }
    for (i, (f, good, target)) in rows.iter().enumerate() {
        let y = 45.0 + row_h * i as f64;
        let (x0, x1) = (x(1.0), x(*good));
        let color = if *good >= 1.0 { "#2a9d8f" } else { "#e76f51" };
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left - 8.0,
            y + 13.0,
            xml(&f.label)
        ));
        s.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\n",
            x0.min(x1),
            (x1 - x0).abs().max(1.0),
            row_h - 8.0
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{good:.2}x</text>\n",
            x0.max(x1) + 4.0,
            y + 13.0
        ));
        if let Some(t) = target {
            let xt = x(*t);
            s.push_str(&format!("<line x1=\"{xt:.1}\" y1=\"{:.1}\" x2=\"{xt:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n", y - 2.0, y + row_h - 6.0));
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "Run on {date}: {cores} cores ({cpu}), {mem} GiB, Linux {}, shared machine; podman 4.3.1's helper from Debian, slirp4netns 1.2.0, iperf3 from Debian. Every column runs on the same servers in the same network namespace; the client runs on the host side (for the direct column, inside the namespace).",
        kernel.trim()
    )
}
