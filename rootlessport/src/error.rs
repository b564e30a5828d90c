use std::io;

use crate::config::q;

/// Everything that can stop the helper before it is ready. The Display text is the one
/// line the helper prints on stdout (podman shows it as `rootlessport <line>`), in
/// podman's and RootlessKit's words where they have words for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Json(String),
    #[error("config on stdin is larger than {limit} bytes")]
    StdinTooLarge { limit: usize },
    #[error("reading the config from stdin: {0}")]
    Stdin(io::Error),
    #[error("missing NetNSPath")]
    MissingNetNsPath,
    #[error("missing ExitFD")]
    MissingExitFd,
    #[error("invalid ExitFD")]
    InvalidExitFd,
    #[error("missing ReadyFD")]
    MissingReadyFd,
    #[error("invalid ReadyFD")]
    InvalidReadyFd,
    #[error("unknown proto: {}", q(.0))]
    UnknownProto(String),
    #[error("unsupported proto: {} (rootlessport forwards tcp and udp only)", q(.0))]
    UnsupportedProto(String),
    #[error("invalid ParentIP: {}", q(.0))]
    InvalidParentIp(String),
    #[error("invalid ChildIP: {}", q(.0))]
    InvalidChildIp(String),
    #[error("invalid ParentPort: {0}")]
    InvalidParentPort(u32),
    #[error("invalid ChildPort: {0}")]
    InvalidChildPort(u32),
    #[error("invalid port range: {which} port {port} with range {range} goes past 65535")]
    RangePastEnd {
        which: &'static str,
        port: u16,
        range: u16,
    },
    #[error("conflict with ID {0}")]
    Conflict(u32),
    /// Making a listener failed (Go's `listen tcp ADDR: bind: REASON` shape).
    #[error("listen {proto} {addr}: {reason}")]
    Listen {
        proto: String,
        addr: String,
        reason: String,
    },
    #[error("cannot enter NetNSPath {}: {reason}", q(.path))]
    Netns { path: String, reason: String },
    #[error("reload socket {}: {reason}", q(.path))]
    ReloadSocket { path: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

/// An errno as Go prints it: `address already in use`, not `Address already in use (os
/// error 98)`.
pub fn errno_text(e: &io::Error) -> String {
    let text = match e.raw_os_error() {
        Some(code) => {
            let s = io::Error::from_raw_os_error(code).to_string();
            s.split(" (os error").next().unwrap_or(&s).to_owned()
        }
        None => e.to_string(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_like_go() {
        assert_eq!(
            errno_text(&io::Error::from_raw_os_error(libc::EADDRINUSE)),
            "address already in use"
        );
        assert_eq!(
            errno_text(&io::Error::from_raw_os_error(libc::EACCES)),
            "permission denied"
        );
        assert_eq!(
            errno_text(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)),
            "cannot assign requested address"
        );
    }
}
