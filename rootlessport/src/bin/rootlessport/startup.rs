//! What the helper does to its own process before it forwards: taking the fds podman
//! handed it, and raising its open-file limit.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{fstat, SFlag};
use rootlessport::{Config, Error};

/// The fds this process was started with (what `/proc/self/fd` lists before the helper
/// opens anything of its own), so that ExitFD and ReadyFD can be checked against them
/// while other threads already make sockets: a number that was not open at start may be
/// a listener of ours by the time the config names it. `None` when `/proc/self/fd`
/// cannot be read: then only the kind of file is checked, and the helper must not open
/// anything before it has taken the fds ([`Inherited::is_known`]).
pub(crate) struct Inherited(Option<Vec<RawFd>>);

impl Inherited {
    /// Call before the helper opens files (the stdin it reads is fd 0).
    pub(crate) fn now() -> Inherited {
        use nix::dir::Dir;
        use nix::fcntl::OFlag;
        use std::os::fd::AsRawFd;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let Ok(mut dir) = Dir::open("/proc/self/fd", flags, nix::sys::stat::Mode::empty()) else {
            return Inherited(None);
        };
        // The directory's own fd is listed too, and closed again below.
        let own = dir.as_raw_fd();
        let mut fds: Vec<RawFd> = dir
            .iter()
            .filter_map(|entry| entry.ok()?.file_name().to_str().ok()?.parse().ok())
            .filter(|&fd| fd != own)
            .collect();
        fds.sort_unstable();
        Inherited(Some(fds))
    }

    /// Whether the fds open at start are known (`/proc/self/fd` could be read). Unknown,
    /// a number that was not open at start may be one of the helper's own files by the
    /// time the config names it, unless the helper opens nothing before it reads it.
    pub(crate) fn is_known(&self) -> bool {
        self.0.is_some()
    }

    fn contains(&self, fd: RawFd) -> bool {
        self.0
            .as_ref()
            .is_none_or(|fds| fds.binary_search(&fd).is_ok())
    }
}

/// Check ExitFD and ReadyFD as podman's helper does (missing when <= 0), and further:
/// each must be one of the `inherited` fds, a pipe or socket, and not the same fd. Both
/// become close-on-exec and owned by the returned values (exit, ready).
pub(crate) fn take_fds(cfg: &Config, inherited: &Inherited) -> Result<(OwnedFd, OwnedFd), Error> {
    if cfg.netns_path.is_empty() {
        return Err(Error::MissingNetNsPath);
    }
    if cfg.exit_fd <= 0 {
        return Err(Error::MissingExitFd);
    }
    if !inherited.contains(cfg.exit_fd) || !is_pipe_or_socket(cfg.exit_fd) {
        return Err(Error::InvalidExitFd);
    }
    if cfg.ready_fd <= 0 {
        return Err(Error::MissingReadyFd);
    }
    if !inherited.contains(cfg.ready_fd)
        || !is_pipe_or_socket(cfg.ready_fd)
        || cfg.ready_fd == cfg.exit_fd
    {
        return Err(Error::InvalidReadyFd);
    }
    // SAFETY: both fds were open when the process started (checked above; or, when
    // that list is unknown, the helper has opened nothing yet) and are handed to us by
    // our parent for our sole use; nothing else in this process owns them or closes
    // fds it did not open.
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
    // SAFETY: borrowed only for this fstat; `fd` was open at start and nothing in this
    // process closes an fd it did not open, so it is the inherited file.
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

/// Raise the soft limit on open files to the hard one: each connection costs two
/// sockets, and a pipe pair while data moves.
pub(crate) fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The soft limit on open files (after [`raise_nofile_limit`]); `u64::MAX` when unknown.
pub(crate) fn nofile_soft() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}
