//! The log: a `tracing` subscriber on stderr, and where stderr goes once ready (see
//! the binary's `# Logging`).

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rootlessport::helper::errno_text;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The filter when `ROOTLESSPORT_LOG` is unset, empty or invalid.
const DEFAULT_FILTER: &str = "warn";

/// Set when stderr became `ROOTLESSPORT_LOG_FILE`: lines get a timestamp and pid.
static STAMPED: AtomicBool = AtomicBool::new(false);

/// Install the subscriber: stderr, filtered by `wanted` (`ROOTLESSPORT_LOG`).
pub(super) fn init(wanted: Option<&str>) {
    let parsed = match wanted.map(directives) {
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

/// Open `path` (`ROOTLESSPORT_LOG_FILE`), if given; a failure is one warning line,
/// never an error of the helper. Only a regular file is taken, and the open never
/// blocks (a FIFO nobody reads would otherwise hold the helper before ready).
pub(super) fn open_file(path: Option<&OsStr>) -> Option<File> {
    let path = path.filter(|p| !p.is_empty())?;
    let not_regular = || "not a regular file".to_string();
    let opened = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            // A FIFO without a reader, a socket (ENXIO), a directory: say what it is.
            match std::fs::metadata(path) {
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
                Path::new(path).display(),
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

#[cfg(test)]
mod tests {
    use super::directives;

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
