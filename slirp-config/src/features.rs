//! What a slirp4netns binary supports, found from its `--help` and `--version` texts.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

use crate::error::ProbeFailure;
use crate::Error;

/// How long a `--help` or `--version` probe may take before we give up on the binary.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Probe output beyond this is not kept (a real help text is under 2 KiB).
const PROBE_OUTPUT_LIMIT: u64 = 64 * 1024;

/// Options a slirp4netns binary advertises in its `--help`: podman's `slirpFeatures`
/// (`libpod/networking_slirp4netns.go`), plus the options podman does not probe for.
/// The [`Default`] has none of them. Versions below are slirp4netns's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlirpFeatures {
    /// `--disable-host-loopback`: the guest can be kept off the host's 127.0.0.1.
    pub has_disable_host_loopback: bool,
    /// `--mtu`.
    pub has_mtu: bool,
    /// `--enable-sandbox`: slirp4netns pivots into a mount namespace of its own (0.4+).
    pub has_enable_sandbox: bool,
    /// `--enable-seccomp` (0.4+).
    pub has_enable_seccomp: bool,
    /// `--cidr`: a network other than `10.0.2.0/24`.
    pub has_cidr: bool,
    /// `--outbound-addr` (and `--outbound-addr6`, 1.1+).
    pub has_outbound_addr: bool,
    /// `--enable-ipv6`.
    pub has_ipv6: bool,
    /// `--netns-type=path`: the netns can be named by path instead of a PID (0.4+).
    pub has_netns_type: bool,
    /// `--userns-path` (0.4+).
    pub has_userns_path: bool,
    /// `--disable-dns` (1.1+).
    pub has_disable_dns: bool,
    /// `--macaddress` (1.1+).
    pub has_macaddress: bool,
}

impl SlirpFeatures {
    /// Detect features the way podman does: by the option names the help text mentions.
    ///
    /// ```
    /// let f = slirp_config::SlirpFeatures::from_help("--mtu=MTU\n--enable-ipv6\n");
    /// assert!(f.has_mtu && f.has_ipv6 && !f.has_cidr);
    /// ```
    pub fn from_help(help: &str) -> Self {
        let has = |flag: &str| help.contains(flag);
        SlirpFeatures {
            has_disable_host_loopback: has("--disable-host-loopback"),
            has_mtu: has("--mtu"),
            has_enable_sandbox: has("--enable-sandbox"),
            has_enable_seccomp: has("--enable-seccomp"),
            has_cidr: has("--cidr"),
            has_outbound_addr: has("--outbound-addr"),
            has_ipv6: has("--enable-ipv6"),
            has_netns_type: has("--netns-type"),
            has_userns_path: has("--userns-path"),
            has_disable_dns: has("--disable-dns"),
            has_macaddress: has("--macaddress"),
        }
    }
}

/// What `slirp4netns --version` reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlirpVersion {
    /// slirp4netns's own version, e.g. `1.2.0`.
    pub version: String,
    /// The `commit:` line: the git commit it was built from.
    pub commit: Option<String>,
    /// The libslirp it runs on, e.g. `4.7.0`.
    pub libslirp: Option<String>,
    /// The newest `SlirpConfig` version the libslirp build supports.
    pub slirp_config_version_max: Option<u32>,
    /// The `libseccomp:` line: the libseccomp it was built with.
    pub libseccomp: Option<String>,
}

impl SlirpVersion {
    /// Parse the `--version` text; `None` when its first line is not
    /// `slirp4netns version X`.
    ///
    /// ```
    /// let v = slirp_config::SlirpVersion::parse(
    ///     "slirp4netns version 1.2.0\nlibslirp: 4.7.0\nSLIRP_CONFIG_VERSION_MAX: 4\n").unwrap();
    /// assert_eq!(v.numeric(), Some((1, 2, 0)));
    /// assert_eq!(v.slirp_config_version_max, Some(4));
    /// ```
    pub fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let first = lines.next()?.trim();
        let version = first.strip_prefix("slirp4netns version ")?.trim();
        if version.is_empty() {
            return None;
        }
        let mut v = SlirpVersion {
            version: version.to_owned(),
            ..Default::default()
        };
        for line in lines {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "commit" => v.commit = Some(value.to_owned()),
                "libslirp" => v.libslirp = Some(value.to_owned()),
                "SLIRP_CONFIG_VERSION_MAX" => v.slirp_config_version_max = value.parse().ok(),
                "libseccomp" => v.libseccomp = Some(value.to_owned()),
                _ => {}
            }
        }
        Some(v)
    }

    /// The version as (major, minor, patch), ignoring any suffix such as `+dev`.
    pub fn numeric(&self) -> Option<(u32, u32, u32)> {
        let core = self.version.split(['+', '-', '~']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>());
        let major = parts.next()?.ok()?;
        let minor = parts.next().unwrap_or(Ok(0)).ok()?;
        let patch = parts.next().unwrap_or(Ok(0)).ok()?;
        Some((major, minor, patch))
    }
}

/// Find `slirp4netns` (or another program name) in `PATH`: the first regular file of
/// that name with an execute bit, as Go's `exec.LookPath` (podman's lookup) finds it.
/// A name holding `/` is returned as it is, unchecked; `None` when nothing is found or
/// `PATH` is unset.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Run `BINARY --help` (once per binary) and detect its features.
///
/// The result is cached by path, device, inode, size and modification time, so an
/// upgraded or replaced binary is probed again. A bare name is looked up in `PATH`.
/// podman's `checkSlirpFlags` (`libpod/networking_slirp4netns.go`), which probes on
/// every container start.
///
/// # Errors
///
/// [`Error::Probe`] when the binary cannot be run, exits with a status other than 0,
/// or has not finished within [`PROBE_TIMEOUT`] (it is killed then).
pub fn check_slirp_flags(binary: &Path) -> Result<SlirpFeatures, Error> {
    probe_cached(binary, "--help").map(|out| SlirpFeatures::from_help(&out))
}

/// Run `BINARY --version` (cached like [`check_slirp_flags`]) and parse it.
///
/// # Errors
///
/// [`Error::Probe`] as for [`check_slirp_flags`]; [`Error::BadVersion`] when the text
/// does not start with `slirp4netns version X`.
pub fn slirp_version(binary: &Path) -> Result<SlirpVersion, Error> {
    let out = probe_cached(binary, "--version")?;
    SlirpVersion::parse(&out).ok_or_else(|| Error::BadVersion {
        binary: binary.to_owned(),
        output: out,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileKey {
    fn of(path: &Path) -> Option<FileKey> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

type ProbeCache = HashMap<(PathBuf, &'static str), (FileKey, String)>;

fn cache() -> &'static Mutex<ProbeCache> {
    static CACHE: OnceLock<Mutex<ProbeCache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn probe_cached(binary: &Path, arg: &'static str) -> Result<String, Error> {
    let resolved = binary
        .to_str()
        .and_then(find_binary)
        .unwrap_or_else(|| binary.to_owned());
    let key_before = FileKey::of(&resolved);
    if let Some(key) = key_before {
        let cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, out)) = cache.get(&(resolved.clone(), arg)) {
            if *k == key {
                return Ok(out.clone());
            }
        }
    }
    let out = run_probe(&resolved, arg)?;
    // Cache only when the file did not change while it ran.
    if let (Some(before), Some(after)) = (key_before, FileKey::of(&resolved)) {
        if before == after {
            let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
            cache.insert((resolved, arg), (after, out.clone()));
        }
    }
    Ok(out)
}

/// Run `binary arg` with stdout and stderr in one pipe (like Go's CombinedOutput),
/// bounded in time and in output size.
fn run_probe(binary: &Path, arg: &'static str) -> Result<String, Error> {
    let fail = |output: String, reason: ProbeFailure| Error::Probe {
        binary: binary.to_owned(),
        arg,
        output,
        reason,
    };
    let (mut reader, writer) = std::io::pipe().map_err(|e| fail(String::new(), e.into()))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| fail(String::new(), e.into()))?;
    let mut cmd = Command::new(binary);
    cmd.arg(arg)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2);
    let mut child = spawn_retrying_busy(&mut cmd).map_err(|e| fail(String::new(), e.into()))?;
    // Our copies of the write end went with `cmd`; drop it so EOF can come.
    drop(cmd);

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let res = (&mut reader).take(PROBE_OUTPUT_LIMIT).read_to_end(&mut buf);
        let _ = tx.send(res.map(|_| buf));
    });
    let output = match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(Ok(buf)) => String::from_utf8_lossy(&buf).into_owned(),
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(String::new(), e.into()));
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(String::new(), ProbeFailure::NoAnswer(PROBE_TIMEOUT)));
        }
    };
    let status = child.wait().map_err(|e| fail(output.clone(), e.into()))?;
    if status.success() {
        Ok(output)
    } else {
        Err(fail(output, ProbeFailure::Status(status)))
    }
}

/// Spawn, retrying briefly on ETXTBSY: a binary that is being replaced (or was just
/// written by another thread that forked meanwhile) is busy for a moment.
fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut attempt = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && attempt < 10 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(10 * attempt));
            }
            res => return res,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP_030: &str = include_str!("../fixtures/slirp4netns-0.3.0-help.txt");
    const HELP_100: &str = include_str!("../fixtures/slirp4netns-1.0.0-help.txt");
    const HELP_120: &str = include_str!("../fixtures/slirp4netns-1.2.0-help.txt");
    const VERSION_120: &str = include_str!("../fixtures/slirp4netns-1.2.0-version.txt");

    #[test]
    fn fixture_0_3_0() {
        let f = SlirpFeatures::from_help(HELP_030);
        let want = SlirpFeatures {
            has_disable_host_loopback: true,
            has_mtu: true,
            has_cidr: true,
            has_ipv6: true,
            ..Default::default()
        };
        assert_eq!(f, want);
    }

    #[test]
    fn fixture_1_0_0() {
        let f = SlirpFeatures::from_help(HELP_100);
        let want = SlirpFeatures {
            has_disable_host_loopback: true,
            has_mtu: true,
            has_enable_sandbox: true,
            has_enable_seccomp: true,
            has_cidr: true,
            has_ipv6: true,
            has_netns_type: true,
            has_userns_path: true,
            ..Default::default()
        };
        assert_eq!(f, want);
    }

    #[test]
    fn fixture_1_2_0() {
        let f = SlirpFeatures::from_help(HELP_120);
        let want = SlirpFeatures {
            has_disable_host_loopback: true,
            has_mtu: true,
            has_enable_sandbox: true,
            has_enable_seccomp: true,
            has_cidr: true,
            has_outbound_addr: true,
            has_ipv6: true,
            has_netns_type: true,
            has_userns_path: true,
            has_disable_dns: true,
            has_macaddress: true,
        };
        assert_eq!(f, want);
        assert_eq!(SlirpFeatures::from_help(""), SlirpFeatures::default());
    }

    #[test]
    fn version_fixture() {
        let v = SlirpVersion::parse(VERSION_120).unwrap();
        assert_eq!(v.version, "1.2.0");
        assert_eq!(v.numeric(), Some((1, 2, 0)));
        assert_eq!(
            v.commit.as_deref(),
            Some("656041d45cfca7a4176f6b7eed9e4fe6c11e8383")
        );
        assert_eq!(v.libslirp.as_deref(), Some("4.7.0"));
        assert_eq!(v.slirp_config_version_max, Some(4));
        assert_eq!(v.libseccomp.as_deref(), Some("2.5.4"));
    }

    #[test]
    fn version_shapes() {
        let v = SlirpVersion::parse("slirp4netns version 0.4.0-beta.3+dev\n").unwrap();
        assert_eq!(v.numeric(), Some((0, 4, 0)));
        assert_eq!(v.libslirp, None);
        assert!(SlirpVersion::parse("").is_none());
        assert!(SlirpVersion::parse("usage: slirp4netns\n").is_none());
        assert!(SlirpVersion::parse("slirp4netns version \n").is_none());
        let v = SlirpVersion::parse("slirp4netns version x.y\n").unwrap();
        assert_eq!(v.numeric(), None);
    }

    #[test]
    fn find_binary_in_path() {
        assert!(find_binary("sh").is_some());
        assert!(find_binary("no-such-program-xyzzy").is_none());
        assert_eq!(find_binary("/a/b"), Some(PathBuf::from("/a/b")));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,200}") {
            let _ = SlirpFeatures::from_help(&s);
            if let Some(v) = SlirpVersion::parse(&s) { let _ = v.numeric(); }
        }
    }
}
