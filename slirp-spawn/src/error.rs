use std::io;
use std::path::PathBuf;
use std::time::Duration;

use slirp_config::go_quote;

/// Errors of starting and stopping slirp4netns (and of opening a namespace). The
/// helper's own failures carry its log, in the words of podman's `waitForSync`
/// (`libpod/networking_slirp4netns.go`), the log quoted as Go's `%q` quotes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options do not suit the binary (e.g. `cidr not supported`), or probing it
    /// with `--help` failed.
    #[error(transparent)]
    Config(#[from] slirp_config::Error),
    /// The subnet is too small for slirp4netns's addresses.
    #[error(transparent)]
    Address(#[from] netaddr::Error),
    /// The container ID cannot name the helper's files.
    #[error("invalid container id {}: {why}", go_quote(.id))]
    InvalidContainerId {
        /// The ID as given.
        id: String,
        /// The rule it breaks.
        why: slirp_config::BadContainerId,
    },
    /// No binary was named and none is in `PATH`.
    #[error("slirp4netns binary not found in PATH (install the slirp4netns package)")]
    BinaryNotFound,
    /// The namespace file cannot be opened, or is no network namespace (the source is
    /// then `InvalidInput`, "not a network namespace").
    #[error("cannot open network namespace {}: {source}", .path.display())]
    OpenNetns {
        /// The path opened (`/proc/PID/ns/net` for a PID).
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A sysctl of the namespace (IPv6 `accept_dad`) cannot be read or written.
    #[error("cannot set {} in the container network namespace: {source}", .path.display())]
    Sysctl {
        /// The sysctl's file under `/proc/sys`.
        path: PathBuf,
        /// Why: entering the namespaces or the file access.
        source: io::Error,
    },
    /// `TmpDir/<ID>.net` does not fit `sockaddr_un`.
    #[error("API socket path {} is {len} bytes long; unix sockets allow at most 107", .path.display())]
    ApiSocketTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Another system call failed; `what` names the step (`creating the exit pipe`).
    #[error("{what}: {source}")]
    Io {
        /// The step, as a user reads it.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The process could not be started (`ENOENT`, `EACCES`, or a failed setup step
    /// in the child such as joining a namespace).
    #[error("cannot start {}: {source}", .binary.display())]
    Spawn {
        /// The program.
        binary: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A step was refused (`EPERM`) to a caller that gave no user namespace: an
    /// unprivileged engine must name the one that owns the network namespace.
    #[error("{inner} (an unprivileged caller must name the user namespace that owns the network namespace: SlirpSpec::userns)")]
    NeedsUserns {
        /// The refused step.
        #[source]
        inner: Box<Error>,
    },
    /// The helper exited with `code` before it was ready; its log says why.
    #[error("slirp4netns failed: {}", go_quote(.log))]
    Failed {
        /// Its exit status.
        code: i32,
        /// Its stdout and stderr (the last 64 KiB).
        log: String,
    },
    /// A signal (`signal`, its number) ended the helper before it was ready.
    #[error("slirp4netns killed by signal")]
    KilledBySignal {
        /// The signal's number (`9` for `SIGKILL`).
        signal: i32,
    },
    /// The helper closed the ready pipe without writing to it (it was killed and
    /// reaped then).
    #[error("slirp4netns closed its ready fd without signalling readiness: {}", go_quote(.log))]
    ClosedWithoutReady {
        /// Its stdout and stderr (the last 64 KiB).
        log: String,
    },
    /// The helper was not ready within the deadline ([`crate::DEFAULT_READY_TIMEOUT`]
    /// unless set); it was killed.
    #[error("slirp4netns did not become ready within {}: {}", fmt_duration(.timeout), go_quote(.log))]
    Timeout {
        /// The deadline.
        timeout: Duration,
        /// Its stdout and stderr (the last 64 KiB).
        log: String,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

fn fmt_duration(d: &Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
