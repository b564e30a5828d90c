//! slirp4netns configuration as podman does it: the `slirp4netns:` options, feature
//! detection from the binary's `--help`, the command line, and the port model shared by
//! every port forwarder: podman's [`PortMapping`] wire type, its `-p` syntax, and its
//! expansion into checked single forwards ([`forwards`]).
//!
//! Error texts are podman's, byte for byte, with values quoted as Go's `%q` quotes them.
//!
//! ```
//! use slirp_config::{build_args, parse_network, parse_options, SlirpFeatures};
//! let opts = parse_options(parse_network("slirp4netns:mtu=1500,enable_ipv6=false")?)?;
//! let features = SlirpFeatures::from_help("--mtu=MTU --disable-host-loopback");
//! assert_eq!(build_args(&opts, &features)?, ["--disable-host-loopback", "--mtu=1500"]);
//! # Ok::<(), slirp_config::Error>(())
//! ```
//!
//! With the installed binary and a custom network:
//!
//! ```no_run
//! use slirp_config::{build_args, check_slirp_flags, parse_network, parse_options};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The engine's options first, then the container's `--network slirp4netns:...`.
//! let mut opts = vec!["mtu=1500".to_string()];
//! opts.extend(parse_network("slirp4netns:cidr=10.5.0.0/24,allow_host_loopback=true")?);
//! let opts = parse_options(&opts)?;
//! let features = check_slirp_flags("slirp4netns".as_ref())?; // runs --help once per binary
//! let args = build_args(&opts, &features)?; // ["--mtu=1500", "--enable-sandbox", ...]
//! let guest = netaddr::slirp4netns_ip(opts.cidr.as_ref())?; // 10.5.0.100
//! # let _ = (args, guest);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, clippy::missing_errors_doc)]

/// The README's example, compiled (and run unless `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;

mod args;
mod container_id;
mod error;
mod features;
mod netns;
mod network;
mod options;
mod port;
mod publish;
mod quote;

pub use args::{build_args, build_command_args, uses_sandbox, EXIT_FD, READY_FD, TAP_NAME};
pub use container_id::{check_container_id, BadContainerId, MAX_CONTAINER_ID_LEN};
pub use error::{Error, ProbeFailure};
pub use features::{
    check_slirp_flags, find_binary, slirp_version, SlirpFeatures, SlirpVersion, PROBE_TIMEOUT,
};
pub use netns::Netns;
/// The name [`Netns`] had before it became the one netns type of the workspace; kept so
/// that code written against it still builds.
#[deprecated(note = "use slirp_config::Netns")]
pub type NetnsTarget = Netns;
pub use network::parse_network;
pub use options::{parse_options, SlirpOptions, DEFAULT_MTU, MAX_MTU, MIN_MTU};
pub use port::{
    forwards, Family, Forwards, PortError, PortForward, PortMapping, PortRange, PortSide, Proto,
    Protocol,
};
pub use publish::{ParsePublishError, PublishSyntaxError};
pub use quote::go_quote;
