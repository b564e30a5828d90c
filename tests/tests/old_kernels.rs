//! The whole stack on the paths older kernels take: on a thread whose seccomp filter
//! makes `close_range` and `pidfd_open` fail with ENOSYS (as before 5.9 and 5.3: RHEL
//! 8's 4.18), the real slirp4netns is started with [`Slirp4netns::start`] and the real
//! rootlessport with its launcher, ports are published through both, bytes go through,
//! neither helper holds an fd of ours it was not handed, and stopping them leaves
//! neither a process nor a zombie. The same run with no filter is the control.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use rootlessport::launcher::Launcher;
use rootlessport::Config;
use slirp_config::PortMapping;
use slirp_portfwd::publish_ports;
use slirp_spawn::process::open_fds;
use slirp_spawn::{Slirp4netns, SlirpSpec};
use tests::{
    deny_syscalls, process_exists, processes_in_group, require_harness, rootlessport_bin, TestNetns,
};

/// Whether `syscall` fails with ENOSYS here (called with arguments that name nothing).
fn is_denied(syscall: i64) -> bool {
    // SAFETY: close_range on a range without fds, or pidfd_open of pid 0 (invalid):
    // neither touches any fd or process of ours.
    let r = unsafe {
        match syscall {
            libc::SYS_close_range => libc::syscall(syscall, 100_000u32, 100_001u32, 0u32),
            _ => libc::syscall(syscall, 0, 0),
        }
    };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)
}

/// What `/proc/PID/fd/FD` points at.
fn target(pid: u32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn own_target(fd: &impl AsRawFd) -> String {
    target(std::process::id(), fd.as_raw_fd())
}

/// The pipes and sockets `pid` holds, by fd: their link targets (`pipe:[N]`,
/// `socket:[N]`) name one kernel object each, unlike `/dev/null` or an anon inode.
fn objects(pid: u32) -> BTreeMap<i32, String> {
    open_fds(pid)
        .unwrap()
        .into_iter()
        .map(|fd| (fd, target(pid, fd)))
        .filter(|(_, t)| t.starts_with("pipe:[") || t.starts_with("socket:["))
        .collect()
}

/// Check that helper `pid` holds none of our pipes and sockets but `handed` (its exit
/// pipe, which it must hold), and neither end of `leaky`.
fn assert_only_handed(what: &str, pid: u32, handed: &str, leaky: &[String]) {
    let theirs = objects(pid);
    let ours: BTreeSet<String> = objects(std::process::id()).into_values().collect();
    let shared: BTreeMap<&i32, &String> =
        theirs.iter().filter(|(_, t)| ours.contains(*t)).collect();
    assert!(
        theirs.values().any(|t| t == handed),
        "{what} lacks its exit pipe {handed}: {theirs:?}"
    );
    for l in leaky {
        assert!(
            !theirs.values().any(|t| t == l),
            "our fd without O_CLOEXEC ({l}) leaked into {what}: {theirs:?}"
        );
    }
    assert!(
        shared.values().all(|t| *t == handed),
        "{what} holds fds of ours it was not handed: {shared:?} (handed {handed})"
    );
}

/// TCP servers on `ports` inside `ns`: each reads to EOF, then answers `tcp PORT: `
/// and what it read.
fn echo_servers(ns: &TestNetns, ports: Vec<u16>) {
    let listeners = ns.run(move || {
        ports
            .iter()
            .map(|p| TcpListener::bind(("0.0.0.0", *p)).unwrap())
            .collect::<Vec<_>>()
    });
    for l in listeners {
        std::thread::spawn(move || {
            let port = l.local_addr().unwrap().port();
            for mut c in l.incoming().flatten() {
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf);
                let _ = c.write_all(format!("tcp {port}: ").as_bytes());
                let _ = c.write_all(&buf);
            }
        });
    }
}

fn tcp_roundtrip(port: u16, msg: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(msg.as_bytes()).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// slirp4netns for a fresh netns with a port published through its API (host
/// `slirp_port` to 81), rootlessport publishing `rootlessport_port` to 80 at the guest
/// address; bytes through both; fd checks; stop; nothing left. With `old_kernel`, all
/// of it from a thread without `close_range` and `pidfd_open`.
fn whole_stack(old_kernel: bool, rootlessport_port: u16, slirp_port: u16) {
    require_harness();
    let ns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    echo_servers(&ns, vec![80, 81]);
    let netns_path = ns.path().display().to_string();
    let tmp_dir = dir.path().to_owned();
    std::thread::spawn(move || {
        // An fd the engine opened without O_CLOEXEC: without close_range, only the
        // fallback sweep keeps it out of the helpers.
        let (leaky_r, leaky_w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        let leaky = [own_target(&leaky_r), own_target(&leaky_w)];
        if old_kernel {
            deny_syscalls(&[libc::SYS_close_range, libc::SYS_pidfd_open]);
        }
        for syscall in [libc::SYS_close_range, libc::SYS_pidfd_open] {
            assert_eq!(is_denied(syscall), old_kernel, "syscall {syscall}");
        }

        let mut spec = SlirpSpec::new(
            slirp_spawn::Netns::Path(netns_path.clone().into()),
            &tmp_dir,
            "oldk",
        )
        .with_api_socket();
        spec.options = slirp_config::parse_options(["enable_ipv6=false"]).unwrap();
        let slirp = Slirp4netns::start(&spec).unwrap();
        assert_eq!(slirp.pidfd().is_none(), old_kernel);
        let sock = slirp.api_socket().unwrap().to_owned();
        // Without a pidfd the wait for the socket only loses its early exit on death.
        let ids = publish_ports(
            &sock,
            slirp.pidfd(),
            &[PortMapping::new("127.0.0.1", slirp_port, 81, 1, "tcp")],
        )
        .unwrap();
        assert_eq!(ids.len(), 1);

        let config = Config::new(
            "oldk",
            netns_path,
            slirp.guest_ip().to_string(),
            tmp_dir.display().to_string(),
        )
        .with_mappings(vec![PortMapping::new(
            "127.0.0.1",
            rootlessport_port,
            80,
            1,
            "tcp",
        )]);
        let (exit_r, exit_w) = tests::cloexec_pipe();
        let mut helper = Launcher::new(rootlessport_bin())
            .start(&config, exit_r)
            .unwrap();
        assert_eq!(helper.pidfd().is_none(), old_kernel);

        assert_eq!(
            tcp_roundtrip(rootlessport_port, "via rootlessport"),
            "tcp 80: via rootlessport"
        );
        assert_eq!(
            tcp_roundtrip(slirp_port, "via slirp4netns"),
            "tcp 81: via slirp4netns"
        );

        let slirp_pid = slirp.pid();
        let helper_pid = helper.pid();
        let slirp_exit = own_target(&slirp.exit_fd().unwrap());
        assert_eq!(target(slirp_pid, 3), slirp_exit, "slirp4netns's fd 3");
        assert_only_handed("slirp4netns", slirp_pid, &slirp_exit, &leaky);
        assert_only_handed("rootlessport", helper_pid, &own_target(&exit_w), &leaky);

        // Closing the exit pipe ends rootlessport; slirp4netns is stopped as podman does.
        drop(exit_w);
        let status = helper
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("rootlessport did not exit when its exit pipe closed");
        assert!(status.success(), "{status}");
        slirp.stop().unwrap();
        for (what, pid) in [("slirp4netns", slirp_pid), ("rootlessport", helper_pid)] {
            assert!(!process_exists(pid), "{what} {pid} (or its zombie) is left");
            assert_eq!(
                processes_in_group(pid),
                [] as [u32; 0],
                "processes left in {what}'s group"
            );
        }
        drop((leaky_r, leaky_w));
    })
    .join()
    .unwrap();
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn old_kernels_whole_stack_without_close_range_and_pidfd_open() {
    whole_stack(true, 28600, 28601);
}

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn old_kernels_control_the_same_stack_with_both() {
    whole_stack(false, 28610, 28611);
}
