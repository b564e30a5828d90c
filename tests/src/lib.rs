//! Helpers shared by the cross-crate integration tests.
//!
//! Tests marked `#[ignore = "itest: ..."]` need namespaces or system programs: `cargo
//! xtask itest` runs them inside fresh network and mount namespaces. Each of them calls
//! [`require_harness`] first so that `cargo test -- --ignored` on a bare host fails
//! with a clear message instead of touching the host's network.

use std::path::PathBuf;

/// The variable `cargo xtask itest` sets inside its namespaces.
pub const HARNESS_ENV: &str = "ROOTLESS_NET_ITEST";

/// Panic unless we run inside the `cargo xtask itest` namespaces.
pub fn require_harness() {
    assert!(
        std::env::var_os(HARNESS_ENV).is_some(),
        "this test changes network state: run it through `cargo xtask itest`"
    );
}

/// The installed slirp4netns, which `cargo xtask itest` makes sure is there.
pub fn slirp4netns() -> PathBuf {
    slirp_config::find_binary("slirp4netns")
        .expect("slirp4netns is not installed (cargo xtask itest installs it as root)")
}

/// A fixture file shipped with slirp-config.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../slirp-config/fixtures")
        .join(name)
}

/// A fresh network namespace held by a [`slirp_spawn::NetnsHolder`], named by
/// `/proc/PID/ns/net`, with the tests' ways into it. Dropping it kills the holder, and
/// the namespace goes with it.
pub struct TestNetns {
    holder: slirp_spawn::NetnsHolder,
}

impl TestNetns {
    pub fn new() -> TestNetns {
        TestNetns {
            holder: slirp_spawn::NetnsHolder::new().expect("a netns holder"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.holder.pid()
    }

    pub fn path(&self) -> PathBuf {
        self.holder.path()
    }

    pub fn netns(&self) -> slirp_spawn::Netns {
        self.holder.netns()
    }

    /// Run a shell script inside the namespace; panics unless it succeeds.
    pub fn sh(&self, script: &str) -> String {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .args(["--", "sh", "-c", script])
            .output()
            .expect("nsenter");
        assert!(
            out.status.success(),
            "{script:?} failed in netns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `f` on a thread inside the namespace: sockets it creates stay in it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = slirp_spawn::open_netns(&self.netns()).expect("open netns");
        slirp_spawn::in_netns(&fd, f).expect("enter netns")
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

/// Live processes (zombies included) whose process group is `pgid`.
pub fn processes_in_group(pgid: u32) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| p.stat().ok())
        .filter(|stat| u32::try_from(stat.pgrp) == Ok(pgid))
        .filter_map(|stat| u32::try_from(stat.pid).ok())
        .collect()
}

/// Whether `/proc/PID` exists (a zombie still has one).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Anonymous memory of process `pid`, in KB (`RssAnon` of `/proc/PID/status`).
pub fn rss_anon_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no RssAnon in /proc/{pid}/status"))
}

/// Wait up to `secs` for `cond`, polling every 10 ms; returns whether it held.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Write an executable fake `slirp4netns` into `dir`: it answers `--help` with the
/// 1.2.0 help text and otherwise runs `body` (a shell snippet).
pub fn fake_slirp4netns(dir: &std::path::Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let help = std::fs::read_to_string(fixture("slirp4netns-1.2.0-help.txt")).expect("fixture");
    let path = dir.join("slirp4netns");
    let tmp = dir.join(".slirp4netns.new");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = --help ]; then cat <<'EOF'\n{help}EOF\nexit 0\nfi\n{body}\n"
    );
    std::fs::write(&tmp, script).expect("write fake");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod fake");
    std::fs::rename(&tmp, &path).expect("install fake");
    path
}

/// A client host: a namespace of its own joined to the harness's namespace by a veth
/// pair, with addresses from TEST-NET-1 (192.0.2.0/24). `slot` (0..63) keeps the names
/// and the /30 of parallel tests apart. The host side is `192.0.2.(4*slot+1)`, the
/// client `192.0.2.(4*slot+2)`.
pub struct ClientHost {
    pub ns: TestNetns,
    pub host_addr: std::net::Ipv4Addr,
    pub client_addr: std::net::Ipv4Addr,
    /// `2001:db8:SLOT::1` on the host side, `::2` on the client (documentation prefix).
    pub host_addr6: std::net::Ipv6Addr,
    pub client_addr6: std::net::Ipv6Addr,
    host_if: String,
}

impl ClientHost {
    pub fn new(slot: u8) -> ClientHost {
        assert!(slot < 64);
        let ns = TestNetns::new();
        let host_if = format!("vh{slot}");
        let base = 4 * slot;
        let host_addr = std::net::Ipv4Addr::new(192, 0, 2, base + 1);
        let client_addr = std::net::Ipv4Addr::new(192, 0, 2, base + 2);
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let pid = ns.pid().to_string();
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "vc", "netns", &pid,
        ]);
        let host_addr6 = std::net::Ipv6Addr::new(0x2001, 0xdb8, slot as u16, 0, 0, 0, 0, 1);
        let client_addr6 = std::net::Ipv6Addr::new(0x2001, 0xdb8, slot as u16, 0, 0, 0, 0, 2);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{host_addr6}/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        ip(&["link", "set", &host_if, "up"]);
        ns.sh(&format!(
            "ip addr add {client_addr}/30 dev vc && ip -6 addr add {client_addr6}/64 dev vc nodad && ip link set vc up && ip link set lo up"
        ));
        ClientHost {
            ns,
            host_addr,
            client_addr,
            host_addr6,
            client_addr6,
            host_if,
        }
    }
}

impl Drop for ClientHost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// A shell script `dir/name` (mode 0755) that runs `setup` (shell: `ulimit -n 64`,
/// `export ROOTLESSPORT_THREADS=2`), exits 1 if that fails, then execs
/// [`rootlessport_bin`] with the script's arguments: our helper started with another
/// limit or environment, by a `Launcher` or by podman's `helper_binaries_dir`.
pub fn rootlessport_wrapper(dir: &std::path::Path, name: &str, setup: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\n{setup} || exit 1\nexec '{}' \"$@\"\n",
        rootlessport_bin().display()
    );
    std::fs::write(&path, script).expect("writing the wrapper script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("making the wrapper script executable");
    path
}

/// A child process that is killed and reaped when dropped, so that a test that fails
/// part way leaves no process behind.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Kill and reap it now (errors ignored: it may have exited already).
    pub fn kill_now(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// The `rootlessport` binary of this build: `ROOTLESSPORT_BIN`, or the one next to the
/// test executable's directory (`cargo xtask itest` builds it).
pub fn rootlessport_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ROOTLESSPORT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("rootlessport");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p rootlessport` (cargo xtask itest does)",
        bin.display()
    );
    bin
}

/// The `xtask` binary of this build (it runs the tests, so it exists).
pub fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XTASK_BIN") {
        return PathBuf::from(p);
    }
    let bin = rootlessport_bin()
        .parent()
        .expect("target/<profile>")
        .join("xtask");
    assert!(
        bin.exists(),
        "{} is missing: cargo build -p xtask",
        bin.display()
    );
    bin
}

/// A pipe whose ends close on exec, so that no unrelated child keeps them open (an
/// exit pipe held by a stray child never reads EOF).
pub fn cloexec_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// A snapshot of the routing state a helper may touch in `ns`, for comparing before and
/// after: `ip -4 rule`, `ip -6 rule`, every IPv4 and IPv6 route of every table, and
/// `net.ipv4.tcp_fwmark_accept` and both `fwmark_reflect`s. Each section's lines are trimmed and sorted, so the
/// order the kernel lists equal entries in does not matter.
pub fn netns_state(ns: &TestNetns) -> String {
    let sections = [
        ("ip -4 rule", "ip -4 rule"),
        ("ip -6 rule", "ip -6 rule"),
        ("ip -4 route", "ip -4 route show table all"),
        ("ip -6 route", "ip -6 route show table all"),
        (
            "tcp_fwmark_accept",
            "cat /proc/sys/net/ipv4/tcp_fwmark_accept",
        ),
        (
            "ipv4 fwmark_reflect",
            "cat /proc/sys/net/ipv4/fwmark_reflect",
        ),
        (
            "ipv6 fwmark_reflect",
            "cat /proc/sys/net/ipv6/fwmark_reflect",
        ),
    ];
    let mut out = String::new();
    for (title, cmd) in sections {
        let text = ns.sh(&format!("{cmd} 2>&1 || true"));
        let mut lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        lines.sort_unstable();
        out.push_str(&format!("== {title}\n"));
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The shape podman's rootless bridge networks (netavark/CNI, `rootless_cni`) run in,
/// built from namespaces of its own with documentation addresses only:
///
/// - `bridge`: podman's rootless netns, holding the Linux bridge `br0` with
///   `198.51.100.1/24` and `2001:db8:88::1/64` (no forwarding, no other links, so
///   nothing leaves the namespaces made here);
/// - `container`: veth `eth0` on `br0`, `198.51.100.2/24` and `2001:db8:88::2/64`,
///   loopback up, default routes via the bridge (`promote_secondaries` is on, so that
///   a second address of the subnet survives the first one's removal, as in a reload);
/// - `sibling`: another container on the same bridge, `198.51.100.3/24` and
///   `2001:db8:88::3/64`, the same default routes;
/// - `client`: a remote client ([`ClientHost`] of `slot`, `192.0.2.x`) joined to the
///   harness netns, where the helper listens.
///
/// `slot` (as for [`ClientHost`], 0..63) keeps the names and addresses that live in the
/// shared harness netns apart between tests running in parallel; everything else is in
/// the topology's private namespaces. DAD is off everywhere, so IPv6 works at once.
/// [`BridgeTopology::launch`] starts the helper for the container; dropping the
/// topology deletes the links it made and ends its namespaces.
pub struct BridgeTopology {
    pub bridge: TestNetns,
    pub container: TestNetns,
    pub sibling: TestNetns,
    pub client: ClientHost,
    /// The helpers' `TmpDir` (reload sockets, logs).
    pub dir: tempfile::TempDir,
    slot: u8,
    launched: std::sync::atomic::AtomicU32,
}

impl BridgeTopology {
    pub const BRIDGE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 1);
    pub const BRIDGE_IP6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x88, 0, 0, 0, 0, 1);
    pub const CONTAINER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 2);
    pub const CONTAINER_IP6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x88, 0, 0, 0, 0, 2);
    pub const SIBLING_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 3);
    pub const SIBLING_IP6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x88, 0, 0, 0, 0, 3);

    pub fn new(slot: u8) -> BridgeTopology {
        const NO_DAD: &str = "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad; \
             echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad; ip link set lo up";
        let bridge = TestNetns::new();
        let container = TestNetns::new();
        let sibling = TestNetns::new();
        for ns in [&bridge, &container, &sibling] {
            ns.sh(NO_DAD);
        }
        bridge.sh(&format!(
            "set -e
             ip link add br0 type bridge
             ip addr add {}/24 dev br0
             ip -6 addr add {}/64 dev br0 nodad
             ip link set br0 up
             ip link add vc0 type veth peer name eth0 netns {}
             ip link set vc0 master br0 up
             ip link add vs0 type veth peer name eth0 netns {}
             ip link set vs0 master br0 up",
            Self::BRIDGE_IP,
            Self::BRIDGE_IP6,
            container.pid(),
            sibling.pid(),
        ));
        for (ns, v4, v6) in [
            (&container, Self::CONTAINER_IP, Self::CONTAINER_IP6),
            (&sibling, Self::SIBLING_IP, Self::SIBLING_IP6),
        ] {
            ns.sh(&format!(
                "set -e
                 echo 1 > /proc/sys/net/ipv4/conf/eth0/promote_secondaries
                 ip addr add {v4}/24 dev eth0
                 ip -6 addr add {v6}/64 dev eth0 nodad
                 ip link set eth0 up
                 ip route add default via {}
                 ip -6 route add default via {}",
                Self::BRIDGE_IP,
                Self::BRIDGE_IP6,
            ));
        }
        let client = ClientHost::new(slot);
        BridgeTopology {
            bridge,
            container,
            sibling,
            client,
            dir: tempfile::tempdir().expect("tempdir"),
            slot,
            launched: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// 198.51.100.2, the helper's default child IP.
    pub fn container_ip(&self) -> std::net::Ipv4Addr {
        Self::CONTAINER_IP
    }

    /// 2001:db8:88::2.
    pub fn container_ip6(&self) -> std::net::Ipv6Addr {
        Self::CONTAINER_IP6
    }

    /// 198.51.100.3.
    pub fn sibling_ip(&self) -> std::net::Ipv4Addr {
        Self::SIBLING_IP
    }

    /// 2001:db8:88::3.
    pub fn sibling_ip6(&self) -> std::net::Ipv6Addr {
        Self::SIBLING_IP6
    }

    /// The config [`BridgeTopology::launch`] uses, to tweak before
    /// [`BridgeTopology::start`]: the container netns, child IP 198.51.100.2, client
    /// addresses kept, `RootlessCNI` (a reload socket), a container ID unique to this
    /// topology and launch, [`BridgeTopology::dir`] as `TmpDir`.
    pub fn config(&self, mappings: Vec<slirp_config::PortMapping>) -> rootlessport::Config {
        let n = self
            .launched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rootlessport::Config::new(
            format!("bridge{}-{n}", self.slot),
            self.container.path().display().to_string(),
            Self::CONTAINER_IP.to_string(),
            self.dir.path().display().to_string(),
        )
        .with_mappings(mappings)
        .with_preserve_source_ip(true)
        .with_rootless_cni(true)
    }

    /// Start the helper ([`rootlessport_bin`]) with `cfg`; panics unless it gets ready.
    pub fn start(&self, cfg: &rootlessport::Config) -> BridgeHelper {
        let (exit_r, exit_w) = cloexec_pipe();
        let process = rootlessport::launcher::Launcher::new(rootlessport_bin())
            .start(cfg, exit_r)
            .unwrap_or_else(|e| panic!("starting {}: {e}", rootlessport_bin().display()));
        BridgeHelper {
            process,
            exit: Some(exit_w),
            tmp_dir: self.dir.path().to_path_buf(),
            container_id: cfg.container_id.clone(),
        }
    }

    /// Start the helper for `mappings` with [`BridgeTopology::config`].
    pub fn launch(&self, mappings: Vec<slirp_config::PortMapping>) -> BridgeHelper {
        self.start(&self.config(mappings))
    }

    /// Start the helper with the config of `mappings` changed by `tweak`.
    pub fn launch_with(
        &self,
        mappings: Vec<slirp_config::PortMapping>,
        tweak: impl FnOnce(&mut rootlessport::Config),
    ) -> BridgeHelper {
        let mut cfg = self.config(mappings);
        tweak(&mut cfg);
        self.start(&cfg)
    }
}

impl Drop for BridgeTopology {
    fn drop(&mut self) {
        // Deleting one end of a veth deletes the other: the container's and the
        // sibling's eth0 go too, even if a socket still holds their namespace.
        let _ = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.bridge.path().display()))
            .args([
                "--",
                "sh",
                "-c",
                "ip link del vc0; ip link del vs0; ip link del br0",
            ])
            .output();
        // The namespaces and the client host go with the fields.
    }
}

/// A helper started by [`BridgeTopology::start`]. Dropping it closes its exit pipe and
/// waits up to 5 s for it to exit, then kills it.
pub struct BridgeHelper {
    pub process: rootlessport::launcher::RootlessPort,
    exit: Option<std::os::fd::OwnedFd>,
    tmp_dir: PathBuf,
    pub container_id: String,
}

impl BridgeHelper {
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Tell the helper its new child IP, as podman does after a network reload.
    pub fn reload(&self, child_ip: &str) -> Result<(), rootlessport::reload::ReloadError> {
        rootlessport::reload::reload(&self.tmp_dir, &self.container_id, child_ip)
    }

    /// Close the write end of the exit pipe (the helper should then exit).
    pub fn close_exit_pipe(&mut self) {
        self.exit = None;
    }

    /// Close the exit pipe and wait up to `timeout` for the helper to exit.
    pub fn exit_within(
        &mut self,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        self.close_exit_pipe();
        self.process
            .wait_timeout(timeout)
            .expect("waiting for rootlessport")
    }
}

impl Drop for BridgeHelper {
    fn drop(&mut self) {
        self.close_exit_pipe();
        // Killed by RootlessPort's drop if still running.
        let _ = self.process.wait_timeout(std::time::Duration::from_secs(5));
    }
}

/// An address as the container reports it: IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what
/// a dual-stack socket sees of an IPv4 peer) shown as plain IPv4.
pub fn unmap(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(cmd);
            }
        }
    }
    out
}

/// From now on, each of `syscalls` fails with ENOSYS on this thread and in what it
/// forks: the paths older kernels take (no `close_range` before 5.9, no `pidfd_open`
/// before 5.3), on this one.
pub fn deny_syscalls(syscalls: &[i64]) {
    seccompiler::apply_filter(&deny_filter(syscalls)).expect("seccomp filter");
}

/// The seccomp program [`deny_syscalls`] applies (every syscall of `syscalls` fails with
/// ENOSYS, everything else is allowed), compiled, for a child's `pre_exec` to apply
/// between fork and exec without allocating.
pub fn deny_filter(syscalls: &[i64]) -> seccompiler::BpfProgram {
    let rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        syscalls.iter().map(|&s| (s, vec![])).collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("a seccomp target arch");
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .expect("seccomp filter");
    filter.try_into().expect("seccomp filter")
}

/// `launcher` (a command that runs its arguments in some namespaces: `nsenter --net=..
/// --`, `unshare --user --net --`) running this build's TCP/UDP echo server on the
/// container ports `tcp` and `udp`; returns once the server says it listens (so the
/// namespaces exist by then).
pub fn start_echo_server(
    mut launcher: std::process::Command,
    tcp: u16,
    udp: u16,
) -> std::process::Child {
    use std::io::BufRead;
    let mut child = launcher
        .arg(xtask_bin())
        .args([
            "echo-server",
            "--tcp",
            &tcp.to_string(),
            "--udp",
            &udp.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the echo server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("its stdout"))
        .read_line(&mut line)
        .expect("reading its first line");
    assert_eq!(line.trim(), "echo-server: ready");
    child
}

/// Servers in `ns` that answer each client with the address they see it come from
/// (IPv4-mapped addresses unmapped): TCP on `tcp` writes `tcp peer ADDR:PORT` and
/// closes, UDP on `udp` answers each datagram `udp peer ADDR:PORT`. Both listen on
/// `::` (dual-stack) and serve until the process ends.
pub fn start_peer_reporters(ns: &TestNetns, tcp: u16, udp: u16) {
    use std::io::Write;
    let (l, u) = ns.run(move || {
        (
            std::net::TcpListener::bind(("::", tcp)).expect("reporter TCP port"),
            std::net::UdpSocket::bind(("::", udp)).expect("reporter UDP port"),
        )
    });
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let Ok(peer) = c.peer_addr() else { continue };
            let _ = c.write_all(format!("tcp peer {}", unmap(peer)).as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(format!("udp peer {}", unmap(from)).as_bytes(), from);
        }
    });
}

/// Send `payload` on `c` from a second thread, half-close, and read the echo to EOF.
pub fn echo_round_trip(c: &mut std::net::TcpStream, payload: &[u8]) -> Vec<u8> {
    let writer = {
        let (mut w, payload) = (
            c.try_clone().expect("a second handle on the connection"),
            payload.to_vec(),
        );
        std::thread::spawn(move || {
            std::io::Write::write_all(&mut w, &payload).expect("sending the payload");
            w.shutdown(std::net::Shutdown::Write).expect("half-closing");
        })
    };
    let mut echoed = Vec::new();
    std::io::Read::read_to_end(c, &mut echoed).expect("reading the echo");
    writer.join().expect("the sending thread");
    echoed
}
