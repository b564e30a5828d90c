//! Reaping helpers the engine lets go (podman's "servicereaper"): one background
//! thread waits on the pidfds of every released helper and reaps each as it exits, so
//! none lingers as a zombie and no SIGCHLD handler is needed. A helper without a pidfd
//! (kernels before 5.3) gets a thread of its own blocked in `waitpid` instead.

use std::os::fd::{AsFd, OwnedFd};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

struct Reaper {
    children: Mutex<Vec<(Child, OwnedFd)>>,
    wake_w: OwnedFd,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Released helpers without a pidfd whose waiting thread has not reaped them yet.
static BLOCKING: AtomicUsize = AtomicUsize::new(0);

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| {
        let (wake_r, wake_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap_or_else(|e| panic!("reaper: cannot create its wake pipe: {e}"));
        std::thread::Builder::new()
            .name("helper-reaper".into())
            .spawn(move || run(wake_r))
            .unwrap_or_else(|e| panic!("reaper: cannot start its thread: {e}"));
        Reaper {
            children: Mutex::new(Vec::new()),
            wake_w,
        }
    })
}

/// Hand a running helper to the reaper.
pub(crate) fn adopt(child: Child, pidfd: OwnedFd) {
    let r = reaper();
    r.children
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((child, pidfd));
    let _ = nix::unistd::write(&r.wake_w, b"x");
}

/// Fallback when no pidfd could be had: a thread that blocks in wait.
pub(crate) fn adopt_blocking(mut child: Child) {
    let pid = child.id();
    BLOCKING.fetch_add(1, Ordering::SeqCst);
    let started = std::thread::Builder::new()
        .name("helper-wait".into())
        .spawn(move || {
            let _ = child.wait();
            BLOCKING.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(error) = started {
        BLOCKING.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(pid, %error, "no thread to reap a released helper: it will stay a zombie once it exits");
    }
}

/// How many released helpers are still running (not yet reaped), with a pidfd or not.
pub fn pending() -> usize {
    let polled = REAPER
        .get()
        .map(|r| r.children.lock().map(|c| c.len()).unwrap_or(0))
        .unwrap_or(0);
    polled + BLOCKING.load(Ordering::SeqCst)
}

fn run(wake_r: OwnedFd) {
    loop {
        // Reap whatever has exited, then sleep on the rest plus the wake pipe.
        let pidfds: Vec<OwnedFd> = {
            let r = reaper();
            let mut children = r.children.lock().unwrap_or_else(|p| p.into_inner());
            children.retain_mut(|(child, _)| !matches!(child.try_wait(), Ok(Some(_)) | Err(_)));
            children
                .iter()
                .filter_map(|(_, fd)| fd.try_clone().ok())
                .collect()
        };
        let mut fds: Vec<PollFd> = Vec::with_capacity(pidfds.len() + 1);
        fds.push(PollFd::new(wake_r.as_fd(), PollFlags::POLLIN));
        fds.extend(
            pidfds
                .iter()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN)),
        );
        let _ = poll(&mut fds, PollTimeout::NONE);
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&wake_r, &mut buf), Ok(n) if n > 0) {}
    }
}
