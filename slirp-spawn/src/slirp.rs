//! slirp4netns for one network namespace: podman's `setupSlirp4netns`, with readiness
//! and death awaited together and an overall deadline.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netaddr::Ipv4Net;
use slirp_config::{
    build_command_args, check_container_id, check_slirp_flags, find_binary, uses_sandbox,
    SlirpFeatures, SlirpOptions, EXIT_FD, READY_FD,
};

use crate::netns::{open_netns, DadGuard, Netns, NetnsHolder};
use crate::process::{Helper, HelperCommand, LogFile, NotReady, DEFAULT_READY_TIMEOUT};
use crate::Error;
/// How long [`Slirp4netns::stop`] waits for the helper after closing its exit pipe,
/// before SIGTERM, and again before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// What to start slirp4netns for: the arguments of podman's `setupSlirp4netns`
/// (`libpod/networking_slirp4netns.go`), as a value. [`SlirpSpec::new`] gives
/// podman's defaults; set the public fields to change them.
///
/// ```no_run
/// use slirp_spawn::{Netns, SlirpSpec, Slirp4netns};
/// let spec = SlirpSpec::new(Netns::Path("/run/netns/ctr1".into()), "/run/user/1000/libpod/tmp", "ctr1");
/// let slirp = Slirp4netns::start(&spec)?;
/// println!("guest {} via {}", slirp.guest_ip(), slirp.gateway());
/// slirp.stop()?;
/// # Ok::<(), slirp_spawn::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SlirpSpec {
    /// The binary; `None` finds `slirp4netns` in `PATH`.
    pub binary: Option<PathBuf>,
    /// The network namespace to serve. A [`Netns::Path`] is passed as
    /// `--netns-type=path PATH`; to a binary without that option, a process holding
    /// the namespace names it by PID until slirp4netns is ready.
    pub netns: Netns,
    /// The `slirp4netns:` options ([`slirp_config::parse_options`]); default
    /// [`SlirpOptions::default`], podman's.
    pub options: SlirpOptions,
    /// Where the (immediately unlinked) log file and the default API socket go.
    pub tmp_dir: PathBuf,
    /// Names the log file and the default API socket; no `/`, not empty.
    pub container_id: String,
    /// Where slirp4netns listens for API requests. `None` means none, unless the
    /// options ask for slirp4netns port forwarding, which gets `TMPDIR/<ID>.net`.
    pub api_socket: Option<PathBuf>,
    /// The overall deadline for readiness, counted from the start call; default
    /// [`DEFAULT_READY_TIMEOUT`] (10 s).
    pub ready_timeout: Duration,
    /// The user namespace owning `netns`, for a caller without privilege over it
    /// (rootless; e.g. `/proc/PID/ns/user` of the engine's namespace holder). The DAD
    /// sysctl is then set from inside it, and slirp4netns runs in it (as root there,
    /// as under rootless podman) and is also given `--userns-path`. The caller's uid
    /// must be mapped to 0 in it.
    pub userns: Option<PathBuf>,
}

impl SlirpSpec {
    /// podman's defaults for a namespace, a tmp dir and a container id.
    pub fn new(netns: Netns, tmp_dir: impl Into<PathBuf>, container_id: impl Into<String>) -> Self {
        SlirpSpec {
            binary: None,
            netns,
            options: SlirpOptions::default(),
            tmp_dir: tmp_dir.into(),
            container_id: container_id.into(),
            api_socket: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            userns: None,
        }
    }

    /// Ask for an API socket at `TMPDIR/<ID>.net`, podman's place for it.
    pub fn with_api_socket(mut self) -> Self {
        self.api_socket = Some(self.default_api_socket());
        self
    }

    fn default_api_socket(&self) -> PathBuf {
        self.tmp_dir.join(format!("{}.net", self.container_id))
    }

    /// `e`, with a hint to set [`SlirpSpec::userns`] when it is a refusal (`EPERM`)
    /// and none was given.
    fn hint_userns(&self, e: Error) -> Error {
        let refused = match &e {
            Error::Sysctl { source, .. } | Error::Spawn { source, .. } => {
                source.raw_os_error() == Some(libc::EPERM)
            }
            _ => false,
        };
        if refused && self.userns.is_none() {
            Error::NeedsUserns { inner: Box::new(e) }
        } else {
            e
        }
    }

    fn api_socket_path(&self) -> Option<PathBuf> {
        match &self.api_socket {
            Some(p) => Some(p.clone()),
            None if self.options.is_slirp_host_forward => Some(self.default_api_socket()),
            None => None,
        }
    }
}

/// A running slirp4netns serving one network namespace.
///
/// Dropping it stops it as [`Slirp4netns::stop`] does (closing the exit pipe, waiting a
/// bounded time, then signals), reaps it and removes its API socket file, so nothing is
/// left behind; errors on that path are only logged. [`Slirp4netns::release`] lets it
/// run on instead.
#[derive(Debug)]
pub struct Slirp4netns {
    helper: Helper,
    exit_w: Option<OwnedFd>,
    api_socket: Option<PathBuf>,
    subnet: Ipv4Net,
    guest: Ipv4Addr,
    gateway: Ipv4Addr,
    dns: Ipv4Addr,
    ipv6: bool,
    features: SlirpFeatures,
    ready_after: Duration,
    released: bool,
}

impl Slirp4netns {
    /// Start slirp4netns for `spec.netns` and wait until it has configured `tap0`:
    /// podman's `setupSlirp4netns` up to its `waitForSync`, with the command line of
    /// [`slirp_config::build_command_args`] and fds 3 (exit pipe, read end) and 4
    /// (ready pipe, write end) as the only ones leaked. The port forwarding podman does
    /// next is `slirp_portfwd::publish_ports`'s or `rootlessport`'s.
    ///
    /// # Errors
    ///
    /// Checked before anything starts: [`Error::InvalidContainerId`],
    /// [`Error::BinaryNotFound`], [`Error::Config`] (probing the binary, options it
    /// lacks), [`Error::Address`], [`Error::ApiSocketTooLong`], [`Error::OpenNetns`].
    /// Then [`Error::Sysctl`] and [`Error::Spawn`] (wrapped in
    /// [`Error::NeedsUserns`] when refused with `EPERM` and no
    /// [`SlirpSpec::userns`] given), and the helper's own failures with its log:
    /// [`Error::Failed`], [`Error::KilledBySignal`], [`Error::ClosedWithoutReady`],
    /// [`Error::Timeout`]. Whatever was started is stopped and reaped, and the DAD
    /// sysctl restored, before the error is returned.
    pub fn start(spec: &SlirpSpec) -> Result<Slirp4netns, Error> {
        let started = Instant::now();
        check_container_id(&spec.container_id).map_err(|why| Error::InvalidContainerId {
            id: spec.container_id.clone(),
            why,
        })?;
        let binary = match &spec.binary {
            Some(b) => b.clone(),
            None => find_binary("slirp4netns").ok_or(Error::BinaryNotFound)?,
        };
        let opts = &spec.options;
        let subnet = opts.subnet();
        let guest = netaddr::slirp4netns_ip(Some(&subnet))?;
        let gateway = netaddr::slirp4netns_gateway(Some(&subnet))?;
        let dns = netaddr::slirp4netns_dns(Some(&subnet))?;

        let features = check_slirp_flags(&binary)?;
        let api_socket = spec.api_socket_path();
        if let Some(sock) = &api_socket {
            let len = sock.as_os_str().as_bytes().len();
            if len > 107 {
                return Err(Error::ApiSocketTooLong {
                    path: sock.clone(),
                    len,
                });
            }
            remove_stale_socket(sock)?;
        }
        let ns = open_netns(&spec.netns)?;
        let userns = match &spec.userns {
            Some(path) => Some(open_userns(path)?),
            None => None,
        };
        // Held until slirp4netns is ready: it names the netns for a binary that only
        // takes a PID.
        let mut _holder = None;
        let target = match &spec.netns {
            Netns::Path(_) if features.has_netns_type => spec.netns.clone(),
            Netns::Path(_) => {
                let holder =
                    NetnsHolder::join(&ns, userns.as_ref()).map_err(|source| Error::Spawn {
                        binary: "sleep (netns placeholder for PID mode)".into(),
                        source,
                    })?;
                let pid = holder.pid();
                _holder = Some(holder);
                Netns::Pid(pid)
            }
            Netns::Pid(_) => spec.netns.clone(),
        };
        let args = build_command_args(
            opts,
            &features,
            api_socket.as_deref(),
            &target,
            spec.userns.as_deref(),
        )?;

        let mut launch = Launch {
            api_socket: api_socket.clone(),
            dad: None,
        };
        if opts.enable_ipv6 {
            launch.dad =
                Some(DadGuard::disable_in(&ns, userns.as_ref()).map_err(|e| spec.hint_userns(e))?);
        }

        let (exit_r, exit_w) = pipe().map_err(Error::io("creating the exit pipe"))?;
        let (ready_r, ready_w) = pipe().map_err(Error::io("creating the ready pipe"))?;
        let log = LogFile::create_unlinked(
            &spec.tmp_dir,
            &format!("slirp4netns-{}.log", spec.container_id),
        )
        .map_err(Error::io(format!(
            "creating the slirp4netns log file in {}",
            spec.tmp_dir.display()
        )))?;
        let mut command = HelperCommand::new(&binary);
        if let Some(userns) = userns {
            // As under rootless podman, slirp4netns runs in the engine's user namespace
            // (as root there), joined before the sandbox's mount namespace is made:
            // unprivileged, neither that namespace nor the sandbox's set-uid to 0 could
            // be had. Its own `--userns-path` join is then a no-op it tolerates.
            command = command.join_userns(userns);
        }
        let mut helper = command
            .args(&args)
            .leak_fd(exit_r, EXIT_FD)
            .leak_fd(ready_w, READY_FD)
            .log(&log)
            .map_err(Error::io("sharing the log file"))?
            .new_mount_namespace(uses_sandbox(opts, &features))
            .spawn()
            .map_err(|source| {
                spec.hint_userns(Error::Spawn {
                    binary: binary.clone(),
                    source,
                })
            })?;
        tracing::debug!(pid = helper.pid(), ?args, "slirp4netns started");

        let deadline = started + spec.ready_timeout;
        if let Err(why) = helper.await_ready(&ready_r, deadline) {
            // The helper is killed and reaped by now, so its log is complete.
            return Err(match why {
                NotReady::Exited(code) => Error::Failed {
                    code,
                    log: log.contents(),
                },
                NotReady::Signalled(signal) => Error::KilledBySignal { signal },
                NotReady::ClosedWithoutReady => Error::ClosedWithoutReady {
                    log: log.contents(),
                },
                NotReady::TimedOut => Error::Timeout {
                    timeout: spec.ready_timeout,
                    log: log.contents(),
                },
                NotReady::Wait(source) => Error::Io {
                    what: "waiting for slirp4netns".into(),
                    source,
                },
            });
        }
        let ready_after = started.elapsed();
        launch.finish()?;
        tracing::debug!(pid = helper.pid(), ?ready_after, "slirp4netns ready");
        Ok(Slirp4netns {
            helper,
            exit_w: Some(exit_w),
            api_socket,
            subnet,
            guest,
            gateway,
            dns,
            ipv6: opts.enable_ipv6,
            features,
            ready_after,
            released: false,
        })
    }

    /// The helper's process ID (also its process group's).
    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }

    /// A pidfd for the helper, readable once it has died: for waiting on its API socket.
    ///
    /// `None` on kernels without `pidfd_open` (before 5.3), or when it failed: waits on
    /// the API socket then end at their timeout instead of at its death.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.helper.pidfd()
    }

    /// Where slirp4netns listens for API requests (`add_hostfwd`, ...), when it was
    /// given a socket ([`SlirpSpec::api_socket`]).
    pub fn api_socket(&self) -> Option<&Path> {
        self.api_socket.as_deref()
    }

    /// The IPv4 network of the virtual LAN (`10.0.2.0/24` unless `cidr=` was given).
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The container's address on `tap0` (subnet + 100).
    pub fn guest_ip(&self) -> Ipv4Addr {
        self.guest
    }

    /// The gateway (subnet + 2): the host side, and the host itself when host
    /// loopback is allowed.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// slirp4netns's DNS forwarder (subnet + 3), for the container's `resolv.conf`.
    pub fn dns(&self) -> Ipv4Addr {
        self.dns
    }

    /// The IPv6 gateway, when IPv6 is on.
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then(netaddr::slirp4netns_gateway6)
    }

    /// The IPv6 DNS forwarder, when IPv6 is on.
    pub fn dns6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then(netaddr::slirp4netns_dns6)
    }

    /// What the binary advertised in its `--help`.
    pub fn features(&self) -> &SlirpFeatures {
        &self.features
    }

    /// Time from the start call to readiness.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The write end of the exit pipe, for the container's monitor: slirp4netns exits
    /// when every copy of it is closed. Once taken, [`Slirp4netns::stop`] falls back to
    /// signals.
    pub fn take_exit_fd(&mut self) -> Option<OwnedFd> {
        self.exit_w.take()
    }

    /// The exit pipe's write end, still owned by this handle.
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exit_w.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether the helper has died (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.helper.try_wait(), Ok(Some(_)))
    }

    /// Stop slirp4netns: close the exit pipe, wait (bounded), then SIGTERM and SIGKILL
    /// if it still runs ([`STOP_GRACE`] before each); reap it and remove its API socket
    /// file.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when signalling or waiting for the helper fails; the socket file
    /// is removed all the same.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<(), Error> {
        self.exit_w = None;
        let res = self
            .helper
            .stop(STOP_GRACE)
            .map(|_| ())
            .map_err(Error::io("stopping slirp4netns"));
        if let Some(sock) = self.api_socket.take() {
            let _ = std::fs::remove_file(sock);
        }
        res
    }

    /// Let slirp4netns run on, owned by whoever holds the exit fd (take it first with
    /// [`Slirp4netns::take_exit_fd`]; if this handle still has it, it is closed and the
    /// helper exits). The shared reaper reaps it when it exits. Returns its pid.
    pub fn release(mut self) -> u32 {
        self.released = true;
        self.exit_w = None;
        self.api_socket = None;
        self.helper.hand_to_reaper()
    }
}

impl Drop for Slirp4netns {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(e) = self.stop_now() {
            tracing::warn!(error = %e, "stopping slirp4netns on drop");
        }
    }
}

/// What must be undone if the launch fails: the DAD sysctl and the API socket file.
struct Launch {
    api_socket: Option<PathBuf>,
    dad: Option<DadGuard>,
}

impl Launch {
    fn finish(mut self) -> Result<(), Error> {
        self.api_socket = None;
        match self.dad.take() {
            Some(dad) => dad.restore(),
            None => Ok(()),
        }
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        // The DadGuard restores on its own drop.
        if let Some(sock) = self.api_socket.take() {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// A socket file left by a crashed slirp4netns would make the new one fail to bind.
/// Anything that is not a socket is left alone (and slirp4netns will say so).
fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(Error::io(
            format!("removing the stale API socket {}", path.display()),
        )),
        _ => Ok(()),
    }
}

fn open_userns(path: &Path) -> Result<OwnedFd, Error> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(Error::io(format!(
            "opening the user namespace {}",
            path.display()
        )))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}
