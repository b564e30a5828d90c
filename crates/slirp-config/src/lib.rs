//! slirp4netns configuration as podman does it: the `slirp4netns:` options, feature
//! detection from the binary's `--help`, the command line, and the port mapping type
//! shared by every port forwarder.
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

mod args;
mod error;
mod features;
mod network;
mod options;
mod port;
mod quote;

pub use args::{
    build_args, build_command_args, uses_sandbox, NetnsTarget, EXIT_FD, READY_FD, TAP_NAME,
};
pub use error::Error;
pub use features::{
    check_slirp_flags, find_binary, slirp_version, SlirpFeatures, SlirpVersion, PROBE_TIMEOUT,
};
pub use network::parse_network;
pub use options::{parse_options, SlirpOptions, DEFAULT_MTU, MAX_MTU, MIN_MTU};
pub use port::PortMapping;
pub use quote::go_quote;
