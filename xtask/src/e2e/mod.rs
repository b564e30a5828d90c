//! The podman end-to-end tests, and what they share.
//!
//! - [`rootful`]: `cargo xtask podman-e2e`, podman as root in a private network
//!   namespace.
//! - [`rootless`]: `cargo xtask podman-e2e-rootless`, rootless podman as an
//!   unprivileged user.
//!
//! Both give podman our release `rootlessport` (copied by [`install_helper`], named
//! first in `helper_binaries_dir` by [`containers_conf`]) and run containers of a
//! busybox image ([`ensure_image`]) that run our `xtask echo-server` (the host's
//! `/usr` and xtask's directory are mounted read-only, [`common_run_args`]): TCP
//! greets with `tcp PORT from PEER` and echoes, UDP answers `udp PORT from PEER: DATA`
//! ([`wait_greeting`], [`udp_echo`]). Each check prints one line, then the summary
//! `LABEL: N passed, N failed` ([`Report`]). Both also drive `rootlessport-ctl`
//! against a container of theirs ([`ctl`]).

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::{self, Need};

mod ctl;
pub mod rootful;
pub mod rootless;

/// What both tests need: podman with runc, conmon and slirp4netns; busybox and tar
/// for the image.
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
        program: "conmon",
        package: "conmon",
    },
    Need {
        program: "slirp4netns",
        package: "slirp4netns",
    },
    Need {
        program: "busybox",
        package: "busybox-static",
    },
    Need {
        program: "tar",
        package: "tar",
    },
];

/// Whether podman can be had here (installed, or installable by us).
pub fn available() -> bool {
    NEEDS.iter().all(|n| sys::find_in_path(n.program).is_some())
        || (sys::is_root() && sys::find_in_path("apt-get").is_some())
}

/// The control tool installed beside our helper.
const CTL: &str = "rootlessport-ctl";
/// The image the containers run.
const IMAGE: &str = "localhost/rootless-net-e2e:latest";
/// How long a port may take to answer after a container (re)start.
const SERVE_WAIT: Duration = Duration::from_secs(20);

/// How a failed check is shown.
#[derive(Clone, Copy)]
enum FailLine {
    /// `FAILED - NAME: WHY`, WHY as it is (`podman-e2e`).
    Failed,
    /// `not ok - NAME: WHY`, WHY on one line (`podman-e2e-rootless`).
    NotOk,
}

/// The checks' outcome: `ok - NAME` or a failure line per check, and the summary.
struct Report {
    label: &'static str,
    fail_line: FailLine,
    passed: u32,
    failed: u32,
}

impl Report {
    fn new(label: &'static str, fail_line: FailLine) -> Report {
        Report {
            label,
            fail_line,
            passed: 0,
            failed: 0,
        }
    }

    /// Count and show one check; its value when it passed.
    fn check<T>(&mut self, name: &str, res: Result<T, String>) -> Option<T> {
        match res {
            Ok(v) => {
                self.passed += 1;
                println!("ok - {name}");
                Some(v)
            }
            Err(e) => {
                self.failed += 1;
                match self.fail_line {
                    FailLine::Failed => println!("FAILED - {name}: {e}"),
                    // One line, whatever the error holds.
                    FailLine::NotOk => println!("not ok - {name}: {}", e.replace('\n', " ")),
                }
                None
            }
        }
    }

    /// The summary line `LABEL: N passed, N failed`; an error when a check failed.
    fn finish(&self) -> Result<(), String> {
        let label = self.label;
        println!("{label}: {} passed, {} failed", self.passed, self.failed);
        if self.failed == 0 {
            Ok(())
        } else {
            Err(format!("{} {label} check(s) failed", self.failed))
        }
    }
}

/// The podman of a test: its environment (config files) and global options.
struct Podman {
    env: Vec<(String, PathBuf)>,
    global: Vec<String>,
    /// `Some(SECS)`: every command runs under `timeout -k 5 SECS`, with stdin from
    /// /dev/null and no remote connection, and a failure names podman's last error
    /// line and exit status. `None`: plain `podman`; a failure gives all its stderr.
    timeout: Option<u32>,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = match self.timeout {
            None => Command::new("podman"),
            Some(secs) => {
                let mut c = Command::new("timeout");
                c.args(["-k", "5", &secs.to_string(), "podman"])
                    .env_remove("CONTAINER_HOST")
                    .env_remove("CONTAINER_CONNECTION")
                    .stdin(Stdio::null());
                c
            }
        };
        c.args(&self.global).args(args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// `podman ARGS`: its stdout, trimmed, or what failed.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let what = match self.timeout {
            None => "podman",
            Some(_) => "timeout podman",
        };
        let out = self
            .cmd(args)
            .output()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let Some(secs) = self.timeout else {
            return Err(format!("podman {}: {}", args.join(" "), err.trim()));
        };
        let why = if out.status.code() == Some(124) || out.status.code() == Some(137) {
            format!("timed out after {secs} s")
        } else {
            // The last error line; podman's warnings ("/" is not a shared mount) first.
            err.lines()
                .rev()
                .find(|l| !l.contains("level=warning"))
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        Err(format!("podman {}: {why} ({})", args.join(" "), out.status))
    }

    /// `podman run -d` of our echo server (with `server_args`) as `name` on
    /// `network`, with `ports` published and the `common` options.
    fn run_echo(
        &self,
        name: &str,
        network: &str,
        ports: &[impl AsRef<str>],
        common: &[String],
        server_args: &[&str],
    ) -> Result<(), String> {
        let mut args: Vec<&str> = vec!["run", "-d", "--name", name, "--network", network];
        for p in ports {
            args.extend(["-p", p.as_ref()]);
        }
        args.extend(common.iter().map(String::as_str));
        args.extend([IMAGE, "/x/xtask", "echo-server"]);
        args.extend(server_args);
        self.run(&args).map(|_| ())
    }
}

/// `podman run` options every container gets: the ulimits runc needs here (with
/// podman's defaults it fails) and the host's `/usr` and xtask's directory mounted
/// read-only at `/usr` and `/x`.
fn common_run_args(nofile: u64, nproc: u64) -> Result<Vec<String>, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
    let xdir = me.parent().ok_or("xtask has no directory")?;
    Ok(vec![
        "--ulimit".to_owned(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".to_owned(),
        format!("nproc={nproc}:{nproc}"),
        "-v".to_owned(),
        "/usr:/usr:ro".to_owned(),
        "-v".to_owned(),
        format!("{}:/x:ro", xdir.display()),
    ])
}

/// The `containers.conf` both tests share (`rootless.rs` says why each setting),
/// after a `# COMMENT` line: our helpers first, runc, cgroupfs, file events.
fn containers_conf(comment: &str, helpers_dir: &Path) -> String {
    format!(
        "# {comment}\n\
         [containers]\ndefault_ulimits = []\n\n\
         [engine]\nhelper_binaries_dir = [{:?}, \"/usr/libexec/podman\", \"/usr/lib/podman\"]\n\
         cgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"file\"\n",
        helpers_dir.display().to_string()
    )
}

/// The release helper and `rootlessport-ctl`, copied (not linked: a rebuild during
/// the run must not change the binary under podman) to `BASE/helpers/`,
/// world-readable.
fn install_helper(base: &Path) -> Result<(), String> {
    let built = crate::helper::release_helper()?;
    install_one(base, &built, "rootlessport")?;
    install_one(base, &crate::helper::ctl_beside(&built), CTL)
}

/// `built`, copied to `BASE/helpers/NAME` when it changed.
fn install_one(base: &Path, built: &Path, name: &str) -> Result<(), String> {
    let helpers = base.join("helpers");
    std::fs::create_dir_all(&helpers)
        .map_err(|e| format!("creating {}: {e}", helpers.display()))?;
    for d in [base, helpers.as_path()] {
        set_mode(d, 0o755)?;
    }
    let ours = helpers.join(name);
    // Unchanged: leave it, so that a run going on (a second run copies before it
    // waits for the lock) keeps seeing its helpers' `/proc/PID/exe` as ours.
    if let (Ok(a), Ok(b)) = (std::fs::read(built), std::fs::read(&ours)) {
        if a == b {
            return Ok(());
        }
    }
    let tmp = helpers.join(format!(".{name}.new"));
    std::fs::copy(built, &tmp)
        .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)))
        .and_then(|_| std::fs::rename(&tmp, &ours))
        .map_err(|e| format!("installing {}: {e}", ours.display()))
}

fn set_mode(p: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).map_err(|e| format!("stat {}: {e}", p.display()))?;
    if md.mode() & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {}: {e}", p.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Import [`IMAGE`] unless podman has it: a tar of `DIR/rootfs`, which holds
/// `bin/busybox` and its applet links.
fn ensure_image(podman: &Podman, dir: &Path) -> Result<(), String> {
    if podman.run(&["image", "exists", IMAGE]).is_ok() {
        return Ok(());
    }
    let rootfs = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let bin = rootfs.join("bin");
    for d in [bin.clone(), rootfs.join("usr")] {
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let busybox = sys::find_in_path("busybox").ok_or("busybox not found")?;
    std::fs::copy(&busybox, bin.join("busybox"))
        .map_err(|e| format!("copying {}: {e}", busybox.display()))?;
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
    let tar = dir.join("rootfs.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tar of the image rootfs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    podman.run(&["import", &tar.display().to_string(), IMAGE])?;
    Ok(())
}

/// `127.0.0.1:PORT`.
fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A TCP connection with 3 s read and write timeouts.
fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(3)))
        .and_then(|_| c.set_write_timeout(Some(Duration::from_secs(3))))
        .map_err(|e| e.to_string())?;
    Ok(c)
}

fn read_line(c: &mut TcpStream) -> Result<String, String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match c.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
            Err(e) => return Err(e.to_string()),
        }
        if buf.len() > 4096 {
            return Err("no line end in 4 KiB".into());
        }
    }
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

/// The first line the echo server at `addr` sends.
fn greeting(addr: SocketAddr) -> Result<String, String> {
    read_line(&mut connect(addr)?)
}

/// The greeting of `addr` once it starts with `want` (within [`SERVE_WAIT`]).
fn wait_greeting(addr: SocketAddr, want: &str) -> Result<String, String> {
    let deadline = Instant::now() + SERVE_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match greeting(addr) {
            Ok(g) if g.starts_with(want) => return Ok(g),
            Ok(g) => last = format!("unexpected greeting {g:?}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "no {want:?} from {addr} within {SERVE_WAIT:?}: {last}"
    ))
}

/// `ping` from 127.0.0.1 to `addr` is answered with `WANT...: ping` (within
/// [`SERVE_WAIT`]).
fn udp_echo(addr: SocketAddr, want: &str) -> Result<(), String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + SERVE_WAIT;
    while Instant::now() < deadline {
        s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
        if let Ok(n) = s.recv(&mut buf) {
            let got = String::from_utf8_lossy(&buf[..n]);
            return if got.starts_with(want) && got.ends_with(": ping") {
                Ok(())
            } else {
                Err(format!("unexpected UDP reply {got:?}"))
            };
        }
    }
    Err(format!("no UDP reply from {addr} within {SERVE_WAIT:?}"))
}

/// Retry `f` until it succeeds or `limit` passes; the last error otherwise.
fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The pids in `/proc`.
fn pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// The network namespace of `pid` (`net:[INODE]`).
fn netns_of(pid: i32) -> Result<String, String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .map_err(|e| format!("/proc/{pid}/ns/net: {e}"))
}
