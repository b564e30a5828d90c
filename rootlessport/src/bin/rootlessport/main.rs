//! `rootlessport`: podman's port-forwarding helper, as a drop-in.
//!
//! Config JSON on stdin; one line on stdout and exit 1 for anything wrong before
//! ready; `1` on ReadyFD once every port is served; exit 0 when ExitFD reads EOF.
//!
//! The environment is read once, at start ([`options::HelperOptions`]): the log's two
//! variables below, and `ROOTLESSPORT_UDP_IDLE_SECS`, `ROOTLESSPORT_THREADS`,
//! `ROOTLESSPORT_PIPE_KB` and `ROOTLESSPORT_PRESERVE_SOURCE_IP` (see the README) for
//! [`rootlessport::helper::Options`]. The forwarding itself is the library's
//! [`Helper`]; this file reads stdin, takes the fds, and sets up the log.
//!
//! # Logging
//!
//! Log lines go to stderr, each one starting with `rootlessport:` and its level
//! (`rootlessport: warning: ...`); stdout is kept for the one error line podman reads.
//!
//! - `ROOTLESSPORT_LOG`: which lines are written: comma-separated level words for
//!   every line and `module=level` entries for a module's lines (those of the modules
//!   below it included), as `tracing-subscriber`'s `Targets` takes them: `debug`,
//!   `info`, `rootlessport=debug`, `rootlessport::tcp=trace,warn`... Level words are
//!   `off`, `error`, `warn` (or `warning`), `info`, `debug`, `trace` in any case, or
//!   `0` to `5`. Default `warn`. A value with anything else in it (a word that is not
//!   a level, such as `degub`, which a target filter would take for a module name and
//!   so turn every other line off; `EnvFilter`'s span and field forms) is replaced by
//!   the default, with one warning line saying so.
//! - `ROOTLESSPORT_LOG_FILE`: a file the log goes to once the helper is ready (opened
//!   when it starts, appended to, created with mode 0600). Its lines also carry a UTC
//!   timestamp and the helper's pid (`2024-05-01T12:00:00.123456Z rootlessport[4242]:
//!   info: ...`), as several helpers may share one file. Only a regular file is taken
//!   (a FIFO, socket, directory or device is refused, and opening never blocks). If it
//!   cannot be opened, one warning line says so before ready and the helper carries on
//!   as without it.
//!
//! Where stderr goes once ready: to `ROOTLESSPORT_LOG_FILE` when set; otherwise a
//! regular file or a terminal is kept (an engine's log file, a person running the
//! helper by hand), and anything else, such as the pipe podman stops reading once the
//! container started, is replaced by `/dev/null`, so that neither a full pipe nor a
//! closed one can block or kill the helper. stdout always goes to `/dev/null` once
//! ready.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

use rootlessport::helper::Helper;
use rootlessport::{Config, Error};

mod logging;
mod options;
mod startup;

use options::HelperOptions;

/// A real config is about 100 bytes per mapping; this leaves room for 100,000 of them.
const STDIN_LIMIT: usize = 16 * 1024 * 1024;

/// Set once stdout points at /dev/null (just before ReadyFD is written).
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Why the helper stopped before it was ready: the one line it prints.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("reading the config from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("config on stdin is larger than {limit} bytes")]
    StdinTooLarge { limit: usize },
    #[error(transparent)]
    Helper(#[from] Error),
}

fn main() {
    if std::env::args_os().len() > 1 {
        // podman's exact words (a contract), before any logging is set up.
        eprintln!("too many arguments, rootlessport expects a json config via STDIN");
        std::process::exit(1);
    }
    let options = HelperOptions::from_env();
    logging::init(options.log.as_deref());
    if let Err(e) = run(&options) {
        if STDOUT_GONE.load(Ordering::Relaxed) {
            // stdout is /dev/null by now: the log is the only place left to say it.
            tracing::error!("{e}");
        } else {
            // The line podman reports (and, for a debug log, the same in the log).
            tracing::debug!("failed before ready: {e}");
            println!("{e}");
        }
        std::process::exit(1);
    }
}

fn run(options: &HelperOptions) -> Result<(), Failure> {
    startup::keep_freed_heap();
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(STDIN_LIMIT as u64 + 1)
        .read_to_end(&mut input)
        .map_err(Failure::Stdin)?;
    if input.len() > STDIN_LIMIT {
        return Err(Failure::StdinTooLarge { limit: STDIN_LIMIT });
    }
    let cfg = Config::from_json(&input)?;
    drop(input);
    tracing::debug!(
        "config: {} mapping(s), NetNSPath {:?}, ChildIP {:?}, RootlessCNI {}",
        cfg.mappings.len(),
        cfg.netns_path,
        cfg.child_ip,
        cfg.rootless_cni
    );
    let (exit_fd, ready_fd) = startup::take_fds(&cfg)?;
    rootlessport::helper::raise_nofile_limit();
    startup::limit_malloc_arenas(options.forwarding.threads);
    let mut forwarding = options.forwarding.clone();
    forwarding.exit_after_run = true;
    let netns_path = cfg.netns_path.clone();
    let helper = Helper::bind(cfg, exit_fd, &forwarding)?;
    let summary = format!(
        "{} port(s) into {} (child IP {})",
        helper.ports(),
        netns_path,
        helper
            .child_ip()
            .map_or("loopback".to_string(), |ip| ip.to_string())
    );
    tracing::info!("{summary}");
    // Opened now, so that a bad path is reported while someone still reads stderr.
    let log_file = logging::open_file(options.log_file.as_deref());
    let mut ready_fd = Some(ready_fd);
    helper.run(|| {
        let to_file = logging::redirect_std(log_file);
        STDOUT_GONE.store(true, Ordering::Relaxed);
        let fd = ready_fd.take().ok_or(Error::InvalidReadyFd)?;
        nix::unistd::write(&fd, b"1").map_err(|e| Error::Io {
            what: "writing to ReadyFD",
            source: e.into(),
        })?;
        drop(fd);
        startup::release_start_up_heap();
        if to_file {
            // The file's first line from this helper says which one it is.
            tracing::info!("ready: {summary}");
        }
        Ok(())
    })?;
    // Listeners and connections are closed by the kernel at exit.
    std::process::exit(0);
}
