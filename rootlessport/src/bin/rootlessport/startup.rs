//! What the helper does to its own process before it forwards: taking the fds podman
//! handed it, and raising its open-file limit.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{fstat, SFlag};
use rootlessport::{Config, Error};

/// Check ExitFD and ReadyFD as podman's helper does (missing when <= 0), and further:
/// each must be an open pipe or socket, and not the same fd. Both become close-on-exec
/// and owned by the returned values (exit, ready).
pub(crate) fn take_fds(cfg: &Config) -> Result<(OwnedFd, OwnedFd), Error> {
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
        (
            OwnedFd::from_raw_fd(cfg.exit_fd),
            OwnedFd::from_raw_fd(cfg.ready_fd),
        )
    };
    for fd in [&exit, &ready] {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    Ok((exit, ready))
}

/// Whether `fd` is open and a pipe or a socket.
fn is_pipe_or_socket(fd: RawFd) -> bool {
    // SAFETY: borrowed only for this fstat, during which nothing in this process closes
    // fds (it is single-threaded still); a number that is not open makes fstat fail
    // with EBADF, which is the answer.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fstat(borrowed).is_ok_and(|st| {
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        kind == SFlag::S_IFIFO || kind == SFlag::S_IFSOCK
    })
}

/// At most one malloc arena per event-loop thread (glibc's default allows 8 per core).
/// The threads that bind many ports in parallel at start-up would otherwise each leave
/// an arena of their own, and the per-port records made later on the event loop end up
/// spread over arenas whose freed parts cannot be reused by one another: with 10,000
/// ports that is 1.77 MB of anonymous memory instead of 0.98 MB (measured with
/// `MALLOC_ARENA_MAX`, docs/performance-analysis.md). Called before the helper starts
/// any thread; glibc only (other C libraries keep their own policy).
pub(crate) fn limit_malloc_arenas(threads: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = libc::c_int::try_from(threads.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and no pointers; a refused value is ignored.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = threads;
}

/// Heap requests up to this size come from the heap during start-up (glibc's
/// largest allowed `M_MMAP_THRESHOLD` on 64-bit), not from a mapping of their own.
const START_UP_MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;

/// glibc's initial `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD`, restored once ready.
const DEFAULT_THRESHOLD: libc::c_int = 128 * 1024;

/// Until [`release_start_up_heap`], keep freed heap for reuse. Start-up makes a few
/// large buffers one after another (the config's bytes, its decoded mappings, the port
/// specs, the listeners, the serving records: about 0.5-1 MB each at 10,000 ports);
/// by default glibc gives each one a mapping of its own and unmaps it when freed, so
/// every one of them is fresh memory, faulted in page by page. With them on the heap
/// and the heap kept, a later buffer reuses an earlier one's pages: measured at 10,000
/// ports, 622 page faults before ready instead of 891 (docs/performance-analysis.md,
/// section 15). glibc only; call it before the config is read.
pub(crate) fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and no pointers; a refused value is ignored.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, START_UP_MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, START_UP_MMAP_THRESHOLD);
    }
}

/// Once ready: glibc's thresholds back to their initial values, fixed from now on (a big
/// buffer made while serving is unmapped when freed), and the heap start-up freed given
/// back (`malloc_trim`): the serving helper's memory is what it uses (section 15).
pub(crate) fn release_start_up_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and no pointers; malloc_trim takes none and
    // locks each arena while it works.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, DEFAULT_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, DEFAULT_THRESHOLD);
        libc::malloc_trim(0);
    }
}
