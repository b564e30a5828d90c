//! Starting slirp4netns for a network namespace, as podman does and then some.
//!
//! - [`Slirp4netns::start`] runs the binary with fd 3 = exit pipe (read end) and fd 4
//!   = ready pipe (write end) and nothing else leaked, its stdout and stderr in a log
//!   file that is unlinked at once, its own process group, a new mount namespace when
//!   the sandbox is on, `--netns-type=path` when given a path (else PID mode).
//! - Readiness and death are awaited together (poll on the ready pipe and a pidfd;
//!   without `pidfd_open`, before 5.3, the ready pipe in 20 ms slices with `waitpid`
//!   between them), under an overall deadline: a helper that dies is reported at once
//!   with its log.
//! - With IPv6 on, `accept_dad` is switched off inside the namespace during the launch
//!   (from a forked child that joined it, after the user namespace when one is given)
//!   and restored, even on failure.
//! - [`process`] is the reusable part: any helper (rootlessport too) is started with a
//!   stdin payload, chosen leaked fds and a log, and awaited the same way
//!   ([`process::Helper::await_ready`], [`DEFAULT_READY_TIMEOUT`]).
//! - [`Netns`] names a network namespace (by path or PID; it is
//!   [`slirp_config::Netns`]), [`open_netns`] opens it, checking that it is one, and
//!   [`in_netns`] runs code inside it on a throwaway thread.
//! - [`NetnsHolder`] is a process holding a network namespace (a fresh one, or one
//!   given by fd) and naming it by PID.
//! - [`reaper`] reaps helpers the engine lets run on.
//!
//! ```no_run
//! use slirp_spawn::{Netns, Slirp4netns, SlirpSpec};
//! let mut spec = SlirpSpec::new(Netns::Pid(4242), "/tmp", "mycontainer");
//! spec.options = slirp_config::parse_options(["mtu=1500", "allow_host_loopback=true"])?;
//! let slirp = Slirp4netns::start(&spec)?;
//! assert_eq!(slirp.guest_ip().to_string(), "10.0.2.100");
//! slirp.stop()?; // closes the exit pipe, reaps, removes the API socket
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs, clippy::missing_errors_doc)]

/// The README's example, compiled (and run unless `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;

mod error;
pub mod netns;
pub mod process;
pub mod reaper;
mod slirp;

pub use error::Error;
pub use netns::{in_netns, open_netns, DadGuard, Netns, NetnsHolder};
pub use process::DEFAULT_READY_TIMEOUT;
pub use slirp::{Slirp4netns, SlirpSpec, STOP_GRACE};
