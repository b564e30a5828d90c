//! The helper itself, for the `rootlessport` binary: what it runs once it has read its
//! config and taken its fds. An engine starts the binary with
//! [`Launcher`](crate::launcher::Launcher) instead.
//!
//! Two steps, so that the caller can act between them while the engine still reads
//! the helper's stderr: [`Helper::bind`] checks the config's ports and child IP
//! (before anything listens), opens the container's netns, makes every listener on the
//! host side and the reload socket; [`Helper::run`] enters the netns, serves every
//! port, calls `ready` once all are served, and returns when the exit pipe reads EOF or
//! on SIGTERM/SIGINT. [`Helper::bind_json`] does what `bind` does straight from the
//! config's JSON, binding the first ports while the rest is decoded (what the binary
//! uses).
//!
//! ```no_run
//! use std::os::fd::OwnedFd;
//! use rootlessport::helper::{Helper, Options};
//! # fn main() -> Result<(), rootlessport::Error> {
//! # let config = rootlessport::Config::default();
//! # let exit_fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
//! let helper = Helper::bind(&config, exit_fd, &Options::default())?;
//! let stopped = helper.run(|| {
//!     // Every port is served: tell the engine (write `1` to ReadyFD).
//!     Ok(())
//! })?;
//! # let _ = stopped; Ok(()) }
//! ```

use std::cell::RefCell;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use nix::sys::epoll::Epoll;
use slirp_config::PortMapping;

use crate::config::{parse_child_ip, plan_ports, Planner, PortSpec};
use crate::forward::{build_runtime, one_thread_runtime, Forwarder, StopSignals, DEFAULT_UDP_IDLE};
use crate::listen::{bind_all, Binding, Bound, FdRoom, Feed, Listen, CHUNK};
use crate::reload::server::ReloadSocket;
use crate::state::DEFAULT_PIPE_SIZE;
use crate::tcp::HubSet;
use crate::{Config, Error};

pub use crate::error::errno_text;
pub use crate::forward::Stopped;

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
    /// took them.
    ///
    /// # Errors
    ///
    /// The first failure, with the helper's one-line text: a port or child IP error,
    /// [`Error::Netns`] (also when a thread of a pool cannot enter it),
    /// [`Error::Listen`] (a port in use: `listen tcp 0.0.0.0:8080: bind: address
    /// already in use`), [`Error::Io`] (the event loop cannot start, or the SIGTERM and
    /// SIGINT handlers cannot be installed: see [`Helper::run`]),
    /// [`Error::ReloadSocket`]. Whatever was made is closed again.
    pub fn bind(config: &Config, exit_fd: OwnedFd, options: &Options) -> Result<Helper, Error> {
        let specs = plan_ports(&config.mappings)?;
        let child_ip = parse_child_ip(&config.child_ip)?;
        // Before anything is made: a stop signal from here on is kept until ready.
        let stop = StopSignals::catch()?;
        let netns = open_netns(config)?;
        let ports = specs.len();
        FdRoom::now().check(ports)?;
        let threads = options.threads.clamp(1, 64);
        let rt = build_runtime(threads, &netns, &config.netns_path)?;
        let hub = Hub::joined(&rt)?;
        let bound = bind_all(specs, Some(hub.epoll()))?;
        let start = Start {
            stop,
            netns,
            rt,
            bound,
            child_ip,
            ports,
        };
        start.into_helper(hub, config, exit_fd, options)
    }

    /// [`Config::from_json`] and [`Helper::bind`] at once, faster with many ports: the
    /// listeners of the first mappings are made while the rest of `json` is still being
    /// decoded (by the binding threads that `bind` uses for many ports, two to four;
    /// the calling thread joins them once the decode is done).
    /// `take` is called with the decoded config before its ports are checked (the
    /// `rootlessport` binary takes its `ExitFD` and `ReadyFD` there, as podman's helper
    /// does at that point); it returns the exit pipe's read end and anything the caller
    /// wants back. Returns the helper, the config and what `take` returned.
    ///
    /// Errors come in the order of `from_json`, `take`, then `bind`, and whatever was
    /// made is closed first: a listener made early for a config that turns out to be
    /// wrong further on listens only until the error is found (a few milliseconds with
    /// 10,000 ports).
    ///
    /// # Errors
    ///
    /// The first failure: [`Config::from_json`]'s, `take`'s, then [`Helper::bind`]'s.
    pub fn bind_json<T>(
        json: &[u8],
        options: &Options,
        take: impl FnOnce(&Config) -> Result<(OwnedFd, T), Error>,
    ) -> Result<(Helper, Config, T), Error> {
        // Before anything is made: a stop signal from here on is kept until ready.
        let stop = StopSignals::catch()?;
        let mut room = FdRoom::now();
        let threads = options.threads.clamp(1, 64);
        // One event-loop thread needs nothing from the config: the loop is made first,
        // and the hub's set joins it while empty. A pool's threads enter the netns as
        // they start, so a pool waits for the config, and its set joins once full.
        let early_rt = if threads == 1 {
            Some(one_thread_runtime()?)
        } else {
            None
        };
        let hub = match &early_rt {
            Some(rt) => Hub::joined(rt)?,
            None => Hub::Unjoined(HubSet::unjoined().map_err(hub_error)?),
        };
        let (config, exit_fd, taken, start) = std::thread::scope(|scope| {
            let estimate = json.len() / MAPPING_JSON_BYTES;
            let binding = Binding::start(scope, estimate, Some(hub.epoll()), Listen::AtFinish);
            let planned = Rc::new(RefCell::new(Planned {
                planner: Planner::with_capacity(estimate),
                ..Planned::default()
            }));
            let each = {
                let planned = planned.clone();
                let feed = binding.feed().clone();
                move |mapping: &PortMapping| planned.borrow_mut().plan(mapping, &feed)
            };
            let (config, streamed) = Config::from_json_each(json, Box::new(each))?;
            let (exit_fd, taken) = take(&config)?;
            let planned = planned.take();
            let (binding, ports) = if streamed {
                if let Some(e) = planned.failed {
                    return Err(e);
                }
                binding.feed().send(planned.pending);
                (binding, planned.planner.planned())
            } else {
                // The decode that planned did not make this config: start over from it.
                drop(binding);
                let specs = plan_ports(&config.mappings)?;
                let binding =
                    Binding::start(scope, specs.len(), Some(hub.epoll()), Listen::AtFinish);
                let ports = specs.len();
                binding.feed().send(specs);
                (binding, ports)
            };
            let child_ip = parse_child_ip(&config.child_ip)?;
            let netns = open_netns(&config)?;
            room.opened(1);
            room.check(ports)?;
            let rt = match early_rt {
                Some(rt) => rt,
                None => build_runtime(threads, &netns, &config.netns_path)?,
            };
            let bound = binding.finish()?;
            let start = Start {
                stop,
                netns,
                rt,
                bound,
                child_ip,
                ports,
            };
            Ok((config, exit_fd, taken, start))
        })?;
        let helper = start.into_helper(hub, &config, exit_fd, options)?;
        Ok((helper, config, taken))
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

/// About the fewest bytes a mapping takes in JSON (`{"host_port":1,"container_port":1}`;
/// podman writes all five keys, ~80 bytes): the input's length over this is at least
/// the number of ports, short of ranges.
const MAPPING_JSON_BYTES: usize = 32;

/// The mappings planned so far while the config is decoded, and the specs not yet
/// handed to the binding threads.
#[derive(Default)]
struct Planned {
    planner: Planner,
    pending: Vec<PortSpec>,
    /// The first failure; later mappings are not planned.
    failed: Option<Error>,
}

impl Planned {
    /// Plan `mapping`; hand the specs on to `feed` a [`CHUNK`] at a time.
    fn plan(&mut self, mapping: &PortMapping, feed: &Feed) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.planner.plan(mapping, &mut self.pending) {
            self.failed = Some(e);
        } else if self.pending.len() >= CHUNK {
            feed.send(std::mem::take(&mut self.pending));
        }
    }
}

/// The accept hub's epoll set, joined to the event loop before the listeners go in
/// when the event loop can be made first (see [`HubSet`]).
enum Hub {
    Joined(HubSet),
    Unjoined(Epoll),
}

impl Hub {
    /// A new set, joined to `rt`'s event loop while empty.
    fn joined(rt: &tokio::runtime::Runtime) -> Result<Hub, Error> {
        let _in_rt = rt.enter();
        let set = HubSet::unjoined().and_then(HubSet::join);
        Ok(Hub::Joined(set.map_err(hub_error)?))
    }

    /// The set, for the binding threads to put the TCP listeners in.
    fn epoll(&self) -> &Epoll {
        match self {
            Hub::Joined(set) => set.epoll(),
            Hub::Unjoined(set) => set,
        }
    }
}

/// What both ways of starting end with, beside the hub's set.
struct Start {
    stop: StopSignals,
    netns: OwnedFd,
    rt: tokio::runtime::Runtime,
    bound: Vec<Bound>,
    child_ip: Option<IpAddr>,
    ports: usize,
}

impl Start {
    /// Join `hub` (the accept hub's set, holding the TCP listeners) to the event loop
    /// unless it is already, make the reload and control socket, and assemble the
    /// helper.
    fn into_helper(
        self,
        hub: Hub,
        config: &Config,
        exit_fd: OwnedFd,
        options: &Options,
    ) -> Result<Helper, Error> {
        let hub_set = match hub {
            Hub::Joined(set) => set,
            Hub::Unjoined(set) => {
                let _in_rt = self.rt.enter();
                HubSet::join(set).map_err(hub_error)?
            }
        };
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
            rt: self.rt,
            bound: self.bound,
            hub_set,
            netns: self.netns,
            netns_path: config.netns_path.clone(),
            child_ip: self.child_ip,
            exit_fd,
            reload,
            udp_idle: options.udp_idle,
            pipe_size: options.pipe_size,
            preserve_source: config.preserve_source_ip && options.preserve_source_ip,
            exit_after: options.exit_after_run,
            container_id: config.container_id.clone(),
            stop: self.stop,
        };
        Ok(Helper {
            forwarder,
            ports: self.ports,
        })
    }
}

fn hub_error(source: std::io::Error) -> Error {
    Error::Io {
        what: "making the epoll set of the TCP listeners",
        source,
    }
}

/// Open the config's `NetNSPath`.
fn open_netns(config: &Config) -> Result<OwnedFd, Error> {
    slirp_spawn::open_netns(&slirp_spawn::Netns::Path(config.netns_path.clone().into())).map_err(
        |e| Error::Netns {
            path: config.netns_path.clone(),
            source: match e {
                slirp_spawn::Error::OpenNetns { source, .. } => source,
                other => std::io::Error::other(other),
            },
        },
    )
}
