use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::quote::go_quote;

/// Errors of option parsing, feature probing and argument building.
///
/// The Display texts of the option and argument errors are podman's, byte for byte
/// (values quoted with Go's `%q`), because users and scripts match on them: those of
/// `parseSlirp4netnsNetworkOptions` and `createBasicSlirp4netnsCmdArgs` in podman 4.x's
/// `libpod/networking_slirp4netns.go`. Each variant holding a `String` holds the value
/// as the user wrote it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option without `=`, or a key podman does not know.
    #[error("unknown option for slirp4netns: {}", go_quote(.0))]
    UnknownOption(String),
    /// `cidr=` that is not an IPv4 network in CIDR notation.
    #[error("invalid cidr {}", go_quote(.0))]
    InvalidCidr(String),
    /// `port_handler=` other than `slirp4netns` or `rootlesskit`.
    #[error("unknown port_handler for slirp4netns: {}", go_quote(.0))]
    UnknownPortHandler(String),
    /// `allow_host_loopback=` other than `true` or `false`.
    #[error("invalid value of allow_host_loopback for slirp4netns: {}", go_quote(.0))]
    InvalidAllowHostLoopback(String),
    /// `enable_ipv6=` other than `true` or `false`.
    #[error("invalid value of enable_ipv6 for slirp4netns: {}", go_quote(.0))]
    InvalidEnableIpv6(String),
    /// `outbound_addr=` that is neither an IPv4 address nor an interface in the
    /// caller's network namespace.
    #[error("invalid outbound_addr {}", go_quote(.0))]
    InvalidOutboundAddr(String),
    /// `outbound_addr6=` that is neither an IPv6 address nor an interface in the
    /// caller's network namespace.
    #[error("invalid outbound_addr6: {}", go_quote(.0))]
    InvalidOutboundAddr6(String),
    /// `mtu=` that is not a number from [`MIN_MTU`](crate::MIN_MTU) to
    /// [`MAX_MTU`](crate::MAX_MTU).
    #[error("invalid mtu {}", go_quote(.0))]
    InvalidMtu(String),

    /// `cidr=` was given, and the binary has no `--cidr`.
    #[error("cidr not supported")]
    CidrNotSupported,
    /// IPv6 is on, and the binary has no `--enable-ipv6`.
    #[error("enable_ipv6 not supported")]
    EnableIpv6NotSupported,
    /// `outbound_addr=` was given, and the binary has no `--outbound-addr` (before 1.1).
    #[error("outbound_addr not supported")]
    OutboundAddrNotSupported,
    /// `outbound_addr6=` was given, and the binary lacks `--outbound-addr` or
    /// `--enable-ipv6`.
    #[error("outbound_addr6 not supported")]
    OutboundAddr6NotSupported,
    /// `outbound_addr6=` was given with IPv6 off.
    #[error("enable_ipv6=true is required for outbound_addr6")]
    OutboundAddr6NeedsIpv6,

    /// A namespace path was given to a slirp4netns without `--netns-type` (before 0.4).
    /// Our text: podman names the namespace by PID then.
    #[error("netns-type=path not supported: this slirp4netns needs a PID")]
    NetnsTypeNotSupported,

    /// A user namespace was named, and the binary has no `--userns-path` (before 0.4).
    /// Our text: podman never passes the option.
    #[error("userns-path not supported")]
    UsernsPathNotSupported,

    /// A network string that is not `slirp4netns` or `slirp4netns:OPTIONS`.
    #[error("network mode {} is not slirp4netns (expected \"slirp4netns\" or \"slirp4netns:OPTIONS\")", go_quote(.0))]
    NotSlirpNetwork(String),

    /// Running the binary to probe it failed: `output` is everything it printed.
    #[error("slirp4netns {}: {} {}: {reason}", go_quote(.output), .binary.display(), .arg)]
    Probe {
        /// The binary that was run.
        binary: PathBuf,
        /// Its one argument: `--help` or `--version`.
        arg: &'static str,
        /// What it wrote to stdout and stderr together (at most 64 KiB).
        output: String,
        /// How it failed.
        #[source]
        reason: ProbeFailure,
    },
    /// The `--version` text did not have the shape slirp4netns prints.
    #[error("cannot parse version output of {}: {}", .binary.display(), go_quote(.output))]
    BadVersion {
        /// The binary that was run.
        binary: PathBuf,
        /// What it printed.
        output: String,
    },
}

/// How running a binary to probe it ([`Error::Probe`]) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeFailure {
    /// Starting it, or reading or waiting for it, failed (`ENOENT`, `EACCES`, ...).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// It did not finish within this time (it was killed).
    #[error("no answer within {} s", .0.as_secs())]
    NoAnswer(Duration),
    /// It ended with this status, not 0.
    #[error("{0}")]
    Status(ExitStatus),
}
