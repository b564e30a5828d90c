//! The helper itself, for the `rootlessport` binary: what it runs once it has read its
//! config and taken its fds. An engine starts the binary with
//! [`Launcher`](crate::launcher::Launcher) instead.
//!
//! Two steps, so that the caller can act between them while the engine still reads
//! the helper's stderr: [`Helper::bind`] checks the config's ports and child IP
//! (before anything listens), opens the container's netns, makes every listener on the
//! host side and the reload socket; [`Helper::run`] enters the netns, serves every
//! port, calls `ready` once all are served, and returns when the exit pipe reads EOF or
//! on SIGTERM/SIGINT.
//!
//! ```no_run
//! use std::os::fd::OwnedFd;
//! use rootlessport::helper::{Helper, Options};
//! # fn main() -> Result<(), rootlessport::Error> {
//! # let config = rootlessport::Config::default();
//! # let exit_fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
//! let helper = Helper::bind(config, exit_fd, &Options::default())?;
//! let stopped = helper.run(|| {
//!     // Every port is served: tell the engine (write `1` to ReadyFD).
//!     Ok(())
//! })?;
//! # let _ = stopped; Ok(()) }
//! ```

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use crate::config::{parse_child_ip, plan_ports};
use crate::forward::{build_runtime, Forwarder, StopSignals, DEFAULT_UDP_IDLE};
use crate::listen::{bind_all, check_fd_room};
use crate::reload::server::ReloadSocket;
use crate::state::DEFAULT_PIPE_SIZE;
use crate::tcp::HubSet;
use crate::{Config, Error};

pub use crate::error::errno_text;
pub use crate::forward::Stopped;
pub use crate::listen::{grow_fd_table, raise_nofile_limit};

/// How the helper forwards, beyond what podman's config says (the binary reads them
/// from its environment, `ROOTLESSPORT_*`). New options may come: start from
/// [`Options::default`] and set fields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// How long a UDP flow may be idle before it is closed. Default 90 s, podman's.
    pub udp_idle: Duration,
    /// Event-loop threads, each inside the container's netns; 1 (the default, which
    /// measured best on 2 cores) serves everything on the thread calling
    /// [`Helper::run`]. Taken as 1 to 64.
    pub threads: usize,
    /// Bytes moved per `splice(2)` call at most, and the pipe size asked of the kernel
    /// (which may give less). Default 256 KiB; at least 4 KiB is used.
    pub pipe_size: usize,
    /// Keep the client's address and port for the container to see, where the netns
    /// and the kernel allow (see the crate's README). Default `true`; a config with
    /// `PreserveSourceIP: false` turns it off too.
    pub preserve_source_ip: bool,
    /// The process exits as soon as [`Helper::run`] returns: the sockets are left to
    /// the kernel to close at exit rather than closed one by one (much faster with
    /// thousands). Default `false`: everything is closed before `run` returns.
    pub exit_after_run: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            udp_idle: DEFAULT_UDP_IDLE,
            threads: 1,
            pipe_size: DEFAULT_PIPE_SIZE,
            preserve_source_ip: true,
            exit_after_run: false,
        }
    }
}

/// A helper whose ports all listen, ready to [`run`](Helper::run).
pub struct Helper {
    forwarder: Forwarder,
    ports: usize,
}

impl Helper {
    /// Everything before serving, in podman's helper's order: the config's ports
    /// checked and expanded (see [`Config::check_ports`]), its child IP parsed, the
    /// container's netns opened, the event loop built ([`Options::threads`]), a
    /// listener made for each port (in the caller's netns; the TCP ones put into the
    /// event loop's accept set as they are made), and the reload and control socket at
    /// `TmpDir/rp/<ContainerID>` (see [`crate::control`]; without `RootlessCNI`, a
    /// failure to make it is a warning). `exit_fd` is the exit pipe's read end
    /// (`ExitFD`). The config's `ExitFD` and `ReadyFD` are not looked at: the caller
    /// took them. The config is taken so that its mappings are freed as soon as they
    /// are planned, before the listeners' records are made (at 10,000 ports those
    /// reuse the mappings' half megabyte instead of faulting in more); a caller that
    /// wants it afterwards (to report or retry a failure) passes a clone.
    ///
    /// # Errors
    ///
    /// The first failure, with the helper's one-line text: a port or child IP error,
    /// [`Error::Netns`] (also when a thread of a pool cannot enter it),
    /// [`Error::Listen`] (a port in use: `listen tcp 0.0.0.0:8080: bind: address
    /// already in use`), [`Error::Io`] (the event loop cannot start, or the SIGTERM and
    /// SIGINT handlers cannot be installed: see [`Helper::run`]),
    /// [`Error::ReloadSocket`]. Whatever was made is closed again.
    pub fn bind(mut config: Config, exit_fd: OwnedFd, options: &Options) -> Result<Helper, Error> {
        let specs = plan_ports(&config.mappings)?;
        drop(std::mem::take(&mut config.mappings));
        let child_ip = parse_child_ip(&config.child_ip)?;
        // Before anything is made: a stop signal from here on is kept until ready.
        let stop = StopSignals::catch()?;
        let netns =
            slirp_spawn::open_netns(&slirp_spawn::Netns::Path(config.netns_path.clone().into()))
                .map_err(|e| Error::Netns {
                    path: config.netns_path.clone(),
                    source: match e {
                        slirp_spawn::Error::OpenNetns { source, .. } => source,
                        other => std::io::Error::other(other),
                    },
                })?;
        let ports = specs.len();
        check_fd_room(ports)?;
        let threads = options.threads.clamp(1, 64);
        let rt = build_runtime(threads, &netns, &config.netns_path)?;
        // The accept hub's epoll set, joined to the event loop while empty; each TCP
        // listener goes into it from the thread that binds it.
        let hub_set = {
            let _in_rt = rt.enter();
            HubSet::new().map_err(|source| Error::Io {
                what: "making the epoll set of the TCP listeners",
                source,
            })?
        };
        let bound = bind_all(specs, Some(hub_set.epoll()))?;
        let tmp_dir = Path::new(&config.tmp_dir);
        let reload = if config.rootless_cni {
            // podman reloads through it: without it the helper fails, as podman's does.
            Some(ReloadSocket::bind(tmp_dir, &config.container_id)?)
        } else if config.tmp_dir.is_empty() || config.container_id.is_empty() {
            tracing::debug!("no TmpDir or ContainerID: no control socket");
            None
        } else {
            // Only for control (podman does not expect it): the helper runs without it
            // rather than fail where podman's would not.
            match ReloadSocket::bind_if_free(tmp_dir, &config.container_id) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("no control socket: {e}");
                    None
                }
            }
        };
        let forwarder = Forwarder {
            rt,
            bound,
            hub_set,
            netns,
            netns_path: config.netns_path,
            child_ip,
            exit_fd,
            reload,
            udp_idle: options.udp_idle,
            pipe_size: options.pipe_size,
            preserve_source: config.preserve_source_ip && options.preserve_source_ip,
            exit_after: options.exit_after_run,
            container_id: config.container_id,
            stop,
        };
        Ok(Helper { forwarder, ports })
    }

    /// The number of ports listening (each protocol of each mapping, times its range).
    pub fn ports(&self) -> usize {
        self.ports
    }

    /// Where connections go: the config's child IP, `None` for the netns's loopback.
    pub fn child_ip(&self) -> Option<IpAddr> {
        self.forwarder.child_ip
    }

    /// Enter the container's netns on this thread, serve every port, call `ready` once
    /// all are served, and return when the exit pipe reads EOF (the container is gone)
    /// or on SIGTERM or SIGINT. Client addresses are kept where possible (one warning
    /// line when they cannot be); the state put into the netns for that is removed
    /// before this returns.
    ///
    /// SIGTERM and SIGINT are caught for the whole process from the start of
    /// [`Helper::bind`] (`signal-hook`'s handlers, whichever thread the kernel gives them
    /// to; no signal mask changes) until this returns or the helper is dropped: one that
    /// comes while starting stops the helper right after `ready`, with everything it made
    /// removed. The handler stays installed afterwards, so a later SIGTERM or SIGINT is
    /// ignored: this is meant for a process of its own, as the `rootlessport` binary is.
    ///
    /// # Errors
    ///
    /// [`Error::Netns`] when the netns cannot be entered, [`Error::Io`] when the event
    /// loop cannot start, and whatever `ready` returns.
    pub fn run(self, ready: impl FnOnce() -> Result<(), Error>) -> Result<Stopped, Error> {
        self.forwarder.run(ready)
    }
}
