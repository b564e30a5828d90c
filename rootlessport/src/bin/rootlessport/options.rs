//! Everything the helper takes from its environment, read once at start.

use std::ffi::OsString;
use std::time::Duration;

use rootlessport::helper::Options;

/// The helper's environment (see the binary's documentation): the log's settings, and
/// the forwarding options the library takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HelperOptions {
    /// `ROOTLESSPORT_LOG`: which lines are written (level words and `module=level`
    /// entries, see [`crate::logging::directives`]); unset: `warn`.
    pub(crate) log: Option<String>,
    /// `ROOTLESSPORT_LOG_FILE`: where the log goes once ready; unset or empty: nowhere
    /// of its own.
    pub(crate) log_file: Option<OsString>,
    /// `ROOTLESSPORT_UDP_IDLE_SECS` (seconds, default 90), `ROOTLESSPORT_THREADS`
    /// (default 1), `ROOTLESSPORT_PIPE_KB` (KiB, default 256) and
    /// `ROOTLESSPORT_PRESERVE_SOURCE_IP` (`0`, `false`, `no` or `off` turn keeping
    /// client addresses off); a value that does not parse is the default.
    pub(crate) forwarding: Options,
}

impl HelperOptions {
    /// Read from this process's environment.
    pub(crate) fn from_env() -> HelperOptions {
        HelperOptions::from_vars(|name| std::env::var_os(name))
    }

    /// Read through `var`, which gives a variable's value by name.
    fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> HelperOptions {
        let text = |name: &str| var(name).and_then(|v| v.into_string().ok());
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let mut forwarding = Options::default();
        if let Some(secs) = number("ROOTLESSPORT_UDP_IDLE_SECS") {
            forwarding.udp_idle = Duration::from_secs(secs);
        }
        if let Some(n) = number("ROOTLESSPORT_THREADS") {
            forwarding.threads = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(kib) = number("ROOTLESSPORT_PIPE_KB") {
            forwarding.pipe_size = usize::try_from(kib.saturating_mul(1024)).unwrap_or(usize::MAX);
        }
        if let Some("0" | "false" | "no" | "off") =
            text("ROOTLESSPORT_PRESERVE_SOURCE_IP").as_deref()
        {
            forwarding.preserve_source_ip = false;
        }
        HelperOptions {
            // Not UTF-8: kept (lossily) so that the filter refuses it with its warning
            // instead of it being dropped unsaid.
            log: var("ROOTLESSPORT_LOG").map(|v| v.to_string_lossy().into_owned()),
            log_file: var("ROOTLESSPORT_LOG_FILE"),
            forwarding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> HelperOptions {
        HelperOptions::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn defaults_when_unset_or_unparsable() {
        let none = read(&[]);
        assert_eq!(none.forwarding, Options::default());
        assert_eq!((none.log, none.log_file), (None, None));
        let junk = read(&[
            ("ROOTLESSPORT_UDP_IDLE_SECS", "soon"),
            ("ROOTLESSPORT_THREADS", "-1"),
            ("ROOTLESSPORT_PIPE_KB", ""),
            ("ROOTLESSPORT_PRESERVE_SOURCE_IP", "1"),
        ]);
        assert_eq!(junk.forwarding, Options::default());
    }

    #[test]
    fn every_variable() {
        let o = read(&[
            ("ROOTLESSPORT_LOG", "debug"),
            ("ROOTLESSPORT_LOG_FILE", "/tmp/rp.log"),
            ("ROOTLESSPORT_UDP_IDLE_SECS", "5"),
            ("ROOTLESSPORT_THREADS", "2"),
            ("ROOTLESSPORT_PIPE_KB", "64"),
            ("ROOTLESSPORT_PRESERVE_SOURCE_IP", "off"),
        ]);
        assert_eq!(o.log.as_deref(), Some("debug"));
        assert_eq!(o.log_file, Some("/tmp/rp.log".into()));
        assert_eq!(o.forwarding.udp_idle, Duration::from_secs(5));
        assert_eq!(o.forwarding.threads, 2);
        assert_eq!(o.forwarding.pipe_size, 64 * 1024);
        assert!(!o.forwarding.preserve_source_ip);
        for off in ["0", "false", "no"] {
            let o = read(&[("ROOTLESSPORT_PRESERVE_SOURCE_IP", off)]);
            assert!(!o.forwarding.preserve_source_ip, "{off}");
        }
    }
}
