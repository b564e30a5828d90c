//! A drop-in for podman 4.x's `rootlessport` helper, and the engine side of it.
//!
//! - The `rootlessport` binary reads podman's config JSON on stdin, listens on the
//!   host side for every published port (TCP and UDP, dual-stack wildcards like
//!   podman's), and forwards into the container's network namespace. One thread enters
//!   that namespace after the listeners are made, so every connection to the container
//!   is opened directly inside it; TCP bytes move with `splice(2)`.
//! - [`launcher`] starts the helper as podman does and waits for it (readiness and
//!   death together, with a deadline); [`reload`] has the reload client and the
//!   request format; [`child_ip`] picks the address to forward to.
//!
//! ```no_run
//! use rootlessport::{child_ip::{child_ip, ChildNetwork}, launcher::Launcher, Config};
//! use slirp_config::PortMapping;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config {
//!     mappings: vec![PortMapping { host_ip: "".into(), host_port: 8080, container_port: 80,
//!                                  range: 1, protocol: "tcp".into() }],
//!     netns_path: "/run/netns/ctr1".into(),
//!     tmp_dir: "/run/myengine".into(),
//!     child_ip: child_ip(ChildNetwork::Slirp4netns { subnet: None }),
//!     container_id: "ctr1".into(),
//!     ..Config::default()
//! };
//! // Close-on-exec, so that no other child of the engine holds the helper's exit pipe open.
//! let (exit_r, exit_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?; // exit_w: the container's monitor
//! let helper = Launcher::new("/usr/libexec/rootless-net/rootlessport").start(&config, exit_r)?;
//! helper.release();
//! # drop(exit_w); Ok(()) }
//! ```

pub mod child_ip;
pub mod config;
mod error;
pub mod forward;
pub mod launcher;
mod netlink;
pub mod reload;
mod routing;
mod source_ip;
mod tcp;
mod udp;

pub use config::Config;
pub use error::{errno_text, Error};
