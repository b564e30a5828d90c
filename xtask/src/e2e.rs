//! `cargo xtask podman-e2e`: a real podman 4.x runs containers with our release
//! `rootlessport` (through `helper_binaries_dir`), with a private config, storage and
//! tmp dir under `target/podman-e2e`, inside a private network and mount namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::args::{self, Long};
use crate::sys::{self, Need};
use crate::workspace::workspace_root;

const NEEDS: &[Need] = &[
    Need {
        program: "podman",
        package: "podman",
    },
    Need {
        program: "runc",
        package: "runc",
    },
    Need {
        program: "busybox",
        package: "busybox-static",
    },
    Need {
        program: "slirp4netns",
        package: "slirp4netns",
    },
    Need {
        program: "conmon",
        package: "conmon",
    },
    Need {
        program: "tar",
        package: "tar",
    },
];
const IMAGE: &str = "localhost/rootless-net-e2e:latest";

/// Whether podman can be had here (installed, or installable by us).
pub fn available() -> bool {
    NEEDS.iter().all(|n| sys::find_in_path(n.program).is_some())
        || (sys::is_root() && sys::find_in_path("apt-get").is_some())
}

fn dir() -> PathBuf {
    workspace_root().join("target/podman-e2e")
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut inner_run = false;
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "podman-e2e")? {
        match arg {
            Long("inner") => inner_run = true,
            other => {
                return Err(format!(
                    "podman-e2e: unknown argument {:?}",
                    args::shown(&other)
                ))
            }
        }
    }
    if inner_run {
        return inner();
    }
    if !sys::is_root() {
        return Err("podman-e2e runs podman as root: run it as root".into());
    }
    sys::ensure(NEEDS)?;
    let built = crate::helper::release_helper()?;
    let d = dir();
    let helpers = d.join("helpers");
    std::fs::create_dir_all(&helpers)
        .map_err(|e| format!("creating {}: {e}", helpers.display()))?;
    // Copy (not link) so a rebuild during the run cannot change the binary under podman.
    let ours = helpers.join("rootlessport");
    let tmp = helpers.join(".rootlessport.new");
    std::fs::copy(&built, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &ours))
        .map_err(|e| format!("installing {}: {e}", ours.display()))?;
    let conf = format!(
        "# Written by cargo xtask podman-e2e.\n[containers]\ndefault_ulimits = []\n\n[engine]\nhelper_binaries_dir = [{:?}, \"/usr/libexec/podman\", \"/usr/lib/podman\"]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
        helpers.display().to_string()
    );
    std::fs::write(d.join("containers.conf"), conf)
        .map_err(|e| format!("writing containers.conf: {e}"))?;

    let status = sys::rerun_in_private_netns(&["podman-e2e".into(), "--inner".into()], &[])?;
    if status.success() {
        Ok(())
    } else {
        Err("podman-e2e failed".into())
    }
}

struct Podman {
    base: Vec<String>,
    conf: PathBuf,
}

impl Podman {
    fn new(d: &Path) -> Podman {
        let p = |s: &str| d.join(s).display().to_string();
        let base = [
            "--root",
            &p("root"),
            "--runroot",
            &p("runroot"),
            "--tmpdir",
            &p("tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "file",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Podman {
            base,
            conf: d.join("containers.conf"),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf)
            .args(&self.base)
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .cmd(args)
            .output()
            .map_err(|e| format!("cannot run podman: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "podman {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, res: Result<(), String>) {
        match res {
            Ok(()) => {
                self.passed += 1;
                println!("ok - {name}");
            }
            Err(e) => {
                self.failed += 1;
                println!("FAILED - {name}: {e}");
            }
        }
    }
}

fn inner() -> Result<(), String> {
    // Orphans of podman (slirp4netns, conmon, helpers) are reparented to us and reaped.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let d = dir();
    let podman = Podman::new(&d);
    let _ = podman.run(&["rm", "-af", "-t", "0"]);
    ensure_image(&podman, &d)?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let xdir = me
        .parent()
        .ok_or("xtask has no directory")?
        .display()
        .to_string();
    let xmount = format!("{xdir}:/x:ro");
    let ours = d.join("helpers/rootlessport");
    let mut r = Report {
        passed: 0,
        failed: 0,
    };
    let common = [
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=1000:1000",
        "-v",
        "/usr:/usr:ro",
        "-v",
        &xmount,
    ];

    let mut c1: Vec<&str> = vec![
        "run",
        "-d",
        "--name",
        "e2e-c1",
        "--network",
        "slirp4netns",
        "-p",
        "127.0.0.1:18080:8080",
        "-p",
        "18081:8081",
        "-p",
        "18090:9090/udp",
        "-p",
        "18100-18102:8100-8102/tcp",
        "-p",
        "18100-18102:8100-8102/udp",
    ];
    c1.extend_from_slice(&common);
    c1.extend_from_slice(&[
        IMAGE,
        "/x/xtask",
        "echo-server",
        "--tcp",
        "8080,8081,8100,8101,8102",
        "--udp",
        "9090,8100,8101,8102",
    ]);
    let t = Instant::now();
    r.check(
        "start a container with published ports",
        podman.run(&c1).map(|_| ()),
    );
    r.check(
        "TCP on 127.0.0.1",
        wait_greeting("127.0.0.1:18080", "tcp 8080 from ")
            .map(|_| println!("   first answer after {:?}", t.elapsed())),
    );
    r.check("TCP echo with half-close", tcp_echo("127.0.0.1:18080"));
    r.check(
        "wildcard port over 127.0.0.1",
        wait_greeting("127.0.0.1:18081", "tcp 8081 from ").map(|_| ()),
    );
    r.check(
        "wildcard port over [::1]",
        wait_greeting("[::1]:18081", "tcp 8081 from ").map(|_| ()),
    );
    r.check("UDP port", udp_echo("127.0.0.1:18090", "udp 9090 from "));
    for i in 0..3u16 {
        r.check(
            &format!("tcp,udp range port {}", 18100 + i),
            wait_greeting(
                &format!("127.0.0.1:{}", 18100 + i),
                &format!("tcp {} from ", 8100 + i),
            )
            .map(|_| ())
            .and_then(|_| {
                udp_echo(
                    &format!("127.0.0.1:{}", 18100 + i),
                    &format!("udp {} from ", 8100 + i),
                )
            }),
        );
    }
    r.check("podman runs our rootlessport", expect_helpers(&ours, 1));

    let mut c2: Vec<&str> = vec![
        "run",
        "-d",
        "--name",
        "e2e-c2",
        "--network",
        "slirp4netns:cidr=10.42.0.0/24",
        "-p",
        "18200:8080",
    ];
    c2.extend_from_slice(&common);
    c2.extend_from_slice(&[IMAGE, "/x/xtask", "echo-server", "--tcp", "8080"]);
    r.check(
        "start a container with slirp4netns:cidr=10.42.0.0/24",
        podman.run(&c2).map(|_| ()),
    );
    r.check(
        "custom cidr: forwarded to 10.42.0.100",
        wait_greeting("127.0.0.1:18200", "tcp 8080 from 10.42.0.100:").map(|_| ()),
    );
    r.check("one helper per container", expect_helpers(&ours, 2));

    r.check(
        "stop the first container",
        podman.run(&["stop", "-t", "2", "e2e-c1"]).map(|_| ()),
    );
    r.check(
        "its helper exits when the container stops",
        expect_helpers(&ours, 1),
    );
    r.check(
        "the other container still answers",
        wait_greeting("127.0.0.1:18200", "tcp 8080 from ").map(|_| ()),
    );
    r.check(
        "stop the second container",
        podman.run(&["stop", "-t", "2", "e2e-c2"]).map(|_| ()),
    );
    r.check("no helper left", expect_helpers(&ours, 0));
    r.check(
        "remove the containers",
        podman.run(&["rm", "-af", "-t", "0"]).map(|_| ()),
    );
    r.check("nothing left running", nothing_left());
    println!("podman-e2e: {} passed, {} failed", r.passed, r.failed);
    if r.failed == 0 {
        Ok(())
    } else {
        Err(format!("{} podman-e2e check(s) failed", r.failed))
    }
}

fn ensure_image(podman: &Podman, d: &Path) -> Result<(), String> {
    if podman.run(&["image", "exists", IMAGE]).is_ok() {
        return Ok(());
    }
    let rootfs = d.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(rootfs.join("usr")).map_err(|e| e.to_string())?;
    let busybox = sys::find_in_path("busybox").ok_or("busybox not found")?;
    std::fs::copy(&busybox, bin.join("busybox")).map_err(|e| format!("copying busybox: {e}"))?;
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("busybox --list: {e}"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    // The host's /usr is mounted in at run time, so host binaries (our echo server) run.
    for (link, to) in [("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        let _ = std::os::unix::fs::symlink(to, rootfs.join(link));
    }
    let tar = d.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .map_err(|e| format!("tar: {e}"))?;
    if !status.success() {
        return Err("tar of the image rootfs failed".into());
    }
    podman.run(&["import", &tar.display().to_string(), IMAGE])?;
    Ok(())
}

fn wait_greeting(addr: &str, want: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        match greeting(addr) {
            Ok(g) if g.starts_with(want) => return Ok(g),
            Ok(g) => last = format!("unexpected greeting {g:?}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no {want:?} from {addr}: {last}"))
}

fn greeting(addr: SocketAddr) -> Result<String, String> {
    let mut c =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match c.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

fn tcp_echo(addr: &str) -> Result<(), String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&payload).map_err(|e| e.to_string())?;
    c.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    c.read_to_end(&mut all).map_err(|e| e.to_string())?;
    let nl = all.iter().position(|b| *b == b'\n').ok_or("no greeting")?;
    if all[nl + 1..] == payload[..] {
        Ok(())
    } else {
        Err(format!(
            "echo returned {} bytes, sent {}",
            all.len() - nl - 1,
            payload.len()
        ))
    }
}

fn udp_echo(addr: &str, want: &str) -> Result<(), String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    for _ in 0..20 {
        s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
        if let Ok(n) = s.recv(&mut buf) {
            let got = String::from_utf8_lossy(&buf[..n]);
            return if got.starts_with(want) && got.ends_with(": ping") {
                Ok(())
            } else {
                Err(format!("unexpected reply {got:?}"))
            };
        }
    }
    Err(format!("no UDP reply from {addr}"))
}

/// Processes (not zombies) running the binary at `exe`.
fn running(exe: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        if target == exe {
            out.push(pid);
        }
    }
    out
}

fn expect_helpers(ours: &Path, n: usize) -> Result<(), String> {
    let exe = std::fs::canonicalize(ours).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reap();
        let now = running(&exe);
        if now.len() == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} of our rootlessport running, want {n}",
                now.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn reap() {
    // SAFETY: waitpid on any child without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// No slirp4netns, conmon or rootlessport in our network namespace, and no zombie.
fn nothing_left() -> Result<(), String> {
    let own = std::fs::read_link("/proc/self/ns/net").map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reap();
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            let in_ours = std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .as_ref()
                == Some(&own);
            if in_ours && ["slirp4netns", "conmon", "rootlessport"].contains(&comm) {
                left.push(format!("{comm} ({pid})"));
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("still running: {}", left.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
