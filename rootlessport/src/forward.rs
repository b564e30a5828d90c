//! The forwarder's life: listeners made in the engine's netns, then one thread that
//! enters the container's netns and serves every port from an event loop. Sockets keep
//! the netns they were made in, so the listeners stay on the host side while every
//! connection to the container is made directly inside it: no second process, no fd
//! passing, no thread per port.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{display_addr, ListenPlan, PortSpec, Transport};
use crate::counters::{PortCounters, Published};
use crate::reload::server::ReloadSocket;
use crate::source_ip::SourceIp;
use crate::state::{register, Shared};
use crate::Error;

/// podman's idle timeout for UDP flows.
pub(crate) const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(90);

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
pub(crate) struct Bound {
    pub(crate) spec: PortSpec,
    sock: socket2::Socket,
    /// When it began listening, in unix seconds.
    published_at: u64,
}

/// Make every listener, in order; the first failure is the error (and the ones made so
/// far are closed with it).
pub(crate) fn bind_all(specs: &[PortSpec]) -> Result<Vec<Bound>, Error> {
    specs
        .iter()
        .map(|spec| {
            let plan = spec.listen_plan()?;
            let sock = bind_one(spec, plan)?;
            Ok(Bound {
                spec: spec.clone(),
                sock,
                published_at: crate::counters::unix_now(),
            })
        })
        .collect()
}

fn bind_one(spec: &PortSpec, plan: ListenPlan) -> Result<socket2::Socket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |op: &'static str, e: io::Error| Error::Listen {
        proto: spec.proto.clone(),
        addr: display_addr(&spec.parent_ip, spec.parent_port),
        reason: op,
        source: Some(e),
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
pub(crate) struct Forwarder {
    pub(crate) bound: Vec<Bound>,
    /// The container's network namespace, opened before we go anywhere.
    pub(crate) netns: OwnedFd,
    pub(crate) netns_path: String,
    pub(crate) child_ip: Option<IpAddr>,
    pub(crate) exit_fd: OwnedFd,
    pub(crate) reload: Option<ReloadSocket>,
    pub(crate) udp_idle: Duration,
    /// Bytes moved per splice call at most (and the pipe size asked for).
    pub(crate) pipe_size: usize,
    /// Event-loop threads; 1 (the default) runs everything on the calling thread.
    pub(crate) threads: usize,
    /// Keep client source addresses (see [`crate::source_ip`]).
    pub(crate) preserve_source: bool,
    /// The caller exits right after [`Forwarder::run`]: skip closing sockets one by one.
    pub(crate) exit_after: bool,
    /// podman's container ID: names the routing state this helper owns in the netns.
    pub(crate) container_id: String,
}

/// Why the helper stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    pub(crate) fn run(self, ready: impl FnOnce() -> Result<(), Error>) -> Result<Stopped, Error> {
        nix::sched::setns(self.netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
            |e| Error::Netns {
                path: self.netns_path.clone(),
                source: e.into(),
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
            let kept = may_keep_addresses().and_then(|()| {
                SourceIp::setup(&self.container_id, self.child_ip, udp_ranges(&self.bound))
            });
            match kept {
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
        let udp_bound = crate::flow_budget::flow_bound(nofile);
        tracing::debug!("open-file limit {nofile}: at most {udp_bound} UDP flows helper-wide");
        let shared = Shared::new(self.child_ip, self.udp_idle, source, udp_bound);
        let shared = Arc::new(shared.with_pipe_size(self.pipe_size));
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
                let counters = Arc::new(PortCounters::default());
                shared.publish(Published {
                    host_ip: b.spec.parent_addr,
                    host_port: b.spec.parent_port,
                    container_port: b.spec.child_port,
                    protocol: b.spec.protocol,
                    published_at: b.published_at,
                    counters: counters.clone(),
                });
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
                            counters,
                        ));
                    }
                    Transport::Udp => {
                        let s = tokio::net::UdpSocket::from_std(b.sock.into()).map_err(io_err)?;
                        tokio::spawn(crate::udp::serve(
                            s,
                            b.spec.child_port,
                            b.spec.family,
                            shared.clone(),
                            counters,
                        ));
                    }
                }
            }
            let reload_guard = match reload {
                Some(r) => {
                    let r = Arc::new(r);
                    tokio::spawn(crate::reload::server::serve(&r, shared.clone()));
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
        drop(keep.take_source_ip());
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
    set_nonblocking(afd.get_ref());
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

/// Make `fd` non-blocking, if it lets us (a pipe does).
fn set_nonblocking(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(flags) = fcntl(fd, FcntlArg::F_GETFL) {
        let _ = fcntl(
            fd,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
        );
    }
}

/// Whether this helper may set up keeping client addresses: that takes `CAP_NET_ADMIN`
/// in the user namespace owning the container's netns, which an engine's helper has
/// (in its own user namespace) and a helper run by an unprivileged user by hand has
/// not. Asked up front so that such a helper says so in one line instead of learning
/// it from a failed netlink request; when the answer is not known (no `/proc`), it is
/// tried, and a failure falls back all the same.
fn may_keep_addresses() -> Result<(), String> {
    use caps::{CapSet, Capability};
    match caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_ADMIN) {
        Ok(false) => Err("no CAP_NET_ADMIN (needed for its routing rules)".to_owned()),
        Ok(true) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "capabilities unknown: trying to keep client addresses");
            Ok(())
        }
    }
}

/// The soft limit on open files now; `u64::MAX` when unlimited or unknown.
fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}
