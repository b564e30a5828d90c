//! Naming the network namespace slirp4netns serves.

use std::path::PathBuf;

/// A network namespace, named the two ways slirp4netns (and podman) can name one: by a
/// path to its namespace file, or by the PID of a process inside it.
///
/// This is only the name; it is plain data and opens nothing. `slirp_spawn` re-exports
/// it as `slirp_spawn::Netns` and opens it (`slirp_spawn::open_netns`, which checks that
/// the file is a network namespace).
///
/// On the slirp4netns command line ([`build_command_args`](crate::build_command_args)),
/// as podman's `libpod/networking_slirp4netns.go` writes it: [`Netns::Path`] becomes
/// `--netns-type=path PATH` (slirp4netns 0.4 and later), [`Netns::Pid`] the bare PID.
///
/// ```
/// use slirp_config::Netns;
/// assert_eq!(Netns::Pid(4242).path(), std::path::Path::new("/proc/4242/ns/net"));
/// assert_eq!(Netns::Path("/run/netns/ctr1".into()).path(), std::path::Path::new("/run/netns/ctr1"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    /// A namespace file: a bind mount such as `/run/netns/NAME` (podman's), or
    /// `/proc/PID/ns/net`.
    Path(PathBuf),
    /// The PID of a process whose network namespace is meant (slirp4netns's PID mode,
    /// the only one before 0.4).
    Pid(u32),
}

impl Netns {
    /// A path that opens this namespace: the path itself, or `/proc/PID/ns/net`.
    pub fn path(&self) -> PathBuf {
        match self {
            Netns::Path(p) => p.clone(),
            Netns::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}
