//! Finding a container's control socket as podman would: the container's full ID from
//! podman, podman's engine tmp dir from its containers.conf files (containers/common
//! `pkg/config`: `systemConfigs` for the file order, `getLibpodTmpDir` and libpod's
//! `getDefaultTmpDir` for the defaults), then `TMP/rp/ID`; failing that, a listening
//! socket for the ID found in `/proc/net/unix`.
//!
//! The rules are plain functions on plain data ([`conf_sources`], [`tmp_dir_from`],
//! [`default_tmp_dir`], [`listening_sockets`]); [`find_socket`] does the I/O.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

/// What podman's config lookup depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfEnv {
    /// The effective uid (0: rootful podman).
    pub uid: u32,
    /// `$CONTAINERS_CONF`: when set, the only file read.
    pub containers_conf: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
}

impl ConfEnv {
    /// This process's environment (empty variables count as unset, as for podman).
    pub fn current() -> ConfEnv {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        ConfEnv {
            uid: nix::unistd::geteuid().as_raw(),
            containers_conf: var("CONTAINERS_CONF"),
            xdg_config_home: var("XDG_CONFIG_HOME"),
            home: var("HOME"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
        }
    }
}

/// One place podman reads containers.conf from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfSource {
    /// A file, read when it exists.
    File(PathBuf),
    /// A drop-in directory: its `*.conf` files in name order.
    Dir(PathBuf),
}

/// The containers.conf files podman reads, in order (a later one overrides):
/// `$CONTAINERS_CONF` alone when set; else `/usr/share/containers/containers.conf`,
/// `/etc/containers/containers.conf`, `/etc/containers/containers.conf.d/`, and for a
/// user other than root `$XDG_CONFIG_HOME/containers/containers.conf` (`$HOME/.config`
/// without it) and its `.d` directory.
pub fn conf_sources(env: &ConfEnv) -> Vec<ConfSource> {
    if let Some(only) = &env.containers_conf {
        return vec![ConfSource::File(only.clone())];
    }
    let mut v = vec![
        ConfSource::File("/usr/share/containers/containers.conf".into()),
        ConfSource::File("/etc/containers/containers.conf".into()),
        ConfSource::Dir("/etc/containers/containers.conf.d".into()),
    ];
    if env.uid != 0 {
        let config_home = env
            .xdg_config_home
            .clone()
            .or_else(|| env.home.as_ref().map(|h| h.join(".config")));
        if let Some(home) = config_home {
            let user = home.join("containers/containers.conf");
            v.push(ConfSource::Dir(PathBuf::from(format!(
                "{}.d",
                user.display()
            ))));
            v.insert(v.len() - 1, ConfSource::File(user));
        }
    }
    v
}

#[derive(Deserialize)]
struct Conf {
    engine: Option<Engine>,
}

#[derive(Deserialize)]
struct Engine {
    tmp_dir: Option<String>,
}

/// `[engine] tmp_dir` of the last of `files` (path, text) that sets it.
///
/// # Errors
///
/// A file that is not TOML, or whose `[engine] tmp_dir` is not a string: the file
/// and the parser's words (podman refuses such a file too).
pub fn tmp_dir_from(files: &[(PathBuf, String)]) -> Result<Option<PathBuf>, String> {
    let mut found = None;
    for (path, text) in files {
        let conf: Conf = toml::from_str(text).map_err(|e| {
            let why = e.message().to_owned();
            format!("{}: {why}", path.display())
        })?;
        if let Some(dir) = conf
            .engine
            .and_then(|e| e.tmp_dir)
            .filter(|d| !d.is_empty())
        {
            found = Some(PathBuf::from(dir));
        }
    }
    Ok(found)
}

/// podman's tmp dir when no file sets one: `/run/libpod` for root; for another user
/// `RUNTIME/libpod/tmp`, RUNTIME being `$XDG_RUNTIME_DIR`, else `/run/user/UID` when
/// `run_user_exists`, else `$TMPDIR`-less `/tmp/podman-run-UID` (podman's last resort).
pub fn default_tmp_dir(env: &ConfEnv, run_user_exists: bool) -> PathBuf {
    if env.uid == 0 {
        return "/run/libpod".into();
    }
    let runtime = match &env.xdg_runtime_dir {
        Some(d) => d.clone(),
        None if run_user_exists => format!("/run/user/{}", env.uid).into(),
        None => format!("/tmp/podman-run-{}", env.uid).into(),
    };
    runtime.join("libpod/tmp")
}

/// podman's engine tmp dir for `env`, reading the config files.
///
/// # Errors
///
/// A config file that cannot be read or parsed, named.
pub fn engine_tmp_dir(env: &ConfEnv) -> Result<PathBuf, String> {
    let mut files = Vec::new();
    let mut read = |path: PathBuf| -> Result<(), String> {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                files.push((path, text));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    };
    for source in conf_sources(env) {
        match source {
            ConfSource::File(p) => read(p)?,
            ConfSource::Dir(d) => {
                let mut confs: Vec<PathBuf> = std::fs::read_dir(&d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                    .collect();
                confs.sort();
                for p in confs {
                    read(p)?;
                }
            }
        }
    }
    match tmp_dir_from(&files)? {
        Some(d) => Ok(d),
        None => {
            let run_user = Path::new("/run/user").join(env.uid.to_string());
            Ok(default_tmp_dir(env, run_user.is_dir()))
        }
    }
}

/// Whether `s` is a full container ID: 64 lower-case hex digits.
pub fn is_full_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a container name or ID did not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// podman knows no such container.
    NoSuchContainer,
    /// podman could not be run, or failed otherwise: why.
    Podman(String),
}

/// A container as podman reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The full ID: 64 hex digits.
    pub id: String,
    /// podman's `.State.Status` (`running`, `exited`, `created`, `paused`, ...);
    /// `None` when podman was not asked (a full ID without podman) or did not say.
    pub state: Option<String>,
}

/// The container of `podman container inspect --format '{{.Id}} {{.State.Status}}'`
/// output: its first line, the ID then the state.
///
/// # Errors
///
/// Output that does not start with a full ID, quoted.
pub fn parse_inspect(stdout: &str) -> Result<Container, String> {
    let line = stdout.lines().next().unwrap_or("").trim();
    let mut words = line.split_whitespace();
    match words.next() {
        Some(id) if is_full_id(id) => Ok(Container {
            id: id.to_owned(),
            state: words.next().map(str::to_owned),
        }),
        _ => Err(format!(
            "podman container inspect printed {line:?}, not a container ID"
        )),
    }
}

/// Whether a container in podman's state `state` has its port helper running:
/// `running`, and `paused` (the helper is not in the container's cgroup, so it
/// still serves); an unknown state counts as running (the socket then tells).
pub fn helper_runs_in(state: Option<&str>) -> bool {
    match state {
        None | Some("running" | "paused" | "unknown") => true,
        Some(_) => false,
    }
}

/// The container `name` (a name, ID or ID prefix): its full ID and state, from
/// `podman container inspect --format '{{.Id}} {{.State.Status}}'`; a full ID is taken
/// as it is, state unknown, when podman cannot be run.
///
/// # Errors
///
/// [`ResolveError`].
pub fn resolve_container(podman: &Path, name: &str) -> Result<Container, ResolveError> {
    let out = Command::new(podman)
        .args([
            "container",
            "inspect",
            "--format",
            "{{.Id}} {{.State.Status}}",
            "--",
            name,
        ])
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(_) if is_full_id(name) => {
            return Ok(Container {
                id: name.to_owned(),
                state: None,
            })
        }
        Err(e) => {
            return Err(ResolveError::Podman(format!(
                "cannot run {}: {e}",
                podman.display()
            )))
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("no such container") {
            return Err(ResolveError::NoSuchContainer);
        }
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(no message)")
            .trim();
        return Err(ResolveError::Podman(format!(
            "podman container inspect failed ({}): {last}",
            out.status
        )));
    }
    parse_inspect(&stdout).map_err(ResolveError::Podman)
}

/// A listening unix socket in `/proc/net/unix`: its inode and bound path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// The socket's inode (`socket:[INODE]` in `/proc/PID/fd`).
    pub inode: u64,
    /// The path it was bound to, as given to `bind`.
    pub path: String,
}

/// The listening `SOCK_SEQPACKET` sockets in `/proc/net/unix` text whose path ends
/// in `/ID`.
pub fn listening_sockets(proc_net_unix: &str, id: &str) -> Vec<UnixSocket> {
    const ACCEPTCON: u32 = 0x10000;
    const SEQPACKET: u32 = 5;
    let tail = format!("/{id}");
    proc_net_unix
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = line.split_whitespace().collect();
            let (flags, kind, inode, path) = (f.get(3)?, f.get(4)?, f.get(6)?, f.get(7..)?);
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let kind = u32::from_str_radix(kind, 16).ok()?;
            let path = path.join(" ");
            (flags & ACCEPTCON != 0 && kind == SEQPACKET && path.ends_with(&tail)).then(|| {
                Some(UnixSocket {
                    inode: inode.parse().ok()?,
                    path,
                })
            })?
        })
        .collect()
}

/// `/proc/self/fd/N/NAME`, as our helper binds: `(N, NAME)`.
pub fn proc_fd_path(path: &str) -> Option<(u32, &str)> {
    let rest = path.strip_prefix("/proc/self/fd/")?;
    let (fd, name) = rest.split_once('/')?;
    Some((fd.parse().ok()?, name))
}

/// The control socket of `id` found through `/proc/net/unix`: a path ending in
/// `/rp/ID`, or one bound through `/proc/self/fd/N/ID` (ours), resolved through the
/// process holding that socket and its directory fd `N`. `None` when there is none
/// this user can see.
pub fn socket_from_proc(id: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/net/unix").ok()?;
    let sockets = listening_sockets(&text, id);
    if let Some(s) = sockets
        .iter()
        .find(|s| s.path.ends_with(&format!("/rp/{id}")) && !s.path.starts_with("/proc/"))
    {
        return Some(s.path.clone().into());
    }
    for s in &sockets {
        let Some((dirfd, name)) = proc_fd_path(&s.path) else {
            continue;
        };
        let want = format!("socket:[{}]", s.inode);
        for pid in std::fs::read_dir("/proc").ok()?.flatten() {
            let pid = pid.path();
            let holds = std::fs::read_dir(pid.join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str())
                });
            if holds {
                if let Ok(dir) = std::fs::read_link(pid.join("fd").join(dirfd.to_string())) {
                    if dir.ends_with("rp") {
                        return Some(dir.join(name));
                    }
                }
            }
        }
    }
    None
}

/// The control socket for the container with full ID `id`: `TMP/rp/ID` under
/// podman's engine tmp dir, or the one `/proc/net/unix` shows when that is missing
/// (podman run with `--tmpdir`); the former when neither is there.
///
/// # Errors
///
/// A containers.conf that cannot be read or parsed.
pub fn find_socket(env: &ConfEnv, id: &str) -> Result<PathBuf, String> {
    let tmp = engine_tmp_dir(env)?;
    let path = rootlessport::control::socket_path(&tmp, id);
    if path.symlink_metadata().is_ok() {
        return Ok(path);
    }
    Ok(socket_from_proc(id).unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> ConfEnv {
        ConfEnv {
            uid,
            home: Some("/home/u".into()),
            ..ConfEnv::default()
        }
    }

    #[test]
    fn ctl_conf_files_in_podman_order() {
        use ConfSource::{Dir, File};
        let system = vec![
            File("/usr/share/containers/containers.conf".into()),
            File("/etc/containers/containers.conf".into()),
            Dir("/etc/containers/containers.conf.d".into()),
        ];
        assert_eq!(conf_sources(&user(0)), system);
        let mut rootless = system.clone();
        rootless.push(File("/home/u/.config/containers/containers.conf".into()));
        rootless.push(Dir("/home/u/.config/containers/containers.conf.d".into()));
        assert_eq!(conf_sources(&user(1001)), rootless);
        let env = ConfEnv {
            xdg_config_home: Some("/x/cfg".into()),
            ..user(1001)
        };
        assert_eq!(
            conf_sources(&env)[3..],
            [
                File("/x/cfg/containers/containers.conf".into()),
                Dir("/x/cfg/containers/containers.conf.d".into())
            ]
        );
        let env = ConfEnv {
            containers_conf: Some("/t/c.conf".into()),
            ..user(1001)
        };
        assert_eq!(conf_sources(&env), [File("/t/c.conf".into())]);
    }

    #[test]
    fn ctl_tmp_dir_later_files_win() {
        let f = |p: &str, t: &str| (PathBuf::from(p), t.to_owned());
        assert_eq!(tmp_dir_from(&[]), Ok(None));
        let files = [
            f("/a", "[engine]\ntmp_dir = \"/one\"\n"),
            f(
                "/b",
                "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\n",
            ),
            f("/c", "# nothing\n"),
        ];
        assert_eq!(tmp_dir_from(&files), Ok(Some("/one".into())));
        let files = [files[0].clone(), f("/d", "[engine]\ntmp_dir = \"/two\"\n")];
        assert_eq!(tmp_dir_from(&files), Ok(Some("/two".into())));
        let e = tmp_dir_from(&[f("/bad.conf", "[engine\n")]).unwrap_err();
        assert!(e.starts_with("/bad.conf: "), "{e}");
        let e = tmp_dir_from(&[f("/bad.conf", "[engine]\ntmp_dir = 7\n")]).unwrap_err();
        assert!(e.starts_with("/bad.conf: ") && e.contains("string"), "{e}");
    }

    #[test]
    fn ctl_default_tmp_dir_as_podman() {
        assert_eq!(
            default_tmp_dir(&user(0), true),
            PathBuf::from("/run/libpod")
        );
        let env = ConfEnv {
            xdg_runtime_dir: Some("/run/user/1001".into()),
            ..user(1001)
        };
        assert_eq!(
            default_tmp_dir(&env, false),
            PathBuf::from("/run/user/1001/libpod/tmp")
        );
        assert_eq!(
            default_tmp_dir(&user(1001), true),
            PathBuf::from("/run/user/1001/libpod/tmp")
        );
        assert_eq!(
            default_tmp_dir(&user(1001), false),
            PathBuf::from("/tmp/podman-run-1001/libpod/tmp")
        );
    }

    #[test]
    fn ctl_full_ids() {
        let id = "a".repeat(64);
        assert!(is_full_id(&id));
        assert!(!is_full_id(&"a".repeat(63)));
        assert!(!is_full_id(&"A".repeat(64)));
        assert!(!is_full_id("web"));
    }

    #[test]
    fn ctl_inspect_output_and_states() {
        let id = "0123456789ab".repeat(5) + "cdef";
        assert_eq!(
            parse_inspect(&format!("{id} exited\n")),
            Ok(Container {
                id: id.clone(),
                state: Some("exited".into())
            })
        );
        // An ID alone (a podman that prints no state): state unknown.
        assert_eq!(
            parse_inspect(&format!("{id}\n")),
            Ok(Container {
                id: id.clone(),
                state: None
            })
        );
        assert_eq!(
            parse_inspect("web running\n"),
            Err(r#"podman container inspect printed "web running", not a container ID"#.into())
        );
        assert!(parse_inspect("").is_err());
        for up in [None, Some("running"), Some("paused"), Some("unknown")] {
            assert!(helper_runs_in(up), "{up:?}");
        }
        for down in [
            "created",
            "exited",
            "stopped",
            "configured",
            "initialized",
            "stopping",
        ] {
            assert!(!helper_runs_in(Some(down)), "{down}");
        }
    }

    #[test]
    fn ctl_proc_net_unix_listening_seqpacket_only() {
        let id = "0123abcd".repeat(8);
        let text = format!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00010000 0005 01 4242 /proc/self/fd/7/{id}\n\
             0000000000000000: 00000002 00000000 00010000 0005 01 4243 /run/libpod/rp/{id}\n\
             0000000000000000: 00000003 00000000 00000000 0005 03 4244 /run/libpod/rp/{id}\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 4245 /run/x/rp/{id}\n\
             0000000000000000: 00000002 00000000 00010000 0005 01 4246 /a dir/rp/{id}\n\
             0000000000000000: 00000002 00000000 00010000 0005 01 4247 /run/libpod/rp/other\n\
             0000000000000000: 00000002 00000000 00010000 0005 01 4248\n"
        );
        let found = listening_sockets(&text, &id);
        let got: Vec<(u64, &str)> = found.iter().map(|s| (s.inode, s.path.as_str())).collect();
        let (p1, p2, p3) = (
            format!("/proc/self/fd/7/{id}"),
            format!("/run/libpod/rp/{id}"),
            format!("/a dir/rp/{id}"),
        );
        assert_eq!(
            got,
            [
                (4242, p1.as_str()),
                (4243, p2.as_str()),
                (4246, p3.as_str())
            ]
        );
        assert_eq!(proc_fd_path(&p1), Some((7, id.as_str())));
        assert_eq!(proc_fd_path(&p2), None);
        assert_eq!(proc_fd_path("/proc/self/fd/x/y"), None);
    }
}
