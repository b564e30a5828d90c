//! TCP forwarding: accept on the host side, connect inside the container netns, then
//! move bytes with `splice(2)` through a pipe (no copy into user space), carrying
//! half-closes and resets across.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;

use crate::config::Family;
use crate::counters::PortCounters;
use crate::source_ip::{source_for, transparent_socket};
use crate::state::Shared;

/// Pipes kept for reuse per thread; a connection only holds one while data is in it.
const POOL_MAX: usize = 32;

/// Accept connections for one published port until the runtime stops or the task is
/// aborted (the port removed: the listener closes with it). `closing` fires when the
/// port's live connections are to be reset.
#[allow(dead_code)] // WIP (wip-port-records): replaced by AcceptHub, kept for the comparison
pub(crate) async fn accept_loop(
    listener: TcpListener,
    child_port: u16,
    family: Family,
    shared: Arc<Shared>,
    counters: Arc<PortCounters>,
    closing: Arc<CloseSignal>,
) {
    loop {
        // `accept()` counts against tokio's cooperative budget: a flood of clients
        // makes this task yield every 128 accepts, so it needs no bound of its own.
        match listener.accept().await {
            Ok((client, peer)) => {
                let shared = shared.clone();
                let open = counters.conn_opened();
                let closing = closing.clone();
                let busy = shared.idle.busy();
                tokio::spawn(async move {
                    let conn = Conn {
                        peer,
                        child_port,
                        family,
                    };
                    forward(client, conn, &shared, open.counters(), closing).await;
                    drop(open);
                    drop(busy);
                });
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning on the ready listener.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

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

/// Where one accepted connection came from and goes.
struct Conn {
    peer: SocketAddr,
    child_port: u16,
    family: Family,
}

async fn forward(
    client: TcpStream,
    conn: Conn,
    shared: &Shared,
    counters: &PortCounters,
    closing: Arc<CloseSignal>,
) {
    let Conn {
        peer,
        child_port,
        family,
    } = conn;
    let to = target(shared.child_ip(), family, child_port);
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
    relay(&client, &upstream, shared.pipe_size, counters, closing).await;
}

/// Connect to `to` for the client `peer`. This runs on a thread that entered the
/// container netns: the socket is made there, from the client's own address and port
/// when they can be kept.
async fn connect(peer: SocketAddr, to: SocketAddr, shared: &Shared) -> io::Result<TcpStream> {
    if let Some(src) = source_for(&shared.source_families, peer, to) {
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
    closing: Arc<CloseSignal>,
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
    loop {
        if src.readable().await.is_err() {
            return PumpEnd::ReadFailed;
        }
        let Some(pipe) = Pipe::take(chunk) else {
            // Boxed: its buffer must not sit in every connection's future.
            match Box::pin(copy_once(src, dst, &mut turn)).await {
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

/// The fallback when no pipe can be had (fd limit): one read and write through a
/// small buffer. The bytes moved, 0 on EOF.
async fn copy_once(src: &TcpStream, dst: &TcpStream, turn: &mut Turn) -> Result<usize, PumpEnd> {
    let mut buf = [0u8; 16 * 1024];
    let n = loop {
        match src.try_read(&mut buf) {
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

/// One published TCP port as the [`AcceptHub`] holds it (WIP, branch wip-port-records):
/// the listening socket, where its connections go, its counters. 16 bytes, in one `Vec`.
pub(crate) struct PortRecord {
    pub(crate) listener: std::net::TcpListener,
    pub(crate) child_port: u16,
    pub(crate) family: Family,
    pub(crate) counters: Arc<PortCounters>,
}

/// The epoll set of the hub, made pollable by tokio through its fd.
struct EpollSet(nix::sys::epoll::Epoll);

impl std::os::fd::AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// One task serving every idle TCP listener: a private epoll set holds every listening
/// socket (level-triggered, the record's index as data) and is itself registered once
/// with tokio. Connections are spawned as their own tasks, as [`accept_loop`] does.
pub(crate) struct AcceptHub {
    set: tokio::io::unix::AsyncFd<EpollSet>,
    records: Vec<PortRecord>,
    closing: Arc<CloseSignal>,
}

/// Accepts from one ready listener before the next ready one gets its turn.
const ACCEPT_BATCH: usize = 32;

impl AcceptHub {
    /// Put every record's listener in one epoll set and register it. Inside the runtime.
    pub(crate) fn new(records: Vec<PortRecord>) -> io::Result<AcceptHub> {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, r) in records.iter().enumerate() {
            ep.add(&r.listener, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        // SAFETY: the Epoll owns its fd, keeps it open until dropped and always returns
        // the same raw fd, which is what registration requires.
        let set = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(EpollSet(ep), Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(AcceptHub {
            set,
            records,
            closing: Arc::new(CloseSignal::default()),
        })
    }

    /// Serve until the task is dropped.
    pub(crate) async fn run(self, shared: Arc<Shared>) {
        use nix::sys::epoll::EpollEvent;
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let Ok(mut guard) = self.set.readable().await else {
                return;
            };
            let n = match self.set.get_ref().0.wait(&mut events, 0u8) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "epoll_wait on the listeners failed");
                    return;
                }
            };
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            drop(guard);
            let mut backoff = false;
            for ev in &events[..n] {
                let Some(rec) = self.records.get(ev.data() as usize) else {
                    continue;
                };
                for _ in 0..ACCEPT_BATCH {
                    match rec.listener.accept() {
                        Ok((client, peer)) => self.spawn_conn(rec, client, peer, &shared),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "accept failed");
                            backoff = true;
                            break;
                        }
                    }
                }
            }
            if backoff {
                // Out of fds or memory: back off instead of spinning on ready listeners.
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }

    fn spawn_conn(
        &self,
        rec: &PortRecord,
        client: std::net::TcpStream,
        peer: SocketAddr,
        shared: &Arc<Shared>,
    ) {
        let client = match client
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(client))
        {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "registering an accepted connection failed");
                return;
            }
        };
        let shared = shared.clone();
        let open = rec.counters.conn_opened();
        let closing = self.closing.clone();
        let busy = shared.idle.busy();
        let conn = Conn {
            peer,
            child_port: rec.child_port,
            family: rec.family,
        };
        tokio::spawn(async move {
            forward(client, conn, &shared, open.counters(), closing).await;
            drop(open);
            drop(busy);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
