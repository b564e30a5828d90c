//! A drop-in for podman 4.x's `rootlessport` helper, and the engine side of it.
//!
//! - The `rootlessport` binary reads podman's config JSON on stdin, listens on the
//!   host side for every published port (TCP and UDP, dual-stack wildcards like
//!   podman's), and forwards into the container's network namespace. One thread enters
//!   that namespace after the listeners are made, so every connection to the container
//!   is opened directly inside it; TCP bytes move with `splice(2)`.
//!
//! What an engine uses:
//!
//! - [`Config`]: the helper's input, podman's JSON (its ports are
//!   [`slirp_config::PortMapping`]s), and [`Error`], the helper's one-line errors;
//! - [`launcher`]: starts the helper as podman does and waits for it (readiness and
//!   death together, with a deadline);
//! - [`reload`]: tells a running helper the container's new address;
//! - [`control`]: lists a running helper's published ports with their counters, and
//!   adds or removes ports while it runs (on the same socket);
//! - [`child_ip`]: picks the address to forward to, as podman does.
//!
//! [`helper`] is the binary's own entry point (the forwarder in this process).
//!
//! ```no_run
//! use rootlessport::{child_ip::{child_ip, ChildNetwork}, launcher::Launcher, Config};
//! use slirp_config::PortMapping;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ip = child_ip(ChildNetwork::Slirp4netns { subnet: None });   // 10.0.2.100
//! let config = Config::new("ctr1", "/run/netns/ctr1", ip, "/run/myengine")
//!     .with_mappings(vec![PortMapping::new("", 8080, 80, 1, "tcp")]);
//! // Close-on-exec, so that no other child of the engine holds the helper's exit pipe open.
//! let (exit_r, exit_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?; // exit_w: the container's monitor
//! let helper = Launcher::new("/usr/libexec/rootless-net/rootlessport").start(&config, exit_r)?;
//! helper.release();
//! # drop(exit_w); Ok(()) }
//! ```

#![warn(missing_docs, clippy::missing_errors_doc)]

/// The README's example, compiled (and run unless `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;

pub mod child_ip;
mod config;
pub mod control;
mod counters;
mod error;
mod flow_budget;
mod forward;
mod heap_trim;
pub mod helper;
pub mod launcher;
mod listen;
mod netlink;
pub mod reload;
mod routing;
mod source_ip;
mod state;
mod tcp;
mod udp;

pub use config::Config;
pub use error::Error;

/// What the fuzz targets (`fuzz/`, built by `cargo fuzz` with `--cfg fuzzing`) reach
/// beyond the public API; absent from every other build.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// The helper's decoder of control requests (JSON objects).
    pub fn parse_control_request(msg: &[u8]) -> Result<crate::control::Request, String> {
        crate::control::parse_request(msg)
    }
    pub use crate::reload::server::parse_request;
}
