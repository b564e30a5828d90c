//! The forwarder's life: listeners made in the engine's netns, then one thread that
//! enters the container's netns and serves every port from an event loop. Sockets keep
//! the netns they were made in, so the listeners stay on the host side while every
//! connection to the container is made directly inside it: no second process, no fd
//! passing, no thread per port.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::config::{display_addr, ListenPlan, PortSpec, Transport};
use crate::error::errno_text;
use crate::netlink::IpFamily;
use crate::reload::ReloadSocket;
use crate::source_ip::SourceIp;
use crate::Error;

/// podman's idle timeout for UDP flows.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(90);

/// State every task reads: where new connections go, and from which address.
pub(crate) struct Shared {
    child_ip: RwLock<Option<IpAddr>>,
    pub(crate) udp_idle: Duration,
    /// Families whose TCP client addresses are kept (empty: none).
    pub(crate) source_families: Vec<IpFamily>,
    /// Families whose UDP client addresses are kept (empty: none).
    pub(crate) udp_families: Vec<IpFamily>,
    /// The mark of our TCP sockets when client addresses are kept.
    pub(crate) mark: Option<u32>,
    source_ip: Mutex<Option<SourceIp>>,
    /// The helper-wide bound on UDP flows (see [`crate::udp`]), from the open-file limit.
    pub(crate) udp_budget: crate::udp::FlowBudget,
}

impl Shared {
    pub(crate) fn child_ip(&self) -> Option<IpAddr> {
        *self.child_ip.read().unwrap_or_else(|p| p.into_inner())
    }

    fn source_ip(&self) -> std::sync::MutexGuard<'_, Option<SourceIp>> {
        self.source_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload: new connections and flows go to `ip`; our routes follow.
    pub(crate) fn set_child_ip(&self, ip: Option<IpAddr>) {
        *self.child_ip.write().unwrap_or_else(|p| p.into_inner()) = ip;
        if let Some(s) = self.source_ip().as_mut() {
            s.reload(ip);
        }
    }

    /// Route the container's replies on the UDP flow `client` <-> `target` to our
    /// socket bound to `client`; `false` when that flow cannot keep the address.
    pub(crate) fn keep_udp_flow(&self, client: SocketAddr, target: SocketAddr) -> bool {
        self.source_ip()
            .as_mut()
            .is_some_and(|s| s.add_udp_flow(client, target.port()))
    }

    /// The flow kept by [`Shared::keep_udp_flow`] ended.
    pub(crate) fn release_udp_flow(&self, client: SocketAddr, target: SocketAddr) {
        if let Some(s) = self.source_ip().as_mut() {
            s.remove_udp_flow(client, target.port());
        }
    }

    /// The state of a forwarder to `child_ip` keeping client addresses as `source`
    /// allows (none without it), with a UDP budget of `udp_bound` live flows. The
    /// families and the mark are copied out of `source` once, so that the data path
    /// reads them without its lock.
    pub(crate) fn new(
        child_ip: Option<IpAddr>,
        udp_idle: Duration,
        source: Option<SourceIp>,
        udp_bound: usize,
    ) -> Shared {
        let families = |kept: fn(&SourceIp, IpFamily) -> bool| -> Vec<IpFamily> {
            [IpFamily::V4, IpFamily::V6]
                .into_iter()
                .filter(|f| source.as_ref().is_some_and(|s| kept(s, *f)))
                .collect()
        };
        Shared {
            child_ip: RwLock::new(child_ip),
            udp_idle,
            source_families: families(SourceIp::supports),
            udp_families: families(SourceIp::supports_udp),
            mark: source.as_ref().map(SourceIp::mark),
            source_ip: Mutex::new(source),
            udp_budget: crate::udp::FlowBudget::new(udp_bound),
        }
    }
}

/// The container port ranges published for UDP, merged.
fn udp_ranges(bound: &[Bound]) -> Vec<(u16, u16)> {
    let mut ports: Vec<u16> = bound
        .iter()
        .filter(|b| b.spec.transport == Transport::Udp)
        .map(|b| b.spec.child_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for p in ports {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == p => *end = p,
            _ => out.push((p, p)),
        }
    }
    out
}

/// A listening socket for one port spec, made in the engine's netns.
#[derive(Debug)]
pub struct Bound {
    pub spec: PortSpec,
    sock: socket2::Socket,
}

/// Make every listener, in order; the first failure is the error (and the ones made so
/// far are closed with it).
pub fn bind_all(specs: &[PortSpec]) -> Result<Vec<Bound>, Error> {
    specs
        .iter()
        .map(|spec| {
            let plan = spec.listen_plan()?;
            let sock = bind_one(spec, plan)?;
            Ok(Bound {
                spec: spec.clone(),
                sock,
            })
        })
        .collect()
}

fn bind_one(spec: &PortSpec, plan: ListenPlan) -> Result<socket2::Socket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |op: &str, e: io::Error| Error::Listen {
        proto: spec.proto.clone(),
        addr: display_addr(&spec.parent_ip, spec.parent_port),
        reason: format!("{op}: {}", errno_text(&e)),
    };
    let (ty, proto) = match spec.transport {
        Transport::Tcp => (Type::STREAM, Protocol::TCP),
        Transport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let mut addr = plan.addr;
    let mut only_v6 = plan.only_v6;
    let sock = match Socket::new(Domain::for_address(addr), ty, Some(proto)) {
        Ok(s) => s,
        // A host without IPv6: a dual-stack wildcard falls back to IPv4 alone.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) && only_v6 == Some(false) => {
            addr = std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            only_v6 = None;
            Socket::new(Domain::IPV4, ty, Some(proto)).map_err(|e| err("socket", e))?
        }
        Err(e) => return Err(err("socket", e)),
    };
    if let Some(v6only) = only_v6 {
        sock.set_only_v6(v6only).map_err(|e| err("setsockopt", e))?;
    }
    if spec.transport == Transport::Tcp {
        // As Go does for listeners: a restart can rebind while old connections linger.
        sock.set_reuse_address(true)
            .map_err(|e| err("setsockopt", e))?;
    }
    sock.set_nonblocking(true)
        .map_err(|e| err("setsockopt", e))?;
    sock.bind(&addr.into()).map_err(|e| err("bind", e))?;
    if spec.transport == Transport::Tcp {
        sock.listen(4096).map_err(|e| err("listen", e))?;
    }
    Ok(sock)
}

/// Everything the event loop needs.
pub struct Forwarder {
    pub bound: Vec<Bound>,
    /// The container's network namespace, opened before we go anywhere.
    pub netns: OwnedFd,
    pub netns_path: String,
    pub child_ip: Option<IpAddr>,
    pub exit_fd: OwnedFd,
    pub reload: Option<ReloadSocket>,
    pub udp_idle: Duration,
    /// Event-loop threads; 1 (the default) runs everything on the calling thread.
    pub threads: usize,
    /// Keep client source addresses (see [`crate::source_ip`]).
    pub preserve_source: bool,
    /// The caller exits right after [`Forwarder::run`]: skip closing sockets one by one.
    pub exit_after: bool,
    /// podman's container ID: names the routing state this helper owns in the netns.
    pub container_id: String,
}

/// Why the forwarder stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// ExitFD reached EOF: the container is gone.
    ExitFd,
    /// SIGTERM or SIGINT.
    Signal,
}

impl Forwarder {
    /// Enter the container netns on this thread, serve every port, call `ready` once all
    /// are being served, and return when ExitFD reads EOF (or on SIGTERM/SIGINT). The
    /// listeners are closed on return.
    pub fn run(self, ready: impl FnOnce() -> Result<(), Error>) -> Result<Stopped, Error> {
        nix::sched::setns(self.netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
            |e| Error::Netns {
                path: self.netns_path.clone(),
                reason: errno_text(&e.into()),
            },
        )?;
        let rt = if self.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
        } else {
            // Every worker enters the container netns too (this thread proved it can).
            let ns = self.netns.try_clone().map_err(|source| Error::Io {
                what: "duplicating the netns fd",
                source,
            })?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.threads)
                .max_blocking_threads(1)
                .on_thread_start(move || {
                    if nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_err()
                    {
                        std::process::abort();
                    }
                })
                .enable_io()
                .enable_time()
                .build()
        }
        .map_err(|source| Error::Io {
            what: "starting the event loop",
            source,
        })?;
        let source = if self.preserve_source {
            match SourceIp::setup(&self.container_id, self.child_ip, udp_ranges(&self.bound)) {
                Ok(s) => Some(s),
                Err(why) => {
                    tracing::warn!(
                        "client addresses are not kept (the container sees the helper's): {why}"
                    );
                    None
                }
            }
        } else {
            None
        };
        let nofile = nofile_limit();
        let udp_bound = crate::udp::flow_bound(nofile);
        tracing::debug!("open-file limit {nofile}: at most {udp_bound} UDP flows helper-wide");
        let shared = Arc::new(Shared::new(self.child_ip, self.udp_idle, source, udp_bound));
        let keep = shared.clone();
        let self_exit = self.exit_after;
        let Forwarder {
            bound,
            exit_fd,
            reload,
            ..
        } = self;
        let result = rt.block_on(async move {
            for b in bound {
                let io_err = |source| Error::Io {
                    what: "registering a listener",
                    source,
                };
                match b.spec.transport {
                    Transport::Tcp => {
                        let l = tokio::net::TcpListener::from_std(b.sock.into()).map_err(io_err)?;
                        tokio::spawn(crate::tcp::accept_loop(
                            l,
                            b.spec.child_port,
                            b.spec.family,
                            shared.clone(),
                        ));
                    }
                    Transport::Udp => {
                        let s = tokio::net::UdpSocket::from_std(b.sock.into()).map_err(io_err)?;
                        tokio::spawn(crate::udp::serve(
                            s,
                            b.spec.child_port,
                            b.spec.family,
                            shared.clone(),
                        ));
                    }
                }
            }
            let reload_guard = match reload {
                Some(r) => {
                    let r = Arc::new(r);
                    tokio::spawn(crate::reload::serve(r.clone(), shared.clone()));
                    Some(r)
                }
                None => None,
            };
            let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
            let exit = wait_eof(exit_fd);
            ready()?;
            let stopped = tokio::select! {
                _ = exit => Stopped::ExitFd,
                _ = term.recv() => Stopped::Signal,
                _ = int.recv() => Stopped::Signal,
            };
            // The serving task holds the socket too: remove the file explicitly.
            if let Some(r) = reload_guard {
                r.remove();
            }
            Ok(stopped)
        });
        // The reply routing goes first (from this thread, inside the container netns):
        // nothing may be left in the netns, whatever happens next.
        let routing = keep.source_ip().take();
        drop(routing);
        if self_exit {
            // The process ends now: the kernel closes every socket at once, which is
            // much faster than deregistering and closing thousands one by one.
            std::mem::forget(rt);
        } else {
            // Dropping the runtime drops every task: listeners and connections close.
            drop(rt);
        }
        result
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal, Error> {
    tokio::signal::unix::signal(kind).map_err(|source| Error::Io {
        what: "installing signal handlers",
        source,
    })
}

/// Wait until `fd` (a pipe's read end) reads EOF; data is read and ignored.
async fn wait_eof(fd: OwnedFd) {
    let afd = match register(fd) {
        Ok(afd) => afd,
        Err(e) => {
            // Not pollable: wait for EOF with blocking reads on a thread instead.
            let (fd, _) = e.into_parts();
            let _ = tokio::task::spawn_blocking(move || {
                let mut buf = [0u8; 512];
                loop {
                    match nix::unistd::read(fd.as_fd(), &mut buf) {
                        Ok(0) => return,
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => return,
                    }
                }
            })
            .await;
            return;
        }
    };
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fd = afd.get_ref().as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut buf = [0u8; 512];
    loop {
        let Ok(mut guard) = afd.readable().await else {
            return;
        };
        match nix::unistd::read(afd.get_ref().as_fd(), &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(_) => return,
        }
    }
}

/// Check ExitFD and ReadyFD as podman's helper does (missing when <= 0), and further:
/// each must be an open pipe or socket, and not the same fd. Both become close-on-exec
/// and owned by the returned values.
pub fn take_fds(cfg: &crate::Config) -> Result<(OwnedFd, OwnedFd), Error> {
    if cfg.netns_path.is_empty() {
        return Err(Error::MissingNetNsPath);
    }
    if cfg.exit_fd <= 0 {
        return Err(Error::MissingExitFd);
    }
    if !is_pipe_or_socket(cfg.exit_fd) {
        return Err(Error::InvalidExitFd);
    }
    if cfg.ready_fd <= 0 {
        return Err(Error::MissingReadyFd);
    }
    if !is_pipe_or_socket(cfg.ready_fd) || cfg.ready_fd == cfg.exit_fd {
        return Err(Error::InvalidReadyFd);
    }
    // SAFETY: both fds were checked open above and are handed to us by our parent for
    // our sole use; nothing else in this process owns them.
    let (exit, ready) = unsafe {
        use std::os::fd::FromRawFd;
        (
            OwnedFd::from_raw_fd(cfg.exit_fd),
            OwnedFd::from_raw_fd(cfg.ready_fd),
        )
    };
    for fd in [&exit, &ready] {
        // SAFETY: fcntl on an fd we now own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((exit, ready))
}

fn is_pipe_or_socket(fd: i32) -> bool {
    // SAFETY: fstat into a zeroed stat buffer; a closed fd just fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return false;
    }
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
}

/// Raise the soft limit on open files to the hard one: each connection costs two
/// sockets, and a pipe pair while data moves.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The soft limit on open files now; `u64::MAX` when unlimited or unknown.
fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}

/// Register an owned fd with the event loop.
pub(crate) fn register(
    fd: OwnedFd,
) -> Result<AsyncFd<OwnedFd>, tokio::io::unix::AsyncFdRegisterError<OwnedFd>> {
    // SAFETY: an OwnedFd owns its fd, keeps it open until dropped and always returns the
    // same raw fd, which is what registration requires.
    unsafe { AsyncFd::register(fd) }
}
