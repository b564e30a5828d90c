//! The whole stack for one command: a fresh user+network+mount namespace, slirp4netns
//! for it, ports published through our `rootlessport` (or slirp4netns's forwarder),
//! then the command, then teardown. Used by `cargo xtask run` and `cargo xtask demo`.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rootlessport::launcher::{Launcher, RootlessPort};
use slirp_config::{PortMapping, SlirpOptions};
use slirp_spawn::{Netns, Slirp4netns, SlirpSpec};

use crate::sys;

/// What to run and how.
pub struct SessionSpec {
    pub ports: Vec<PortMapping>,
    pub options: SlirpOptions,
    pub command: Vec<OsString>,
}

/// A running session: namespace holder (then the command), slirp4netns, port helper.
pub struct Session {
    child: Child,
    go: Option<OwnedFd>,
    slirp: Option<Slirp4netns>,
    helper: Option<(RootlessPort, OwnedFd)>,
    tmp: PathBuf,
    pub guest: std::net::Ipv4Addr,
    pub slirp_ready: Duration,
    pub ports_ready: Duration,
    pub features: slirp_config::SlirpFeatures,
    /// Every process started for the session, to check that teardown left none.
    pub pids: Vec<u32>,
    /// The PID namespace's init (`ns-child`), which passes signals on to the command.
    init: Option<u32>,
}

/// The rootlessport binary: `ROOTLESSPORT_BIN`, else the release build (built now).
pub fn rootlessport_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ROOTLESSPORT_BIN") {
        return Ok(PathBuf::from(p));
    }
    crate::helper::release_helper()
}

fn pipe_high() -> Result<(OwnedFd, OwnedFd), String> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // Above 4, so that the dup2 onto 3 and 4 in the child cannot clobber them.
    let high = |fd: OwnedFd| -> Result<OwnedFd, String> {
        let n = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
            .map_err(|e| format!("fcntl: {e}"))?;
        // SAFETY: fcntl just returned this new fd.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    };
    Ok((high(r)?, high(w)?))
}

impl Session {
    /// Make the namespaces, start slirp4netns and publish the ports. The command waits
    /// until [`Session::go`].
    pub fn start(spec: &SessionSpec, progress: &dyn Fn(String)) -> Result<Session, String> {
        sys::ensure(&[
            sys::Need {
                program: "slirp4netns",
                package: "slirp4netns",
            },
            sys::Need {
                program: "ip",
                package: "iproute2",
            },
            sys::Need {
                program: "unshare",
                package: "util-linux",
            },
        ])?;
        let rootlessport = if spec.options.is_slirp_host_forward || spec.ports.is_empty() {
            None
        } else {
            Some(rootlessport_binary()?)
        };
        let me = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
        let unshare = sys::find_in_path("unshare").ok_or("unshare not found")?;
        sweep_stale_tmp_dirs();
        let (go_r, go_w) = pipe_high()?;
        let (in_r, in_w) = pipe_high()?;
        let mut cmd = Command::new(unshare);
        // A PID namespace too, with `ns-child` as its init: whatever the command leaves
        // running dies with it, and `--kill-child` takes the namespace down with unshare.
        cmd.args([
            "--user",
            "--map-root-user",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
        ])
        .arg(&me)
        .args(["ns-child", "--"])
        .args(&spec.command);
        let (a, b) = (go_r.as_raw_fd(), in_w.as_raw_fd());
        let parent = nix::unistd::getpid();
        // SAFETY: dup2, prctl and getppid between fork and exec: async-signal-safe, on
        // fds we own and plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If we die (even by SIGKILL), unshare dies, and with it the namespace.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("xtask exited during the start"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start unshare: {e}"))?;
        drop((go_r, in_w));
        let tmp = std::env::temp_dir().join(format!("rootless-net-run-{}", child.id()));
        let mut session = Session {
            child,
            go: Some(go_w),
            slirp: None,
            helper: None,
            tmp,
            guest: std::net::Ipv4Addr::UNSPECIFIED,
            slirp_ready: Duration::ZERO,
            ports_ready: Duration::ZERO,
            features: Default::default(),
            pids: Vec::new(),
            init: None,
        };
        // The child says when it is inside its namespaces.
        let mut byte = [0u8; 1];
        match nix::unistd::read(&in_r, &mut byte) {
            Ok(1) => {}
            _ => {
                let status = session.child.wait().ok();
                return Err(format!(
                    "could not create the user+network+mount namespace (unshare {})",
                    status.map(|s| s.to_string()).unwrap_or_default()
                ));
            }
        }
        let pid = session.child.id();
        session.init = init_of(pid);
        session.pids.push(pid);
        progress(format!(
            "namespace: pid {pid} in a new user, network and mount namespace"
        ));

        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&session.tmp)
            .map_err(|e| format!("creating {}: {e}", session.tmp.display()))?;
        let mut slirp_spec = SlirpSpec::new(
            Netns::Path(format!("/proc/{pid}/ns/net").into()),
            &session.tmp,
            format!("run-{pid}"),
        );
        slirp_spec.options = spec.options.clone();
        if !sys::is_root() {
            slirp_spec.userns = Some(format!("/proc/{pid}/ns/user").into());
        }
        let slirp = Slirp4netns::start(&slirp_spec).map_err(|e| e.to_string())?;
        session.guest = slirp.guest_ip();
        // The command's resolver: slirp4netns's DNS, as podman gives a container (the
        // host's may be on its loopback, 127.0.0.53 with systemd-resolved, which the
        // new netns cannot reach). ns-child mounts it over /etc/resolv.conf.
        let resolv = session.tmp.join(RESOLV_CONF);
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        std::fs::write(&resolv, resolv_conf(slirp.dns(), &host))
            .map_err(|e| format!("writing {}: {e}", resolv.display()))?;
        session.slirp_ready = slirp.ready_after();
        session.features = *slirp.features();
        session.pids.push(slirp.pid());
        progress(format!(
            "slirp4netns ready in {:.1} ms: guest {}/{} via {}, DNS {}{}, MTU {}",
            slirp.ready_after().as_secs_f64() * 1000.0,
            slirp.guest_ip(),
            slirp.subnet().prefix_len(),
            slirp.gateway(),
            slirp.dns(),
            if slirp.gateway6().is_some() {
                ", IPv6 fd00::/64"
            } else {
                ""
            },
            spec.options.mtu,
        ));
        let api = slirp.api_socket().map(Path::to_path_buf);
        session.slirp = Some(slirp);

        let t = Instant::now();
        if let Some(bin) = rootlessport {
            let config = rootlessport::Config::new(
                format!("run-{pid}"),
                format!("/proc/{pid}/ns/net"),
                session.guest.to_string(),
                session.tmp.display().to_string(),
            )
            .with_mappings(spec.ports.clone());
            let (exit_r, exit_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| format!("pipe: {e}"))?;
            let mut launcher = Launcher::new(&bin);
            if !sys::is_root() {
                launcher.userns = Some(format!("/proc/{pid}/ns/user").into());
            }
            let helper = launcher
                .start(&config, exit_r)
                .map_err(|e| format!("{e} (the helper: {})", bin.display()))?;
            session.pids.push(helper.pid());
            progress(format!("rootlessport: pid {}", helper.pid()));
            session.helper = Some((helper, exit_w));
            for m in &spec.ports {
                progress(format!("published {} (rootlessport)", describe(m)));
            }
        } else if !spec.ports.is_empty() {
            let slirp = session.slirp.as_ref().ok_or("slirp4netns is gone")?;
            let api = api.ok_or("slirp4netns has no API socket")?;
            slirp_portfwd::publish_ports(&api, slirp.pidfd(), &spec.ports)
                .map_err(|e| e.to_string())?;
            for m in &spec.ports {
                progress(format!("published {} (slirp4netns)", describe(m)));
            }
            if spec.options.disable_host_loopback
                && spec.ports.iter().any(|m| m.protocol.contains("udp"))
            {
                progress("note: slirp4netns drops UDP replies to clients on 127.0.0.1 while host loopback is disabled".into());
            }
        }
        session.ports_ready = t.elapsed();
        Ok(session)
    }

    /// Watch slirp4netns and the port helper while the command runs: if one exits,
    /// `progress` says so at once (the command goes on, cut off or unpublished, as a
    /// podman container would). Through their pidfds, so nothing is watched on kernels
    /// without `pidfd_open` (before 5.3). Stops when the [`DeathWatch`] is dropped.
    pub fn watch_for_deaths(
        &self,
        progress: impl Fn(String) + Send + 'static,
    ) -> Result<DeathWatch, String> {
        let mut watched: Vec<(&'static str, u32, OwnedFd)> = Vec::new();
        let mut watch = |name, pid, fd: Option<std::os::fd::BorrowedFd<'_>>| {
            if let Some(fd) = fd.and_then(|fd| fd.try_clone_to_owned().ok()) {
                watched.push((name, pid, fd));
            }
        };
        if let Some(slirp) = &self.slirp {
            watch("slirp4netns", slirp.pid(), slirp.pidfd());
        }
        if let Some((helper, _)) = &self.helper {
            watch("rootlessport", helper.pid(), helper.pidfd());
        }
        let (stop_r, stop_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let thread = std::thread::spawn(move || watch_deaths(&watched, &stop_r, &progress));
        Ok(DeathWatch {
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }

    /// slirp4netns and the port helper, if they exited on their own while the command
    /// ran (before teardown), as lines for the user; the helper's status is given.
    pub fn exited_early(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(slirp) = &mut self.slirp {
            if slirp.has_exited() {
                lines.push(format!("slirp4netns (pid {}) had exited", slirp.pid()));
            }
        }
        if let Some((helper, _)) = &mut self.helper {
            if let Ok(Some(s)) = helper.wait_timeout(Duration::ZERO) {
                lines.push(format!(
                    "rootlessport (pid {}) had exited: {s}",
                    helper.pid()
                ));
            }
        }
        lines
    }

    /// Let the command run: the go byte, then the path of the resolv.conf for it.
    pub fn go(&mut self) {
        if let Some(go) = self.go.take() {
            let mut message = b"g".to_vec();
            message.extend_from_slice(self.tmp.join(RESOLV_CONF).as_os_str().as_encoded_bytes());
            let _ = nix::unistd::write(&go, &message);
        }
    }

    /// Wait for the command; SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to us are passed
    /// on to it (a second one kills it), and teardown follows whichever ends it. One the terminal sent (Ctrl-C) is not: it went to the whole
    /// foreground process group, the command's included, and a copy from us would be a
    /// second one to the command.
    ///
    /// [`catch_stop_signals`] must have been called before the command could start.
    pub fn wait(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as libc::pid_t);
        let mut forwarded = 0;
        loop {
            let got = match wait_or_stop_signal(pid) {
                Ok(Waited::Child(status)) => {
                    // Reaped: tell std::process::Child so it does not wait again.
                    let _ = self.child.try_wait();
                    return exit_status(status);
                }
                Ok(Waited::Signal(got)) => got,
                Err(_) => return ExitStatus::from_raw(1 << 8),
            };
            forwarded += 1;
            if forwarded > 1 {
                // Our own unreaped child (unshare): the namespace dies with it.
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            } else if got & FROM_TERMINAL != 0 {
                // The command had it from the terminal too.
            } else if let (Some(init), Ok(sig)) = (self.init, Signal::try_from(got)) {
                // unshare blocks SIGINT and SIGTERM: the namespace's init (ns-child)
                // passes them on to the command. Its pid stays ours while unshare, its
                // parent, is unreaped.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), sig);
            }
        }
    }

    /// Stop the command (if still running) and everything started for it. Every step
    /// is tried; the errors are returned together. Then checks that none of the
    /// session's processes is left, zombie or not.
    pub fn teardown(mut self) -> Result<(), String> {
        self.teardown_now()?;
        let left: Vec<String> = self
            .pids
            .iter()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .map(|p| p.to_string())
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("processes left behind: {}", left.join(", ")))
        }
    }

    fn teardown_now(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        self.go = None; // a child still waiting for "go" exits on EOF
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some((mut helper, exit_w)) = self.helper.take() {
            // Exited before its exit pipe closed: said while the command ran
            // ([`Session::exited_early`]), not a teardown error.
            let early = matches!(helper.wait_timeout(Duration::ZERO), Ok(Some(_)));
            drop(exit_w);
            match helper.wait_timeout(Duration::from_secs(5)) {
                _ if early => {}
                Ok(Some(s)) if s.success() => {}
                Ok(Some(s)) => errors.push(format!("rootlessport exited with {s}")),
                Ok(None) => {
                    let _ = helper.stop(Duration::from_secs(1));
                    errors.push("rootlessport did not exit when its exit pipe closed".into());
                }
                Err(e) => errors.push(format!("waiting for rootlessport: {e}")),
            }
        }
        if let Some(slirp) = self.slirp.take() {
            if let Err(e) = slirp.stop() {
                errors.push(e.to_string());
            }
        }
        if self.tmp.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.tmp) {
                errors.push(format!("removing {}: {e}", self.tmp.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// The stop signal `run` got last (with [`FROM_TERMINAL`]), 0 for none.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// From now on, SIGINT, SIGTERM, SIGHUP and SIGQUIT to this process are recorded, not
/// acted on: [`Session::wait`] passes them on to the command, and one that came before
/// the command started is [`stop_signal_before_start`]'s. Call it before
/// [`Session::start`], so that a Ctrl-C at any moment ends in a teardown.
///
/// # Errors
///
/// `sigaction` failing.
pub fn catch_stop_signals() -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        STOP_SIGNAL.store(sig | from_terminal(info), Ordering::SeqCst);
    }
    // No SA_RESTART: a wait is cut short, and the signal passed on.
    let catch = SigAction::new(
        SigHandler::SigAction(on_signal),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only reads its siginfo and stores to an atomic.
        unsafe { sigaction(sig, &catch) }.map_err(|e| format!("sigaction {sig}: {e}"))?;
    }
    Ok(())
}

/// What [`wait_or_stop_signal`] brought.
enum Waited {
    /// A child's end.
    Child(nix::sys::wait::WaitStatus),
    /// A stop signal that came meanwhile (with [`FROM_TERMINAL`]).
    Signal(i32),
}

/// Wait until `pid` (`-1`: any child) ends or a stop signal comes
/// ([`catch_stop_signals`]). Not a blocking wait, which a signal that came just
/// before it would not cut short: a check, then 20 ms of `poll` that a signal does.
///
/// # Errors
///
/// `waitpid` failing (no such child).
fn wait_or_stop_signal(pid: nix::unistd::Pid) -> nix::Result<Waited> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => {}
            Ok(status) => return Ok(Waited::Child(status)),
            Err(e) => return Err(e),
        }
        let got = STOP_SIGNAL.swap(0, Ordering::SeqCst);
        if got != 0 {
            return Ok(Waited::Signal(got));
        }
        let _ = nix::poll::poll(&mut [], nix::poll::PollTimeout::from(20u8));
    }
}

/// A child's end as std gives it.
fn exit_status(status: nix::sys::wait::WaitStatus) -> ExitStatus {
    use nix::sys::wait::WaitStatus;
    match status {
        WaitStatus::Exited(_, code) => ExitStatus::from_raw(code << 8),
        WaitStatus::Signaled(_, sig, core) => {
            ExitStatus::from_raw(sig as i32 | if core { 0x80 } else { 0 })
        }
        _ => ExitStatus::from_raw(1 << 8),
    }
}

/// A stop signal that came before the command started (then it is not to be started),
/// taken.
pub fn stop_signal_before_start() -> Option<i32> {
    let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst) & !FROM_TERMINAL;
    (sig != 0).then_some(sig)
}

/// Marks a signal the kernel sent (the terminal's Ctrl-C, Ctrl-\\, hang-up), beside the
/// signal number, in the handlers' atomics.
const FROM_TERMINAL: i32 = 1 << 16;

/// [`FROM_TERMINAL`] when the kernel sent the signal `info` describes (a terminal's
/// keys or hang-up reach the whole foreground process group at once), else 0 (a
/// process's `kill`). For signal handlers: reads the siginfo only.
fn from_terminal(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: the kernel passes an SA_SIGINFO handler a valid siginfo.
    if !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL {
        FROM_TERMINAL
    } else {
        0
    }
}

/// What a process of the session no longer does once it exited.
fn loss_of(name: &str) -> &'static str {
    if name == "rootlessport" {
        "the published ports no longer forward"
    } else {
        "the command's network is cut off"
    }
}

/// Until `stop` is readable (its write end closed): report each of `watched` that
/// exits (its pidfd turns readable), once.
fn watch_deaths(watched: &[(&str, u32, OwnedFd)], stop: &OwnedFd, progress: &dyn Fn(String)) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut reported = vec![false; watched.len()];
    loop {
        let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        let open: Vec<usize> = (0..watched.len()).filter(|i| !reported[*i]).collect();
        fds.extend(
            open.iter()
                .map(|i| PollFd::new(watched[*i].2.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            return;
        }
        for (k, i) in open.iter().enumerate() {
            if ready(&fds[k + 1]) {
                reported[*i] = true;
                let (name, pid, _) = &watched[*i];
                progress(format!(
                    "{name} (pid {pid}) exited while the command runs: {}; the command goes on (Ctrl-C ends it)",
                    loss_of(name)
                ));
            }
        }
    }
}

/// Watches the session's processes while the command runs ([`Session::watch_for_deaths`]);
/// dropping it stops the watch.
pub struct DeathWatch {
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DeathWatch {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.teardown_now();
    }
}

use std::os::unix::fs::DirBuilderExt;

/// `tcp 127.0.0.1:8080 -> 80`, `tcp,udp *:8000-8002 -> 80-82`.
pub fn describe(m: &PortMapping) -> String {
    let host = match m.host_ip.as_str() {
        "" => "*".to_owned(),
        ip if ip.contains(':') => format!("[{ip}]"),
        ip => ip.to_owned(),
    };
    format!(
        "{} {host}:{} -> {}",
        m.protocol_list(),
        m.host_ports(),
        m.container_ports()
    )
}

/// Exit code for a finished command: its code, or 128 + the signal that ended it.
pub fn exit_code(s: ExitStatus) -> i32 {
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// `xtask ns-child -- CMD...`: runs inside the new namespaces as the init of the PID
/// namespace. Says so on fd 4, brings loopback up, waits for the go byte on fd 3 (EOF:
/// setup failed, exit quietly) and the path of a resolv.conf after it, which it mounts
/// over /etc/resolv.conf in its mount namespace (a warning if it cannot), then runs CMD
/// as its child: it passes SIGINT, SIGTERM,
/// SIGHUP and SIGQUIT sent by a process on to it (not those the terminal sent, which
/// reached the command too), reaps whatever else ends up under it, and exits with
/// CMD's status (128 + the signal if a signal ended it). Its exit ends everything CMD
/// left running: the kernel kills a PID namespace with its init.
pub fn ns_child(args: &[String]) -> Result<(), String> {
    use nix::sys::wait::WaitStatus;

    // An init gets only the signals it has a handler for: set before anything else, so
    // that one sent while the namespace is set up is kept for the command.
    catch_stop_signals().map_err(|e| format!("ns-child: {e}"))?;

    let args = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    let (program, rest) = args.split_first().ok_or("ns-child: no command")?;
    // SAFETY: fds 3 and 4 were set up for us by the session; we own them now.
    let (go, inside) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
    let _ = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let _ = nix::unistd::write(&inside, b"1");
    drop(inside);
    let mut message = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::fs::File::from(go), &mut message);
    let Some((b'g', resolv)) = message.split_first() else {
        std::process::exit(125);
    };
    if !resolv.is_empty() {
        use std::os::unix::ffi::OsStrExt;
        let source = Path::new(std::ffi::OsStr::from_bytes(resolv));
        let bind = nix::mount::mount(
            Some(source),
            "/etc/resolv.conf",
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        );
        if let Err(e) = bind {
            eprintln!("xtask: the command keeps the host's /etc/resolv.conf (mounting slirp4netns's DNS over it: {e})");
        }
    }
    let child = match Command::new(program).args(rest).spawn() {
        Ok(child) => child,
        Err(err) => {
            // As a shell says it: 127 for a command not found, 126 for one that cannot
            // be run.
            eprintln!("xtask: cannot run {program}: {err}");
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            std::process::exit(code);
        }
    };
    let cmd = nix::unistd::Pid::from_raw(child.id() as libc::pid_t);
    // One that came before the command was there never reached it, whoever sent it.
    if let Some(sig) = stop_signal_before_start().and_then(|s| Signal::try_from(s).ok()) {
        let _ = nix::sys::signal::kill(cmd, sig);
    }
    loop {
        match wait_or_stop_signal(nix::unistd::Pid::from_raw(-1)) {
            Ok(Waited::Child(WaitStatus::Exited(pid, code))) if pid == cmd => {
                std::process::exit(code)
            }
            Ok(Waited::Child(WaitStatus::Signaled(pid, sig, _))) if pid == cmd => {
                std::process::exit(128 + sig as i32)
            }
            Ok(Waited::Child(_)) => {} // an orphan of CMD's, reaped
            // One from the terminal reached the command too (the same foreground
            // process group): passing it on would give the command a second one.
            Ok(Waited::Signal(got)) => {
                if let (0, Ok(sig)) = (got & FROM_TERMINAL, Signal::try_from(got)) {
                    let _ = nix::sys::signal::kill(cmd, sig);
                }
            }
            Err(e) => return Err(format!("ns-child: waiting for {program}: {e}")),
        }
    }
}

/// The command's resolver config, in the session's tmp dir.
const RESOLV_CONF: &str = "resolv.conf";

/// A resolv.conf naming `dns` as the one name server, with the host's `search` and
/// `options` lines kept (as podman writes one for a slirp4netns container).
fn resolv_conf(dns: std::net::Ipv4Addr, host: &str) -> String {
    let mut out = format!("nameserver {dns}\n");
    for line in host.lines() {
        let word = line.split_whitespace().next();
        if matches!(word, Some("search" | "domain" | "options")) {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

/// Remove the tmp dirs of earlier sessions that were killed before their teardown
/// (`kill -9` of xtask): ours by owner, named after a pid that no longer runs.
fn sweep_stale_tmp_dirs() {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("rootless-net-run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The pid of `parent`'s child (unshare's forked init), from `/proc/*/stat`.
fn init_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 4, after the parenthesised command name.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The `-p` parsing tests are slirp-config's (publish.rs) now.
    #[test]
    fn describe_lines() {
        let m: PortMapping = "8000-8002:80-82".parse().unwrap();
        assert_eq!(describe(&m), "tcp *:8000-8002 -> 80-82");
        assert_eq!(
            describe(&"[::1]:1:2/udp".parse().unwrap()),
            "udp [::1]:1 -> 2"
        );
        assert_eq!(
            describe(&PortMapping::new("127.0.0.1", 8080, 80, 0, "")),
            "tcp 127.0.0.1:8080 -> 80"
        );
    }
}
