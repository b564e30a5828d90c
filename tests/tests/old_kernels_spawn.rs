//! The paths older kernels take, on this one: a seccomp filter makes `close_range` fail
//! with ENOSYS, as on kernels before 5.9 (RHEL 8's 4.18, Ubuntu 20.04's 5.4), and the
//! helper must still receive exactly the fds it is handed and nothing else; and it makes
//! `pidfd_open` fail, as before 5.3 (RHEL 8), and helpers must still start, be awaited,
//! be stopped and be reaped, leaving neither a process nor a zombie. Needs no privilege
//! (a filter only narrows what its thread may do).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use slirp_spawn::process::{open_fds, Helper, HelperCommand, NotReady};
use tests::deny_syscalls;

#[test]
fn without_close_range_the_helper_gets_only_the_fds_it_is_handed() {
    // Each test runs on a thread of its own; the filter stays on this one.
    std::thread::spawn(|| {
        // An fd the engine opened without O_CLOEXEC (as `nix::unistd::pipe()` does):
        // with close_range unavailable it would leak into the helper.
        let (leaky_r, leaky_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let (handed, _keep) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        deny_syscalls(&[libc::SYS_close_range]);
        // SAFETY: close_range with a range that holds no fd of ours; it must fail.
        let r = unsafe { libc::syscall(libc::SYS_close_range, 100_000u32, 100_001u32, 0u32) };
        assert_eq!(r, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS),
            "the filter is in place"
        );

        let mut helper = HelperCommand::new("sleep")
            .args(["30"])
            .leak_fd(handed, 3)
            .spawn()
            .unwrap();
        let fds = settled_fds(helper.pid(), &[0, 1, 2, 3]);
        assert_only_stdio_and_3(&fds, &leaky_r, &leaky_w);
        helper.kill().unwrap();
        assert!(helper
            .wait_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some());
    })
    .join()
    .unwrap();
}

/// The helper holds fds 0-3 and nothing else: the engine's `leaky` pipe did not leak.
fn assert_only_stdio_and_3(fds: &[(i32, String)], leaky_r: &impl AsRawFd, leaky_w: &impl AsRawFd) {
    assert_eq!(
        fds.iter().map(|(fd, _)| *fd).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "fds {} and {} of the engine leaked into the helper: {fds:?}",
        leaky_r.as_raw_fd(),
        leaky_w.as_raw_fd()
    );
}

/// The fds of helper `pid`, with what they point at, once they are `want` or after 5 s.
/// Right after exec, the dynamic loader and the C library's locale setup briefly hold
/// files of their own (libc.so.6, LC_* as fd 4, say), so a list taken at once may show
/// them; an inherited fd stays for good, so a leak still fails.
fn settled_fds(pid: u32, want: &[i32]) -> Vec<(i32, String)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fds = open_fds(pid).unwrap();
        if fds == want || Instant::now() >= deadline {
            return fds
                .into_iter()
                .map(|fd| {
                    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    (fd, target)
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Our children that are left: running ones whose command line holds `marker`, and any
/// of `started` still there, running or a zombie (a zombie's command line is empty, so
/// only its pid names it).
fn children_left(marker: &str, started: &[u32]) -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let ppid = rest.split_whitespace().nth(1);
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(me.as_str())
                && (started.contains(pid) || String::from_utf8_lossy(&cmdline).contains(marker))
        })
        .collect()
}

/// Run `f` on a thread of its own (the filter stays on it) with `pidfd_open` denied.
fn without_pidfd_open(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        deny_syscalls(&[libc::SYS_pidfd_open]);
        f()
    })
    .join()
    .unwrap();
}

/// `script` run by `sh -c`, with the write end of a ready pipe as fd 3; we keep a copy
/// of that write end too, so that the pipe never reads EOF: only the fallback's
/// `waitpid` can notice the helper's death.
fn sh_with_ready(script: &str) -> (Helper, OwnedFd, OwnedFd) {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let keep_w = ready_w.try_clone().unwrap();
    let helper = HelperCommand::new("sh")
        .args(["-c", script])
        .leak_fd(ready_w, 3)
        .spawn()
        .unwrap();
    assert!(helper.pidfd().is_none(), "pidfd_open was not denied");
    (helper, ready_r, keep_w)
}

#[test]
fn without_pidfd_open_readiness_exit_and_timeout_are_still_seen() {
    without_pidfd_open(|| {
        let marker = "oldk-ready-31";
        let mut started = Vec::new();
        let deadline = || Instant::now() + Duration::from_secs(10);

        // A ready write.
        let (mut helper, ready_r, _keep) =
            sh_with_ready(&format!("printf up >&3; exec sleep 30 # {marker}"));
        started.push(helper.pid());
        assert_eq!(helper.await_ready(&ready_r, deadline()).unwrap(), b"up");
        assert!(helper.try_wait().unwrap().is_none(), "still running");
        let status = helper.kill().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        // An exit before ready, noticed by waitpid between poll slices (the ready pipe
        // stays open through our copy), well within the deadline.
        let (mut helper, ready_r, _keep) = sh_with_ready(&format!("sleep 0.1; exit 7 # {marker}"));
        started.push(helper.pid());
        let t = Instant::now();
        match helper.await_ready(&ready_r, deadline()) {
            Err(NotReady::Exited(7)) => {}
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(helper.try_wait().unwrap().and_then(|s| s.code()), Some(7));

        // A helper that never gets ready: the deadline, and it is killed and reaped.
        let (mut helper, ready_r, _keep) = sh_with_ready(&format!("exec sleep 30 # {marker}"));
        started.push(helper.pid());
        let t = Instant::now();
        let ready = helper.await_ready(&ready_r, Instant::now() + Duration::from_millis(300));
        let took = t.elapsed();
        assert!(matches!(ready, Err(NotReady::TimedOut)), "{ready:?}");
        assert!(
            (Duration::from_millis(300)..Duration::from_secs(2)).contains(&took),
            "{took:?}"
        );
        let status = helper.try_wait().unwrap().expect("reaped");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        drop(helper);

        // Killed by a signal before ready.
        let (mut helper, ready_r, _keep) =
            sh_with_ready(&format!("kill -TERM $$; sleep 30 # {marker}"));
        started.push(helper.pid());
        match helper.await_ready(&ready_r, deadline()) {
            Err(NotReady::Signalled(libc::SIGTERM)) => {}
            other => panic!("{other:?}"),
        }

        assert_eq!(children_left(marker, &started), [] as [u32; 0]);
    });
}

#[test]
fn without_pidfd_open_stop_ends_with_sigterm_or_sigkill_in_bounds() {
    without_pidfd_open(|| {
        let marker = "oldk-stop-32";
        let mut started = Vec::new();
        let grace = Duration::from_millis(200);

        // Ignores its exit pipe, dies on SIGTERM.
        let (exit_r, exit_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut helper = HelperCommand::new("sleep")
            .args(["30.32"])
            .leak_fd(exit_r, 3)
            .spawn()
            .unwrap();
        assert!(helper.pidfd().is_none(), "pidfd_open was not denied");
        started.push(helper.pid());
        drop(exit_w);
        let t = Instant::now();
        let status = helper.stop(grace).unwrap();
        let took = t.elapsed();
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
        assert!(
            (grace..grace * 2 + Duration::from_secs(1)).contains(&took),
            "{took:?}"
        );

        // Ignores SIGTERM too: SIGKILL after the second grace. It says it is ready once
        // the trap is set, so that our SIGTERM cannot come first.
        let (mut helper, ready_r, keep_w) = sh_with_ready(&format!(
            "trap '' TERM; printf x >&3; exec sleep 30 # {marker}"
        ));
        started.push(helper.pid());
        helper
            .await_ready(&ready_r, Instant::now() + Duration::from_secs(10))
            .unwrap();
        drop(keep_w);
        let t = Instant::now();
        let status = helper.stop(grace).unwrap();
        let took = t.elapsed();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        assert!(
            (grace * 2..grace * 2 + Duration::from_secs(1)).contains(&took),
            "{took:?}"
        );
        // Reaped: a second stop only reports the status.
        assert_eq!(helper.stop(grace).unwrap().signal(), Some(libc::SIGKILL));

        assert_eq!(children_left("30.32", &started), [] as [u32; 0]);
        assert_eq!(children_left(marker, &started), [] as [u32; 0]);
    });
}

#[test]
fn without_pidfd_open_a_released_helper_is_still_reaped() {
    without_pidfd_open(|| {
        let mut helper = HelperCommand::new("sleep").args(["0.33"]).spawn().unwrap();
        assert!(helper.pidfd().is_none(), "pidfd_open was not denied");
        let pid = helper.hand_to_reaper();
        assert!(
            helper.signal(libc::SIGTERM).is_err(),
            "its pid is no longer ours to name"
        );
        drop(helper);
        // Still running, so counted (only this test releases helpers in this binary).
        assert_eq!(slirp_spawn::reaper::pending(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !children_left("0.33", &[pid]).is_empty() {
            assert!(
                Instant::now() < deadline,
                "released helper {pid} still there (a zombie?)"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        while slirp_spawn::reaper::pending() != 0 {
            assert!(Instant::now() < deadline, "the reaper still counts it");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
}

#[test]
fn without_close_range_and_pidfd_open_the_helper_gets_only_its_fds() {
    std::thread::spawn(|| {
        let (leaky_r, leaky_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let (handed, keep) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        deny_syscalls(&[libc::SYS_close_range, libc::SYS_pidfd_open]);
        let mut helper = HelperCommand::new("sleep")
            .args(["30.34"])
            .leak_fd(handed, 3)
            .spawn()
            .unwrap();
        assert!(helper.pidfd().is_none(), "pidfd_open was not denied");
        let pid = helper.pid();
        let fds = settled_fds(pid, &[0, 1, 2, 3]);
        assert_only_stdio_and_3(&fds, &leaky_r, &leaky_w);
        let inode = |path: String| std::fs::read_link(path).unwrap();
        assert_eq!(
            inode(format!("/proc/{pid}/fd/3")),
            inode(format!("/proc/self/fd/{}", keep.as_raw_fd())),
            "fd 3 is the pipe it was handed"
        );
        let status = helper.stop(Duration::from_millis(100)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert_eq!(children_left("30.34", &[pid]), [] as [u32; 0]);
    })
    .join()
    .unwrap();
}
