//! `listen-floor N`: the least work any forwarder does to publish `N` TCP ports, as the
//! bench's limit for the published-ports time to ready (issue 15).
//!
//! It makes `N` listeners on `[::]:10000` and up (dual-stack, `SO_REUSEADDR`, backlog
//! 4096 as the helper's), puts each into one epoll set, as a forwarder must to
//! learn of connections, writes `1` to stdout once all listen, and exits when stdin
//! reads EOF. Nothing else: no config, no plan, no event loop. Like the helper it grows
//! its fd table once before making the sockets, and from 256 ports on binds with as
//! many threads as the helper would (the cores, at most 4), each a contiguous slice.
//! The bench builds it as it builds the helper (release, static), so that both pay the
//! same for their start.

use std::io::Write;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// The first port, as the bench's published-ports config has it.
const FIRST_PORT: u16 = 10000;
/// The helper's rule: one thread below this many ports, else the cores, at most 4.
const PARALLEL_FROM: usize = 256;
const MAX_THREADS: usize = 4;

fn main() {
    if let Err(e) = run() {
        eprintln!("listen-floor: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = match args.as_slice() {
        [n] => n
            .parse()
            .ok()
            .filter(|n| (1..=usize::from(u16::MAX - FIRST_PORT) + 1).contains(n))
            .ok_or_else(|| format!("bad port count {n:?} (1-{})", u16::MAX - FIRST_PORT + 1))?,
        _ => return Err("usage: listen-floor N".into()),
    };
    grow_fd_table(n + 64);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
    let threads = if n < PARALLEL_FROM {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |c| c.get())
            .min(MAX_THREADS)
    };
    let per = n.div_ceil(threads);
    let listeners = std::thread::scope(|scope| {
        let epoll = &epoll;
        let others: Vec<_> = (1..threads)
            .map(|k| scope.spawn(move || listen_range(k * per, ((k + 1) * per).min(n), epoll)))
            .collect();
        let mut all = listen_range(0, per.min(n), epoll)?;
        for t in others {
            all.extend(t.join().map_err(|_| "a binding thread panicked")??);
        }
        Ok::<_, String>(all)
    })?;
    let mut out = std::io::stdout().lock();
    out.write_all(b"1")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    drop(listeners);
    Ok(())
}

/// Listeners for the ports at positions `from..to`, each added to `epoll`.
fn listen_range(from: usize, to: usize, epoll: &Epoll) -> Result<Vec<Socket>, String> {
    (from..to)
        .map(|i| {
            let port = FIRST_PORT + u16::try_from(i).map_err(|_| "port out of range")?;
            let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            let fail = |what: &str, e: std::io::Error| format!("{what} [::]:{port}: {e}");
            let sock = Socket::new(
                Domain::IPV6,
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )
            .map_err(|e| fail("socket", e))?;
            sock.set_reuse_address(true)
                .map_err(|e| fail("setsockopt", e))?;
            sock.bind(&addr.into()).map_err(|e| fail("bind", e))?;
            sock.listen(4096).map_err(|e| fail("listen", e))?;
            epoll
                .add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                .map_err(|e| fail("epoll_ctl", e.into()))?;
            Ok(sock)
        })
        .collect()
}

/// Grow the fd table to hold `fds` at once (as the helper does; best effort).
fn grow_fd_table(fds: usize) {
    let Ok(probe) = std::fs::File::open("/dev/null") else {
        return;
    };
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let top = u64::try_from(fds)
        .unwrap_or(u64::MAX)
        .min(limit.saturating_sub(1));
    let Ok(top) = i32::try_from(top) else {
        return;
    };
    if let Ok(high) = nix::fcntl::fcntl(&probe, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(top)) {
        // SAFETY: `high` was just returned by F_DUPFD_CLOEXEC: an open fd nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(high) });
    }
}
