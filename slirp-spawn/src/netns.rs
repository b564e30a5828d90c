//! Network namespaces: opening one (named by [`Netns`], slirp-config's type), holding
//! one with a process, and running code inside it on a throwaway thread.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Child;

use nix::sched::CloneFlags;

pub use slirp_config::Netns;

/// Open the network namespace `ns` (its [`Netns::path`]) and check that the file is one.
///
/// ```no_run
/// use slirp_spawn::{open_netns, Netns};
/// let fd = open_netns(&Netns::Path("/run/netns/ctr1".into()))?;
/// # let _ = fd;
/// # Ok::<(), slirp_spawn::Error>(())
/// ```
///
/// # Errors
///
/// [`crate::Error::OpenNetns`] when the file cannot be opened, or is not a network
/// namespace (`InvalidInput`: "not a network namespace").
pub fn open_netns(ns: &Netns) -> Result<OwnedFd, crate::Error> {
    let path = ns.path();
    let err = |source: io::Error| crate::Error::OpenNetns {
        path: path.clone(),
        source,
    };
    let fd = OwnedFd::from(File::open(&path).map_err(err)?);
    // NS_GET_NSTYPE tells a namespace file from anything else. (Not /proc/self/fd's
    // `net:[INODE]`: a netns bind-mounted at /run/netns/X, podman's, reads as that path.)
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl with no argument on an fd we own.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 || kind != libc::CLONE_NEWNET {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace",
        )));
    }
    Ok(fd)
}

/// A process that holds a network namespace and names it by its PID: a fresh namespace
/// ([`NetnsHolder::new`]: a test's or a tool's container), or an existing one given by fd
/// ([`NetnsHolder::join`]: for slirp4netns before 0.4, which takes only a PID).
///
/// The process is `sleep infinity` (from `PATH`) in a process group of its own, with
/// nothing but stdio on `/dev/null`; it is in its namespace before
/// [`NetnsHolder::new`] or [`NetnsHolder::join`] returns. Dropping the holder kills and
/// reaps it, and a fresh namespace goes with it unless something else still holds it
/// (a process, a bind mount, an open fd).
///
/// ```no_run
/// use slirp_spawn::{in_netns, open_netns, NetnsHolder};
/// let ns = NetnsHolder::new()?;                 // needs CAP_SYS_ADMIN (root, or a user namespace)
/// println!("{}", ns.path().display());          // /proc/PID/ns/net
/// let fd = open_netns(&ns.netns())?;
/// let listener = in_netns(&fd, || std::net::TcpListener::bind("127.0.0.1:0"))??;
/// # let _ = listener;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct NetnsHolder {
    helper: crate::process::Helper,
}

impl NetnsHolder {
    /// A fresh network namespace, held by a new process (`unshare(CLONE_NEWNET)` in the
    /// child, as `unshare --net` does): only `lo`, down.
    ///
    /// # Errors
    ///
    /// Starting the process failed: `EPERM` from `unshare` without `CAP_SYS_ADMIN` in
    /// the caller's user namespace, or `sleep` not found.
    pub fn new() -> io::Result<NetnsHolder> {
        Self::spawn(crate::process::HelperCommand::new("sleep").new_network_namespace(true))
    }

    /// A process inside the network namespace `ns`, joining the user namespace
    /// `userns` first when given (a rootless engine's, which owns `ns`; the caller's uid
    /// must be mapped in it).
    ///
    /// # Errors
    ///
    /// Duplicating the fds or starting the process failed (`EPERM` from `setns` without
    /// privilege over a namespace, or `sleep` not found).
    pub fn join(ns: &OwnedFd, userns: Option<&OwnedFd>) -> io::Result<NetnsHolder> {
        let mut command = crate::process::HelperCommand::new("sleep").join_netns(ns.try_clone()?);
        if let Some(userns) = userns {
            command = command.join_userns(userns.try_clone()?);
        }
        Self::spawn(command)
    }

    fn spawn(command: crate::process::HelperCommand) -> io::Result<NetnsHolder> {
        let helper = command.args(["infinity"]).spawn()?;
        Ok(NetnsHolder { helper })
    }

    /// The holding process's PID, which names the namespace (slirp4netns's PID mode:
    /// `Netns::Pid(holder.pid())`).
    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }

    /// `/proc/PID/ns/net` of the holder.
    pub fn path(&self) -> PathBuf {
        Netns::Pid(self.pid()).path()
    }

    /// The namespace by that path ([`NetnsHolder::path`]), as every slirp4netns from 0.4
    /// and rootlessport take it.
    pub fn netns(&self) -> Netns {
        Netns::Path(self.path())
    }

    /// The holding process as a plain [`Child`]: the caller now kills and reaps it
    /// (for code that keeps `Child` handles; the holder's drop no longer does).
    pub fn into_child(self) -> Child {
        self.helper
            .into_child()
            .expect("a holder is never handed to the reaper")
    }
}

/// Run `f` on a new thread that has entered the namespace `ns`; the thread ends with
/// `f`, so nothing else ever runs in that namespace by accident. Sockets `f` creates
/// belong to `ns` for good, whichever thread uses them later.
///
/// # Errors
///
/// Duplicating `ns` or starting the thread failed, `setns` was refused (`EPERM`
/// without `CAP_SYS_ADMIN` over the namespace's owning user namespace), or `f`
/// panicked (`Other`).
pub fn in_netns<T, F>(ns: &OwnedFd, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = ns.try_clone()?;
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> io::Result<T> {
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })?
        .join()
        .map_err(|_| io::Error::other("thread inside the network namespace panicked"))?
}

const ACCEPT_DAD: &str = "/proc/sys/net/ipv6/conf/default/accept_dad";
const ACCEPT_DAD_C: &CStr = c"/proc/sys/net/ipv6/conf/default/accept_dad";

/// IPv6 duplicate address detection switched off in a namespace while slirp4netns
/// configures it (DAD would delay the address by a second or more), and switched back
/// to its original value by [`DadGuard::restore`] or on drop, whatever happened between.
///
/// The sysctl is read and written by a short-lived forked child that joins the
/// namespaces (the user namespace first when one is given, then the network namespace),
/// so the engine itself never changes namespace and an unprivileged engine can do it
/// in the user namespace that owns the network namespace: joining a user namespace is
/// only allowed to a single-threaded process, which a forked child is.
#[derive(Debug)]
pub struct DadGuard {
    ns: OwnedFd,
    userns: Option<OwnedFd>,
    original: Option<Vec<u8>>,
}

impl DadGuard {
    /// Save `accept_dad` of the namespace and set it to 0, as root in the caller's user
    /// namespace. A namespace without IPv6 (no such file) is fine: there is nothing to
    /// restore.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Sysctl`] when the namespace cannot be entered or the sysctl not
    /// read or written (e.g. `EPERM` for a caller without privilege over it: see
    /// [`DadGuard::disable_in`]).
    pub fn disable(ns: &OwnedFd) -> Result<DadGuard, crate::Error> {
        Self::disable_in(ns, None)
    }

    /// As [`DadGuard::disable`], from inside the user namespace `userns` (a rootless
    /// engine's, which owns `ns`): the child joins it before the network namespace,
    /// where it holds the privilege to write the sysctl.
    ///
    /// # Errors
    ///
    /// As [`DadGuard::disable`].
    pub fn disable_in(ns: &OwnedFd, userns: Option<&OwnedFd>) -> Result<DadGuard, crate::Error> {
        let err = |source| crate::Error::Sysctl {
            path: ACCEPT_DAD.into(),
            source,
        };
        let original = swap_sysctl(ns, userns, ACCEPT_DAD_C, b"0").map_err(err)?;
        Ok(DadGuard {
            ns: ns.try_clone().map_err(err)?,
            userns: userns.map(OwnedFd::try_clone).transpose().map_err(err)?,
            original,
        })
    }

    /// Put the original value back.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Sysctl`] when it cannot be written.
    pub fn restore(mut self) -> Result<(), crate::Error> {
        self.restore_now()
    }

    fn restore_now(&mut self) -> Result<(), crate::Error> {
        let Some(value) = self.original.take() else {
            return Ok(());
        };
        swap_sysctl(&self.ns, self.userns.as_ref(), ACCEPT_DAD_C, &value)
            .map(|_| ())
            .map_err(|source| crate::Error::Sysctl {
                path: ACCEPT_DAD.into(),
                source,
            })
    }
}

impl Drop for DadGuard {
    fn drop(&mut self) {
        if let Err(e) = self.restore_now() {
            tracing::warn!(error = %e, "could not restore accept_dad");
        }
    }
}

/// The longest sysctl value [`swap_sysctl`] reads back.
const SYSCTL_MAX: usize = 64;

/// In a forked child that joins `userns` (when given) and then `netns`: read the sysctl
/// file `path`, write `value` to it, and hand the old value back through a pipe.
/// `Ok(None)` when the file does not exist there (no IPv6 in the namespace).
fn swap_sysctl(
    netns: &OwnedFd,
    userns: Option<&OwnedFd>,
    path: &CStr,
    value: &[u8],
) -> io::Result<Option<Vec<u8>>> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the child calls only async-signal-safe syscalls (setns, open, read, write,
    // _exit) on values prepared before the fork, and allocates nothing.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let step = || -> Result<(), nix::errno::Errno> {
                if let Some(userns) = userns {
                    nix::sched::setns(userns, CloneFlags::CLONE_NEWUSER)?;
                }
                nix::sched::setns(netns, CloneFlags::CLONE_NEWNET)?;
                let old = match open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(nix::errno::Errno::ENOENT) => return Ok(()),
                    Err(e) => return Err(e),
                };
                let mut buf = [0u8; SYSCTL_MAX];
                let n = nix::unistd::read(&old, &mut buf)?;
                // A sysctl takes a write at offset 0 only: a fresh open.
                let new = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
                nix::unistd::write(&new, value)?;
                // The old value, or "!" for an empty one so that it differs from absence.
                nix::unistd::write(&w, if n == 0 { b"!" } else { &buf[..n] })?;
                Ok(())
            };
            let code = match step() {
                Ok(()) => 0,
                Err(e) => (e as i32).clamp(1, 255),
            };
            // SAFETY: _exit ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(w);
            let mut buf = [0u8; SYSCTL_MAX];
            let mut len = 0;
            loop {
                match nix::unistd::read(&r, &mut buf[len..]) {
                    Ok(0) => break,
                    Ok(n) => len += n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
                        let _ = waitpid(child, None);
                        return Err(e.into());
                    }
                }
                if len == buf.len() {
                    break;
                }
            }
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other?,
                }
            };
            match status {
                WaitStatus::Exited(_, 0) => Ok(match &buf[..len] {
                    [] => None,
                    b"!" => Some(Vec::new()),
                    old => Some(old.to_vec()),
                }),
                WaitStatus::Exited(_, code) => Err(io::Error::from_raw_os_error(code)),
                other => Err(io::Error::other(format!(
                    "the child setting the sysctl ended as {other:?}"
                ))),
            }
        }
    }
}
