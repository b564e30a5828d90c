//! The log: a `tracing` subscriber on stderr, and where stderr goes once ready (see
//! the binary's `# Logging`).

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rootlessport::helper::errno_text;

use tracing::subscriber::NoSubscriber;
use tracing::{span, Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::Layer;

/// The level when `ROOTLESSPORT_LOG` is unset, empty or invalid.
const DEFAULT_LEVEL: LevelFilter = LevelFilter::WARN;

/// Set when stderr became `ROOTLESSPORT_LOG_FILE`: lines get a timestamp and pid.
static STAMPED: AtomicBool = AtomicBool::new(false);

/// Install the subscriber: stderr, filtered by `wanted` (`ROOTLESSPORT_LOG`).
pub(super) fn init(wanted: Option<&str>) {
    let default = || Targets::new().with_default(DEFAULT_LEVEL);
    let (filter, invalid) = match wanted.map(directives) {
        None | Some(Ok(None)) => (default(), None),
        Some(Ok(Some(targets))) => (targets, None),
        Some(Err(reason)) => (default(), Some(reason)),
    };
    let _ = tracing::subscriber::set_global_default(Stderr {
        filter,
        ansi: std::io::stderr().is_terminal(),
    });
    if let Some(e) = invalid {
        tracing::warn!(
            "ROOTLESSPORT_LOG={:?} is not a valid filter ({e}); using \"{DEFAULT_LEVEL}\"",
            wanted.unwrap_or_default()
        );
    }
}

/// `ROOTLESSPORT_LOG` as a filter of `tracing-subscriber`'s [`Targets`]. `Ok(None)`
/// for an empty value (the default, said nothing about); `Err` says why the value is
/// refused.
///
/// Comma-separated entries, each a level word (any case, `warning` for `warn`, or `0`
/// (`off`) to `5` (`trace`)) for every line, or `target=level` (its level word taken
/// the same way) for the lines whose target (the module path) starts with `target`
/// (`rootlessport::tcp=debug`; a prefix as text, as `Targets` matches, so
/// `rootlessport::forw` also selects `rootlessport::forward`); the most specific entry for a line wins, and a later
/// entry replaces an earlier one for the same target. Anything else is refused: a bare
/// word that is not a level (`degub` would otherwise be taken for a target and turn
/// every other line, warnings included, off), and `EnvFilter`'s span and field forms
/// (`target[span]=level`), which this helper never took into account (it has no spans).
pub(super) fn directives(value: &str) -> Result<Option<Targets>, String> {
    fn level(word: &str) -> Option<LevelFilter> {
        if word.eq_ignore_ascii_case("warning") {
            return Some(LevelFilter::WARN);
        }
        // `LevelFilter`'s own parser: the level names in any case and `0` (`off`) to
        // `5` (`trace`). Not what it also takes: `""` (as `error`) and longer numbers
        // (`05`, `+5`).
        let not_a_long_number =
            word.len() == 1 || !word.starts_with(|c: char| c.is_ascii_digit() || c == '+');
        (!word.is_empty() && not_a_long_number)
            .then(|| word.parse().ok())
            .flatten()
    }
    const LEVEL_WORDS: &str = "off, error, warn, info, debug, trace";
    let mut targets = Targets::new();
    let mut any = false;
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if let Some(l) = level(entry) {
            targets = targets.with_default(l);
        } else if let Some((target, word)) = entry.split_once('=') {
            let target = target.trim_end();
            let word = word.trim_start();
            let l = level(word)
                .ok_or_else(|| format!("{word:?} in {entry:?} is not a level ({LEVEL_WORDS})"))?;
            let is_path = |t: &str| {
                !t.is_empty()
                    && t.split("::").all(|part| {
                        !part.is_empty()
                            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
            };
            if !is_path(target) {
                return Err(format!(
                    "{target:?} in {entry:?} is not a module path such as rootlessport::tcp \
                     (span and field filters are not supported)"
                ));
            }
            targets = targets.with_target(target, l);
        } else {
            return Err(format!(
                "{entry:?} is not a level ({LEVEL_WORDS}) nor target=level"
            ));
        }
        any = true;
    }
    Ok(any.then_some(targets))
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

/// The helper's subscriber: lines filtered by a [`Targets`], formatted as
/// `rootlessport: warning: message key=value` (the module before the message of debug
/// and trace lines, a timestamp and pid first in `ROOTLESSPORT_LOG_FILE`), one
/// `write` to stderr each.
///
/// Not `tracing_subscriber::fmt()`: that one is built on the span `Registry`, whose
/// slab allocates and zeroes 32 KB (4,096 shard pointers) when it is made, resident for
/// the helper's life (docs/performance-analysis.md section 12). The helper records no
/// spans, so it needs no span store.
struct Stderr {
    filter: Targets,
    /// Colour the level word (stderr was a terminal at start).
    ansi: bool,
}

impl Stderr {
    /// One log line for `event`, with its newline.
    fn line(&self, event: &Event<'_>) -> Result<String, fmt::Error> {
        let mut line = String::new();
        let mut w = Writer::new(&mut line);
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
        if self.ansi {
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
        DefaultFields::new().format_fields(w.by_ref(), event)?;
        writeln!(w)?;
        Ok(line)
    }
}

impl Subscriber for Stderr {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter.would_enable(meta.target(), meta.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // The most verbose level of any entry (what `Targets` tells any subscriber it
        // is layered on; the subscriber type plays no part).
        Layer::<NoSubscriber>::max_level_hint(&self.filter)
    }

    fn event(&self, event: &Event<'_>) {
        if let Ok(line) = self.line(event) {
            // Nothing to do about a log that cannot be written.
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    // No spans: the helper records none, and a span from a library is not kept.
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::directives;
    use tracing::Level;
    use tracing_subscriber::filter::Targets;

    /// Whether `targets` lets a line of `level` from `target` through.
    fn passes(targets: &Targets, target: &str, level: Level) -> bool {
        targets.would_enable(target, &level)
    }

    fn parsed(value: &str) -> Targets {
        directives(value).unwrap().unwrap()
    }

    #[test]
    fn level_words_any_case_and_warning() {
        for (value, on, off) in [
            ("warning", Level::WARN, Some(Level::INFO)),
            ("WARN", Level::WARN, Some(Level::INFO)),
            ("Warning", Level::WARN, Some(Level::INFO)),
            ("Debug", Level::DEBUG, Some(Level::TRACE)),
            (" trace ", Level::TRACE, None),
            ("4", Level::DEBUG, Some(Level::TRACE)),
            ("1", Level::ERROR, Some(Level::WARN)),
        ] {
            let t = parsed(value);
            assert!(passes(&t, "rootlessport::tcp", on), "{value}");
            if let Some(off) = off {
                assert!(!passes(&t, "rootlessport::tcp", off), "{value}");
            }
        }
        let off = parsed("off");
        assert!(!passes(&off, "rootlessport", Level::ERROR));
    }

    #[test]
    fn bare_word_not_a_level_is_refused() {
        let e = directives("degub").unwrap_err();
        assert!(e.contains("\"degub\""), "{e}");
        assert!(directives("info,degub").is_err());
        assert!(directives("rootlessport").is_err());
        assert!(directives("6").is_err());
        // What `LevelFilter` would parse but is not a level word here.
        for v in ["05", "+5", "rootlessport="] {
            assert!(directives(v).is_err(), "{v}");
        }
    }

    #[test]
    fn target_forms_select_a_module_and_those_below_it() {
        let t = parsed("rootlessport::udp=trace,warn");
        assert!(passes(&t, "rootlessport::udp", Level::TRACE));
        assert!(passes(&t, "rootlessport::tcp", Level::WARN));
        assert!(!passes(&t, "rootlessport::tcp", Level::INFO));
        let t = parsed("rootlessport::tcp=Warning, INFO");
        assert!(!passes(&t, "rootlessport::tcp", Level::INFO));
        assert!(passes(&t, "rootlessport::udp", Level::INFO));
        // Only the named module's lines (and its children's): no default given, so
        // the rest is off, as with EnvFilter.
        let t = parsed("rootlessport=debug");
        assert!(passes(&t, "rootlessport", Level::DEBUG));
        assert!(passes(&t, "rootlessport::forward", Level::DEBUG));
        assert!(!passes(&t, "rootlessport::tcp", Level::TRACE));
        assert!(!passes(&t, "tokio::runtime", Level::ERROR));
    }

    #[test]
    fn bad_target_forms_are_refused_naming_the_entry() {
        let e = directives("rootlessport=degub").unwrap_err();
        assert!(
            e.contains("\"degub\"") && e.contains("rootlessport=degub"),
            "{e}"
        );
        let e = directives("rootlessport[conn]=debug").unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        assert!(directives("=debug").is_err());
        assert!(directives("a::=debug").is_err());
        assert!(directives("a=b=debug").is_err());
    }

    #[test]
    fn empty_is_the_default() {
        assert!(directives("").unwrap().is_none());
        assert!(directives("  ").unwrap().is_none());
        assert!(directives(",").unwrap().is_none());
    }
}
