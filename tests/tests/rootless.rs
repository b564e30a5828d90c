//! The library launch path as an engine running as an ordinary user uses it: a user
//! namespace mapping the user to root and a network namespace it owns, slirp4netns
//! started with `SlirpSpec.userns` (DAD sysctl and sandbox inside that user namespace),
//! and rootlessport through the launcher with `Launcher.userns`. No step may need root.
//!
//! The same through `rootlessport/examples/engine.rs` with `--userns`: the example's
//! whole flow, rootless.
//!
//! `cargo xtask itest` runs these as an unprivileged user (a test user it creates when
//! it runs as root, else the current user); [`require_rootless`] refuses any other run.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slirp_config::PortMapping;
use slirp_spawn::{Netns, Slirp4netns, SlirpSpec};
use tests::{cloexec_pipe, process_exists, rootlessport_bin, start_echo_server, HARNESS_ENV};

/// The value `cargo xtask itest` gives [`HARNESS_ENV`] for the unprivileged run.
const ROOTLESS: &str = "rootless";

fn require_rootless() {
    assert_eq!(
        std::env::var(HARNESS_ENV).as_deref(),
        Ok(ROOTLESS),
        "this test must run as an unprivileged user: run it through `cargo xtask itest`"
    );
    assert!(
        !nix::unistd::geteuid().is_root(),
        "this test must not run as root"
    );
}

/// The engine's namespaces: `unshare --user --map-root-user --net` running the echo
/// server (TCP and UDP on the given container ports) inside them. Killed on drop.
struct EngineNamespaces {
    child: Child,
}

impl EngineNamespaces {
    fn start(tcp: u16, udp: u16) -> EngineNamespaces {
        let mut unshare = Command::new("unshare");
        unshare.args(["--user", "--map-root-user", "--net", "--"]);
        let child = start_echo_server(unshare, tcp, udp);
        EngineNamespaces { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ns(&self, kind: &str) -> String {
        format!("/proc/{}/ns/{kind}", self.pid())
    }

    /// A sysctl of the network namespace, read from inside (nsenter as the user's root).
    fn sysctl(&self, path: &str) -> String {
        let out = Command::new("nsenter")
            .args([
                "--target",
                &self.pid().to_string(),
                "--user",
                "--net",
                "--preserve-credentials",
                "cat",
                path,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for EngineNamespaces {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn same_namespace(a: &str, b: &str) -> bool {
    std::fs::read_link(a).unwrap() == std::fs::read_link(b).unwrap()
}

fn mapping(host: u16, container: u16, protocol: &str) -> PortMapping {
    PortMapping::new("127.0.0.1", host, container, 1, protocol)
}

fn fetch_tcp(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"x").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

fn ask_udp(port: u16) -> String {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = (0..20)
        .find_map(|_| {
            u.send_to(b"hi", ("127.0.0.1", port)).unwrap();
            u.recv(&mut buf).ok()
        })
        .expect("no UDP reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
#[ignore = "itest: runs as an unprivileged user (cargo xtask itest)"]
fn rootless_library_launch_publishes_and_leaves_nothing() {
    require_rootless();
    let engine = EngineNamespaces::start(80, 53);
    let dad_before = engine.sysctl("/proc/sys/net/ipv6/conf/default/accept_dad");
    let tmp = tempfile::tempdir().unwrap();

    // podman's defaults: IPv6 on (so the DAD sysctl is set), sandbox on (mount ns).
    let mut spec = SlirpSpec::new(
        Netns::Path(engine.ns("net").into()),
        tmp.path(),
        "rootless-lib",
    );
    spec.userns = Some(engine.ns("user").into());
    assert!(spec.options.enable_ipv6 && !spec.options.no_pivot_root);
    let slirp = Slirp4netns::start(&spec).unwrap();
    let slirp_pid = slirp.pid();
    assert!(
        same_namespace(&format!("/proc/{slirp_pid}/ns/user"), &engine.ns("user")),
        "slirp4netns runs in the engine's user namespace"
    );
    assert!(
        !same_namespace(&format!("/proc/{slirp_pid}/ns/mnt"), "/proc/self/ns/mnt"),
        "slirp4netns's sandbox has a mount namespace of its own"
    );
    assert_eq!(
        engine.sysctl("/proc/sys/net/ipv6/conf/tap0/accept_dad"),
        "0",
        "tap0 was made while DAD was off"
    );
    assert_eq!(
        engine.sysctl("/proc/sys/net/ipv6/conf/default/accept_dad"),
        dad_before,
        "accept_dad restored after the launch"
    );

    let config = rootlessport::Config::new(
        "rootless-lib",
        engine.ns("net"),
        slirp.guest_ip().to_string(),
        tmp.path().display().to_string(),
    )
    .with_mappings(vec![mapping(28910, 80, "tcp"), mapping(28911, 53, "udp")]);
    let (exit_r, exit_w) = cloexec_pipe();
    let mut launcher = rootlessport::launcher::Launcher::new(rootlessport_bin());
    launcher.userns = Some(engine.ns("user").into());
    let mut helper = launcher.start(&config, exit_r).unwrap();
    let helper_pid = helper.pid();
    assert!(
        same_namespace(&format!("/proc/{helper_pid}/ns/user"), &engine.ns("user")),
        "rootlessport runs in the engine's user namespace"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{helper_pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap()
            .split_whitespace()
            .nth(1),
        Some(nix::unistd::getuid().to_string().as_str()),
        "the helper keeps the user's own uid on the host"
    );

    let tcp = fetch_tcp(28910);
    assert!(tcp.starts_with("tcp 80 from "), "{tcp}");
    let udp = ask_udp(28911);
    assert!(
        udp.starts_with("udp 53 from ") && udp.ends_with(": hi"),
        "{udp}"
    );

    drop(exit_w);
    let status = helper.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "rootlessport must exit cleanly once its exit pipe closes: {status:?}"
    );
    slirp.stop().unwrap();
    assert!(!process_exists(slirp_pid), "slirp4netns left");
    assert!(
        TcpListener::bind("127.0.0.1:28910").is_ok() && UdpSocket::bind("127.0.0.1:28911").is_ok(),
        "a published port is still held"
    );
    let left: Vec<String> = entries(tmp.path())
        .into_iter()
        .filter(|e| e != "rp")
        .collect();
    assert_eq!(left, [] as [String; 0], "files left in the tmp dir");
}

#[test]
#[ignore = "itest: runs as an unprivileged user (cargo xtask itest)"]
fn rootless_without_the_user_namespace_fails_with_a_clear_error() {
    require_rootless();
    let engine = EngineNamespaces::start(80, 53);
    let tmp = tempfile::tempdir().unwrap();
    // Forgetting `userns`: the user holds no privilege over the namespace, and the
    // error must say which step needed it.
    let spec = SlirpSpec::new(
        Netns::Path(engine.ns("net").into()),
        tmp.path(),
        "rootless-nouserns",
    );
    let err = Slirp4netns::start(&spec).unwrap_err().to_string();
    assert_eq!(
        err,
        "cannot set /proc/sys/net/ipv6/conf/default/accept_dad in the container network namespace: Operation not permitted (os error 1) (an unprivileged caller must name the user namespace that owns the network namespace: SlirpSpec::userns)"
    );
    // Without IPv6 the first refused step is starting slirp4netns in its sandbox.
    let mut spec = spec;
    spec.options.enable_ipv6 = false;
    let err = Slirp4netns::start(&spec).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot start ")
            && err.ends_with(": Operation not permitted (os error 1) (an unprivileged caller must name the user namespace that owns the network namespace: SlirpSpec::userns)"),
        "{err}"
    );
    assert_eq!(entries(tmp.path()), [] as [String; 0]);
}

/// `rootlessport/examples/engine.rs` (built beside the helper by `cargo xtask itest`).
fn engine_example_bin() -> std::path::PathBuf {
    let bin = rootlessport_bin().parent().unwrap().join("examples/engine");
    assert!(
        bin.exists(),
        "{} is missing: cargo build -p rootlessport --examples",
        bin.display()
    );
    bin
}

/// The next stdout line of the example starting with `prefix`, within 20 s.
fn line_from(lines: &std::sync::mpsc::Receiver<String>, prefix: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line {prefix:?} from the example"));
        println!("engine: {line}");
        if line.starts_with(prefix) {
            return line;
        }
    }
}

#[test]
#[ignore = "itest: runs as an unprivileged user (cargo xtask itest)"]
fn rootless_engine_example_publishes_reloads_and_leaves_nothing() {
    require_rootless();
    let engine = EngineNamespaces::start(80, 53);
    let tmp = tempfile::tempdir().unwrap();
    let mut example = Command::new(engine_example_bin())
        .arg(engine.ns("net"))
        .arg(tmp.path())
        .args(["rootless-example", "--userns", &engine.ns("user")])
        .args(["-p", "127.0.0.1:28912:80", "-p", "127.0.0.1:28913:53/udp"])
        .args(["--reload-to", "10.0.3.200"])
        .env("ROOTLESSPORT_BIN", rootlessport_bin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if the test fails (its helpers follow their exit pipes).
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = example.stdout.take().unwrap();
    let mut stdin = example.stdin.take().unwrap();
    let mut example = Kill(example);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pid = |line: String| -> u32 {
        line.split("pid ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|p| p.parse().ok())
            .unwrap()
    };
    let slirp_pid = pid(line_from(&lines, "slirp4netns: pid "));
    let helper_pid = pid(line_from(&lines, "rootlessport: pid "));
    assert!(
        same_namespace(&format!("/proc/{helper_pid}/ns/user"), &engine.ns("user")),
        "rootlessport runs in the engine's user namespace"
    );
    assert_eq!(line_from(&lines, "guest "), "guest 10.0.2.100");
    line_from(&lines, "ready: ");

    // From the host's loopback the container sees its own address.
    let tcp = fetch_tcp(28912);
    assert!(tcp.starts_with("tcp 80 from 10.0.2.100:"), "{tcp}");
    let udp = ask_udp(28913);
    assert!(
        udp.starts_with("udp 53 from ") && udp.ends_with(": hi"),
        "{udp}"
    );

    // The reload: the container gets a new address (a subnet of its own, so that it is
    // also the source the server sees), new connections go there.
    let out = Command::new("nsenter")
        .args(["--target", &engine.pid().to_string()])
        .args(["--user", "--net", "--preserve-credentials"])
        .args(["ip", "addr", "add", "10.0.3.200/24", "dev", "tap0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    stdin.write_all(b"\n").unwrap();
    assert_eq!(line_from(&lines, "reload to "), "reload to 10.0.3.200: OK");
    line_from(&lines, "ready: ");
    let tcp = fetch_tcp(28912);
    assert!(tcp.starts_with("tcp 80 from 10.0.3.200:"), "{tcp}");

    // The end of its input ends it.
    drop(stdin);
    assert_eq!(line_from(&lines, "torn down"), "torn down");
    let status = example.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!process_exists(slirp_pid), "slirp4netns left");
    assert!(!process_exists(helper_pid), "rootlessport left");
    assert!(
        TcpListener::bind("127.0.0.1:28912").is_ok() && UdpSocket::bind("127.0.0.1:28913").is_ok(),
        "a published port is still held"
    );
    // Logs unlinked, the reload socket and the rp/ the helper made removed.
    assert_eq!(
        entries(tmp.path()),
        [] as [String; 0],
        "left in the tmp dir"
    );
}

/// podman's helper run without the user namespace that owns the container's netns
/// (outside `podman unshare`): it cannot enter it. One clear error before ready, with
/// one event-loop thread and with a pool of two (whose workers would each have to
/// abort if they found out only when starting), and nothing left: no port listens,
/// no file stays in TmpDir.
#[test]
#[ignore = "itest: runs as an unprivileged user (cargo xtask itest)"]
fn rootless_helper_outside_the_user_namespace_fails_before_ready() {
    require_rootless();
    let engine = EngineNamespaces::start(80, 53);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    for threads in [1, 2] {
        let wrapper = tests::rootlessport_wrapper(
            tmp.path(),
            &format!("rootlessport-{threads}"),
            &format!("export ROOTLESSPORT_THREADS={threads}"),
        );
        let config = rootlessport::Config::new(
            "rootless-outside",
            engine.ns("net"),
            "",
            run.display().to_string(),
        )
        .with_mappings(vec![mapping(28691, 80, "tcp")]);
        let (exit_r, _exit_w) = cloexec_pipe();
        let err = rootlessport::launcher::Launcher::new(&wrapper)
            .start(&config, exit_r)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "rootlessport cannot enter NetNSPath \"{}\": operation not permitted",
                engine.ns("net")
            ),
            "{threads} thread(s)"
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", 28691)).is_err(),
            "port 28691 listens after the failed start ({threads} thread(s))"
        );
        assert_eq!(entries(&run), [] as [String; 0], "{threads} thread(s)");
    }
}
