//! TCP forwarding: accept on the host side, connect inside the container netns, then
//! move bytes with `splice(2)` through a pipe (no copy into user space), carrying
//! half-closes and resets across.
//!
//! Every published TCP port of a helper is served by one task, the [`AcceptHub`], not a
//! task per port: its listeners sit in a private epoll set (level-triggered, a slot
//! index as data) that is registered once with the event loop. A port is a 24-byte
//! [`PortRecord`] in the hub plus its 56-byte entry in the published list
//! ([`crate::state::Entry`]); its counters and close signal ([`TcpPortState`]) are
//! allocated at its first connection, so 10,000 idle published ports cost about 0.8 MB
//! of heap, not a task, two registrations and a counter block each. The config's
//! listeners are put into the set by the threads that bind them, as each starts to
//! listen ([`crate::listen::bind_all`]), and the hub adopts them in one step
//! ([`HubCommand::Adopt`]). Control `add` and `remove` reach the hub through
//! [`HubCommand`]s; a removal deletes the listener from
//! the set and closes it before the reply, and frees its slot for the next port added.
//! Each accepted connection (`accept4`, non-blocking and close-on-exec in one call)
//! is a task of its own, spawned onto the runtime's pool when it has several threads.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::SockFlag;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::Family;
use crate::counters::PortCounters;
use crate::source_ip::{source_for, transparent_socket};
use crate::state::{Entry, Shared};

/// Pipes kept for reuse per thread; a connection only holds one while data is in it.
const POOL_MAX: usize = 32;

/// The signal that resets the live connections of one published port (a `remove`
/// with `close`). Each connection registers with it once, when it starts relaying
/// (and leaves it when it ends): a wake-up of the connection's task reads one atomic,
/// nothing per byte, no lock on the data path.
#[derive(Debug, Default)]
pub(crate) struct CloseSignal {
    closed: AtomicBool,
    notify: Notify,
}

impl CloseSignal {
    /// Reset every live connection of the port, now and from now on.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Ready once [`CloseSignal::close`] was called. To be polled from one task only
    /// (the connection's): its waker is taken once, at the first poll, and a tokio
    /// task's waker stays the same for its life.
    async fn closed(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if self.closed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            if !registered {
                registered = true;
                // The one registration (under the Notify's lock); a close after it
                // wakes this task, and one before it is seen by the load below.
                if notified.as_mut().poll(cx).is_ready() || self.closed.load(Ordering::Acquire) {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await;
    }
}

/// Where a connection goes: the child IP of the moment, or the netns's loopback.
pub(crate) fn target(child_ip: Option<IpAddr>, family: Family, port: u16) -> SocketAddr {
    let ip = child_ip.unwrap_or(match family {
        Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    });
    SocketAddr::new(ip, port)
}

/// Where one accepted connection goes.
struct Conn {
    child_port: u16,
    family: Family,
}

async fn forward(client: TcpStream, conn: Conn, shared: &Shared, port: &TcpPortState) {
    let Conn { child_port, family } = conn;
    let counters = &port.counters;
    let to = target(shared.child_ip(), family, child_port);
    // The client's address is only needed to keep it (one syscall saved otherwise).
    let peer = if shared.source_families.is_empty() {
        None
    } else {
        client.peer_addr().ok()
    };
    let upstream = match connect(peer, to, shared).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, %to, "connect in the container failed");
            counters.refused();
            // As a direct connection to a closed port would: the client gets a reset.
            reset(&client);
            return;
        }
    };
    // The client's socket has TCP_NODELAY already: accepted from a listener that has
    // it (`listen::bind_one`), which Linux copies to every connection it accepts.
    let _ = upstream.set_nodelay(true);
    relay(&client, &upstream, shared.pipe_size, counters, &port.close).await;
}

/// Connect to `to` for the client `peer` (known when its address may be kept). This
/// runs on a thread that entered the container netns: the socket is made there, from
/// the client's own address and port when they can be kept.
async fn connect(
    peer: Option<SocketAddr>,
    to: SocketAddr,
    shared: &Shared,
) -> io::Result<TcpStream> {
    if let Some((peer, src)) =
        peer.and_then(|peer| Some((peer, source_for(&shared.source_families, peer, to)?)))
    {
        match transparent_socket(src, socket2::Type::STREAM, shared.mark) {
            Ok(s) => match TcpSocket::from_std_stream(s.into()).connect(to).await {
                // The same client address and port already has a connection to this
                // target (two published ports for one container port, one client
                // port): that 4-tuple is taken, so this one comes from the helper's side.
                Err(e) if taken(&e) => tracing::debug!(
                    error = %e, %peer, %to,
                    "client address and port already connected to this target: the container sees the helper's"
                ),
                done => return done,
            },
            Err(e) => tracing::debug!(
                error = %e, %peer, %to,
                "no socket from the client's address: the container sees the helper's"
            ),
        }
    }
    let sock = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.connect(to).await
}

/// A transparent connect that collides with a connection we already have.
fn taken(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE)
    )
}

/// Abort a connection with RST (SO_LINGER 0 then close).
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

enum PumpEnd {
    /// The source sent FIN.
    Eof,
    /// Reading the source failed (it was reset): reset the destination.
    ReadFailed,
    /// Writing the destination failed (it went away): reset the source.
    WriteFailed,
}

/// Relay both directions until both have ended; a reset on one side resets the other,
/// and `closing` firing (the port removed with `close`) resets both.
/// `chunk`: bytes moved per splice call at most. `a` is the client: bytes from it
/// count as in, to it as out.
async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    chunk: usize,
    counters: &PortCounters,
    closing: &CloseSignal,
) {
    let up = pump(a, b, chunk, |n| counters.moved_in(0, n as u64));
    let down = pump(b, a, chunk, |n| counters.moved_out(0, n as u64));
    let closed = closing.closed();
    tokio::pin!(up, down, closed);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            () = &mut closed => { reset(a); reset(b); return; }
            end = &mut up, if !up_done => match end {
                PumpEnd::Eof => { up_done = true; shutdown_write(b); }
                PumpEnd::ReadFailed => { reset(b); return; }
                PumpEnd::WriteFailed => { reset(a); return; }
            },
            end = &mut down, if !down_done => match end {
                PumpEnd::Eof => { down_done = true; shutdown_write(a); }
                PumpEnd::ReadFailed => { reset(a); return; }
                PumpEnd::WriteFailed => { reset(b); return; }
            },
        }
    }
}

fn shutdown_write(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
}

/// Work one pump does before it lets the other tasks run. `readable()` and `writable()`
/// do not count against tokio's cooperative budget (only `accept`, `recv`, `poll_read`
/// and the like do), so while the source keeps having data and the destination keeps
/// taking it, the loop below would never return to the event loop: one busy connection
/// would hold up every other one, the accept loops and the exit watch on its thread.
const YIELD_ROUNDS: u32 = 16;
const YIELD_BYTES: usize = 4 * 1024 * 1024;

/// Rounds and bytes moved since this pump last gave the event loop a turn.
#[derive(Default)]
struct Turn {
    rounds: u32,
    bytes: usize,
}

impl Turn {
    /// Count a round of `n` bytes; past the bound, yield once (an `epoll_wait` with no
    /// timeout, and the other ready tasks run) and start counting again.
    async fn moved(&mut self, n: usize) {
        self.rounds += 1;
        self.bytes += n;
        if self.rounds >= YIELD_ROUNDS || self.bytes >= YIELD_BYTES {
            *self = Turn::default();
            tokio::task::yield_now().await;
        }
    }

    /// An operation would block: the next readiness await parks the task anyway.
    fn parked(&mut self) {
        *self = Turn::default();
    }
}

/// Move bytes from `src` to `dst` until EOF or an error, up to `chunk` per splice;
/// `count` is told the bytes each splice (or copy) delivered to `dst`.
async fn pump(src: &TcpStream, dst: &TcpStream, chunk: usize, count: impl Fn(usize)) -> PumpEnd {
    let mut turn = Turn::default();
    // The fallback's buffer, made the first time it is needed. On the heap: in the
    // future, or built on the stack to be moved there, it would make every
    // connection's poll frame 16 KB deeper (the helper's stack stays that deep).
    let mut buf: Option<Box<[u8]>> = None;
    loop {
        if src.readable().await.is_err() {
            return PumpEnd::ReadFailed;
        }
        let Some(pipe) = Pipe::take(chunk) else {
            let buf = buf.get_or_insert_with(|| vec![0u8; COPY_BUF].into_boxed_slice());
            match copy_once(src, dst, buf, &mut turn).await {
                Ok(0) => return PumpEnd::Eof,
                Ok(n) => {
                    count(n);
                    turn.moved(n).await;
                    continue;
                }
                Err(end) => return end,
            }
        };
        let filled = src.try_io(Interest::READABLE, || splice(src, &pipe.w, chunk));
        let n = match filled {
            Ok(0) => {
                pipe.give_back();
                return PumpEnd::Eof;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                turn.parked();
                continue;
            }
            Err(_) => {
                pipe.give_back();
                return PumpEnd::ReadFailed;
            }
        };
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || splice(&pipe.r, dst, left)) {
                Ok(n) => {
                    left -= n;
                    count(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    turn.parked();
                    if dst.writable().await.is_err() {
                        return PumpEnd::WriteFailed;
                    }
                }
                // The pipe still holds data: it is dropped, not pooled.
                Err(_) => return PumpEnd::WriteFailed,
            }
        }
        pipe.give_back();
        turn.moved(n).await;
    }
}

/// The fallback's buffer (bytes).
const COPY_BUF: usize = 16 * 1024;

/// The fallback when no pipe can be had (fd limit): one read and write through `buf`.
/// The bytes moved, 0 on EOF.
async fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    turn: &mut Turn,
) -> Result<usize, PumpEnd> {
    let n = loop {
        match src.try_read(buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                turn.parked();
                src.readable().await.map_err(|_| PumpEnd::ReadFailed)?
            }
            Err(_) => return Err(PumpEnd::ReadFailed),
        }
    };
    let mut done = 0;
    while done < n {
        match dst.try_write(&buf[done..n]) {
            Ok(m) => done += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                turn.parked();
                dst.writable().await.map_err(|_| PumpEnd::WriteFailed)?
            }
            Err(_) => return Err(PumpEnd::WriteFailed),
        }
    }
    Ok(n)
}

/// splice(2) without offsets (sockets and pipes), never blocking.
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}

/// An empty pipe borrowed from the per-thread pool.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A pipe from the pool, or a new one of about `size` bytes.
    fn take(size: usize) -> Option<Pipe> {
        if let Some(p) = POOL.with(|p| p.borrow_mut().pop()) {
            return Some(p);
        }
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .ok()?;
        // A bigger pipe means fewer splice calls per byte; the kernel may refuse.
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size));
        Some(Pipe { r, w })
    }

    /// Return an empty pipe to the pool (or close it when the pool is full).
    fn give_back(self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

/// A published TCP port's counters and the signal that resets its connections, made
/// at its first connection and shared by its connections and its list entry (128
/// bytes with its `Arc`; a port never connected to has none).
#[derive(Debug, Default)]
pub(crate) struct TcpPortState {
    pub(crate) counters: PortCounters,
    pub(crate) close: CloseSignal,
}

/// One published TCP port as the [`AcceptHub`] holds it: its listener, where its
/// connections go, its entry id, and its state once it has had a connection. 24 bytes.
pub(crate) struct PortRecord {
    listener: std::net::TcpListener,
    id: u32,
    child_port: u16,
    family: Family,
    state: Option<Arc<TcpPortState>>,
}

impl PortRecord {
    /// The port listed as entry `id`, its listener made by [`crate::listen`] (with
    /// `TCP_NODELAY`, which accepted connections inherit), its connections going to
    /// `child_port` in the container (over `family` when the child IP is not known).
    pub(crate) fn new(
        listener: std::net::TcpListener,
        id: u32,
        child_port: u16,
        family: Family,
    ) -> PortRecord {
        PortRecord {
            listener,
            id,
            child_port,
            family,
            state: None,
        }
    }
}

/// Why an [`HubCommand::Add`] was refused: the listener of the entry `id` could not be
/// put into the hub's epoll set.
pub(crate) struct AddFailed {
    pub(crate) id: u32,
    pub(crate) source: io::Error,
}

/// A change to the ports the [`AcceptHub`] serves; each is answered once done.
pub(crate) enum HubCommand {
    /// Serve `records` and list `entries` (their list entries, and those of the UDP
    /// ports of the same batch), in one step: no connection is accepted on a port
    /// before it is listed. All or none: on an error nothing is served or listed.
    Add {
        records: Vec<PortRecord>,
        entries: Vec<Entry>,
        done: oneshot::Sender<Result<(), AddFailed>>,
    },
    /// The start-up batch, whose listeners are in the hub's set already (put there by
    /// [`crate::listen::bind_all`] as each was bound): `slots[i]` is the port whose
    /// event data is `i`, `None` a free slot (a UDP port of the batch). Served and
    /// listed in one step as with `Add`; refused unless the hub is still empty.
    Adopt {
        slots: Vec<Option<PortRecord>>,
        entries: Vec<Entry>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Stop serving the ports whose entry ids are `ids` (sorted; ids the hub does not
    /// hold are skipped): each listener leaves the epoll set and is closed before
    /// `done` is sent, so the port refuses connections by then.
    Remove {
        ids: Vec<u32>,
        done: oneshot::Sender<()>,
    },
}

/// The epoll set of the hub, made pollable by tokio through its fd.
struct EpollSet(Epoll);

impl std::os::fd::AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// The accept hub's epoll set, registered with the event loop while still empty: the
/// kernel checks every entry of an epoll set added to another one (for loops), which
/// for 10,000 listeners took a few milliseconds of the start-up. The listeners are
/// then put in by the threads that bind them ([`crate::listen::bind_all`]).
pub(crate) struct HubSet(AsyncFd<EpollSet>);

impl HubSet {
    /// A new, empty set. Inside the runtime (`Runtime::enter`).
    ///
    /// # Errors
    ///
    /// Making the epoll set or registering it with the event loop failed.
    pub(crate) fn new() -> io::Result<HubSet> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // SAFETY: the Epoll owns its fd, keeps it open until dropped and always returns
        // the same raw fd, which is what registration requires.
        let set = unsafe { AsyncFd::register_with_interest(EpollSet(ep), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(HubSet(set))
    }

    /// The set itself, to add listeners to.
    pub(crate) fn epoll(&self) -> &Epoll {
        &self.0.get_ref().0
    }
}

/// The one task serving every listener of the helper's TCP ports (see the module docs).
pub(crate) struct AcceptHub {
    set: AsyncFd<EpollSet>,
    /// Indexed by the epoll data; `None`: a free slot, its index in `free`.
    slots: Vec<Option<PortRecord>>,
    free: Vec<u32>,
    commands: mpsc::UnboundedReceiver<HubCommand>,
    shared: Arc<Shared>,
}

/// Accepts from one ready listener before the next ready one gets its turn.
const ACCEPT_BATCH: usize = 32;

/// Ready listeners taken from the epoll set at a time.
const EVENTS: usize = 64;

/// How long the hub stops accepting after an accept failed for want of fds or memory,
/// instead of spinning on listeners that stay ready.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What woke the hub.
enum Wake<'a> {
    Command(Option<HubCommand>),
    /// This many listeners are ready (in the events buffer), seen under this guard.
    Ready(usize, tokio::io::unix::AsyncFdReadyGuard<'a, EpollSet>),
}

impl AcceptHub {
    /// A hub polling `set` (empty, or holding the listeners of the start-up batch it
    /// is to [`HubCommand::Adopt`]), taking its commands from `commands`.
    pub(crate) fn new(
        set: HubSet,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<HubCommand>,
    ) -> AcceptHub {
        AcceptHub {
            set: set.0,
            slots: Vec::new(),
            free: Vec::new(),
            commands,
            shared,
        }
    }

    /// Serve until every command sender is gone (the helper ends) or the task is dropped.
    pub(crate) async fn run(mut self) {
        let mut events = [EpollEvent::empty(); EVENTS];
        loop {
            let wake = tokio::select! {
                // Changes first: a `remove` waits for its reply.
                biased;
                cmd = self.commands.recv() => Wake::Command(cmd),
                ready = self.set.readable() => {
                    let Ok(mut guard) = ready else { return };
                    match self.set.get_ref().0.wait(&mut events, 0u8) {
                        Ok(0) => {
                            guard.clear_ready();
                            continue;
                        }
                        Ok(n) => Wake::Ready(n, guard),
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "epoll_wait on the TCP listeners failed");
                            return;
                        }
                    }
                }
            };
            match wake {
                Wake::Command(Some(cmd)) => self.obey(cmd),
                Wake::Command(None) => return,
                Wake::Ready(n, mut guard) => {
                    match accept_ready(&mut self.slots, &events[..n], &self.shared) {
                        Accepted::Drained if n < EVENTS => {
                            // Every ready listener said EAGAIN: the set is idle unless
                            // a connection came since, and that is a new event for the
                            // event loop, which this does not clear. Saves the
                            // `epoll_wait` that would only find it empty.
                            guard.clear_ready();
                        }
                        Accepted::Drained | Accepted::More => {
                            drop(guard);
                            tokio::task::yield_now().await;
                        }
                        Accepted::Failed => {
                            drop(guard);
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                    }
                }
            }
        }
    }

    fn obey(&mut self, cmd: HubCommand) {
        match cmd {
            HubCommand::Add {
                records,
                entries,
                done,
            } => {
                let added = self.add(records);
                if added.is_ok() {
                    self.shared.publish(entries);
                }
                let _ = done.send(added);
            }
            HubCommand::Adopt {
                slots,
                entries,
                done,
            } => {
                let adopted = if self.slots.is_empty() {
                    self.free = (0..slots.len())
                        .rev()
                        .filter(|&i| slots[i].is_none())
                        .map(|i| i as u32)
                        .collect();
                    self.slots = slots;
                    self.shared.publish(entries);
                    Ok(())
                } else {
                    // Its listeners close with `slots`, which takes them out of the set.
                    Err(io::Error::other("the accept hub serves ports already"))
                };
                let _ = done.send(adopted);
            }
            HubCommand::Remove { ids, done } => {
                for slot in 0..self.slots.len() {
                    if matches!(&self.slots[slot], Some(r) if ids.binary_search(&r.id).is_ok()) {
                        self.close_slot(slot);
                    }
                }
                let _ = done.send(());
            }
        }
    }

    /// Put every record's listener in the set, each in a free slot or a new one; on an
    /// error the ones put in are taken out and closed again.
    fn add(&mut self, records: Vec<PortRecord>) -> Result<(), AddFailed> {
        let mut placed = Vec::with_capacity(records.len());
        for rec in records {
            let slot = self.free.pop().map_or(self.slots.len(), |s| s as usize);
            let event = EpollEvent::new(EpollFlags::EPOLLIN, slot as u64);
            if let Err(e) = self.set.get_ref().0.add(&rec.listener, event) {
                if slot < self.slots.len() {
                    self.free.push(slot as u32);
                }
                for s in placed {
                    self.close_slot(s);
                }
                return Err(AddFailed {
                    id: rec.id,
                    source: e.into(),
                });
            }
            if slot == self.slots.len() {
                self.slots.push(Some(rec));
            } else {
                self.slots[slot] = Some(rec);
            }
            placed.push(slot);
        }
        Ok(())
    }

    /// Take the listener in `slot` out of the set and close it; the slot is free.
    fn close_slot(&mut self, slot: usize) {
        if let Some(rec) = self.slots[slot].take() {
            if let Err(e) = self.set.get_ref().0.delete(&rec.listener) {
                tracing::debug!(error = %e, "taking a listener out of the epoll set failed");
            }
            drop(rec);
            self.free.push(slot as u32);
        }
    }
}

/// How a round of accepts ended.
enum Accepted {
    /// Every listener taken from the set was accepted from until EAGAIN.
    Drained,
    /// A listener may have more: its batch ran out first.
    More,
    /// An accept failed for want of fds or memory: back off.
    Failed,
}

/// Accept on every ready listener of `events` (indexes into `slots`), up to
/// [`ACCEPT_BATCH`] each.
fn accept_ready(
    slots: &mut [Option<PortRecord>],
    events: &[EpollEvent],
    shared: &Arc<Shared>,
) -> Accepted {
    let mut round = Accepted::Drained;
    for ev in events {
        let Some(Some(rec)) = usize::try_from(ev.data())
            .ok()
            .and_then(|i| slots.get_mut(i))
        else {
            continue;
        };
        let mut drained = false;
        for _ in 0..ACCEPT_BATCH {
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            match nix::sys::socket::accept4(&rec.listener, flags) {
                Ok(client) => spawn_conn(rec, client, shared),
                // Level-triggered: what is left comes back next round.
                Err(Errno::EAGAIN) => {
                    drained = true;
                    break;
                }
                // The client gave up before we accepted: take the next.
                Err(Errno::ECONNABORTED | Errno::EINTR) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    return Accepted::Failed;
                }
            }
        }
        if !drained {
            round = Accepted::More;
        }
    }
    round
}

/// A connection, counted open on its port and live for the heap trim until dropped.
struct Open {
    port: Arc<TcpPortState>,
    _busy: crate::heap_trim::Busy,
}

impl Open {
    fn new(port: &Arc<TcpPortState>, shared: &Shared) -> Open {
        port.counters.conn_opened();
        Open {
            port: port.clone(),
            _busy: shared.idle.busy(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.port.counters.conn_closed();
    }
}

/// Relay the connection `client` accepted on `rec`'s port in a task of its own.
fn spawn_conn(rec: &mut PortRecord, client: OwnedFd, shared: &Arc<Shared>) {
    let client = match TcpStream::from_std(std::net::TcpStream::from(client)) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "registering an accepted connection failed");
            return;
        }
    };
    let state = rec.state.get_or_insert_with(|| {
        let state = Arc::new(TcpPortState::default());
        shared.attach_tcp_state(rec.id, &state);
        state
    });
    let open = Open::new(state, shared);
    let conn = Conn {
        child_port: rec.child_port,
        family: rec.family,
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        forward(client, conn, &shared, &open.port).await;
        drop(open);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_published_tcp_port_stays_within_80_bytes_of_heap() {
        // What 10,000 published ports cost (the issue-15 budget is ~100 B per port):
        // the hub's slot and the list entry; nothing else until a first connection.
        assert_eq!(std::mem::size_of::<Option<PortRecord>>(), 24);
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    #[test]
    fn the_copy_fallback_moves_what_it_reads_then_sees_eof() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            // Two connected pairs on loopback: client -> src, dst -> server.
            let pair = || {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let far = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (near, _) = l.accept().unwrap();
                near.set_nonblocking(true).unwrap();
                (far, TcpStream::from_std(near).unwrap())
            };
            let (mut client, src) = pair();
            let (mut server, dst) = pair();
            let mut buf = vec![0u8; COPY_BUF];
            let mut turn = Turn::default();
            // More than one buffer's worth: each call moves at most COPY_BUF bytes.
            let sent: Vec<u8> = (0..COPY_BUF * 2 + 100).map(|i| (i % 251) as u8).collect();
            client.write_all(&sent).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut moved = 0;
            loop {
                match copy_once(&src, &dst, &mut buf, &mut turn).await {
                    Ok(0) => break,
                    Ok(n) => {
                        assert!(n <= COPY_BUF);
                        moved += n;
                    }
                    Err(_) => panic!("the copy failed after {moved} bytes"),
                }
            }
            assert_eq!(moved, sent.len());
            drop(dst);
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            assert_eq!(got, sent);
        });
    }

    #[test]
    fn control_close_signal_wakes_registered_and_late_connections() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let signal = Arc::new(CloseSignal::default());
            // Not closed: never ready, however often it is polled.
            let quiet = tokio::time::timeout(Duration::from_millis(20), signal.closed()).await;
            assert!(quiet.is_err());
            // Registered, then closed from another task: woken.
            let waiting = tokio::spawn({
                let signal = signal.clone();
                async move { signal.closed().await }
            });
            tokio::task::yield_now().await;
            signal.close();
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("a registered connection was not woken")
                .unwrap();
            // A connection that starts relaying after the close sees it at once.
            tokio::time::timeout(Duration::from_secs(5), signal.closed())
                .await
                .expect("a late connection missed the close");
        });
    }
}
