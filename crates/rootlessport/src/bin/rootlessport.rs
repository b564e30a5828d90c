//! `rootlessport`: podman's port-forwarding helper, as a drop-in.
//!
//! Config JSON on stdin; one line on stdout and exit 1 for anything wrong before
//! ready; `1` on ReadyFD once every port is served; exit 0 when ExitFD reads EOF.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use rootlessport::config::{parse_child_ip, plan_ports};
use rootlessport::forward::{bind_all, raise_nofile_limit, take_fds, Forwarder, DEFAULT_UDP_IDLE};
use rootlessport::reload::ReloadSocket;
use rootlessport::{errno_text, Config, Error};

/// A real config is about 100 bytes per mapping; this leaves room for 100,000 of them.
const STDIN_LIMIT: usize = 16 * 1024 * 1024;

fn main() {
    if std::env::args_os().len() > 1 {
        eprintln!("too many arguments, rootlessport expects a json config via STDIN");
        std::process::exit(1);
    }
    if let Err(e) = run() {
        // Before ready this is the line podman reports; after it, stdout is /dev/null.
        println!("{e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Error> {
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(STDIN_LIMIT as u64 + 1)
        .read_to_end(&mut input)
        .map_err(Error::Stdin)?;
    if input.len() > STDIN_LIMIT {
        return Err(Error::StdinTooLarge { limit: STDIN_LIMIT });
    }
    let cfg = Config::from_json(&input)?;
    drop(input);
    let (exit_fd, ready_fd) = take_fds(&cfg)?;
    let specs = plan_ports(&cfg.mappings)?;
    let child_ip = parse_child_ip(&cfg.child_ip)?;
    raise_nofile_limit();
    let netns = slirp_spawn::Netns::Path(cfg.netns_path.clone().into())
        .open()
        .map_err(|e| Error::Netns {
            path: cfg.netns_path.clone(),
            reason: match e {
                slirp_spawn::Error::OpenNetns { source, .. } => errno_text(&source),
                other => other.to_string(),
            },
        })?;
    let bound = bind_all(&specs)?;
    let reload = if cfg.rootless_cni {
        Some(ReloadSocket::bind(
            Path::new(&cfg.tmp_dir),
            &cfg.container_id,
        )?)
    } else {
        None
    };
    let udp_idle = std::env::var("ROOTLESSPORT_UDP_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_UDP_IDLE);
    eprintln!(
        "rootlessport: {} port(s) into {} (child IP {})",
        specs.len(),
        cfg.netns_path,
        child_ip.map_or("loopback".to_string(), |ip| ip.to_string())
    );
    let forwarder = Forwarder {
        bound,
        netns,
        netns_path: cfg.netns_path.clone(),
        child_ip,
        exit_fd,
        reload,
        udp_idle,
        threads: std::env::var("ROOTLESSPORT_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1)
            .clamp(1, 64),
        exit_after: true,
        preserve_source: cfg.preserve_source_ip
            && !matches!(
                std::env::var("ROOTLESSPORT_PRESERVE_SOURCE_IP").as_deref(),
                Ok("0" | "false" | "no" | "off")
            ),
    };
    let mut ready_fd = Some(ready_fd);
    forwarder.run(|| {
        // A closed log pipe must not kill us later: stdout and stderr go to /dev/null.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            // SAFETY: dup2 onto the standard fds with an fd we own.
            unsafe {
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
        let fd = ready_fd.take().ok_or(Error::InvalidReadyFd)?;
        nix::unistd::write(&fd, b"1").map_err(|e| Error::Io {
            what: "writing to ReadyFD",
            source: e.into(),
        })?;
        drop(fd);
        Ok(())
    })?;
    // Listeners and connections are closed by the kernel at exit.
    std::process::exit(0);
}
