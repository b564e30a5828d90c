//! An engine's whole flow, as podman runs it for `--network slirp4netns -p ...`, with
//! nothing but the crates' public API: slirp4netns for the container's network
//! namespace ([`slirp_spawn::Slirp4netns`]), every `-p` mapping published by the
//! `rootlessport` helper ([`rootlessport::launcher::Launcher`]), optionally a network
//! reload ([`rootlessport::reload::reload`]), then teardown with nothing left behind.
//!
//! ```text
//! engine [OPTIONS] NETNS TMPDIR CONTAINER_ID
//!
//!   NETNS                 the container's network namespace (/proc/PID/ns/net, /run/netns/NAME)
//!   TMPDIR                the engine's runtime directory (an existing directory)
//!   CONTAINER_ID          names the log files and the reload socket
//!   -p, --publish MAP     [IP:]HOST:CONTAINER[/PROTO], as `podman run -p`; repeatable
//!   --userns PATH         the user namespace owning NETNS (rootless: /proc/PID/ns/user)
//!   --network NET         slirp4netns[:OPTIONS], as `podman run --network` (default slirp4netns)
//!   --reload-to IP        after the first line on stdin, tell the helper the container's
//!                         new address (and print `reload to IP: OK`)
//!   --rootlessport PATH   the helper binary (default $ROOTLESSPORT_BIN, else the
//!                         `rootlessport` built beside this example)
//! ```
//!
//! Once every port is served it prints a line per published port and the guest IP,
//! then waits for a line on stdin (or its end, or SIGINT, SIGTERM, SIGHUP) and tears
//! down: it closes the helper's exit pipe and waits for it, stops slirp4netns, and
//! prints `torn down`. A failure is one line on stderr (`engine: ...`) and a non-zero
//! exit status (2 for a bad command line, 1 otherwise), with whatever had started
//! stopped again.
//!
//! As root, with a server in a namespace of its own:
//!
//! ```sh
//! cargo build -p rootlessport --bins --examples
//! unshare --net python3 -m http.server 80 & PID=$!; sleep 1   # unshare execs the server
//! mkdir -p /tmp/engine
//! target/debug/examples/engine /proc/$PID/ns/net /tmp/engine ctr1 -p 127.0.0.1:8080:80
//! curl http://127.0.0.1:8080/      # from another terminal; then Enter to tear down
//! ```
//!
//! As an ordinary user, the namespaces come from `unshare --user --map-root-user`, and
//! the user namespace owning the netns is named with `--userns` (host ports from 1024):
//!
//! ```sh
//! unshare --user --map-root-user --net python3 -m http.server 80 & PID=$!; sleep 1
//! mkdir -p /tmp/engine-$USER
//! target/debug/examples/engine /proc/$PID/ns/net /tmp/engine-$USER ctr1 \
//!     --userns /proc/$PID/ns/user -p 127.0.0.1:8080:80
//! ```
//!
//! `cargo xtask itest engine` runs it both ways (tests/tests/example_engine.rs, and the
//! rootless one in tests/tests/rootless.rs).

use std::fmt::Display;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use rootlessport::child_ip::{child_ip, ChildNetwork};
use rootlessport::launcher::Launcher;
use rootlessport::Config;
use slirp_config::{parse_network, parse_options, PortMapping};
use slirp_spawn::{Netns, Slirp4netns, SlirpSpec};

/// How long teardown waits for the helper to exit once its exit pipe is closed.
const HELPER_EXIT_WAIT: Duration = Duration::from_secs(5);

/// What went wrong: the line to print, and the exit status.
struct Failure {
    line: String,
    status: u8,
}

/// A failure while running (exit status 1).
fn fail(what: impl Display) -> Failure {
    Failure {
        line: what.to_string(),
        status: 1,
    }
}

/// A bad command line (exit status 2).
fn usage(what: impl Display) -> Failure {
    Failure {
        line: what.to_string(),
        status: 2,
    }
}

const USAGE: &str = "usage: engine [--userns PATH] [--network slirp4netns[:OPTIONS]] \
[--reload-to IP] [--rootlessport PATH] NETNS TMPDIR CONTAINER_ID [-p [IP:]HOST:CONTAINER[/PROTO]]...";

struct Args {
    netns: PathBuf,
    tmp_dir: PathBuf,
    container_id: String,
    mappings: Vec<PortMapping>,
    userns: Option<PathBuf>,
    network: String,
    reload_to: Option<IpAddr>,
    rootlessport: Option<PathBuf>,
}

/// `None`: `--help` was asked for.
fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, Failure> {
    let mut positional = Vec::new();
    let mut mappings = Vec::new();
    let mut userns = None;
    let mut network = "slirp4netns".to_owned();
    let mut reload_to = None;
    let mut rootlessport = None;
    while let Some(arg) = argv.next() {
        // `--opt=value` and `--opt value` alike.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| usage(format!("{name} needs a value (engine --help)")))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(None),
            "-p" | "--publish" => mappings.push(value()?.parse().map_err(usage)?),
            "--userns" => userns = Some(PathBuf::from(value()?)),
            "--network" => network = value()?,
            "--rootlessport" => rootlessport = Some(PathBuf::from(value()?)),
            "--reload-to" => {
                let v = value()?;
                let ip = v
                    .parse()
                    .map_err(|_| usage(format!("--reload-to {v:?} is not an IP address")))?;
                reload_to = Some(ip);
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(usage(format!("unknown option {s:?} (engine --help)")))
            }
            _ => positional.push(arg),
        }
    }
    let [netns, tmp_dir, container_id]: [String; 3] = positional
        .try_into()
        .map_err(|_| usage("expected NETNS TMPDIR CONTAINER_ID (engine --help)"))?;
    Ok(Some(Args {
        netns: netns.into(),
        tmp_dir: tmp_dir.into(),
        container_id,
        mappings,
        userns,
        network,
        reload_to,
        rootlessport,
    }))
}

/// The helper: `--rootlessport`, `$ROOTLESSPORT_BIN`, else `target/<profile>/rootlessport`
/// beside this example's `target/<profile>/examples/`.
fn rootlessport_binary(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    let bin = match given.or_else(|| std::env::var_os("ROOTLESSPORT_BIN").map(PathBuf::from)) {
        Some(bin) => bin,
        None => std::env::current_exe()
            .map_err(|e| fail(format!("cannot find this program's path: {e}")))?
            .parent()
            .and_then(Path::parent)
            .map(|profile| profile.join("rootlessport"))
            .ok_or_else(|| fail("cannot find the rootlessport binary: pass --rootlessport"))?,
    };
    if !bin.is_file() {
        return Err(fail(format!(
            "no rootlessport binary at {} (cargo build -p rootlessport --bins, or pass --rootlessport PATH)",
            bin.display()
        )));
    }
    Ok(bin)
}

/// `tcp 127.0.0.1:8080 -> 10.0.2.100:80`, `tcp,udp *:8000-8002 -> 10.0.2.100:80-82`.
fn describe(m: &PortMapping, guest: impl Display) -> String {
    let host = match m.host_ip.as_str() {
        "" => "*".to_owned(),
        ip if ip.contains(':') => format!("[{ip}]"),
        ip => ip.to_owned(),
    };
    format!(
        "{} {host}:{} -> {guest}:{}",
        m.protocol_list(),
        m.host_ports(),
        m.container_ports()
    )
}

/// The write end of the signal pipe, for the handler; -1 before it is made.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let saved = nix::errno::Errno::last_raw();
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking and lives as long
    // as the process (it is never closed).
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&byte as *const u8).cast(),
            1,
        )
    };
    nix::errno::Errno::set_raw(saved);
}

/// SIGINT, SIGTERM and SIGHUP become a byte on the returned pipe (the self-pipe trick),
/// so that waiting for one of them and for stdin is one `poll`.
fn catch_signals() -> Result<OwnedFd, Failure> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| fail(format!("creating the signal pipe: {e}")))?;
    SIGNAL_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w); // the handler may use it until the process ends
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only calls write(2) and touches errno.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| fail(format!("installing a {sig} handler: {e}")))?;
    }
    Ok(r)
}

/// What ended a wait.
enum Event {
    Line,
    EndOfInput,
    Signal(String),
}

/// stdin, read without a buffer of std's (so that `poll` sees everything not yet read).
struct Input {
    pending: Vec<u8>,
    signals: OwnedFd,
}

impl Input {
    fn wait(&mut self) -> Result<Event, Failure> {
        loop {
            if let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                self.pending.drain(..=nl);
                return Ok(Event::Line);
            }
            let stdin = std::io::stdin();
            let mut fds = [
                PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(fail(format!("waiting for stdin: {e}"))),
            }
            let signalled = fds[1].any().unwrap_or(false);
            let input = fds[0].any().unwrap_or(false);
            if signalled {
                let mut byte = [0u8; 1];
                if let Ok(1) = nix::unistd::read(&self.signals, &mut byte) {
                    let name = Signal::try_from(i32::from(byte[0]))
                        .map(|s| s.to_string())
                        .unwrap_or_else(|_| format!("signal {}", byte[0]));
                    return Ok(Event::Signal(name));
                }
            }
            if input {
                let mut buf = [0u8; 512];
                match nix::unistd::read(&stdin, &mut buf) {
                    Ok(0) => return Ok(Event::EndOfInput),
                    Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                    Err(e) => return Err(fail(format!("reading stdin: {e}"))),
                }
            }
        }
    }
}

fn say(line: impl Display) {
    let mut out = std::io::stdout().lock();
    // A reader that went away must not stop the teardown.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: Args, mut input: Input) -> Result<(), Failure> {
    // Everything that can be checked is checked before anything starts.
    let options = parse_options(parse_network(&args.network).map_err(usage)?).map_err(usage)?;
    if options.is_slirp_host_forward {
        return Err(usage(
            "port_handler=slirp4netns publishes through slirp4netns's API socket \
             (slirp_portfwd::publish_ports); this example shows the rootlessport handler",
        ));
    }
    if !args.tmp_dir.is_dir() {
        return Err(fail(format!(
            "TMPDIR {} is not a directory",
            args.tmp_dir.display()
        )));
    }
    let netns_path = args
        .netns
        .to_str()
        .ok_or_else(|| usage("NETNS must be valid UTF-8 (the helper's config is JSON)"))?;
    let tmp_dir = args
        .tmp_dir
        .to_str()
        .ok_or_else(|| usage("TMPDIR must be valid UTF-8 (the helper's config is JSON)"))?;
    let guest = child_ip(ChildNetwork::Slirp4netns {
        subnet: options.cidr.as_ref(),
    });
    // RootlessCNI: the helper listens for reloads (podman: rootless bridge networks).
    let config = Config::new(&args.container_id, netns_path, &guest, tmp_dir)
        .with_mappings(args.mappings.clone())
        .with_rootless_cni(args.reload_to.is_some());
    config.check_ports().map_err(usage)?;
    let binary = if args.mappings.is_empty() {
        None
    } else {
        Some(rootlessport_binary(args.rootlessport.clone())?)
    };

    // slirp4netns: tap0 in the namespace, up and configured, once this returns.
    let mut spec = SlirpSpec::new(
        Netns::Path(args.netns.clone()),
        &args.tmp_dir,
        &args.container_id,
    );
    spec.options = options;
    spec.userns = args.userns.clone();
    let slirp = Slirp4netns::start(&spec).map_err(fail)?;
    say(format_args!(
        "slirp4netns: pid {}, guest {}/{} via {}, DNS {}, ready in {:.1} ms",
        slirp.pid(),
        slirp.guest_ip(),
        slirp.subnet().prefix_len(),
        slirp.gateway(),
        slirp.dns(),
        slirp.ready_after().as_secs_f64() * 1000.0,
    ));

    // rootlessport: every port served once this returns. Its exit pipe's write end
    // stands for the container's monitor: closing it stops the helper. (On failure
    // `slirp` is dropped, which stops slirp4netns.)
    let mut helper = None;
    if let Some(binary) = binary {
        let (exit_r, exit_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| fail(format!("creating the exit pipe: {e}")))?;
        let mut launcher = Launcher::new(binary);
        launcher.userns = args.userns.clone();
        let process = launcher.start(&config, exit_r).map_err(fail)?;
        say(format_args!(
            "rootlessport: pid {}, {} port(s)",
            process.pid(),
            config.check_ports().unwrap_or(0)
        ));
        helper = Some((process, exit_w));
    }
    for m in &args.mappings {
        say(format_args!("published {}", describe(m, slirp.guest_ip())));
    }
    say(format_args!("guest {}", slirp.guest_ip()));

    const READY: &str = "ready: a line on stdin (or its end, or SIGINT/SIGTERM) tears down";
    let mut result = Ok(());
    let mut event = None;
    if let Some(ip) = args.reload_to {
        say(format_args!(
            "ready: a line on stdin reloads to {ip}, then another tears down"
        ));
        match input.wait()? {
            Event::Line => {
                let new_ip = ip.to_string();
                match rootlessport::reload::reload(&args.tmp_dir, &args.container_id, &new_ip) {
                    Ok(()) => {
                        say(format_args!("reload to {new_ip}: OK"));
                        say(READY);
                    }
                    Err(e) => result = Err(fail(e)),
                }
            }
            other => event = Some(other),
        }
    } else {
        say(READY);
    }
    if result.is_ok() && event.is_none() {
        event = Some(input.wait()?);
    }
    if let Some(Event::Signal(name)) = event {
        say(format_args!("{name}: tearing down"));
    }

    // Teardown, every step tried, in podman's order: the helper, then slirp4netns.
    let mut errors = Vec::new();
    if let Some((mut process, exit_w)) = helper {
        drop(exit_w);
        match process.wait_timeout(HELPER_EXIT_WAIT) {
            Ok(Some(status)) if status.success() => {}
            Ok(Some(status)) => errors.push(format!("rootlessport exited with {status}")),
            Ok(None) => {
                let _ = process.stop(Duration::from_secs(1));
                errors.push(format!(
                    "rootlessport did not exit within {}s of its exit pipe closing (killed)",
                    HELPER_EXIT_WAIT.as_secs()
                ));
            }
            Err(e) => errors.push(format!("waiting for rootlessport: {e}")),
        }
    }
    if let Err(e) = slirp.stop() {
        errors.push(e.to_string());
    }
    if let Err(mut f) = result {
        for e in errors {
            f.line = format!("{}; {e}", f.line);
        }
        return Err(f);
    }
    if !errors.is_empty() {
        return Err(fail(format!("teardown: {}", errors.join("; "))));
    }
    say("torn down");
    Ok(())
}

fn main() -> ExitCode {
    let outcome = parse_args(std::env::args().skip(1)).and_then(|args| match args {
        None => {
            say(USAGE);
            Ok(())
        }
        Some(args) => {
            let input = Input {
                pending: Vec::new(),
                signals: catch_signals()?,
            };
            run(args, input)
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("engine: {}", f.line);
            ExitCode::from(f.status)
        }
    }
}
