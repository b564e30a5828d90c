//! The unprivileged user the rootless tests run as.
//!
//! As root, [`ensure_test_user`] sets up (idempotently) the user `rootless-net-test`
//! with what rootless podman needs on a stock distribution: subordinate uid/gid
//! ranges for `newuidmap`/`newgidmap`, a `/dev/net/tun` it may open (mode 0666, as
//! distributions ship it; slirp4netns opens it), and an `XDG_RUNTIME_DIR`
//! (`/run/user/UID`, 0700, owned by the user). [`TestUser::command`] then runs a
//! program as that user with a clean login-like environment.
//!
//! Run by someone who is not root, [`current_user_can_go_rootless`] says in one line
//! why that user cannot run rootless containers here, if it cannot.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::unistd::{Uid, User};

/// The name of the user the rootless tests run as.
pub const TEST_USER: &str = "rootless-net-test";

/// The subordinate id range given to the test user when it has none: the first
/// free block of this size at or above `SUBID_FIRST`.
const SUBID_FIRST: u64 = 200_000;
const SUBID_COUNT: u64 = 65_536;

/// The `PATH` of every command run as the test user.
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Variables passed through from our environment to commands run as the test user
/// (logging of the tests and of our helper).
const PASS_THROUGH: &[&str] = &["RUST_LOG", "ROOTLESSPORT_LOG", "ROOTLESSPORT_LOG_FILE"];

/// An existing unprivileged user, ready for rootless containers.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `XDG_RUNTIME_DIR`: `/run/user/UID`, 0700, owned by the user.
    pub runtime_dir: PathBuf,
}

impl TestUser {
    /// `program` run as this user: uid and gid set (std clears the supplementary
    /// groups when it changes the uid as root; `CommandExt::groups` is unstable, and
    /// the test user belongs to no other group anyway), the environment cleared and
    /// set to `HOME`, `USER`, `LOGNAME`, `PATH`, `XDG_RUNTIME_DIR` (plus `RUST_LOG`,
    /// `ROOTLESSPORT_LOG` and `ROOTLESSPORT_LOG_FILE` when set), and the home directory
    /// as working directory (the caller's may not be accessible to the user).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", USER_PATH)
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .current_dir(&self.home)
            .uid(self.uid)
            .gid(self.gid);
        for k in PASS_THROUGH {
            if let Some(v) = std::env::var_os(k) {
                c.env(k, v);
            }
        }
        c
    }
}

/// As root: create (or find) the user `rootless-net-test` and make it able to run
/// rootless containers. Idempotent: a second call changes nothing.
pub fn ensure_test_user() -> Result<TestUser, String> {
    if !Uid::effective().is_root() {
        return Err(format!(
            "setting up the test user {TEST_USER} needs root (running as uid {})",
            Uid::effective()
        ));
    }
    // Test runs may set the user up at the same time (itest and podman-e2e-rootless,
    // two worktrees): one at a time, so that no range is added twice.
    let _lock = setup_lock()?;
    let user = match lookup(TEST_USER)? {
        Some(u) => u,
        None => {
            let made = run_checked(
                Command::new(tool("useradd")?).args(["-m", "-s", "/bin/sh", TEST_USER]),
                "useradd",
            );
            // Someone without our lock (a person, another tool) may have made it.
            match (lookup(TEST_USER)?, made) {
                (Some(u), _) => u,
                (None, Err(e)) => return Err(e),
                (None, Ok(())) => {
                    return Err(format!(
                        "useradd succeeded but user {TEST_USER} is not found"
                    ))
                }
            }
        }
    };
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    // The home directory (useradd -m made it; an existing user may lack one).
    if !user.dir.is_dir() {
        std::fs::create_dir_all(&user.dir)
            .map_err(|e| format!("creating {}: {e}", user.dir.display()))?;
        chown(&user.dir, uid, gid)?;
        chmod(&user.dir, 0o755)?;
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        ensure_subid_range(Path::new(file), TEST_USER, uid)?;
    }
    ensure_tun()?;
    let runtime_dir = PathBuf::from(format!("/run/user/{uid}"));
    ensure_runtime_dir(&runtime_dir, uid, gid)?;
    Ok(TestUser {
        name: TEST_USER.to_owned(),
        uid,
        gid,
        home: user.dir,
        runtime_dir,
    })
}

/// Whether the user we run as can run rootless containers: a subordinate uid and gid
/// range, `newuidmap`/`newgidmap`, working user namespaces (`unshare -Ur true`) and a
/// `/dev/net/tun` it may open read-write. The error is one line saying why not.
pub fn current_user_can_go_rootless() -> Result<(), String> {
    let name = current_user_name()?;
    let uid = Uid::current();
    for (file, kind) in [("/etc/subuid", "uid"), ("/etc/subgid", "gid")] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if subid_ranges(&text, &name, uid.as_raw()).is_empty() {
            return Err(format!(
                "no {file} range for user {name} (as root: usermod --add-sub{kind}s 200000-265535 {name})"
            ));
        }
    }
    for prog in ["newuidmap", "newgidmap"] {
        if crate::sys::find_in_path(prog).is_none() {
            return Err(format!("{prog} not found (install the package uidmap)"));
        }
    }
    current_user_can_make_namespaces()
}

/// What our own rootless stack needs of the user we run as (less than podman): working
/// user namespaces (`unshare -Ur true`) and a `/dev/net/tun` it may open read-write.
/// The error is one line saying why not.
pub fn current_user_can_make_namespaces() -> Result<(), String> {
    let name = current_user_name()?;
    let unshare = tool("unshare")?;
    let out = Command::new("timeout")
        .args(["10"])
        .arg(&unshare)
        .args(["-Ur", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run timeout {}: {e}", unshare.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "user namespaces do not work for user {name}: unshare -Ur true: {} (user.max_user_namespaces, kernel.unprivileged_userns_clone)",
            err.lines().last().unwrap_or("failed").trim()
        ));
    }
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        let mode = std::fs::metadata("/dev/net/tun")
            .map(|m| format!(" (mode {:04o}; distributions ship 0666)", m.mode() & 0o7777))
            .unwrap_or_default();
        return Err(format!(
            "user {name} cannot open /dev/net/tun read-write: {e}{mode}"
        ));
    }
    Ok(())
}

fn current_user_name() -> Result<String, String> {
    let uid = Uid::current();
    User::from_uid(uid)
        .map_err(|e| format!("cannot look up uid {uid}: {e}"))?
        .map(|u| u.name)
        .ok_or_else(|| format!("uid {uid} has no passwd entry (rootless podman needs a user name)"))
}

/// An exclusive `flock` on `/run/rootless-net-test.lock`, waited for up to a minute.
fn setup_lock() -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use nix::fcntl::{Flock, FlockArg};
    let path = Path::new("/run/rootless-net-test.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err((_, e)) => return Err(format!("locking {}: {e}", path.display())),
        }
    }
}

fn lookup(name: &str) -> Result<Option<User>, String> {
    User::from_name(name).map_err(|e| format!("cannot look up user {name}: {e}"))
}

fn tool(program: &str) -> Result<PathBuf, String> {
    crate::sys::find_in_path(program).ok_or_else(|| format!("{program} not found"))
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {uid}:{gid} {}: {e}", path.display()))
}

fn chmod(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {}: {e}", path.display()))
}

/// The `(start, count)` ranges of `/etc/subuid`-style `text` for a user, by name or uid.
fn subid_ranges(text: &str, name: &str, uid: u32) -> Vec<(u64, u64)> {
    let uid = uid.to_string();
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?, f.next()?);
            if who != name && who != uid {
                return None;
            }
            let (start, count) = (start.parse().ok()?, count.parse::<u64>().ok()?);
            (count > 0).then_some((start, count))
        })
        .collect()
}

/// The first `SUBID_COUNT` block at or above `SUBID_FIRST` that no line of `text` uses.
fn free_subid_start(text: &str) -> u64 {
    let used: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':').skip(1);
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    let mut start = SUBID_FIRST;
    while let Some(&(s, c)) = used
        .iter()
        .find(|&&(s, c)| s < start + SUBID_COUNT && start < s.saturating_add(c))
    {
        start = s.saturating_add(c).max(start + 1);
    }
    start
}

/// Give `name` a range in `file` unless it has one (by name or uid).
fn ensure_subid_range(file: &Path, name: &str, uid: u32) -> Result<(), String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("reading {}: {e}", file.display())),
    };
    if !subid_ranges(&text, name, uid).is_empty() {
        return Ok(());
    }
    let start = free_subid_start(&text);
    let sep = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(file)
        .and_then(|mut f| writeln!(f, "{sep}{name}:{start}:{SUBID_COUNT}"))
        .map_err(|e| format!("adding a range for {name} to {}: {e}", file.display()))
}

/// `/dev/net/tun` present and mode 0666, as distributions ship it.
fn ensure_tun() -> Result<(), String> {
    let tun = Path::new("/dev/net/tun");
    if !tun.exists() {
        std::fs::create_dir_all("/dev/net").map_err(|e| format!("creating /dev/net: {e}"))?;
        nix::sys::stat::mknod(
            tun,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(10, 200),
        )
        .map_err(|e| format!("mknod /dev/net/tun c 10 200: {e}"))?;
    }
    let mode = std::fs::metadata(tun)
        .map_err(|e| format!("stat /dev/net/tun: {e}"))?
        .mode()
        & 0o7777;
    if mode != 0o666 {
        chmod(tun, 0o666)?;
    }
    Ok(())
}

/// `/run/user/UID`: a directory, 0700, owned by the user.
fn ensure_runtime_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    if let Some(parent) = dir.parent() {
        if !parent.is_dir() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
            chmod(parent, 0o755)?;
        }
    }
    if !dir.is_dir() {
        std::fs::create_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let md = std::fs::metadata(dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
    if md.uid() != uid || md.gid() != gid {
        chown(dir, uid, gid)?;
    }
    if md.mode() & 0o7777 != 0o700 {
        chmod(dir, 0o700)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:300000:10\nbob:1:0\n";
        assert_eq!(subid_ranges(text, "alice", 1000), vec![(100000, 65536)]);
        assert_eq!(subid_ranges(text, "carol", 1001), vec![(300000, 10)]);
        assert!(subid_ranges(text, "bob", 7).is_empty());
    }

    #[test]
    fn range_added_once_after_the_others() {
        let file = std::env::temp_dir().join(format!("subuid-test-{}", std::process::id()));
        std::fs::write(&file, "alice:200000:65536").expect("writing the test file");
        ensure_subid_range(&file, "bob", 1002).expect("first call");
        ensure_subid_range(&file, "bob", 1002).expect("second call");
        let text = std::fs::read_to_string(&file).expect("reading the test file");
        let _ = std::fs::remove_file(&file);
        assert_eq!(text, "alice:200000:65536\nbob:265536:65536\n");
    }

    #[test]
    fn free_start_skips_used_blocks() {
        assert_eq!(free_subid_start(""), 200_000);
        assert_eq!(free_subid_start("a:100000:65536\n"), 200_000);
        assert_eq!(free_subid_start("a:200000:65536\n"), 265_536);
        assert_eq!(free_subid_start("a:150000:65536\nb:265536:1000\n"), 266_536);
    }
}
