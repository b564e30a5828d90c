//! `rootlessport`: podman's port-forwarding helper, as a drop-in.
//!
//! Config JSON on stdin; one line on stdout and exit 1 for anything wrong before
//! ready; `1` on ReadyFD once every port is served; exit 0 when ExitFD reads EOF.
//!
//! # Logging
//!
//! Log lines go to stderr, each one starting with `rootlessport:` and its level
//! (`rootlessport: warning: ...`); stdout is kept for the one error line podman reads.
//!
//! - `ROOTLESSPORT_LOG`: which lines are written, in `tracing-subscriber`'s `EnvFilter`
//!   syntax: `debug`, `info`, `rootlessport=debug`, `rootlessport::tcp=trace,warn`...
//!   Level words are `off`, `error`, `warn` (or `warning`), `info`, `debug`, `trace`,
//!   in any case. Default `warn`. A value that does not parse, or a word in it that is
//!   not a level (`degub`: `EnvFilter` alone would take it for a target and turn every
//!   other line off), is replaced by the default, with one warning line saying so.
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

use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rootlessport::config::{parse_child_ip, plan_ports};
use rootlessport::forward::{bind_all, raise_nofile_limit, take_fds, Forwarder, DEFAULT_UDP_IDLE};
use rootlessport::reload::ReloadSocket;
use rootlessport::{errno_text, Config, Error};

/// A real config is about 100 bytes per mapping; this leaves room for 100,000 of them.
const STDIN_LIMIT: usize = 16 * 1024 * 1024;

/// The filter when `ROOTLESSPORT_LOG` is unset, empty or invalid.
const DEFAULT_FILTER: &str = "warn";

/// Set once stdout points at /dev/null (just before ReadyFD is written).
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

fn main() {
    if std::env::args_os().len() > 1 {
        // podman's exact words (a contract), before any logging is set up.
        eprintln!("too many arguments, rootlessport expects a json config via STDIN");
        std::process::exit(1);
    }
    logging::init();
    if let Err(e) = run() {
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
    tracing::debug!(
        "config: {} mapping(s), NetNSPath {:?}, ChildIP {:?}, RootlessCNI {}",
        cfg.mappings.len(),
        cfg.netns_path,
        cfg.child_ip,
        cfg.rootless_cni
    );
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
    let summary = format!(
        "{} port(s) into {} (child IP {})",
        specs.len(),
        cfg.netns_path,
        child_ip.map_or("loopback".to_string(), |ip| ip.to_string())
    );
    tracing::info!("{summary}");
    // Opened now, so that a bad path is reported while someone still reads stderr.
    let log_file = logging::open_file();
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
        container_id: cfg.container_id.clone(),
        preserve_source: cfg.preserve_source_ip
            && !matches!(
                std::env::var("ROOTLESSPORT_PRESERVE_SOURCE_IP").as_deref(),
                Ok("0" | "false" | "no" | "off")
            ),
    };
    let mut ready_fd = Some(ready_fd);
    forwarder.run(|| {
        let to_file = logging::redirect_std(log_file);
        STDOUT_GONE.store(true, Ordering::Relaxed);
        let fd = ready_fd.take().ok_or(Error::InvalidReadyFd)?;
        nix::unistd::write(&fd, b"1").map_err(|e| Error::Io {
            what: "writing to ReadyFD",
            source: e.into(),
        })?;
        drop(fd);
        if to_file {
            // The file's first line from this helper says which one it is.
            tracing::info!("ready: {summary}");
        }
        Ok(())
    })?;
    // Listeners and connections are closed by the kernel at exit.
    std::process::exit(0);
}

/// The log: a `tracing` subscriber on stderr, and where stderr goes once ready.
mod logging {
    use super::*;

    use std::fmt;
    use std::os::unix::fs::OpenOptionsExt;

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::EnvFilter;

    /// Set when stderr became `ROOTLESSPORT_LOG_FILE`: lines get a timestamp and pid.
    static STAMPED: AtomicBool = AtomicBool::new(false);

    /// Install the subscriber: stderr, filter from `ROOTLESSPORT_LOG`.
    pub(super) fn init() {
        let wanted = std::env::var("ROOTLESSPORT_LOG").ok();
        let parsed = match wanted.as_deref().map(directives) {
            None | Some(Ok(None)) => Ok(None),
            Some(Ok(Some(dirs))) => EnvFilter::try_new(dirs)
                .map(Some)
                .map_err(|e| e.to_string()),
            Some(Err(reason)) => Err(reason),
        };
        let (filter, invalid) = match parsed {
            Ok(Some(f)) => (f, None),
            Ok(None) => (EnvFilter::new(DEFAULT_FILTER), None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some(e)),
        };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_env_filter(filter)
            .event_format(Format)
            .try_init();
        if let Some(e) = invalid {
            tracing::warn!(
                "ROOTLESSPORT_LOG={:?} is not a valid filter ({e}); using {DEFAULT_FILTER:?}",
                wanted.unwrap_or_default()
            );
        }
    }

    /// `ROOTLESSPORT_LOG` as `EnvFilter` directives. `Ok(None)` for an empty value (the
    /// default, said nothing about); `Err` says why the value is refused.
    ///
    /// Each comma-separated entry is a level word (any case, `warning` for `warn`, or
    /// `EnvFilter`'s `0`..`5`), or a `target=level` / `target[span]=level` form (its
    /// level word taken the same way) or a span form, left to `EnvFilter` to check. A
    /// bare word that is not a level is refused: `EnvFilter` would take `degub` for a
    /// target name and turn every other line, warnings included, off.
    pub(super) fn directives(value: &str) -> Result<Option<String>, String> {
        fn level(word: &str) -> Option<&'static str> {
            const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
            if word.eq_ignore_ascii_case("warning") {
                return Some("warn");
            }
            let numeric = ["0", "1", "2", "3", "4", "5"]
                .iter()
                .position(|n| *n == word);
            numeric
                .or_else(|| LEVELS.iter().position(|l| l.eq_ignore_ascii_case(word)))
                .map(|i| LEVELS[i])
        }
        let mut out = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some(l) = level(entry) {
                out.push(l.to_string());
            } else if let Some((head, tail)) = entry.rsplit_once('=') {
                match level(tail.trim()) {
                    Some(l) => out.push(format!("{}={l}", head.trim_end())),
                    None => out.push(entry.to_string()),
                }
            } else if entry.contains('[') {
                out.push(entry.to_string());
            } else {
                return Err(format!(
                    "{entry:?} is not a level (off, error, warn, info, debug, trace) \
                     nor target=level"
                ));
            }
        }
        Ok((!out.is_empty()).then(|| out.join(",")))
    }

    /// Open `ROOTLESSPORT_LOG_FILE`, if set; a failure is one warning line, never an
    /// error of the helper. Only a regular file is taken, and the open never blocks (a
    /// FIFO nobody reads would otherwise hold the helper before ready).
    pub(super) fn open_file() -> Option<File> {
        let path = std::env::var_os("ROOTLESSPORT_LOG_FILE").filter(|p| !p.is_empty())?;
        let not_regular = || "not a regular file".to_string();
        let opened = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| {
                // A FIFO without a reader, a socket (ENXIO), a directory: say what it is.
                match std::fs::metadata(&path) {
                    Ok(m) if !m.is_file() => not_regular(),
                    _ => errno_text(&e),
                }
            })
            .and_then(|f| match f.metadata() {
                Ok(m) if m.is_file() => Ok(f),
                Ok(_) => Err(not_regular()),
                Err(e) => Err(errno_text(&e)),
            })
            .and_then(|f| {
                use nix::fcntl::{fcntl, FcntlArg, OFlag};
                let flags = fcntl(&f, FcntlArg::F_GETFL).map_err(|e| errno_text(&e.into()))?;
                let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
                fcntl(&f, FcntlArg::F_SETFL(flags)).map_err(|e| errno_text(&e.into()))?;
                Ok(f)
            });
        match opened {
            Ok(f) => Some(f),
            Err(reason) => {
                tracing::warn!(
                    "cannot open ROOTLESSPORT_LOG_FILE {}: {reason}; logging as without it",
                    Path::new(&path).display(),
                );
                None
            }
        }
    }

    /// At ready: stdout to /dev/null; stderr to `file` if given, else kept when it is a
    /// regular file or a terminal, else to /dev/null. True when stderr is now `file`.
    pub(super) fn redirect_std(file: Option<File>) -> bool {
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null");
        if let Ok(null) = &null {
            let _ = nix::unistd::dup2_stdout(null);
        }
        if let Some(file) = file {
            if nix::unistd::dup2_stderr(&file).is_ok() {
                STAMPED.store(true, Ordering::Relaxed);
                return true;
            }
        }
        if !stderr_is_kept() {
            if let Ok(null) = &null {
                let _ = nix::unistd::dup2_stderr(null);
            }
        }
        false
    }

    /// A terminal, or a regular file with a name (a log a person can open): nobody has
    /// to keep reading it for us to go on. An unlinked file (a launcher's start-up log,
    /// read back only on failure) is not kept: nobody could read what comes later.
    fn stderr_is_kept() -> bool {
        use nix::sys::stat::{fstat, SFlag};
        let stderr = std::io::stderr();
        stderr.is_terminal()
            || fstat(&stderr).is_ok_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
                    && st.st_nlink > 0
            })
    }

    /// `rootlessport: warning: message key=value`, the module before the message of
    /// debug and trace lines, and a timestamp and pid first in `ROOTLESSPORT_LOG_FILE`.
    struct Format;

    impl<S, N> FormatEvent<S, N> for Format
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut w: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            let meta = event.metadata();
            if STAMPED.load(Ordering::Relaxed) {
                SystemTime.format_time(&mut w)?;
                write!(w, " rootlessport[{}]: ", std::process::id())?;
            } else {
                w.write_str("rootlessport: ")?;
            }
            let (word, colour) = match *meta.level() {
                Level::ERROR => ("error", "31"),
                Level::WARN => ("warning", "33"),
                Level::INFO => ("info", "32"),
                Level::DEBUG => ("debug", "34"),
                Level::TRACE => ("trace", "35"),
            };
            if w.has_ansi_escapes() {
                write!(w, "\x1b[{colour}m{word}\x1b[0m: ")?;
            } else {
                write!(w, "{word}: ")?;
            }
            // Which module, for debug and trace lines (`tcp: ...`), the binary's own
            // lines aside: what `ROOTLESSPORT_LOG=rootlessport::tcp=debug` selects.
            let target = meta.target();
            if *meta.level() >= Level::DEBUG && target != "rootlessport" {
                let short = target.strip_prefix("rootlessport::").unwrap_or(target);
                write!(w, "{short}: ")?;
            }
            ctx.format_fields(w.by_ref(), event)?;
            writeln!(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::logging::directives;

    #[test]
    fn level_words_any_case_and_warning() {
        assert_eq!(directives("warning"), Ok(Some("warn".into())));
        assert_eq!(directives("WARN"), Ok(Some("warn".into())));
        assert_eq!(directives("Warning"), Ok(Some("warn".into())));
        assert_eq!(directives("Debug"), Ok(Some("debug".into())));
        assert_eq!(directives("off"), Ok(Some("off".into())));
        assert_eq!(directives(" trace "), Ok(Some("trace".into())));
        assert_eq!(directives("4"), Ok(Some("debug".into())));
    }

    #[test]
    fn bare_word_not_a_level_is_refused() {
        let e = directives("degub").unwrap_err();
        assert!(e.contains("\"degub\""), "{e}");
        assert!(directives("info,degub").is_err());
        assert!(directives("rootlessport").is_err());
        assert!(directives("6").is_err());
    }

    #[test]
    fn target_forms() {
        assert_eq!(
            directives("rootlessport=debug"),
            Ok(Some("rootlessport=debug".into()))
        );
        assert_eq!(
            directives("rootlessport::udp=trace,warn"),
            Ok(Some("rootlessport::udp=trace,warn".into()))
        );
        assert_eq!(
            directives("rootlessport::tcp=Warning, INFO"),
            Ok(Some("rootlessport::tcp=warn,info".into()))
        );
        assert_eq!(
            directives("rootlessport[conn]=debug"),
            Ok(Some("rootlessport[conn]=debug".into()))
        );
        // An unknown level after `=` is left to EnvFilter, which refuses it.
        assert_eq!(
            directives("rootlessport=degub"),
            Ok(Some("rootlessport=degub".into()))
        );
    }

    #[test]
    fn empty_is_the_default() {
        assert_eq!(directives(""), Ok(None));
        assert_eq!(directives("  "), Ok(None));
        assert_eq!(directives(","), Ok(None));
    }

    #[test]
    fn every_accepted_value_builds_a_filter() {
        use tracing_subscriber::EnvFilter;
        for v in [
            "warning",
            "WARN",
            "rootlessport=debug",
            "rootlessport::udp=trace,warn",
            "rootlessport::tcp=Warning, INFO",
            "rootlessport[conn]=debug",
        ] {
            let d = directives(v).unwrap().unwrap();
            assert!(EnvFilter::try_new(&d).is_ok(), "{v} -> {d}");
        }
        assert!(EnvFilter::try_new("rootlessport=degub").is_err());
    }
}
