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
        let binding = Binding::start(scope, specs.len(), hub, Listen::AtOnce);
        binding.feed().send_all(specs);
        binding.finish()
    })
}

/// When a [`Binding`]'s TCP sockets start to listen (and join the hub's set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listen {
    /// As each is made.
    AtOnce,
    /// Only once [`Binding::finish`] is called, the batch being known to be good: until
    /// then they are only bound. A bound TCP socket that does not listen refuses
    /// connections, and does not stop another socket with `SO_REUSEADDR` (another
    /// helper's, podman's) from binding and listening on its port; so a config refused
    /// after its first ports were made takes no connection and fails no other helper.
    AtFinish,
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
    scope: &'scope std::thread::Scope<'scope, 'env>,
    threads: Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
    how: How<'env>,
    /// The CPU of the thread that started the binding, which the threads move off.
    caller_cpu: Option<usize>,
    published_at: u64,
}

/// What the binding threads share: the work waiting and what was made.
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
    /// Work not taken yet, oldest first.
    waiting: VecDeque<Work>,
    /// Chunks made, in the order they were done.
    made: Vec<Made>,
    /// The chunk a thread failed on (its sockets closed already), if any.
    failed: Option<Chunk>,
    /// Specs sent so far: the next chunk's first position.
    sent: usize,
    /// The fd table holds this many more fds than were open at the start.
    room: usize,
    /// TCP sockets listen as they are made (else they are only bound, see [`Listen`]).
    listen: bool,
    /// No more chunks come.
    closed: bool,
    /// Take no more work: one failed, or the batch is abandoned.
    stop: bool,
}

/// Specs at consecutive positions of the batch, `first` the position of the first.
struct Chunk {
    first: usize,
    specs: Vec<PortSpec>,
}

/// A chunk's sockets, one per spec.
struct Made {
    chunk: Chunk,
    socks: Vec<socket2::Socket>,
    /// Its TCP sockets listen (and are in the hub's set).
    listening: bool,
}

/// What a binding thread does next.
enum Work {
    /// Make the chunk's sockets.
    Make(Chunk),
    /// Make the TCP ones of a chunk made before listen.
    Listen(Made),
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
        // More ports than the fd table was grown for (a config of port ranges): grow
        // it once for twice as many, instead of the kernel's doubling under way.
        let grow = (state.sent > state.room).then(|| {
            state.room = state.sent * 2;
            state.room
        });
        state.waiting.push_back(Work::Make(Chunk { first, specs }));
        self.changes.fetch_add(1, Ordering::Release);
        drop(state);
        self.more.notify_one();
        if let Some(more) = grow {
            grow_fd_table(more);
        }
    }

    /// [`Feed::send`] in chunks of [`CHUNK`].
    fn send_all(&self, mut specs: Vec<PortSpec>) {
        while specs.len() > CHUNK {
            let rest = specs.split_off(CHUNK);
            self.send(std::mem::replace(&mut specs, rest));
        }
        self.send(specs);
    }

    /// Do the work waiting until none is left (or, unless `until_closed`, none waits),
    /// or until told to stop.
    fn work(&self, how: How, until_closed: bool) {
        loop {
            let (job, listen) = {
                let mut state = self.lock();
                loop {
                    if state.stop {
                        return;
                    }
                    if let Some(job) = state.waiting.pop_front() {
                        break (job, state.listen);
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
            let done = match job {
                Work::Make(chunk) => match bind_in_order(&chunk.specs, chunk.first, how, listen) {
                    Ok(socks) => Ok(Made {
                        chunk,
                        socks,
                        listening: listen,
                    }),
                    Err(_) => Err(chunk),
                },
                Work::Listen(made) => match listen_in_order(&made, how) {
                    Ok(()) => Ok(Made {
                        listening: true,
                        ..made
                    }),
                    Err(_) => Err(made.chunk),
                },
            };
            let mut state = self.lock();
            match done {
                // Made before listening, and the batch is good by now: listen next.
                Ok(made) if !made.listening && state.listen => {
                    state.waiting.push_back(Work::Listen(made));
                }
                Ok(made) => state.made.push(made),
                Err(chunk) => {
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

    /// Tell the threads that nothing more comes, and that TCP sockets may listen now
    /// (those made before listen first); with `stop`, to take no more work.
    fn close(&self, stop: bool) {
        let mut state = self.lock();
        self.changes.fetch_add(1, Ordering::Release);
        state.closed = true;
        state.stop |= stop;
        if !state.listen && !stop {
            state.listen = true;
            let made = std::mem::take(&mut state.made);
            let (listening, not_yet): (Vec<Made>, Vec<Made>) =
                made.into_iter().partition(|m| m.listening);
            state.made = listening;
            let jobs = not_yet.into_iter().map(Work::Listen);
            // Before the chunks still to be made: their ports were planned first.
            let rest = std::mem::take(&mut state.waiting);
            state.waiting = jobs.chain(rest).collect();
        }
        drop(state);
        self.more.notify_all();
    }
}

impl<'scope, 'env> Binding<'scope, 'env> {
    /// Start binding, for about `ports` listeners (which decides how many threads, and
    /// how far the fd table is grown at once), in `scope`'s threads, TCP ones listening
    /// as `listen` says. See [`bind_all`] for `hub`.
    pub(crate) fn start(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        ports: usize,
        hub: Option<&'env Epoll>,
        listen: Listen,
    ) -> Binding<'scope, 'env> {
        let how = How {
            hub,
            dual_stack_default: dual_stack_is_default(),
        };
        let feed = Arc::new(Feed::default());
        {
            let mut state = feed.lock();
            state.listen = listen == Listen::AtOnce;
            state.room = ports;
        }
        let mut binding = Binding {
            feed,
            scope,
            threads: Vec::new(),
            how,
            caller_cpu: nix::sched::sched_getcpu().ok(),
            published_at: crate::counters::unix_now(),
        };
        binding.spawn_threads(ports);
        binding
    }

    /// Start the threads that `ports` listeners call for, unless started already: none
    /// below [`PARALLEL_FROM`], else one less than the CPUs (up to
    /// [`MAX_BIND_THREADS`]), the calling thread being the last binder (it joins in
    /// `finish`). The fd table is grown for the ports first. A thread that cannot start
    /// leaves its share to the others.
    fn spawn_threads(&mut self, ports: usize) {
        if ports < PARALLEL_FROM || !self.threads.is_empty() {
            return;
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_BIND_THREADS);
        if threads < 2 {
            return;
        }
        grow_fd_table(ports);
        for _ in 1..threads {
            let (feed, how, cpu) = (self.feed.clone(), self.how, self.caller_cpu);
            let thread = std::thread::Builder::new()
                .name("rootlessport-bind".to_owned())
                .stack_size(BIND_STACK)
                .spawn_scoped(self.scope, move || {
                    if let Some(cpu) = cpu {
                        move_off_cpu(cpu);
                    }
                    feed.work(how, true);
                });
            match thread {
                Ok(t) => self.threads.push(t),
                Err(_) => break,
            }
        }
    }

    /// Where the specs go, in order.
    pub(crate) fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// Bind (and listen), on this thread too, every spec sent, then wait for the
    /// threads: the listeners in the order sent, all or none (see [`Binding`]).
    ///
    /// # Errors
    ///
    /// The first failure in the order sent ([`Error::Listen`], or [`Error::Io`] when a
    /// listener could not join the hub's set).
    pub(crate) fn finish(mut self) -> Result<Vec<Bound>, Error> {
        // Many ports planned from a short config (port ranges): threads now.
        let sent = self.feed.lock().sent;
        self.spawn_threads(sent);
        self.feed.close(false);
        self.feed.work(self.how, false);
        self.join();
        let state = std::mem::take(&mut *self.feed.lock());
        let mut done = state.made;
        done.sort_unstable_by_key(|made| made.chunk.first);
        let published_at = self.published_at;
        let listed = |specs: Vec<PortSpec>, socks: Vec<socket2::Socket>| {
            specs.into_iter().zip(socks).map(move |(spec, sock)| Bound {
                spec,
                sock,
                published_at,
            })
        };
        if !state.stop && state.waiting.is_empty() && done.iter().all(|m| m.listening) {
            return Ok(done
                .into_iter()
                .flat_map(|m| listed(m.chunk.specs, m.socks))
                .collect());
        }
        // A chunk failed: close everything, then again in order on this thread alone.
        let mut chunks: Vec<Chunk> = done.into_iter().map(|made| made.chunk).collect();
        chunks.extend(state.failed);
        chunks.extend(state.waiting.into_iter().map(|job| match job {
            Work::Make(chunk) => chunk,
            Work::Listen(made) => made.chunk,
        }));
        chunks.sort_unstable_by_key(|chunk| chunk.first);
        let specs: Vec<PortSpec> = chunks.into_iter().flat_map(|c| c.specs).collect();
        let socks = bind_in_order(&specs, 0, self.how, true)?;
        Ok(listed(specs, socks).collect())
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

    /// Count `files` more as open (opened since [`FdRoom::now`], before the listeners).
    pub(crate) fn opened(&mut self, files: usize) {
        self.open = self.open.map(|open| open.saturating_add(files));
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
/// batch (the hub's event data), TCP ones listening (and joining the hub's set) only
/// with `listen`; the first failure closes the ones made.
fn bind_in_order(
    specs: &[PortSpec],
    first: usize,
    how: How,
    listen: bool,
) -> Result<Vec<socket2::Socket>, Error> {
    let mut socks = Vec::with_capacity(specs.len());
    for (at, spec) in (first..).zip(specs) {
        let sock = bind_one(spec, spec.listen_plan()?, how.dual_stack_default)?;
        if listen {
            start_listening(spec, &sock, at, how)?;
        }
        socks.push(sock);
    }
    Ok(socks)
}

/// Let the TCP sockets of `made` (bound without listening) listen and join the hub's
/// set, in order.
fn listen_in_order(made: &Made, how: How) -> Result<(), Error> {
    let first = made.chunk.first;
    for ((at, spec), sock) in (first..).zip(&made.chunk.specs).zip(&made.socks) {
        start_listening(spec, sock, at, how)?;
    }
    Ok(())
}

/// A TCP listener listens and joins the hub's set, position `at` as its event data;
/// nothing for UDP.
fn start_listening(
    spec: &PortSpec,
    sock: &socket2::Socket,
    at: usize,
    how: How,
) -> Result<(), Error> {
    if spec.transport != Transport::Tcp {
        return Ok(());
    }
    sock.listen(4096).map_err(|e| Error::Listen {
        proto: spec.proto().to_owned(),
        addr: display_addr(&spec.parent_ip, spec.parent_port),
        reason: "listen",
        source: Some(e),
    })?;
    if let Some(hub) = how.hub {
        let event = EpollEvent::new(EpollFlags::EPOLLIN, at as u64);
        hub.add(sock, event).map_err(|e| Error::Io {
            what: "registering a listener",
            source: e.into(),
        })?;
    }
    Ok(())
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
