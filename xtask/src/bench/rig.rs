//! The bench's rig: the container netns with its servers, every forwarder in front of
//! them (podman's helper, ours, a baseline build of ours, slirp4netns's hostfwd, and
//! ours twice more for a client on a veth pair), pasta in a netns of its own with the
//! same servers, and how a client process reaches each column.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rootlessport::launcher::{Launcher, RootlessPort};
use slirp_config::PortMapping;

use crate::sys;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Col {
    /// No forwarder: the client inside the container netns (the limit).
    Direct,
    Podman,
    /// pasta as podman 5 runs it, into a netns of its own.
    Pasta,
    Slirp,
    Ours,
    /// Another build of ours (`--baseline PATH`), measured exactly like ours.
    Baseline,
}

pub(super) const COLS: [Col; 6] = [
    Col::Direct,
    Col::Podman,
    Col::Pasta,
    Col::Slirp,
    Col::Ours,
    Col::Baseline,
];

/// The other forwarders, the best of which is "the best peer" of a figure.
pub(super) const PEERS: [Col; 3] = [Col::Podman, Col::Pasta, Col::Slirp];

impl Col {
    fn title(self) -> &'static str {
        match self {
            Col::Direct => "direct (no forwarder)",
            Col::Podman => "podman rootlessport",
            Col::Pasta => "pasta",
            Col::Slirp => "slirp4netns hostfwd",
            Col::Ours => "our rootlessport",
            Col::Baseline => "ours (baseline)",
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
            Col::Pasta => (26201, 26007),
            Col::Baseline => (27201, 27007),
        }
    }
}

pub(super) fn podman_helper() -> Option<PathBuf> {
    [
        "/usr/lib/podman/rootlessport",
        "/usr/libexec/podman/rootlessport",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Everything the bench set up; dropped in reverse at the end.
pub(super) struct Rig {
    pub netns: String,
    pub holder: Child,
    pub servers: Vec<Child>,
    pub tmp: PathBuf,
    pub podman: Option<(RootlessPort, OwnedFd)>,
    pub ours: (RootlessPort, OwnedFd),
    pub baseline: Option<(RootlessPort, OwnedFd)>,
    pub pasta: Pasta,
    pub slirp: slirp_spawn::Slirp4netns,
    pub podman_bin: Option<PathBuf>,
    pub ours_bin: PathBuf,
    pub baseline_bin: Option<PathBuf>,
    pub pasta_bin: PathBuf,
    /// `listen-floor` (xtask's second binary), started as the helpers are: the limit of
    /// the published-ports time to ready, a process that makes the same listeners and
    /// nothing else.
    pub floor_bin: PathBuf,
    /// A client host on a veth pair (198.18.0.2 -> 198.18.0.1), and our helper with and
    /// without keeping client addresses, for the cost of that feature.
    pub client_netns: String,
    pub client_holder: Child,
    pub _kept: (RootlessPort, OwnedFd),
    pub _plain: (RootlessPort, OwnedFd),
}

/// Where a client runs and what it talks to.
pub(super) struct Where {
    pub netns: Option<String>,
    pub iperf: String,
    pub echo: String,
}

pub(super) const VETH_KEPT: (u16, u16) = (24201, 24007);
pub(super) const VETH_PLAIN: (u16, u16) = (25201, 25007);

pub(super) fn veth_where(rig: &Rig, ports: (u16, u16)) -> Where {
    Where {
        netns: Some(rig.client_netns.clone()),
        iperf: format!("198.18.0.1:{}", ports.0),
        echo: format!("198.18.0.1:{}", ports.1),
    }
}

impl Rig {
    /// Whether column `c` runs in this rig (podman's helper may be missing, the
    /// baseline is optional).
    pub(super) fn has(&self, c: Col) -> bool {
        match c {
            Col::Podman => self.podman.is_some(),
            Col::Baseline => self.baseline.is_some(),
            _ => true,
        }
    }

    /// The helper binary of a column that is a `rootlessport` (podman's, ours, the
    /// baseline), for the published-ports figures.
    pub(super) fn helper_bin(&self, c: Col) -> Option<&Path> {
        match c {
            Col::Podman => self.podman_bin.as_deref(),
            Col::Ours => Some(&self.ours_bin),
            Col::Baseline => self.baseline_bin.as_deref(),
            _ => None,
        }
    }
}

pub(super) fn where_of(rig: &Rig, c: Col) -> Where {
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

pub(super) fn helper_config(
    netns: &str,
    tmp: &Path,
    id: &str,
    mappings: Vec<PortMapping>,
) -> rootlessport::Config {
    rootlessport::Config::new(id, netns, "127.0.0.1", tmp.display().to_string())
        .with_mappings(mappings)
}

pub(super) fn launch(
    bin: &Path,
    cfg: &rootlessport::Config,
) -> Result<(RootlessPort, OwnedFd, Duration), String> {
    let (exit_r, exit_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
    let mut l = Launcher::new(bin);
    l.ready_timeout = Duration::from_secs(60);
    let h = l
        .start(cfg, exit_r)
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    // From the spawn, as pasta's time is from its spawn with its arguments built: not
    // this (debug) build's encoding of the config, ~30 ms for 10,000 mappings.
    let ready = h.startup_time();
    Ok((h, exit_w, ready))
}

pub(super) fn setup() -> Result<Rig, String> {
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let (holder, netns) =
        sys::netns_holder("ip link set lo up && ip addr add 10.0.3.100/32 dev lo")?;
    let servers = start_servers(&netns)?;
    let tmp = std::env::temp_dir().join(format!("rootless-net-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let podman_bin = podman_helper();
    let ours_bin = std::env::var_os("BENCH_OURS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::helper::release_bin(None, "rootlessport"));
    let baseline_bin = std::env::var_os("BENCH_BASELINE").map(PathBuf::from);
    let floor_bin = std::env::var_os("BENCH_FLOOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::helper::release_bin(None, "listen-floor"));
    let pasta_bin = sys::find_in_path("pasta").ok_or("pasta not found (package passt)")?;
    let ports = |c: Col| {
        let (i, e) = c.ports();
        vec![mapping(i, 5201, "tcp"), mapping(e, 7, "tcp,udp")]
    };
    // A helper serving column `col`'s ports (from `bin`, when there is one).
    let helper = |bin: &Path, col: Col, id: &str| -> Result<(RootlessPort, OwnedFd), String> {
        let (h, w, _) = launch(bin, &helper_config(&netns, &tmp, id, ports(col)))?;
        Ok((h, w))
    };
    let podman = podman_bin
        .as_deref()
        .map(|b| helper(b, Col::Podman, "bench-podman"))
        .transpose()?;
    let (h, w) = helper(&ours_bin, Col::Ours, "bench-ours")?;
    let baseline = baseline_bin
        .as_deref()
        .map(|b| helper(b, Col::Baseline, "bench-baseline"))
        .transpose()?;
    pasta_uplink()?;
    let pasta = Pasta::start_with_servers(&pasta_bin, &ports(Col::Pasta))?;
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
        baseline,
        pasta,
        slirp,
        podman_bin,
        ours_bin,
        baseline_bin,
        pasta_bin,
        floor_bin,
        client_netns,
        client_holder,
        _kept: (hk, wk),
        _plain: (hp, wp),
    };
    // Wait until every column answers.
    for c in COLS.into_iter().filter(|c| rig.has(*c)) {
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

/// The bench's servers in `netns` (a path): iperf3 on 5201, the echo server on TCP and
/// UDP 7.
fn start_servers(netns: &str) -> Result<Vec<Child>, String> {
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
    Ok(vec![
        enter(&iperf, &["-s", "-p", "5201"])?,
        enter(&me, &["echo-server", "--plain", "--tcp", "7", "--udp", "7"])?,
    ])
}

/// An interface with a default route in the bench's own netns: pasta's
/// `--config-net` copies the addresses and routes of the host's default-route
/// interface into the container netns and refuses to start without one. Documentation
/// addresses; the bench's clients only use loopback, so no column's traffic takes it.
fn pasta_uplink() -> Result<(), String> {
    for args in [
        &[
            "link",
            "add",
            "pasta-up",
            "type",
            "veth",
            "peer",
            "name",
            "pasta-up-peer",
        ][..],
        &["link", "set", "pasta-up-peer", "up"],
        &["addr", "add", "192.0.2.1/24", "dev", "pasta-up"],
        &["link", "set", "pasta-up", "up"],
        &[
            "route",
            "add",
            "default",
            "via",
            "192.0.2.254",
            "dev",
            "pasta-up",
        ],
    ] {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// A netns held by a process and bind-mounted on a file under `/run/netns` (the
/// bench's private tmpfs), as podman names a container's netns: pasta opens it by
/// that path and quits once the file is removed.
pub(super) struct NamedNetns {
    holder: Child,
    pub file: PathBuf,
}

impl NamedNetns {
    pub(super) fn new(name: &str) -> Result<Self, String> {
        let (holder, proc_path) = sys::netns_holder("ip link set lo up")?;
        let file = PathBuf::from("/run/netns").join(name);
        let named = NamedNetns { holder, file };
        std::fs::File::create(&named.file)
            .map_err(|e| format!("cannot create {}: {e}", named.file.display()))?;
        nix::mount::mount(
            Some(proc_path.as_str()),
            &named.file,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("cannot bind {proc_path} on {}: {e}", named.file.display()))?;
        Ok(named)
    }

    /// podman's teardown of a netns: detach the bind mount, unlink the file; then the
    /// holder goes too, and nothing keeps the netns.
    pub(super) fn remove(&mut self) {
        let _ = nix::mount::umount2(&self.file, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.file);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// pasta forwarding into a netns of its own (its `--config-net` puts a tap interface,
/// addresses and a default route there, which would clash with slirp4netns's in the
/// rig's netns), with the same servers as the rig's netns.
pub(super) struct Pasta {
    /// pasta's own process (it forks to the background once ready).
    pub pid: u32,
    servers: Vec<Child>,
    netns: NamedNetns,
}

impl Pasta {
    fn start_with_servers(bin: &Path, mappings: &[PortMapping]) -> Result<Pasta, String> {
        let netns = NamedNetns::new("bench-pasta")?;
        let servers = start_servers(&netns.file.display().to_string())?;
        let (pid, _) = start_pasta(bin, mappings, &netns.file)?;
        Ok(Pasta {
            pid,
            servers,
            netns,
        })
    }
}

impl Drop for Pasta {
    fn drop(&mut self) {
        stop_pid(self.pid);
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        self.netns.remove();
    }
}

/// SIGTERM a process that is not our child (pasta forks away from us), then wait up to
/// 2 s for it to be gone, SIGKILL if it is not.
pub(super) fn stop_pid(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    let Ok(raw) = i32::try_from(pid) else { return };
    let pid = nix::unistd::Pid::from_raw(raw);
    let _ = kill(pid, Signal::SIGTERM);
    if !wait_gone(pid.as_raw() as u32, Duration::from_secs(2)) {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// Whether process `pid` is gone (or a zombie) within `timeout`, polled every ms.
pub(super) fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let alive = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.stat())
            .map(|s| s.state != 'Z')
            .unwrap_or(false);
        if !alive {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The pasta command line podman 5 runs to publish `mappings` into the netns at
/// `netns` (containers/common `libnetwork/pasta`, `createPastaArgs`, with no
/// `pasta_options` configured): `--config-net`, one `-t`/`-u` per mapping and
/// protocol as `[HOST_IP/]HOST-HOST_END:CONTAINER-CONTAINER_END`, its DNS forwarder,
/// `none` for what is not forwarded, `--no-map-gw --quiet --netns PATH`. Two options
/// of the bench's own go where configured ones would: `--runas 0:0` (run as root,
/// pasta switches to `nobody`, who may not open the netns) and `--pid FILE`.
///
/// # Errors
///
/// A protocol pasta cannot forward (podman's "can't forward protocol: sctp").
pub(super) fn pasta_args(
    mappings: &[PortMapping],
    netns: &Path,
    pid_file: &Path,
) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = vec![
        "--config-net".into(),
        "--runas".into(),
        "0:0".into(),
        "--pid".into(),
        pid_file.display().to_string(),
    ];
    let (mut tcp, mut udp) = (false, false);
    for m in mappings {
        for proto in m.protocols() {
            let flag = match proto {
                "tcp" => {
                    tcp = true;
                    "-t"
                }
                "udp" => {
                    udp = true;
                    "-u"
                }
                other => return Err(format!("can't forward protocol: {other}")),
            };
            let addr = if m.host_ip.is_empty() {
                String::new()
            } else {
                format!("{}/", m.host_ip)
            };
            let last = |first: u16| u32::from(first) + u32::from(m.count()) - 1;
            args.push(flag.into());
            args.push(format!(
                "{addr}{}-{}:{}-{}",
                m.host_port,
                last(m.host_port),
                m.container_port,
                last(m.container_port)
            ));
        }
    }
    args.extend(["--dns-forward", "169.254.0.1"].map(String::from));
    if !tcp {
        args.extend(["-t", "none"].map(String::from));
    }
    if !udp {
        args.extend(["-u", "none"].map(String::from));
    }
    args.extend(
        [
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
        ]
        .map(String::from),
    );
    args.push(netns.display().to_string());
    Ok(args)
}

/// Start pasta for `mappings` into the netns at `netns` and wait until it is ready (it
/// forks to the background then, and its first process exits 0): (pid, time to ready).
pub(super) fn start_pasta(
    bin: &Path,
    mappings: &[PortMapping],
    netns: &Path,
) -> Result<(u32, Duration), String> {
    let pid_file = netns.with_extension("pasta-pid");
    let _ = std::fs::remove_file(&pid_file);
    let args = pasta_args(mappings, netns, &pid_file)?;
    let t = Instant::now();
    let out = Command::new(bin)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let ready = t.elapsed();
    // Without a system logger pasta says so on stderr for every line it logs.
    let said: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("Failed to send") && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    let _ = std::fs::remove_file(&pid_file);
    match pid {
        Some(pid) if out.status.success() => Ok((pid, ready)),
        _ => Err(format!(
            "pasta for {} did not start ({}): {}",
            netns.display(),
            out.status,
            said.join("; ")
        )),
    }
}

pub(super) fn addr(c: Col, iperf: bool) -> String {
    let (i, e) = c.ports();
    format!("127.0.0.1:{}", if iperf { i } else { e })
}

/// Run a bench client (inside the container netns for the direct column).
pub(super) fn client_cmd(rig: &Rig, c: Col, args: &[&str]) -> Command {
    client_cmd_at(&where_of(rig, c), args)
}

pub(super) fn client_cmd_at(w: &Where, args: &[&str]) -> Command {
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

pub(super) fn client(rig: &Rig, c: Col, args: &[&str]) -> Result<String, String> {
    let out = client_cmd(rig, c, args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(super) fn forwarder_pid(rig: &Rig, c: Col) -> Option<u32> {
    match c {
        Col::Direct => None,
        Col::Podman => rig.podman.as_ref().map(|(h, _)| h.pid()),
        Col::Pasta => Some(rig.pasta.pid),
        Col::Slirp => Some(rig.slirp.pid()),
        Col::Ours => Some(rig.ours.0.pid()),
        Col::Baseline => rig.baseline.as_ref().map(|(h, _)| h.pid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line is podman 5's for the same mappings (its createPastaArgs
    /// test cases), with the bench's `--runas`/`--pid` where configured options go.
    #[test]
    fn pasta_args_are_podmans() {
        let ns = Path::new("/run/netns/x");
        let pid = Path::new("/run/netns/x.pasta-pid");
        let own = [
            "--config-net",
            "--runas",
            "0:0",
            "--pid",
            "/run/netns/x.pasta-pid",
        ];
        let tail = [
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
            "--quiet",
            "--netns",
            "/run/netns/x",
        ];
        let line = |mid: &[&str]| -> Vec<String> {
            own.iter()
                .chain(mid)
                .chain(&tail)
                .map(|s| s.to_string())
                .collect()
        };
        assert_eq!(
            pasta_args(&[mapping(8080, 80, "tcp,udp")], ns, pid).unwrap(),
            line(&[
                "-t",
                "127.0.0.1/8080-8080:80-80",
                "-u",
                "127.0.0.1/8080-8080:80-80",
                "--dns-forward",
                "169.254.0.1"
            ])
        );
        assert_eq!(
            pasta_args(&[PortMapping::new("", 10000, 20000, 3, "tcp")], ns, pid).unwrap(),
            line(&[
                "-t",
                "10000-10002:20000-20002",
                "--dns-forward",
                "169.254.0.1",
                "-u",
                "none"
            ])
        );
        assert_eq!(
            pasta_args(&[], ns, pid).unwrap(),
            line(&["--dns-forward", "169.254.0.1", "-t", "none", "-u", "none"])
        );
        assert_eq!(
            pasta_args(&[mapping(1, 1, "tcp,sctp")], ns, pid).unwrap_err(),
            "can't forward protocol: sctp"
        );
    }
}
