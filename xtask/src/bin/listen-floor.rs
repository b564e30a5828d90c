//! `listen-floor`: the least work any forwarder does to publish N TCP ports, as the
//! bench's limit for the published-ports time to ready (issue 15).
//!
//! The bench starts it as it starts the helpers, with the same launcher and config,
//! and it speaks the helper's protocol: it reads its config from stdin to the end (a
//! helper cannot start before it has its config), makes one listener for each mapping
//! in it on `[::]:10000` and up, writes `1` to fd 4 (the helper's ReadyFD) once all
//! listen, and exits when fd 3 (ExitFD) reads EOF. The config is not decoded: its
//! mappings are counted as its JSON objects but the outer one, which is all the bench's
//! configs need (one-port TCP mappings, host ports from 10000 up). Each listener is what every forwarder podman runs must make: a dual-stack
//! socket with `SO_REUSEADDR` (Go's listeners, podman's helper and ours set it; without
//! it a restarted container's port stays refused while old connections linger), bound,
//! listening (backlog 4096, the helper's), added to one epoll set to learn of
//! connections. Nothing else: no decoding, no plan, no event loop, no `TCP_NODELAY`.
//! Like the helper (with the helper's own functions) it raises its open-file limit and
//! grows its fd table once first, and, from 256 ports on, binds with
//! the cores' threads (at most 4), each a contiguous slice: on this 2-core machine two
//! threads are the most that pays (docs/performance-analysis.md, section 11).
//!
//! By hand: `echo '{"Mappings":[{},{},{}]}' | listen-floor 3< <(sleep 5) 4>&1` prints
//! `1` once 3 listeners (ports 10000-10002, in the network namespace it runs in) are
//! made, and ends 5 s later. A missing fd 3 or 4 is refused before anything is made.

use std::io::Read;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// The helper's ExitFD and ReadyFD, as podman passes them.
use slirp_config::{EXIT_FD, READY_FD};

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
    if std::env::args_os().len() > 1 {
        return Err("usage: listen-floor (config on stdin, ExitFD 3, ReadyFD 4)".into());
    }
    // Both before anything is made: a socket or the epoll set could take a missing one's
    // number.
    for (fd, name) in [(EXIT_FD, "ExitFD"), (READY_FD, "ReadyFD")] {
        // SAFETY: only asks whether the number is an open fd; nothing is done with it.
        let open = nix::fcntl::fcntl(
            unsafe { BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        );
        if open.is_err() {
            return Err(format!("{name} {fd} is not open"));
        }
    }
    let mut config = Vec::new();
    std::io::stdin()
        .read_to_end(&mut config)
        .map_err(|e| format!("reading the config from stdin: {e}"))?;
    let n = config
        .iter()
        .filter(|&&b| b == b'{')
        .count()
        .saturating_sub(1);
    let most = usize::from(u16::MAX - FIRST_PORT) + 1;
    if !(1..=most).contains(&n) {
        return Err(format!(
            "its config has {n} mappings (1-{most} can be made)"
        ));
    }
    rootlessport::helper::raise_nofile_limit();
    rootlessport::helper::grow_fd_table(n);
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
    // SAFETY: fd 4 is the ReadyFD the caller passed (checked by the write); it is only
    // borrowed for the write and stays open for the process's life.
    let ready = unsafe { BorrowedFd::borrow_raw(READY_FD) };
    match nix::unistd::write(ready, b"1") {
        Ok(1) => {}
        _ => return Err(format!("cannot write to ReadyFD {READY_FD}")),
    }
    // SAFETY: fd 3 is the ExitFD the caller passed (open, checked first), only borrowed
    // for the reads.
    let exit = unsafe { BorrowedFd::borrow_raw(EXIT_FD) };
    let mut buf = [0u8; 64];
    while matches!(nix::unistd::read(exit, &mut buf), Ok(n) if n > 0) {}
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
