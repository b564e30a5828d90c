//! The bench's rig: the container netns with its servers, every forwarder in front of
//! them (podman's helper, ours, slirp4netns's hostfwd, and ours twice more for a client
//! on a veth pair), and how a client process reaches each column.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rootlessport::launcher::{Launcher, RootlessPort};
use slirp_config::PortMapping;

use crate::sys;
use crate::workspace::workspace_root;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Col {
    Direct,
    Podman,
    Slirp,
    Ours,
}

pub(super) const COLS: [Col; 4] = [Col::Direct, Col::Podman, Col::Slirp, Col::Ours];

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
    pub slirp: slirp_spawn::Slirp4netns,
    pub podman_bin: Option<PathBuf>,
    pub ours_bin: PathBuf,
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
    let t = Instant::now();
    let h = l
        .start(cfg, exit_r)
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    Ok((h, exit_w, t.elapsed()))
}

pub(super) fn setup() -> Result<Rig, String> {
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
        Col::Slirp => Some(rig.slirp.pid()),
        Col::Ours => Some(rig.ours.0.pid()),
    }
}
