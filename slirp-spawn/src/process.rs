//! Starting a helper process the way container engines do, reusable for any helper
//! (slirp4netns, rootlessport): a stdin payload, chosen fds leaked at chosen numbers and
//! nothing else, stdout and stderr into an unlinked log file, its own process group,
//! optionally a new mount namespace; then readiness and death awaited together (on a
//! pidfd, or, on kernels without `pidfd_open`, by polling in short slices).
//!
//! podman does this twice inline, in `setupSlirp4netns` and
//! `setupRootlessPortMappingViaRLK` (`libpod/networking_slirp4netns.go`): an
//! `exec.Cmd` with `ExtraFiles` and `Setpgid`, a log file unlinked once open, then
//! `waitForSync` on the ready pipe. Here it is one builder ([`HelperCommand`]) and one
//! wait ([`Helper::await_ready`]) for both.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Most of a log we read back into an error: the end of it, where the reason is.
const LOG_TAIL_LIMIT: u64 = 64 * 1024;

/// A log file that exists only as an open fd: created in a directory and unlinked at
/// once, so nothing is left on disk whatever happens to us or the helper.
#[derive(Debug)]
pub struct LogFile {
    file: File,
}

impl LogFile {
    /// Create `dir/name` exclusively (a stale file of that name is removed first; a
    /// symlink is never followed), mode 0600, then unlink it: podman's handling of
    /// `slirp4netns-<ID>.log` and `rootlessport-<ID>.log`.
    ///
    /// # Errors
    ///
    /// Removing a stale file, creating (`EEXIST` when another appeared meanwhile,
    /// `ELOOP` for a symlink put there meanwhile) or unlinking it failed.
    pub fn create_unlinked(dir: &Path, name: &str) -> io::Result<LogFile> {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(LogFile { file })
    }

    /// An unnamed log in memory (`memfd_create`; `name` shows in `/proc/PID/fd`), for
    /// helpers that are not given a directory.
    ///
    /// # Errors
    ///
    /// `memfd_create` failed (`EMFILE`, or `ENOSYS` before Linux 3.17).
    pub fn anonymous(name: &str) -> io::Result<LogFile> {
        let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        Ok(LogFile {
            file: File::from(fd),
        })
    }

    /// What the helper wrote so far (its last 64 KiB), lossily decoded.
    pub fn contents(&self) -> String {
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(LOG_TAIL_LIMIT);
        let mut buf = vec![0u8; (len - start) as usize];
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        buf.truncate(done);
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn try_clone(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

/// What a helper is started with. Build it, then [`HelperCommand::spawn`].
#[derive(Debug)]
pub struct HelperCommand {
    program: PathBuf,
    args: Vec<OsString>,
    stdin: Option<Vec<u8>>,
    fds: Vec<(OwnedFd, RawFd)>,
    stdout: Option<File>,
    stderr: Option<File>,
    new_mount_ns: bool,
    new_net_ns: bool,
    netns: Option<OwnedFd>,
    userns: Option<OwnedFd>,
    own_process_group: bool,
}

impl HelperCommand {
    /// A command for `program` (a path, or a name looked up in `PATH` when spawned),
    /// with the defaults: no arguments, stdin, stdout and stderr on `/dev/null`, no fd
    /// leaked, the caller's namespaces, a process group of its own.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        HelperCommand {
            program: program.into(),
            args: Vec::new(),
            stdin: None,
            fds: Vec::new(),
            stdout: None,
            stderr: None,
            new_mount_ns: false,
            new_net_ns: false,
            netns: None,
            userns: None,
            own_process_group: true,
        }
    }

    /// Append `args` to the arguments (`argv[0]` is the program as given).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Bytes the helper reads on stdin (from a sealed in-memory file, so writing them
    /// never blocks and no thread is needed). Without it, stdin is `/dev/null`.
    pub fn stdin_bytes(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(payload.into());
        self
    }

    /// Give the helper `fd` as fd number `target` (3 and up). Every other fd of ours
    /// stays out of the helper.
    pub fn leak_fd(mut self, fd: OwnedFd, target: RawFd) -> Self {
        self.fds.push((fd, target));
        self
    }

    /// Send stdout and stderr to `log` (else to `/dev/null`).
    ///
    /// # Errors
    ///
    /// Duplicating the log's fd failed (`EMFILE`).
    pub fn log(self, log: &LogFile) -> io::Result<Self> {
        self.stdout_log(log)?.stderr_log(log)
    }

    /// Send stdout alone to `log`.
    ///
    /// # Errors
    ///
    /// As [`HelperCommand::log`].
    pub fn stdout_log(mut self, log: &LogFile) -> io::Result<Self> {
        self.stdout = Some(log.try_clone()?);
        Ok(self)
    }

    /// Send stderr alone to `log`.
    ///
    /// # Errors
    ///
    /// As [`HelperCommand::log`].
    pub fn stderr_log(mut self, log: &LogFile) -> io::Result<Self> {
        self.stderr = Some(log.try_clone()?);
        Ok(self)
    }

    /// Start the helper in a new mount namespace (needed by `--enable-sandbox`), with
    /// every mount in it private, so that nothing it mounts or unmounts reaches the
    /// caller's namespace.
    pub fn new_mount_namespace(mut self, yes: bool) -> Self {
        self.new_mount_ns = yes;
        self
    }

    /// Start the helper in a new, empty network namespace of its own (only `lo`, down),
    /// made after any user namespace it joins. See [`NetnsHolder`](crate::NetnsHolder)
    /// for a process that only holds one.
    pub fn new_network_namespace(mut self, yes: bool) -> Self {
        self.new_net_ns = yes;
        self
    }

    /// Start the helper inside the network namespace `ns` (an open namespace fd). This
    /// wins over [`HelperCommand::new_network_namespace`].
    pub fn join_netns(mut self, ns: OwnedFd) -> Self {
        self.netns = Some(ns);
        self
    }

    /// Start the helper inside the user namespace `ns` (as root there): a rootless
    /// engine's helpers run in its user namespace to act on the netns it owns.
    pub fn join_userns(mut self, ns: OwnedFd) -> Self {
        self.userns = Some(ns);
        self
    }

    /// Put the helper in a process group of its own (the default), so that signals
    /// sent to the engine's terminal group do not reach it.
    pub fn own_process_group(mut self, yes: bool) -> Self {
        self.own_process_group = yes;
        self
    }

    /// Start the helper.
    ///
    /// Its death is watched through a pidfd when the kernel has `pidfd_open` (5.3 and
    /// later); without one (older kernels, a seccomp filter, out of fds) the helper
    /// starts all the same and [`Helper`] polls for its death instead.
    ///
    /// # Errors
    ///
    /// An fd target below 3, or failing to prepare the stdin payload, the log fds or the
    /// leaked fds, or to fork and exec (including any step of the child's setup: dup2,
    /// `setns`, `unshare`). No child is left behind on any of these errors.
    pub fn spawn(self) -> io::Result<Helper> {
        let HelperCommand {
            program,
            args,
            stdin,
            fds,
            stdout,
            stderr,
            new_mount_ns,
            new_net_ns,
            netns,
            userns,
            own_process_group,
        } = self;
        let mut cmd = Command::new(&program);
        cmd.args(&args);
        match &stdin {
            Some(payload) => cmd.stdin(payload_file(payload)?),
            None => cmd.stdin(Stdio::null()),
        };
        match stdout {
            Some(log) => cmd.stdout(log),
            None => cmd.stdout(Stdio::null()),
        };
        match stderr {
            Some(log) => cmd.stderr(log),
            None => cmd.stderr(Stdio::null()),
        };
        if own_process_group {
            cmd.process_group(0);
        }

        // Move every source fd above the targets, so that no dup2 in the child can
        // clobber another source (and no source is its own target).
        let min = fds.iter().map(|(_, t)| *t).max().unwrap_or(2).max(9) + 1;
        let mut moved = Vec::with_capacity(fds.len());
        for (fd, target) in &fds {
            if *target < 3 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot leak an fd as {target}: 0-2 are stdio"),
                ));
            }
            moved.push((rustix::io::fcntl_dupfd_cloexec(fd, min)?, *target));
        }
        drop(fds);
        // The namespace fds too: the child joins them after the dup2s.
        let above = |fd: Option<OwnedFd>| -> io::Result<Option<OwnedFd>> {
            Ok(match fd {
                Some(fd) => Some(rustix::io::fcntl_dupfd_cloexec(&fd, min)?),
                None => None,
            })
        };
        let (userns, netns) = (above(userns)?, above(netns)?);
        // For kernels without close_range(CLOSE_RANGE_CLOEXEC) (before 5.11: RHEL 8,
        // Debian 11, Ubuntu 20.04): the highest fd open now, read before the fork (the
        // child may not allocate), plus a margin for fds other threads open meanwhile.
        // Listed only when this thread (whose seccomp filter the child inherits) lacks
        // the call; else the child never sweeps by hand.
        let highest = if close_range_cloexec_works() {
            1024
        } else {
            open_fds(std::process::id())
                .ok()
                .and_then(|fds| fds.last().copied())
                .unwrap_or(1024)
        }
        .max(min + moved.len() as RawFd);
        let sweep_to = highest.saturating_add(CLOEXEC_MARGIN);
        let mut unshare_flags = CloneFlags::empty();
        if new_mount_ns {
            unshare_flags |= CloneFlags::CLONE_NEWNS;
        }
        if new_net_ns {
            unshare_flags |= CloneFlags::CLONE_NEWNET;
        }
        // SAFETY: the closure runs between fork and exec; it calls only async-signal-safe
        // syscalls (close_range, fcntl, dup2, setns, unshare, mount) through thin wrappers and
        // allocates nothing (an error is an errno). The sweep passes raw numbers to
        // fcntl(2), most of them not open, which no fd type may stand for. dup2 over a
        // target is what the child is for: nothing in it owns those numbers.
        unsafe {
            cmd.pre_exec(move || {
                // Everything inherited from fd 3 up closes at exec, whoever opened it
                // without O_CLOEXEC; the dup2s below then re-open exactly the chosen ones.
                let swept = libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) == 0;
                if !swept {
                    // No close_range (ENOSYS before 5.9, EINVAL for the flag before
                    // 5.11, or a seccomp filter): mark each fd by hand. Closed numbers
                    // just fail with EBADF.
                    for fd in 3..=sweep_to {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                        }
                    }
                }
                for (src, target) in &moved {
                    // The copy is not close-on-exec; it is the helper's from now on.
                    let _ = nix::unistd::dup2_raw(src, *target)?.into_raw_fd();
                }
                // The forked child is single-threaded, as joining a user namespace needs.
                if let Some(ns) = &userns {
                    nix::sched::setns(ns, CloneFlags::CLONE_NEWUSER)?;
                }
                if !unshare_flags.is_empty() {
                    nix::sched::unshare(unshare_flags)?;
                }
                if new_mount_ns {
                    // Private, as Go's Unshareflags makes podman's slirp4netns: else
                    // the sandbox's unmounts of the old root reach the caller's shared
                    // mounts (`ip netns add` makes /run/netns one) and unmount every
                    // named netns. A short path: nix copies it on the stack, no alloc.
                    nix::mount::mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                        None::<&str>,
                    )?;
                }
                if let Some(ns) = &netns {
                    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        // Our copies of the leaked fds close with the command (the helper's ready pipe
        // must read EOF once the helper closes its end).
        drop(cmd);
        // From here on the handle owns the child: whatever fails, its drop kills and
        // reaps it.
        let child = child?;
        let mut helper = Helper {
            pid: child.id(),
            child: Some(child),
            pidfd: None,
            own_group: own_process_group,
            status: None,
        };
        match pidfd_open(helper.pid) {
            Ok(fd) => helper.pidfd = Some(fd),
            Err(error) => {
                // Before 5.3 (RHEL 8's 4.18), under a seccomp filter, or out of fds.
                tracing::debug!(
                    pid = helper.pid,
                    %error,
                    "no pidfd for the helper: polling for its death instead"
                );
            }
        }
        Ok(helper)
    }
}

/// Whether `close_range(CLOSE_RANGE_CLOEXEC)` works on this thread (tried on a range
/// that holds no fd).
fn close_range_cloexec_works() -> bool {
    let far = (i32::MAX - 1) as u32;
    // SAFETY: close_range on a range above any fd number: it changes no fd.
    unsafe { libc::syscall(libc::SYS_close_range, far, far, libc::CLOSE_RANGE_CLOEXEC) == 0 }
}

/// fds above the highest one open before the fork that the fallback sweep also marks
/// close-on-exec (opened by other threads between the listing and the fork).
const CLOEXEC_MARGIN: RawFd = 256;

fn payload_file(payload: &[u8]) -> io::Result<File> {
    let fd = nix::sys::memfd::memfd_create("helper-stdin", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut f = File::from(fd);
    f.write_all(payload)?;
    f.rewind()?;
    Ok(f)
}

/// How often a helper without a pidfd is checked for death (`waitpid(WNOHANG)`) while
/// we wait for it: short enough that a dead helper is noticed at once for a human,
/// long enough to cost nothing.
const DEATH_POLL_SLICE: Duration = Duration::from_millis(20);

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// How long a started helper gets to say it is ready, unless its caller says otherwise:
/// the one default of [`Slirp4netns::start`](crate::Slirp4netns::start)
/// ([`SlirpSpec::ready_timeout`](crate::SlirpSpec::ready_timeout)) and of rootlessport's
/// launcher. 10 s.
///
/// podman has no overall deadline for slirp4netns (it polls the ready pipe in 1 s slices
/// until the helper writes or dies, `setupSlirp4netns` in libpod's `networking_slirp4netns.go`)
/// and gives rootlessport 3 s; 10 s leaves room for a sandboxed slirp4netns on a loaded
/// machine while still ending a hung helper.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a helper did not become ready ([`Helper::await_ready`]). Whichever it is, the
/// helper is gone by then: killed (its process group too, when it has its own) and
/// reaped.
///
/// The Display texts are generic; callers with their own words (podman's
/// `slirp4netns failed: "LOG"`, say) map the variants to them.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// It exited with this code before it was ready.
    #[error("the helper exited with code {0} before it was ready")]
    Exited(i32),
    /// This signal ended it before it was ready.
    #[error("the helper was killed by signal {0} before it was ready")]
    Signalled(i32),
    /// It closed its ready fd without writing to it, and did not exit within the grace
    /// that followed (up to 1 s, within the deadline).
    #[error("the helper closed its ready fd without signalling readiness")]
    ClosedWithoutReady,
    /// The deadline passed first.
    #[error("the helper did not become ready in time")]
    TimedOut,
    /// Waiting itself failed (`poll`, `read` or `waitpid`).
    #[error("waiting for the helper: {0}")]
    Wait(#[source] io::Error),
}

impl NotReady {
    fn from_status(status: ExitStatus) -> NotReady {
        match status.code() {
            Some(code) => NotReady::Exited(code),
            None => NotReady::Signalled(status.signal().unwrap_or(0)),
        }
    }
}

/// How [`Helper::watch_ready`] ended, before [`Helper::await_ready`] cleans up.
enum Watch {
    Ready(Vec<u8>),
    Exited(ExitStatus),
    Closed,
    TimedOut,
}

/// A running helper: its pid, a pidfd to watch it with (when the kernel has
/// `pidfd_open`), and its reaping.
///
/// Dropping a `Helper` that has not been reaped kills its process group (SIGKILL) and
/// reaps it, so neither a process nor a zombie outlives the handle. Use
/// [`Helper::hand_to_reaper`] to let a helper run on without us.
#[derive(Debug)]
pub struct Helper {
    /// Our unreaped child; `None` once handed to the reaper. While it is here and
    /// `status` is `None`, its pid (and process group id) cannot be reused, so plain
    /// `kill(2)` names it as surely as a pidfd.
    child: Option<Child>,
    /// `None` on kernels without `pidfd_open` (or when it failed), and once handed to
    /// the reaper.
    pidfd: Option<OwnedFd>,
    pid: u32,
    own_group: bool,
    status: Option<ExitStatus>,
}

impl Helper {
    /// The helper's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A pidfd for the helper, readable once it has exited.
    ///
    /// `None` on kernels without `pidfd_open` (before 5.3), when it failed (a seccomp
    /// filter, out of fds), and after [`Helper::hand_to_reaper`].
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|fd| fd.as_fd())
    }

    /// Wait for the helper to write on `ready` (the read end of its ready pipe) or to
    /// die, whichever comes first, until `deadline`; the bytes it wrote (at most 64).
    ///
    /// Death is seen on the pidfd at once; without a pidfd the helper is checked every
    /// 20 ms between waits on `ready`. The one readiness wait of this workspace:
    /// [`Slirp4netns::start`](crate::Slirp4netns::start) and rootlessport's launcher
    /// both map its [`NotReady`] to their own error texts.
    ///
    /// # Errors
    ///
    /// [`NotReady`]: the helper exited or was killed by a signal first, closed `ready`
    /// without writing, or the deadline passed; or waiting failed. On every one of
    /// these the helper has been killed (when still running) and reaped, so no process
    /// or zombie is left.
    pub fn await_ready(&mut self, ready: &OwnedFd, deadline: Instant) -> Result<Vec<u8>, NotReady> {
        let why = match self.watch_ready(ready, deadline) {
            Ok(Watch::Ready(bytes)) => return Ok(bytes),
            Ok(Watch::Exited(status)) => return Err(NotReady::from_status(status)),
            Ok(Watch::Closed) => NotReady::ClosedWithoutReady,
            Ok(Watch::TimedOut) => NotReady::TimedOut,
            Err(e) => NotReady::Wait(e),
        };
        if let Err(error) = self.kill() {
            // Its drop tries again.
            tracing::warn!(pid = self.pid, %error, "killing a helper that did not get ready");
        }
        Err(why)
    }

    /// The wait of [`Helper::await_ready`], which leaves the helper as it is.
    fn watch_ready(&mut self, ready: &OwnedFd, deadline: Instant) -> io::Result<Watch> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Watch::TimedOut);
            }
            let (ready_ev, dead) = {
                let mut fds = vec![PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
                let wait = match &self.pidfd {
                    Some(pidfd) => {
                        fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
                        left
                    }
                    None => left.min(DEATH_POLL_SLICE),
                };
                match poll(&mut fds, poll_timeout(wait)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let dead = match fds.get(1) {
                    Some(pidfd) => pidfd.revents().is_some_and(|r| !r.is_empty()),
                    // No pidfd: ask waitpid after every slice.
                    None => true,
                };
                (fds[0].revents().unwrap_or(PollFlags::empty()), dead)
            };
            if ready_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                let mut buf = [0u8; 64];
                let n = loop {
                    match nix::unistd::read(ready.as_fd(), &mut buf) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        other => break other?,
                    }
                };
                if n > 0 {
                    return Ok(Watch::Ready(buf[..n].to_vec()));
                }
                // EOF: it closed the fd; it is most likely on its way out.
                let grace = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(1));
                return Ok(match self.wait_timeout(grace)? {
                    Some(status) => Watch::Exited(status),
                    None => Watch::Closed,
                });
            }
            if dead {
                if let Some(status) = self.try_wait()? {
                    return Ok(Watch::Exited(status));
                }
            }
        }
    }

    /// Reap the helper if it has exited (`waitpid` with `WNOHANG`); its status once
    /// reaped. `None` while it runs, and after [`Helper::hand_to_reaper`].
    ///
    /// # Errors
    ///
    /// `waitpid` failing.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait()?;
        self.status = status;
        Ok(status)
    }

    /// Wait up to `timeout` for the helper to exit, and reap it. `None` if it still runs
    /// (or was handed to the reaper).
    ///
    /// Without a pidfd the helper is checked every 20 ms.
    ///
    /// # Errors
    ///
    /// `poll` or `waitpid` failing.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match &self.pidfd {
                Some(pidfd) => {
                    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, poll_timeout(left)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                None => std::thread::sleep(left.min(DEATH_POLL_SLICE)),
            }
        }
    }

    /// Send `signal` to the helper (and to its process group when it has its own). Does
    /// nothing once the helper is reaped.
    ///
    /// Plain `kill(2)`, with or without a pidfd: the helper is our child and unreaped,
    /// so its pid (and its group's id) cannot have been reused.
    ///
    /// # Errors
    ///
    /// An unknown signal number, `kill(2)` failing other than with ESRCH, or a helper
    /// already handed to the reaper (whose pid may since name another process).
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        if self.child.is_none() {
            return Err(io::Error::other("helper already handed to the reaper"));
        }
        let signal = match signal {
            0 => None,
            n => Some(Signal::try_from(n)?),
        };
        let pid = Pid::from_raw(self.pid as libc::pid_t);
        let r = nix::sys::signal::kill(pid, signal);
        if self.own_group {
            // Helpers the helper started, still in its group (ESRCH: none is left).
            let _ = nix::sys::signal::killpg(pid, signal);
        }
        match r {
            // ESRCH cannot happen while it is unreaped (a zombie takes signals), but it
            // would mean it is gone anyway.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// SIGKILL the helper (and its group) and reap it.
    ///
    /// # Errors
    ///
    /// Signalling or `waitpid` failing, or a helper already handed to the reaper.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(libc::SIGKILL)?;
        let status = match self.child.as_mut() {
            Some(child) => child.wait()?,
            None => return Err(io::Error::other("helper already handed to the reaper")),
        };
        self.status = Some(status);
        Ok(status)
    }

    /// Stop the helper gracefully: wait up to `grace` for it to exit on its own (after
    /// the caller closed its exit fd, say), then SIGTERM and another `grace`, then
    /// SIGKILL. Always reaps.
    ///
    /// # Errors
    ///
    /// Waiting or signalling failing (the drop of the handle still kills and reaps).
    pub fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        self.kill()
    }

    /// The helper as a plain [`Child`], for a caller that kills and reaps it itself:
    /// this handle no longer does. `None` once handed to the reaper.
    pub(crate) fn into_child(mut self) -> Option<Child> {
        self.child.take()
    }

    /// Let the helper run on without this handle: the shared reaper reaps it when it
    /// exits (a thread blocked in `waitpid` for a helper without a pidfd), so it never
    /// lingers as a zombie. Afterwards this handle only knows the pid: it has no pidfd,
    /// cannot signal, and its drop does nothing. Returns the pid.
    pub fn hand_to_reaper(&mut self) -> u32 {
        let pidfd = self.pidfd.take();
        if let Some(child) = self.child.take() {
            if self.status.is_none() {
                match pidfd {
                    Some(pidfd) => crate::reaper::adopt(child, pidfd),
                    None => crate::reaper::adopt_blocking(child),
                }
            }
        }
        self.pid
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.child.is_some() && self.status.is_none() {
            let _ = self.kill();
        }
    }
}

fn poll_timeout(d: Duration) -> PollTimeout {
    // Round up so that we never wake just before the deadline and spin.
    let ms = d.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// The fds a process has open, by number, lowest first (from `/proc/PID/fd`).
///
/// # Errors
///
/// No such process (`NotFound`), or its fds are not ours to list (`PermissionDenied`).
pub fn open_fds(pid: u32) -> io::Result<Vec<RawFd>> {
    let process = procfs::process::Process::new(pid as i32).map_err(proc_error)?;
    let mut fds: Vec<RawFd> = process
        .fd()
        .map_err(proc_error)?
        // An fd closed while the list is read is not open.
        .filter_map(|fd| Some(fd.ok()?.fd))
        .collect();
    fds.sort_unstable();
    Ok(fds)
}

/// A `/proc` read's error as the OS error it is, where it is one.
pub(crate) fn proc_error(e: procfs::ProcError) -> io::Error {
    match e {
        procfs::ProcError::Io(e, _) => e,
        procfs::ProcError::NotFound(_) => io::ErrorKind::NotFound.into(),
        procfs::ProcError::PermissionDenied(_) => io::ErrorKind::PermissionDenied.into(),
        other => io::Error::other(other),
    }
}
