//! Network namespaces: naming one, and running code inside it on a throwaway thread.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

/// A network namespace, by bind-mount path (`/run/netns/X`, `/proc/PID/ns/net`) or by
/// the PID of a process inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    Path(PathBuf),
    Pid(u32),
}

impl Netns {
    /// A path that opens this namespace.
    pub fn path(&self) -> PathBuf {
        match self {
            Netns::Path(p) => p.clone(),
            Netns::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }

    /// Open the namespace, checking that it is one.
    pub fn open(&self) -> Result<OwnedFd, crate::Error> {
        let path = self.path();
        open_netns(&path)
    }
}

fn open_netns(path: &Path) -> Result<OwnedFd, crate::Error> {
    let err = |source: io::Error| crate::Error::OpenNetns {
        path: path.to_owned(),
        source,
    };
    let fd = OwnedFd::from(File::open(path).map_err(err)?);
    // NS_GET_NSTYPE tells a namespace file from anything else.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl with no argument on an fd we own.
    let kind = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), NS_GET_NSTYPE as _) };
    if kind < 0 || kind != libc::CLONE_NEWNET {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a network namespace",
        )));
    }
    Ok(fd)
}

/// Run `f` on a new thread that has entered the namespace `ns`; the thread ends with
/// `f`, so nothing else ever runs in that namespace by accident.
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

/// IPv6 duplicate address detection switched off in a namespace while slirp4netns
/// configures it (DAD would delay the address by a second or more), and switched back
/// to its original value by [`DadGuard::restore`] or on drop, whatever happened between.
#[derive(Debug)]
pub struct DadGuard {
    ns: OwnedFd,
    original: Option<String>,
}

impl DadGuard {
    /// Save `accept_dad` of the namespace and set it to 0. A namespace without IPv6
    /// (no such file) is fine: there is nothing to restore.
    pub fn disable(ns: &OwnedFd) -> Result<DadGuard, crate::Error> {
        let original = in_netns(ns, || -> io::Result<Option<String>> {
            let original = match std::fs::read_to_string(ACCEPT_DAD) {
                Ok(v) => v.trim().to_owned(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            std::fs::write(ACCEPT_DAD, "0")?;
            Ok(Some(original))
        })
        .and_then(|r| r)
        .map_err(|source| crate::Error::Sysctl {
            path: ACCEPT_DAD.into(),
            source,
        })?;
        Ok(DadGuard {
            ns: ns.try_clone().map_err(|source| crate::Error::Sysctl {
                path: ACCEPT_DAD.into(),
                source,
            })?,
            original,
        })
    }

    /// Put the original value back.
    pub fn restore(mut self) -> Result<(), crate::Error> {
        self.restore_now()
    }

    fn restore_now(&mut self) -> Result<(), crate::Error> {
        let Some(value) = self.original.take() else {
            return Ok(());
        };
        in_netns(&self.ns, move || std::fs::write(ACCEPT_DAD, value))
            .and_then(|r| r)
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
