//! `cargo xtask podman-e2e`: a real podman 4.x runs containers with our release
//! `rootlessport` (through `helper_binaries_dir`), with a private config, storage and
//! tmp dir under `target/podman-e2e`, inside a private network and mount namespace.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    common_run_args, containers_conf, ensure_image, install_helper, lo, netns_of, pids, udp_echo,
    wait_for, wait_greeting, write, FailLine, Podman, Report, NEEDS,
};
use crate::args::{self, Long};
use crate::sys;
use crate::workspace::workspace_root;

const LABEL: &str = "podman-e2e";

fn dir() -> PathBuf {
    workspace_root().join("target/podman-e2e")
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut inner_run = false;
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, LABEL)? {
        match arg {
            Long("inner") => inner_run = true,
            other => {
                return Err(format!(
                    "{LABEL}: unknown argument {:?}",
                    args::shown(&other)
                ))
            }
        }
    }
    if inner_run {
        return inner();
    }
    if !sys::is_root() {
        return Err(format!("{LABEL} runs podman as root: run it as root"));
    }
    sys::ensure(NEEDS)?;
    let d = dir();
    install_helper(&d)?;
    let conf = containers_conf(
        &format!("Written by cargo xtask {LABEL}."),
        &d.join("helpers"),
    );
    write(&d.join("containers.conf"), &conf)?;

    let status = sys::rerun_in_private_netns(&[LABEL.into(), "--inner".into()], &[])?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{LABEL} failed"))
    }
}

/// Podman with its config, store and tmp dir under `d`.
fn podman(d: &Path) -> Podman {
    let p = |s: &str| d.join(s).display().to_string();
    let global = [
        "--root",
        &p("root"),
        "--runroot",
        &p("runroot"),
        "--tmpdir",
        &p("tmp"),
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--runtime",
        "runc",
        "--events-backend",
        "file",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Podman {
        env: vec![("CONTAINERS_CONF".to_owned(), d.join("containers.conf"))],
        global,
        timeout: None,
    }
}

fn inner() -> Result<(), String> {
    // Orphans of podman (slirp4netns, conmon, helpers) are reparented to us and reaped.
    // SAFETY: prctl with constant arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let d = dir();
    let podman = podman(&d);
    let _ = podman.run(&["rm", "-af", "-t", "0"]);
    ensure_image(&podman, &d)?;
    let common = common_run_args(20_000, 1_000)?;
    let ours = d.join("helpers/rootlessport");
    let mut r = Report::new(LABEL, FailLine::Failed);

    let t = Instant::now();
    r.check(
        "start a container with published ports",
        podman.run_echo(
            "e2e-c1",
            "slirp4netns",
            &[
                "127.0.0.1:18080:8080",
                "18081:8081",
                "18090:9090/udp",
                "18100-18102:8100-8102/tcp",
                "18100-18102:8100-8102/udp",
            ],
            &common,
            &[
                "--tcp",
                "8080,8081,8100,8101,8102",
                "--udp",
                "9090,8100,8101,8102",
            ],
        ),
    );
    r.check(
        "TCP on 127.0.0.1",
        wait_greeting(lo(18080), "tcp 8080 from ")
            .map(|_| println!("   first answer after {:?}", t.elapsed())),
    );
    r.check("TCP echo with half-close", tcp_echo(lo(18080)));
    r.check(
        "wildcard port over 127.0.0.1",
        wait_greeting(lo(18081), "tcp 8081 from ").map(|_| ()),
    );
    r.check(
        "wildcard port over [::1]",
        wait_greeting(
            SocketAddr::from((Ipv6Addr::LOCALHOST, 18081)),
            "tcp 8081 from ",
        )
        .map(|_| ()),
    );
    r.check("UDP port", udp_echo(lo(18090), "udp 9090 from "));
    for i in 0..3u16 {
        r.check(
            &format!("tcp,udp range port {}", 18100 + i),
            wait_greeting(lo(18100 + i), &format!("tcp {} from ", 8100 + i))
                .and_then(|_| udp_echo(lo(18100 + i), &format!("udp {} from ", 8100 + i))),
        );
    }
    r.check("podman runs our rootlessport", expect_helpers(&ours, 1));

    r.check(
        "start a container with slirp4netns:cidr=10.42.0.0/24",
        podman.run_echo(
            "e2e-c2",
            "slirp4netns:cidr=10.42.0.0/24",
            &["18200:8080"],
            &common,
            &["--tcp", "8080"],
        ),
    );
    r.check(
        "custom cidr: forwarded to 10.42.0.100",
        wait_greeting(lo(18200), "tcp 8080 from 10.42.0.100:").map(|_| ()),
    );
    r.check("one helper per container", expect_helpers(&ours, 2));

    super::ctl::checks(
        &mut r,
        &podman,
        &d.join("helpers").join(super::CTL),
        &d,
        &common,
        "e2e-ctl",
        &super::ctl::CtlPorts {
            a: 18300,
            b: 18301,
            u: 18302,
            busy: 18303,
            free: 18304,
        },
    );
    r.check(
        "the ctl's container has no helper left",
        expect_helpers(&ours, 2),
    );

    r.check(
        "stop the first container",
        podman.run(&["stop", "-t", "2", "e2e-c1"]).map(|_| ()),
    );
    r.check(
        "its helper exits when the container stops",
        expect_helpers(&ours, 1),
    );
    r.check(
        "the other container still answers",
        wait_greeting(lo(18200), "tcp 8080 from ").map(|_| ()),
    );
    r.check(
        "stop the second container",
        podman.run(&["stop", "-t", "2", "e2e-c2"]).map(|_| ()),
    );
    r.check("no helper left", expect_helpers(&ours, 0));
    r.check(
        "remove the containers",
        podman.run(&["rm", "-af", "-t", "0"]).map(|_| ()),
    );
    r.check("nothing left running", nothing_left());
    r.finish()
}

fn tcp_echo(addr: SocketAddr) -> Result<(), String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&payload).map_err(|e| e.to_string())?;
    c.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    c.read_to_end(&mut all).map_err(|e| e.to_string())?;
    let nl = all.iter().position(|b| *b == b'\n').ok_or("no greeting")?;
    if all[nl + 1..] == payload[..] {
        Ok(())
    } else {
        Err(format!(
            "echo returned {} bytes, sent {}",
            all.len() - nl - 1,
            payload.len()
        ))
    }
}

/// `n` processes (not zombies) run our helper.
fn expect_helpers(ours: &Path, n: usize) -> Result<(), String> {
    let exe = std::fs::canonicalize(ours).map_err(|e| e.to_string())?;
    wait_for(Duration::from_secs(10), || {
        reap();
        let now = pids()
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|t| t == exe))
            .count();
        if now == n {
            Ok(())
        } else {
            Err(format!("{now} of our rootlessport running, want {n}"))
        }
    })
}

fn reap() {
    // SAFETY: waitpid on any child without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// No slirp4netns, conmon or rootlessport in our network namespace, and no zombie.
fn nothing_left() -> Result<(), String> {
    let own = netns_of(nix::unistd::getpid().as_raw())?;
    wait_for(Duration::from_secs(10), || {
        reap();
        let left: Vec<String> = pids()
            .filter_map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let comm = comm.trim();
                let in_ours = netns_of(pid).is_ok_and(|ns| ns == own);
                (in_ours && ["slirp4netns", "conmon", "rootlessport"].contains(&comm))
                    .then(|| format!("{comm} ({pid})"))
            })
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still running: {}", left.join(", ")))
        }
    })
}
