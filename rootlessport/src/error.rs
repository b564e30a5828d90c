use std::io;

use slirp_config::go_quote as q;

/// Everything that can stop the helper before it is ready. The Display text is the one
/// line the helper prints on stdout (podman shows it as `rootlessport <line>`, see
/// [`LaunchError::Reported`](crate::launcher::LaunchError::Reported)), in podman's and
/// RootlessKit's words where they have words for it (RootlessKit's
/// `pkg/port/portutil.ValidatePortSpec`, podman's `pkg/rootlessport`). An OS error
/// behind a failure is its [`source`](std::error::Error::source), and its text (as Go
/// prints an errno: `address already in use`) ends the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The config is empty or blank: Go's decoder's `unexpected end of JSON input`.
    #[error("unexpected end of JSON input")]
    EmptyConfig,
    /// The config is JSON but not an object.
    #[error("invalid config JSON: expected an object")]
    NotAnObject,
    /// The config does not decode: `invalid config JSON: ` and serde's reason.
    #[error("invalid config JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// `NetNSPath` is empty.
    #[error("missing NetNSPath")]
    MissingNetNsPath,
    /// `ExitFD` is 0 or negative.
    #[error("missing ExitFD")]
    MissingExitFd,
    /// `ExitFD` is not an open pipe or socket.
    #[error("invalid ExitFD")]
    InvalidExitFd,
    /// `ReadyFD` is 0 or negative.
    #[error("missing ReadyFD")]
    MissingReadyFd,
    /// `ReadyFD` is not an open pipe or socket, or is `ExitFD`.
    #[error("invalid ReadyFD")]
    InvalidReadyFd,
    /// A protocol that is none of `tcp`, `tcp4`, `tcp6`, `udp`, `udp4`, `udp6` (nor
    /// `sctp`): `unknown proto: "X"`.
    #[error("unknown proto: {}", q(.0))]
    UnknownProto(String),
    /// `sctp` (with its suffix, if any), which RootlessKit lets pass and then cannot
    /// forward; ours says so.
    #[error("unsupported proto: {} (rootlessport forwards tcp and udp only)", q(.0))]
    UnsupportedProto(String),
    /// A host IP that is not an IP address.
    #[error("invalid ParentIP: {}", q(.0))]
    InvalidParentIp(String),
    /// A child IP (config or reload) that is neither empty nor an IP address.
    #[error("invalid ChildIP: {}", q(.0))]
    InvalidChildIp(String),
    /// A host port of 0.
    #[error("invalid ParentPort: {0}")]
    InvalidParentPort(u32),
    /// A container port of 0.
    #[error("invalid ChildPort: {0}")]
    InvalidChildPort(u32),
    /// A range whose last port is past 65535 (podman's helper wraps around; ours
    /// refuses). `which` is `host` or `container`.
    #[error("invalid port range: {which} port {port} with range {range} goes past 65535")]
    RangePastEnd {
        /// `host` or `container`.
        which: &'static str,
        /// The first port of the range.
        port: u16,
        /// The number of ports.
        range: u16,
    },
    /// The same protocol, host IP and host port as the port with this 1-based ID.
    #[error("conflict with ID {0}")]
    Conflict(u32),
    /// More published ports than the open-file limit leaves room for: each listening
    /// socket is an open file. Checked before any port is bound (podman's helper fails
    /// part-way with `listen tcp ADDR: socket: too many open files`).
    #[error(
        "{ports} published port(s) need {ports} open files, but the open-file limit \
         (RLIMIT_NOFILE, raised to its hard limit) is {limit}, with {open} files already \
         open and {reserve} kept for the helper's own use: raise the hard limit \
         (ulimit -Hn, systemd's LimitNOFILE=) or publish fewer ports"
    )]
    TooManyPorts {
        /// Listening sockets the config asks for.
        ports: usize,
        /// The soft open-file limit (already raised to the hard one by the helper binary).
        limit: u64,
        /// Files open when the check ran.
        open: usize,
        /// Files kept free for the event loop, control socket and first connections.
        reserve: usize,
    },
    /// Making a listener failed, in Go's `listen tcp ADDR: bind: REASON` shape: the
    /// call that failed (`socket`, `setsockopt`, `bind`, `listen`) and its OS error,
    /// or why the address does not suit the protocol (`not an IPv4 address`).
    #[error("listen {proto} {addr}: {reason}{}", cause(.source))]
    Listen {
        /// The protocol as given (`tcp`, `udp6`, ...).
        proto: String,
        /// `HOST:PORT` as Go prints it (`[::1]:80`).
        addr: String,
        /// The call that failed, or what is wrong with the address.
        reason: &'static str,
        /// The OS error of that call.
        #[source]
        source: Option<io::Error>,
    },
    /// The container's netns could not be opened or entered.
    #[error("cannot enter NetNSPath {}: {}", q(.path), errno_text(.source))]
    Netns {
        /// `NetNSPath`.
        path: String,
        /// Why (`no such file or directory`, `not a network namespace`, ...).
        #[source]
        source: io::Error,
    },
    /// The reload socket could not be made: what failed (`mkdir DIR`, `bind`, `invalid
    /// ContainerID "X"`, ...) and the OS error, when there is one.
    #[error("reload socket {}: {reason}{}", q(.path), cause(.source))]
    ReloadSocket {
        /// `TmpDir/rp/<ContainerID>`.
        path: String,
        /// What failed, or what is wrong.
        reason: String,
        /// The OS error of that step.
        #[source]
        source: Option<io::Error>,
    },
    /// Anything else the helper does before ready: what it was doing and the OS error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (`starting the event loop`, `writing to ReadyFD`, ...).
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// `: ` and the errno text of `source`, or nothing.
fn cause(source: &Option<io::Error>) -> String {
    source
        .as_ref()
        .map_or_else(String::new, |e| format!(": {}", errno_text(e)))
}

/// An errno as Go prints it: `address already in use`, not `Address already in use (os
/// error 98)`; an error without an errno as it displays, its first letter made lower
/// case.
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
        assert_eq!(
            errno_text(&io::Error::other("Not a network namespace")),
            "not a network namespace"
        );
    }

    #[test]
    fn os_errors_are_sources_and_end_the_line() {
        use std::error::Error as _;
        let listen = Error::Listen {
            proto: "tcp".into(),
            addr: "0.0.0.0:80".into(),
            reason: "bind",
            source: Some(io::Error::from_raw_os_error(libc::EADDRINUSE)),
        };
        assert_eq!(
            listen.to_string(),
            "listen tcp 0.0.0.0:80: bind: address already in use"
        );
        let cause = listen.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(
            cause.and_then(io::Error::raw_os_error),
            Some(libc::EADDRINUSE)
        );
        let family = Error::Listen {
            proto: "udp6".into(),
            addr: "127.0.0.1:80".into(),
            reason: "not an IPv6 address",
            source: None,
        };
        assert_eq!(
            family.to_string(),
            "listen udp6 127.0.0.1:80: not an IPv6 address"
        );
        assert!(family.source().is_none());
        let netns = Error::Netns {
            path: "/run/netns/x".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            netns.to_string(),
            r#"cannot enter NetNSPath "/run/netns/x": no such file or directory"#
        );
        assert!(netns.source().is_some());
        let reload = Error::ReloadSocket {
            path: "/t/rp/c".into(),
            reason: "mkdir /t/rp".into(),
            source: Some(io::Error::from_raw_os_error(libc::EACCES)),
        };
        assert_eq!(
            reload.to_string(),
            r#"reload socket "/t/rp/c": mkdir /t/rp: permission denied"#
        );
        assert!(reload.source().is_some());
        let refused = Error::ReloadSocket {
            path: "/t/rp/..".into(),
            reason: r#"invalid ContainerID "..""#.into(),
            source: None,
        };
        assert_eq!(
            refused.to_string(),
            r#"reload socket "/t/rp/..": invalid ContainerID "..""#
        );
    }
}
