//! Listeners: every published port's socket is made in the engine's netns (so it
//! listens on the host side), before the serving threads enter the container's. Ports
//! added later through the control socket are bound by [`Binder`], a thread that
//! never leaves the engine's netns: a rootless helper cannot `setns` back into it.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::config::{display_addr, ListenPlan, PortSpec, Transport};
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

/// Specs handed to the binding threads at a time ([`Feed::send`]): small enough that
/// they start while the config is still being read, large enough that taking a chunk
/// costs nothing next to binding it.
pub(crate) const CHUNK: usize = 128;

/// Make every listener, in the calling thread's netns, all or none: the first failure
/// in `specs`' order is the error, and every socket made is closed with it.
///
/// With `hub`, every TCP listener also goes into that epoll set (the accept hub's,
/// level-triggered `EPOLLIN`) as soon as it listens, its position in `specs` as the
/// event's data: the registrations overlap with the binding instead of following it.
/// A socket closed on a failure leaves the set with it (the kernel drops an epoll
/// entry when its file is closed).
///
/// Many ports are bound by several threads at once (see [`Binding`]).
pub(crate) fn bind_all(specs: Vec<PortSpec>, hub: Option<&Epoll>) -> Result<Vec<Bound>, Error> {
    std::thread::scope(|scope| {
        let binding = Binding::start(scope, specs.len(), hub);
        binding.feed().send_all(specs);
        binding.finish()
    })
}

/// Listeners being made by a few threads at once (each one inheriting the netns of the
/// thread that started them), from specs handed over in chunks ([`Feed::send`]) while
/// they are still being planned: the config's first ports are bound while the rest of
/// it is read. The calling thread binds too once it [`finish`](Binding::finish)es.
///
/// All or none, in order: if any chunk fails, the threads stop taking chunks, and
/// `finish` closes every socket made and binds the whole batch again on the calling
/// thread alone, in order, so that the error is exactly the one a sequential start-up
/// gives (a port taken by one of our own listeners included, whichever thread got there
/// first). Dropped without `finish` (the start-up failed for another reason), it stops
/// the threads, waits for them and closes every socket made.
pub(crate) struct Binding<'scope, 'env> {
    feed: Arc<Feed>,
    threads: Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
    how: How<'env>,
    published_at: u64,
}

/// What the binding threads share: the chunks waiting and what was made of them.
#[derive(Default)]
pub(crate) struct Feed {
    state: Mutex<FeedState>,
    more: Condvar,
    /// Counts every chunk sent and every close, so that a thread can wait for the next
    /// one awake, without the lock ([`SPIN`]).
    changes: AtomicUsize,
}

/// How long a binding thread with nothing to do waits awake (spinning) before it sleeps.
/// A sleeping thread is woken by the scheduler on the waker's CPU in many VMs (an idle
/// virtual CPU looks busy to it), where it takes turns with the thread decoding the
/// config instead of running beside it: measured with 10,000 ports, the decode then
/// took 7-25 ms instead of 4-6. The first chunk comes well within this; after it, the
/// decode hands chunks on faster than they are bound.
const SPIN: Duration = Duration::from_millis(3);

#[derive(Default)]
struct FeedState {
    /// Chunks not taken yet, oldest first.
    waiting: VecDeque<Chunk>,
    /// Chunks bound, with their sockets, in the order they were done.
    bound: Vec<(Chunk, Vec<socket2::Socket>)>,
    /// The chunk a thread failed on (its sockets closed already), if any.
    failed: Option<Chunk>,
    /// Specs sent so far: the next chunk's first position.
    sent: usize,
    /// No more chunks come.
    closed: bool,
    /// Take no more chunks: one failed, or the batch is abandoned.
    stop: bool,
}

/// Specs at consecutive positions of the batch, `first` the position of the first.
struct Chunk {
    first: usize,
    specs: Vec<PortSpec>,
}

impl Feed {
    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hand `specs` to the binding threads, at the positions after the ones sent
    /// before.
    pub(crate) fn send(&self, specs: Vec<PortSpec>) {
        if specs.is_empty() {
            return;
        }
        let mut state = self.lock();
        let first = state.sent;
        state.sent += specs.len();
        state.waiting.push_back(Chunk { first, specs });
        self.changes.fetch_add(1, Ordering::Release);
        drop(state);
        self.more.notify_one();
    }

    /// [`Feed::send`] in chunks of [`CHUNK`].
    fn send_all(&self, mut specs: Vec<PortSpec>) {
        while specs.len() > CHUNK {
            let rest = specs.split_off(CHUNK);
            self.send(std::mem::replace(&mut specs, rest));
        }
        self.send(specs);
    }

    /// Bind chunks until none is left (or, unless `until_closed`, none waits), or until
    /// told to stop.
    fn work(&self, how: How, until_closed: bool) {
        loop {
            let chunk = {
                let mut state = self.lock();
                loop {
                    if state.stop {
                        return;
                    }
                    if let Some(chunk) = state.waiting.pop_front() {
                        break chunk;
                    }
                    if state.closed || !until_closed {
                        return;
                    }
                    let seen = self.changes.load(Ordering::Acquire);
                    drop(state);
                    self.spin_while_unchanged(seen);
                    state = self.lock();
                    if self.changes.load(Ordering::Acquire) == seen {
                        state = self
                            .more
                            .wait(state)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            };
            let made = bind_in_order(&chunk.specs, chunk.first, how);
            let mut state = self.lock();
            match made {
                Ok(socks) => state.bound.push((chunk, socks)),
                Err(_) => {
                    state.failed = Some(chunk);
                    state.stop = true;
                    drop(state);
                    self.more.notify_all();
                }
            }
        }
    }

    /// Wait up to [`SPIN`], awake, for [`Feed::changes`] to move on from `seen`.
    fn spin_while_unchanged(&self, seen: usize) {
        let until = Instant::now() + SPIN;
        while self.changes.load(Ordering::Acquire) == seen && Instant::now() < until {
            std::hint::spin_loop();
        }
    }

    /// Tell the threads that nothing more comes (and, with `stop`, to take no more).
    fn close(&self, stop: bool) {
        let mut state = self.lock();
        self.changes.fetch_add(1, Ordering::Release);
        state.closed = true;
        state.stop |= stop;
        drop(state);
        self.more.notify_all();
    }
}

impl<'scope, 'env> Binding<'scope, 'env> {
    /// Start binding, for about `ports` listeners (which decides how many threads, and
    /// how far the fd table is grown at once), in `scope`'s threads. See [`bind_all`]
    /// for `hub`.
    pub(crate) fn start(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        ports: usize,
        hub: Option<&'env Epoll>,
    ) -> Binding<'scope, 'env> {
        let how = How {
            hub,
            dual_stack_default: dual_stack_is_default(),
        };
        let threads = if ports < PARALLEL_FROM {
            1
        } else {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_BIND_THREADS)
        };
        if threads > 1 {
            grow_fd_table(ports);
        }
        let feed = Arc::new(Feed::default());
        // The calling thread is the last binder: it joins in `finish`. A thread that
        // cannot start leaves its share to the others.
        let caller_cpu = nix::sched::sched_getcpu().ok();
        let threads = (1..threads)
            .map_while(|_| {
                let feed = feed.clone();
                std::thread::Builder::new()
                    .name("rootlessport-bind".to_owned())
                    .stack_size(BIND_STACK)
                    .spawn_scoped(scope, move || {
                        if let Some(cpu) = caller_cpu {
                            move_off_cpu(cpu);
                        }
                        feed.work(how, true);
                    })
                    .ok()
            })
            .collect();
        Binding {
            feed,
            threads,
            how,
            published_at: crate::counters::unix_now(),
        }
    }

    /// Where the specs go, in order.
    pub(crate) fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// Bind, on this thread too, every spec sent, then wait for the threads: the
    /// listeners in the order sent, all or none (see [`Binding`]).
    ///
    /// # Errors
    ///
    /// The first failure in the order sent ([`Error::Listen`], or [`Error::Io`] when a
    /// listener could not join the hub's set).
    pub(crate) fn finish(mut self) -> Result<Vec<Bound>, Error> {
        self.feed.close(false);
        self.feed.work(self.how, false);
        self.join();
        let state = std::mem::take(&mut *self.feed.lock());
        let mut done = state.bound;
        done.sort_unstable_by_key(|(chunk, _)| chunk.first);
        let at = |(chunk, socks): (Chunk, Vec<socket2::Socket>)| {
            chunk
                .specs
                .into_iter()
                .zip(socks)
                .map(|(spec, sock)| Bound {
                    spec,
                    sock,
                    published_at: self.published_at,
                })
        };
        if !state.stop {
            return Ok(done.into_iter().flat_map(at).collect());
        }
        // A chunk failed: close everything, then again in order on this thread alone.
        let mut chunks: Vec<Chunk> = done.into_iter().map(|(chunk, _)| chunk).collect();
        chunks.extend(state.failed);
        chunks.extend(state.waiting);
        chunks.sort_unstable_by_key(|chunk| chunk.first);
        let specs: Vec<PortSpec> = chunks.into_iter().flat_map(|c| c.specs).collect();
        let socks = bind_in_order(&specs, 0, self.how)?;
        let published_at = self.published_at;
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

    /// Wait for every binding thread to end.
    fn join(&mut self) {
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Binding<'_, '_> {
    /// Abandoned (not finished): stop the threads, wait for them, close what they made.
    fn drop(&mut self) {
        self.feed.close(true);
        self.join();
        drop(std::mem::take(&mut *self.feed.lock()));
    }
}

/// Move the calling thread to another CPU than `cpu` (one it may run on), once, then
/// let it run anywhere it may again. A new thread is often started on its parent's CPU
/// and left there for milliseconds beside it although another CPU is idle (seen on
/// this 2-CPU VM: the thread decoding the config then ran at half speed). Best effort:
/// nothing happens where the thread may run on `cpu` alone or the calls fail.
fn move_off_cpu(cpu: usize) {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let this_thread = Pid::from_raw(0);
    let Ok(allowed) = sched_getaffinity(this_thread) else {
        return;
    };
    let mut others = allowed;
    if others.unset(cpu).is_err()
        || !(0..nix::sched::CpuSet::count()).any(|c| others.is_set(c).unwrap_or(false))
    {
        return;
    }
    if sched_setaffinity(this_thread, &others).is_ok() {
        let _ = sched_setaffinity(this_thread, &allowed);
    }
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
/// (two sockets and a pipe pair each). (The stop signals' socket pair, and at start-up
/// the hub's set, are open already when [`FdRoom::now`] counts.)
const FD_RESERVE: usize = 32;

/// The open files of this process before any listener is made, for [`FdRoom::check`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct FdRoom {
    limit: u64,
    /// `None` when `/proc/self/fd` cannot be read: binding shows it then.
    open: Option<usize>,
}

impl FdRoom {
    /// Count the open files now (through `/proc/self/fd`), before binding. Counting the
    /// entries of a directory (less the one `read_dir` holds) needs no parser; `procfs`
    /// would add its code to every helper for this one count.
    pub(crate) fn now() -> FdRoom {
        FdRoom {
            limit: nofile_limit(),
            open: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count().saturating_sub(1)),
        }
    }

    /// Refuse a start-up whose `ports` listeners cannot all be open files at once (with
    /// [`FD_RESERVE`] left) beside the files counted by [`FdRoom::now`], instead of
    /// failing at the first `EMFILE` part-way (or reporting the `EMFILE` of a binding
    /// thread that started before the count of ports was known). Warns when fewer than
    /// 256 files are left for connections. Start-up only: a control `add` later is
    /// bound as it comes and fails all or none at the first `EMFILE` (the running
    /// helper's own files and live connections are open by then, and the reserve would
    /// count twice).
    ///
    /// # Errors
    ///
    /// [`Error::TooManyPorts`].
    pub(crate) fn check(self, ports: usize) -> Result<(), Error> {
        let (limit, Some(open)) = (self.limit, self.open) else {
            return Ok(());
        };
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
}

/// Make this process's fd table hold `more` fds beyond those open, at once. Left to
/// grow as sockets are made, the kernel doubles it step by step, and with more than
/// one thread each step waits for an RCU grace period (`expand_fdtable`): measured,
/// that made two binding threads slower than one. The fd asked for stays below the
/// open-file limit (an fd at or above it is refused, and the table would then grow
/// step by step after all: 19,960 ports took 2.6 times as long as 15,000). Best
/// effort: a limit too low for the ports shows up as the bind error it always was.
fn grow_fd_table(more: usize) {
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
            hub.add(&sock, event).map_err(|e| Error::Io {
                what: "registering a listener",
                source: e.into(),
            })?;
        }
        socks.push(sock);
    }
    Ok(socks)
}

fn bind_one(
    spec: &PortSpec,
    plan: ListenPlan,
    dual_stack_default: bool,
) -> Result<socket2::Socket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |op: &'static str, e: io::Error| Error::Listen {
        proto: spec.proto().to_owned(),
        addr: display_addr(&spec.parent_ip, spec.parent_port),
        reason: op,
        source: Some(e),
    };
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
