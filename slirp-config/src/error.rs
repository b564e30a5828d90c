use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::quote::go_quote;

/// Errors of option parsing, feature probing and argument building.
///
/// The Display texts of the option and argument errors are podman's, byte for byte
/// (values quoted with Go's `%q`), because users and scripts match on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option without `=`, or a key podman does not know.
    #[error("unknown option for slirp4netns: {}", go_quote(.0))]
    UnknownOption(String),
    #[error("invalid cidr {}", go_quote(.0))]
    InvalidCidr(String),
    #[error("unknown port_handler for slirp4netns: {}", go_quote(.0))]
    UnknownPortHandler(String),
    #[error("invalid value of allow_host_loopback for slirp4netns: {}", go_quote(.0))]
    InvalidAllowHostLoopback(String),
    #[error("invalid value of enable_ipv6 for slirp4netns: {}", go_quote(.0))]
    InvalidEnableIpv6(String),
    #[error("invalid outbound_addr {}", go_quote(.0))]
    InvalidOutboundAddr(String),
    #[error("invalid outbound_addr6: {}", go_quote(.0))]
    InvalidOutboundAddr6(String),
    #[error("invalid mtu {}", go_quote(.0))]
    InvalidMtu(String),

    #[error("cidr not supported")]
    CidrNotSupported,
    #[error("enable_ipv6 not supported")]
    EnableIpv6NotSupported,
    #[error("outbound_addr not supported")]
    OutboundAddrNotSupported,
    #[error("outbound_addr6 not supported")]
    OutboundAddr6NotSupported,
    #[error("enable_ipv6=true is required for outbound_addr6")]
    OutboundAddr6NeedsIpv6,

    /// A namespace path was given to a slirp4netns without `--netns-type`.
    #[error("netns-type=path not supported: this slirp4netns needs a PID")]
    NetnsTypeNotSupported,

    #[error("userns-path not supported")]
    UsernsPathNotSupported,

    /// A network string that is not `slirp4netns` or `slirp4netns:OPTIONS`.
    #[error("network mode {} is not slirp4netns (expected \"slirp4netns\" or \"slirp4netns:OPTIONS\")", go_quote(.0))]
    NotSlirpNetwork(String),

    /// Running the binary to probe it failed: `output` is everything it printed.
    #[error("slirp4netns {}: {} {}: {reason}", go_quote(.output), .binary.display(), .arg)]
    Probe {
        binary: PathBuf,
        arg: &'static str,
        output: String,
        #[source]
        reason: ProbeFailure,
    },
    /// The `--version` text did not have the shape slirp4netns prints.
    #[error("cannot parse version output of {}: {}", .binary.display(), go_quote(.output))]
    BadVersion { binary: PathBuf, output: String },
}

/// How running a binary to probe it ([`Error::Probe`]) failed.
#[derive(Debug, thiserror::Error)]
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
