use std::io;
use std::path::PathBuf;
use std::time::Duration;

use slirp_config::go_quote;

/// Errors of starting and stopping slirp4netns. The helper's own failures carry its
/// log, in podman's words.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] slirp_config::Error),
    #[error(transparent)]
    Address(#[from] netaddr::Error),
    /// The container ID cannot name the helper's files.
    #[error("invalid container id {}: {why}", go_quote(.id))]
    InvalidContainerId {
        id: String,
        why: slirp_config::BadContainerId,
    },
    #[error("slirp4netns binary not found in PATH (install the slirp4netns package)")]
    BinaryNotFound,
    #[error("cannot open network namespace {}: {source}", .path.display())]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("cannot set {} in the container network namespace: {source}", .path.display())]
    Sysctl { path: PathBuf, source: io::Error },
    #[error("API socket path {} is {len} bytes long; unix sockets allow at most 107", .path.display())]
    ApiSocketTooLong { path: PathBuf, len: usize },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("cannot start {}: {source}", .binary.display())]
    Spawn { binary: PathBuf, source: io::Error },
    /// A step was refused (`EPERM`) to a caller that gave no user namespace: an
    /// unprivileged engine must name the one that owns the network namespace.
    #[error("{inner} (an unprivileged caller must name the user namespace that owns the network namespace: SlirpSpec::userns)")]
    NeedsUserns {
        #[source]
        inner: Box<Error>,
    },
    /// The helper exited with `code` before it was ready; its log says why.
    #[error("slirp4netns failed: {}", go_quote(.log))]
    Failed { code: i32, log: String },
    /// A signal (`signal`, its number) ended the helper before it was ready.
    #[error("slirp4netns killed by signal")]
    KilledBySignal { signal: i32 },
    #[error("slirp4netns closed its ready fd without signalling readiness: {}", go_quote(.log))]
    ClosedWithoutReady { log: String },
    #[error("slirp4netns did not become ready within {}: {}", fmt_duration(.timeout), go_quote(.log))]
    Timeout { timeout: Duration, log: String },
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
