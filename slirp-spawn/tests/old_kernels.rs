//! The paths older kernels take, on this one: a seccomp filter makes `close_range` fail
//! with ENOSYS, as on kernels before 5.9 (RHEL 8's 4.18, Ubuntu 20.04's 5.4), and the
//! helper must still receive exactly the fds it is handed and nothing else. Needs no
//! privilege (a filter only narrows what its thread may do).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use slirp_spawn::process::{open_fds, HelperCommand};

/// From now on, `syscall` fails with ENOSYS on this thread and in what it forks.
fn deny(syscall: i64) {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        [(syscall, vec![])].into_iter().collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("a seccomp target arch");
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    seccompiler::apply_filter(&program).unwrap();
}

#[test]
fn without_close_range_the_helper_gets_only_the_fds_it_is_handed() {
    // Each test runs on a thread of its own; the filter stays on this one.
    std::thread::spawn(|| {
        // An fd the engine opened without O_CLOEXEC (as `nix::unistd::pipe()` does):
        // with close_range unavailable it would leak into the helper.
        let (leaky_r, leaky_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let (handed, _keep) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        deny(libc::SYS_close_range);
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
        let fds = open_fds(helper.pid()).unwrap();
        assert_eq!(
            fds,
            [0, 1, 2, 3],
            "fds {} and {} of the engine leaked into the helper",
            leaky_r.as_raw_fd(),
            leaky_w.as_raw_fd()
        );
        helper.kill().unwrap();
        assert!(helper
            .wait_timeout(Duration::from_secs(5))
            .unwrap()
            .is_some());
    })
    .join()
    .unwrap();
}

/// Our children (running, or exited and never waited for) whose command line holds
/// `marker`.
fn children_with(marker: &str) -> Vec<u32> {
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
            ppid == Some(me.as_str()) && String::from_utf8_lossy(&cmdline).contains(marker)
        })
        .collect()
}

#[test]
fn without_pidfd_open_the_start_fails_and_leaves_no_zombie() {
    std::thread::spawn(|| {
        deny(libc::SYS_pidfd_open);
        let err = HelperCommand::new("sleep")
            .args(["30.25"])
            .spawn()
            .expect_err("no pidfd, no start");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSYS), "{err}");
        // Killed and reaped before the error came back: neither running nor a zombie.
        assert_eq!(
            children_with("30.25"),
            [] as [u32; 0],
            "the started child was left"
        );
    })
    .join()
    .unwrap();
}
