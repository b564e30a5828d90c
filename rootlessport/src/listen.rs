//! Listeners: every published port's socket is made in the engine's netns (so it
//! listens on the host side), before the serving threads enter the container's. Ports
//! added later through the control socket are bound by [`Binder`], a thread that
//! never leaves the engine's netns: a rootless helper cannot `setns` back into it.

use std::io;
use std::sync::mpsc;

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::config::{ListenPlan, PortSpec, Transport};
use crate::Error;

/// A listening socket for one port spec, made in the engine's netns.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) spec: PortSpec,
    pub(crate) sock: socket2::Socket,
    /// When it began listening, in unix seconds.
    pub(crate) published_at: u64,
}

/// Below this many ports one thread binds them all: starting a thread costs about as
/// much as binding a few dozen listeners.
const PARALLEL_FROM: usize = 256;

/// At most this many threads bind at once (the kernel's socket set-up scales with
/// cores; more threads than that only add their start-up).
const MAX_BIND_THREADS: usize = 4;

/// The stack of a binding thread: it only makes sockets (the default is 2 MiB).
const BIND_STACK: usize = 128 * 1024;

/// Make every listener, in the calling thread's netns, all or none: the first failure
/// in `specs`' order is the error, and every socket made is closed with it.
///
/// With `hub`, every TCP listener also goes into that epoll set (the accept hub's,
/// level-triggered `EPOLLIN`) as soon as it listens, its position in `specs` as the
/// event's data: the registrations overlap with the binding instead of following it.
/// A socket closed on a failure leaves the set with it (the kernel drops an epoll
/// entry when its file is closed).
///
/// Many ports are bound by several threads at once (each one inherits the calling
/// thread's netns), each a contiguous slice of `specs`. If any of them fails, every
/// socket made is closed and the whole batch is bound again by this thread alone, in
/// order: the error is then exactly the one a sequential start-up gives (a port taken
/// by one of our own listeners included, whichever thread got there first).
pub(crate) fn bind_all(specs: Vec<PortSpec>, hub: Option<&Epoll>) -> Result<Vec<Bound>, Error> {
    let published_at = crate::counters::unix_now();
    let threads = if specs.len() < PARALLEL_FROM {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_BIND_THREADS)
    };
    let how = How {
        hub,
        dual_stack_default: dual_stack_is_default(),
    };
    let mut socks = None;
    if threads > 1 {
        grow_fd_table(specs.len());
        socks = bind_parallel(&specs, threads, how);
    }
    let socks = match socks {
        Some(s) => s,
        None => bind_in_order(&specs, 0, how)?,
    };
    Ok(specs
        .into_iter()
        .zip(socks)
        .map(|(spec, sock)| Bound {
            spec,
            sock,
            published_at,
        })
        .collect())
}

/// What every listener of one [`bind_all`] shares.
#[derive(Clone, Copy)]
struct How<'a> {
    /// The accept hub's epoll set, for the TCP listeners.
    hub: Option<&'a Epoll>,
    /// New IPv6 sockets of this netns take IPv4 too (`net.ipv6.bindv6only` is 0), so a
    /// dual-stack listener needs no `IPV6_V6ONLY` call.
    dual_stack_default: bool,
}

/// Whether new IPv6 sockets in the calling thread's netns are dual-stack by default
/// (`net.ipv6.bindv6only` = 0, the kernel's default). `false` when it cannot be read:
/// then every dual-stack listener sets `IPV6_V6ONLY` to 0 itself, as Go always does.
fn dual_stack_is_default() -> bool {
    std::fs::read("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim_ascii() == b"0")
}

/// The soft limit on open files now; `u64::MAX` when unlimited or unknown.
pub(crate) fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}

/// Files kept free beyond the listeners: the event loop's own (epoll, eventfd), the
/// accept hub's epoll set, the control socket, a netlink socket, and a few connections
/// (two sockets and a pipe pair each). (The stop signals' socket pair is open already.)
const FD_RESERVE: usize = 32;

/// Refuse, before binding anything, a start-up whose listeners cannot all be open files
/// at once (with [`FD_RESERVE`] left), instead of failing at the first `EMFILE`
/// part-way. Warns when fewer than 256 files are left for connections. Counts the open
/// files through `/proc/self/fd`; if that cannot be read, binding shows it.
/// Start-up only: a control `add` later is bound as it comes and fails all or none at
/// the first `EMFILE` (the running helper's own files and live connections are open
/// by then, and the reserve would count twice).
pub(crate) fn check_fd_room(ports: usize) -> Result<(), Error> {
    let limit = nofile_limit();
    // Counting the entries of a directory (less the one read_dir holds) needs no
    // parser; `procfs` would add its code to every helper for this one count.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Ok(());
    };
    let open = dir.count().saturating_sub(1);
    let room = usize::try_from(limit).unwrap_or(usize::MAX);
    if open.saturating_add(ports).saturating_add(FD_RESERVE) > room {
        return Err(Error::TooManyPorts {
            ports,
            limit,
            open,
            reserve: FD_RESERVE,
        });
    }
    let left = room - open - ports;
    if left < 256 {
        tracing::warn!(
            "{ports} published port(s) leave {left} open files for connections \
             (open-file limit {limit}; each connection takes 2, and 2 more while data moves)"
        );
    }
    Ok(())
}

/// Raise this process's soft limit on open files to its hard one (nothing if it is there
/// already; best effort): every listener is an open file, and each connection costs two
/// sockets, and a pipe pair while data moves. The `rootlessport` binary calls it before
/// anything is bound.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Make this process's fd table hold `more` fds (and 64 spare) beyond those open, at
/// once. Left to grow as sockets are made, the kernel doubles it step by step, and with
/// more than one thread each step waits for an RCU grace period (`expand_fdtable`):
/// measured, that made two binding threads slower than one. The fd asked for stays
/// below the open-file limit (an fd at or above it is refused, and the table would then
/// grow step by step after all: 19,960 ports took 2.6 times as long as 15,000). Best
/// effort: a limit too low for the ports shows up as the bind error it always was.
/// Binding many ports ([`Helper::bind`](crate::helper::Helper::bind)) calls it.
pub fn grow_fd_table(more: usize) {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::{FromRawFd, OwnedFd};
    let Ok(probe) = std::fs::File::open("/dev/null") else {
        return;
    };
    let below_limit = nofile_limit().saturating_sub(1);
    let want = u64::try_from(more.saturating_add(64)).unwrap_or(u64::MAX);
    let Ok(top) = i32::try_from(want.min(below_limit)) else {
        return;
    };
    if let Ok(high) = fcntl(&probe, FcntlArg::F_DUPFD_CLOEXEC(top)) {
        // SAFETY: `high` was just returned by F_DUPFD_CLOEXEC, so it is an open fd
        // that nothing else in this process knows of; it is closed on drop here.
        drop(unsafe { OwnedFd::from_raw_fd(high) });
    }
}

/// Bind `specs` in order on this thread, the first being position `first` of the
/// batch (the hub's event data); the first failure closes the ones made.
fn bind_in_order(
    specs: &[PortSpec],
    first: usize,
    how: How,
) -> Result<Vec<socket2::Socket>, Error> {
    let mut socks = Vec::with_capacity(specs.len());
    for (at, spec) in (first..).zip(specs) {
        let sock = bind_one(spec, spec.listen_plan()?, how.dual_stack_default)?;
        if let (Some(hub), Transport::Tcp) = (how.hub, spec.transport) {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, at as u64);
            hub.add(&sock, event)
                .map_err(|e| registering_failed(spec, e.into()))?;
        }
        socks.push(sock);
    }
    Ok(socks)
}

/// The failed call when `epoll_ctl` fails with `e`, with what ENOSPC means there (its
/// errno alone reads "no space left on device").
pub(crate) fn epoll_ctl_failed(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        "epoll_ctl: the per-user limit on epoll watches (fs.epoll.max_user_watches) is reached"
    } else {
        "epoll_ctl"
    }
}

/// `spec`'s listener could not be put into an epoll set (the accept hub's, or the event
/// loop's for UDP): named as a bind failure is, `listen udp 127.0.0.1:53: epoll_ctl:
/// ...` (see [`epoll_ctl_failed`]).
pub(crate) fn registering_failed(spec: &PortSpec, source: io::Error) -> Error {
    spec.listen_error(epoll_ctl_failed(&source), Some(source))
}

/// Bind `specs` in `threads` contiguous slices at once, this thread binding the first
/// (and any slice whose thread could not start). `None` if any slice failed: every
/// socket made is closed by then.
fn bind_parallel(specs: &[PortSpec], threads: usize, how: How) -> Option<Vec<socket2::Socket>> {
    let per = specs.len().div_ceil(threads);
    let mut slices = specs.chunks(per).enumerate();
    let (_, first) = slices.next()?;
    std::thread::scope(|scope| {
        let spawned: Vec<_> = slices
            .map(|(k, slice)| {
                std::thread::Builder::new()
                    .name("rootlessport-bind".to_owned())
                    .stack_size(BIND_STACK)
                    .spawn_scoped(scope, move || bind_in_order(slice, k * per, how))
                    .map_err(|_| (k, slice))
            })
            .collect();
        // Every slice is waited for, also after a failure: no thread outlives this.
        let mut bound = bind_in_order(first, 0, how).ok();
        for thread in spawned {
            let more = match thread {
                Ok(handle) => handle.join().ok().and_then(Result::ok),
                Err((k, slice)) if bound.is_some() => bind_in_order(slice, k * per, how).ok(),
                Err(_) => None,
            };
            bound = bound.zip(more).map(|(mut all, more)| {
                all.extend(more);
                all
            });
        }
        bound
    })
}

fn bind_one(
    spec: &PortSpec,
    plan: ListenPlan,
    dual_stack_default: bool,
) -> Result<socket2::Socket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |op, e| spec.listen_error(op, Some(e));
    // Non-blocking (as the event loop needs) and close-on-exec from the start: no
    // fcntl calls afterwards.
    let (ty, proto) = match spec.transport {
        Transport::Tcp => (Type::STREAM.nonblocking(), Protocol::TCP),
        Transport::Udp => (Type::DGRAM.nonblocking(), Protocol::UDP),
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
    match only_v6 {
        // What the netns gives a new socket already (read once per batch).
        Some(false) if dual_stack_default => {}
        // Otherwise set, as Go always sets it: `net.ipv6.bindv6only` is 1, or unknown.
        Some(v6only) => sock.set_only_v6(v6only).map_err(|e| err("setsockopt", e))?,
        None => {}
    }
    if spec.transport == Transport::Tcp {
        // As Go does for listeners: a restart can rebind while old connections linger.
        sock.set_reuse_address(true)
            .map_err(|e| err("setsockopt", e))?;
        // Linux copies TCP_NODELAY from a listener to the sockets it accepts: one
        // setsockopt here instead of one per connection (see `tcp::forward`).
        sock.set_tcp_nodelay(true)
            .map_err(|e| err("setsockopt", e))?;
    }
    sock.bind(&addr.into()).map_err(|e| err("bind", e))?;
    if spec.transport == Transport::Tcp {
        sock.listen(4096).map_err(|e| err("listen", e))?;
    }
    Ok(sock)
}

/// A thread left in the engine's netns, binding the listeners of ports added while
/// the helper serves (the serving threads are in the container's netns). It ends when
/// the `Binder` is dropped.
#[derive(Debug)]
pub(crate) struct Binder {
    jobs: mpsc::Sender<Job>,
}

/// Specs to bind, and where the outcome goes.
type Job = (
    Vec<PortSpec>,
    tokio::sync::oneshot::Sender<Result<Vec<Bound>, Error>>,
);

/// The binder thread's stack: it only makes sockets (the default is 2 MiB).
const BINDER_STACK: usize = 128 * 1024;

impl Binder {
    /// Start the thread, in the calling thread's netns (call it before `setns`).
    pub(crate) fn spawn() -> Result<Binder, Error> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("rootlessport-bind".to_owned())
            .stack_size(BINDER_STACK)
            .spawn(move || {
                for (specs, reply) in queue {
                    // All or none, as at start-up; a gone asker drops the sockets.
                    let _ = reply.send(bind_all(specs, None));
                }
            })
            .map_err(|source| Error::Io {
                what: "starting the listener thread",
                source,
            })?;
        Ok(Binder { jobs })
    }

    /// Bind a listener for each of `specs` in the engine's netns, all or none: the
    /// first failure is the error, and every socket made for the batch is closed.
    pub(crate) async fn bind(&self, specs: Vec<PortSpec>) -> Result<Vec<Bound>, Error> {
        let gone = || Error::Io {
            what: "binding in the engine's netns",
            source: io::Error::other("the listener thread is gone"),
        };
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.jobs.send((specs, reply)).map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    /// A listener the event loop could not take is named as a bind failure is, and the
    /// per-user epoll limit is said in words (its errno alone reads "no space left on
    /// device").
    #[test]
    fn a_registration_failure_names_its_port_and_the_epoll_limit() {
        let spec = |ip: &str, port, proto: &str| {
            let mapping = slirp_config::PortMapping::new(ip, port, port, 1, proto);
            crate::config::plan_ports(&[mapping]).unwrap().remove(0)
        };
        let full = registering_failed(
            &spec("::1", 53, "udp"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(
            full.to_string(),
            "listen udp [::1]:53: epoll_ctl: the per-user limit on epoll watches \
             (fs.epoll.max_user_watches) is reached: no space left on device"
        );
        let other = registering_failed(
            &spec("", 8080, "tcp"),
            io::Error::from_raw_os_error(libc::ENOMEM),
        );
        assert_eq!(
            other.to_string(),
            "listen tcp 0.0.0.0:8080: epoll_ctl: cannot allocate memory"
        );
    }

    /// What `tcp::forward` relies on instead of setting TCP_NODELAY on each accepted
    /// client socket: the kernel copies it from our listener, dual-stack ones included.
    #[test]
    fn accepted_tcp_connections_inherit_nodelay() {
        for host_ip in ["", "127.0.0.1"] {
            let free = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = free.local_addr().unwrap().port();
            drop(free);
            let mapping = slirp_config::PortMapping::new(host_ip, port, 80, 1, "tcp");
            let specs = crate::config::plan_ports(&[mapping]).unwrap();
            let bound = bind_all(specs, None).unwrap();
            let listener: TcpListener = bound.into_iter().next().unwrap().sock.into();
            listener.set_nonblocking(false).unwrap();
            let _client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert!(
                accepted.nodelay().unwrap(),
                "a connection accepted on {host_ip:?}:{port} has Nagle's algorithm on"
            );
        }
    }
}
