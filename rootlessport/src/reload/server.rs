//! The helper's side of the reload socket (podman's helper's `reloadPortMappings`
//! listener): a `SOCK_SEQPACKET` socket at `TmpDir/rp/<ContainerID>`, one request per
//! connection, answered `OK` or with the error text, then closed. Only the helper's own
//! user may reload it; a request larger than [`MAX_REQUEST`] is refused.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{self, Backlog, MsgFlags, SockFlag};
use nix::unistd::UnlinkatFlags;
use slirp_config::{check_container_id, BadContainerId};

use super::{proc_addr, seqpacket, MAX_REQUEST};
use crate::config::{parse_child_ip, q};
use crate::state::{register, Shared};
use crate::Error;

/// How long one reload connection may take.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Decode a reload request into the new child IP (`None`: the netns loopback), with
/// podman's error texts.
pub fn parse_request(msg: &[u8]) -> Result<Option<IpAddr>, String> {
    // Like Go's json.Decoder: the first JSON value counts, whatever follows it.
    let mut values = serde_json::Deserializer::from_slice(msg).into_iter::<String>();
    let ip = match values.next() {
        Some(Ok(ip)) => ip,
        Some(Err(e)) => return Err(format!("rootless port failed to decode ports: {e}")),
        None => return Err("rootless port failed to decode ports: EOF".into()),
    };
    parse_child_ip(&ip).map_err(|e| format!("rootless port failed to add port: {e}"))
}

/// The listening reload socket; its file is removed on drop.
#[derive(Debug)]
pub(crate) struct ReloadSocket {
    /// `TmpDir/rp`, opened `O_PATH`.
    dir: OwnedFd,
    /// The container ID: the socket's name in `dir`.
    name: String,
    listener: OwnedFd,
    /// `TmpDir/rp` when we created it: removed again (if empty) with the socket.
    created_dir: Option<PathBuf>,
}

/// Why making the socket failed: what was done, and the OS error if one was had.
type Failure = (String, Option<io::Error>);

impl ReloadSocket {
    /// Create `tmp_dir/rp` (mode 0700, never through a symlink), remove a stale socket
    /// of that name, and listen at `tmp_dir/rp/<container_id>`, bound through
    /// `/proc/self/fd/<dir>/<id>` so that long tmp dirs fit the 108-byte limit.
    pub(crate) fn bind(tmp_dir: &Path, container_id: &str) -> Result<ReloadSocket, Error> {
        let path = tmp_dir.join("rp").join(container_id);
        let fail = |(reason, source): Failure| Error::ReloadSocket {
            path: path.display().to_string(),
            reason,
            source,
        };
        // The one container-ID rule (slirp-config's), in this socket's own words.
        let why = match check_container_id(container_id) {
            Ok(()) => None,
            Err(BadContainerId::Nul) => Some("ContainerID holds a NUL byte".to_owned()),
            Err(e @ BadContainerId::TooLong) => {
                Some(format!("invalid ContainerID {}: {e}", q(container_id)))
            }
            Err(_) => Some(format!("invalid ContainerID {}", q(container_id))),
        };
        if let Some(why) = why {
            return Err(fail((why, None)));
        }
        let (dir, created_dir) = open_private_dir(&tmp_dir.join("rp")).map_err(fail)?;
        // Whatever fails from here on, a directory we made does not stay behind.
        let undo_dir = |why: Failure| {
            if let Some(d) = &created_dir {
                // Fails harmlessly when another helper's socket is in it.
                let _ = std::fs::remove_dir(d);
            }
            fail(why)
        };
        // A stale socket from a crashed helper would make bind fail.
        let _ = nix::unistd::unlinkat(&dir, container_id, UnlinkatFlags::NoRemoveDir);
        let os = |what: &'static str| move |e: Errno| (what.to_owned(), Some(io::Error::from(e)));
        let listener = seqpacket(SockFlag::SOCK_NONBLOCK)
            .map_err(os("socket"))
            .map_err(undo_dir)?;
        let bound = proc_addr(&dir, container_id)
            .and_then(|addr| socket::bind(listener.as_raw_fd(), &addr))
            .map_err(os("bind"));
        bound.map_err(undo_dir)?;
        let listening = Backlog::new(16).and_then(|backlog| socket::listen(&listener, backlog));
        if let Err(e) = listening {
            // The bound file goes with the directory.
            let _ = nix::unistd::unlinkat(&dir, container_id, UnlinkatFlags::NoRemoveDir);
            return Err(undo_dir(os("listen")(e)));
        }
        Ok(ReloadSocket {
            dir,
            name: container_id.to_owned(),
            listener,
            created_dir,
        })
    }

    /// Remove the socket file now (also done on drop). Idempotent.
    pub(crate) fn remove(&self) {
        let _ = nix::unistd::unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
        if let Some(d) = &self.created_dir {
            // Other helpers' sockets keep it.
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Drop for ReloadSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `dir` as an O_PATH fd: created 0700 if missing; an existing one must be a real
/// directory (not a symlink) owned by us, and is made 0700. With it, the directory
/// when we created it.
fn open_private_dir(dir: &Path) -> Result<(OwnedFd, Option<PathBuf>), Failure> {
    let shown = dir.display();
    if dir.as_os_str().as_bytes().contains(&0) {
        return Err(("path holds a NUL byte".to_owned(), None));
    }
    let created = match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Some(dir.to_owned()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
        Err(e) => return Err((format!("mkdir {shown}"), Some(e))),
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir);
    let fd = match opened {
        Ok(f) => OwnedFd::from(f),
        Err(e) => {
            let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            return Err(if is_link {
                (
                    format!("{shown} is a symbolic link; refusing to use it"),
                    None,
                )
            } else {
                (format!("open {shown}"), Some(e))
            });
        }
    };
    let st = nix::sys::stat::fstat(&fd).map_err(|e| (format!("stat {shown}"), Some(e.into())))?;
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err((format!("{shown} is not owned by us"), None));
    }
    if st.st_mode & 0o777 != 0o700 {
        // chmod through /proc: fchmod does not take O_PATH fds.
        let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::set_permissions(&via, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| (format!("chmod {shown}"), Some(e)))?;
    }
    Ok((fd, created))
}

/// Accept reload requests until the runtime stops.
pub(crate) async fn serve(sock: Arc<ReloadSocket>, shared: Arc<Shared>) {
    let listener = match sock
        .listener
        .try_clone()
        .and_then(|fd| register(fd).map_err(io::Error::from))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "reload socket cannot be served");
            return;
        }
    };
    loop {
        let Ok(mut guard) = listener.readable().await else {
            return;
        };
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let conn = match socket::accept4(listener.get_ref(), flags) {
            Ok(conn) => conn,
            Err(Errno::EAGAIN) => {
                guard.clear_ready();
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_TIMEOUT, handle(conn, &shared)).await;
        });
    }
}

async fn handle(conn: OwnedFd, shared: &Shared) {
    // The request is read first (bounded), so that a refused peer gets its answer
    // rather than a broken pipe; it is acted on only for our own user.
    let reply = match recv_request(conn.try_clone()).await {
        Err(why) => why,
        Ok(msg) => match peer_allowed(&conn) {
            Err(why) => why,
            Ok(()) => match parse_request(&msg) {
                Ok(ip) => {
                    shared.set_child_ip(ip);
                    tracing::debug!(?ip, "reloaded child IP");
                    "OK".to_owned()
                }
                Err(why) => why,
            },
        },
    };
    // A short or failed send only loses the reply.
    let _ = socket::send(conn.as_raw_fd(), reply.as_bytes(), MsgFlags::MSG_NOSIGNAL);
}

/// Only our own user may reload us.
fn peer_allowed(conn: &OwnedFd) -> Result<(), String> {
    let cred = socket::getsockopt(conn, socket::sockopt::PeerCredentials)
        .map_err(|e| format!("reload refused: cannot read peer credentials: {e}"))?;
    if cred.uid() == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(format!(
            "reload refused: uid {} may not reload this helper",
            cred.uid()
        ))
    }
}

async fn recv_request(conn: io::Result<OwnedFd>) -> Result<Vec<u8>, String> {
    let conn = conn.map_err(|e| format!("reload failed: {e}"))?;
    let afd = register(conn).map_err(|e| format!("reload failed: {e}"))?;
    let mut buf = vec![0u8; MAX_REQUEST + 1];
    loop {
        let mut guard = afd
            .readable()
            .await
            .map_err(|e| format!("reload failed: {e}"))?;
        // MSG_TRUNC: the message's real length, however much of it fits.
        let n = match socket::recv(afd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
            Ok(n) => n,
            Err(Errno::EAGAIN) => {
                guard.clear_ready();
                continue;
            }
            Err(e) => return Err(format!("reload failed: {}", io::Error::from(e))),
        };
        if n > MAX_REQUEST {
            return Err(format!(
                "reload refused: request of {n} bytes is over {MAX_REQUEST}"
            ));
        }
        buf.truncate(n);
        return Ok(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(
            parse_request(b"\"10.89.0.5\"\n").unwrap(),
            Some("10.89.0.5".parse().unwrap())
        );
        assert_eq!(
            parse_request(b"\"fd00::5\"").unwrap(),
            Some("fd00::5".parse().unwrap())
        );
        assert_eq!(parse_request(b"\"\"\n").unwrap(), None);
        // Whatever follows the first value is ignored, as Go's decoder does.
        assert_eq!(
            parse_request(b"\"10.0.0.1\" junk").unwrap(),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_request(b"").unwrap_err(),
            "rootless port failed to decode ports: EOF"
        );
        assert_eq!(
            parse_request(b"  \n").unwrap_err(),
            "rootless port failed to decode ports: EOF"
        );
        assert!(parse_request(b"10.0.0.1")
            .unwrap_err()
            .starts_with("rootless port failed to decode ports: "));
        assert!(parse_request(b"{\"ip\":1}")
            .unwrap_err()
            .starts_with("rootless port failed to decode ports: "));
        assert_eq!(
            parse_request(b"\"not-an-ip\"").unwrap_err(),
            r#"rootless port failed to add port: invalid ChildIP: "not-an-ip""#
        );
    }

    /// A helper's reload socket in a fresh tmp dir, served on a runtime of its own, with
    /// the state it changes (child IP 10.0.0.1 at first).
    struct Served {
        tmp: tempfile::TempDir,
        shared: Arc<Shared>,
        socket: Arc<ReloadSocket>,
        rt: tokio::runtime::Runtime,
    }

    fn served(id: &str) -> Served {
        let tmp = tempfile::tempdir().unwrap();
        let socket = Arc::new(ReloadSocket::bind(tmp.path(), id).unwrap());
        let shared = Arc::new(Shared::new(
            "10.0.0.1".parse().ok(),
            Duration::from_secs(60),
            None,
            16,
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.spawn(serve(socket.clone(), shared.clone()));
        Served {
            tmp,
            shared,
            socket,
            rt,
        }
    }

    #[test]
    fn the_client_reloads_a_served_socket() {
        let s = served("ctr1");
        let rp = s.tmp.path().join("rp");
        let mode = std::fs::metadata(&rp).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        crate::reload::reload(s.tmp.path(), "ctr1", "10.89.0.5").unwrap();
        assert_eq!(s.shared.child_ip(), "10.89.0.5".parse().ok());
        crate::reload::reload(s.tmp.path(), "ctr1", "").unwrap();
        assert_eq!(s.shared.child_ip(), None);
        // podman's words for a bad address, and nothing changed.
        let e = crate::reload::reload(s.tmp.path(), "ctr1", "not-an-ip").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"port reloading failed: rootless port failed to add port: invalid ChildIP: "not-an-ip""#
        );
        assert_eq!(s.shared.child_ip(), None);
        // No such helper: a connect error with the OS error as its cause.
        let e = crate::reload::reload(s.tmp.path(), "other", "10.0.0.2").unwrap_err();
        assert!(
            matches!(&e, crate::reload::ReloadError::Connect(io) if io.kind() == io::ErrorKind::NotFound)
        );
        assert!(std::error::Error::source(&e).is_some());
        // Removed with the helper: the socket, and the directory it made.
        s.socket.remove();
        assert!(!rp.exists());
        drop(s.rt);
    }

    #[test]
    fn a_request_over_the_limit_is_refused() {
        let s = served("big");
        let sock = super::super::seqpacket(SockFlag::empty()).unwrap();
        let dir = std::fs::File::open(s.tmp.path().join("rp")).unwrap();
        let addr = proc_addr(&dir, "big").unwrap();
        socket::connect(sock.as_raw_fd(), &addr).unwrap();
        let msg = vec![b' '; MAX_REQUEST + 1];
        socket::send(sock.as_raw_fd(), &msg, MsgFlags::MSG_NOSIGNAL).unwrap();
        let mut reply = [0u8; 256];
        let n = socket::recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty()).unwrap();
        assert_eq!(
            std::str::from_utf8(&reply[..n]).unwrap(),
            format!(
                "reload refused: request of {} bytes is over {MAX_REQUEST}",
                MAX_REQUEST + 1
            )
        );
        assert_eq!(s.shared.child_ip(), "10.0.0.1".parse().ok());
    }

    #[test]
    fn bind_refuses_bad_ids_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let long = "a".repeat(slirp_config::MAX_CONTAINER_ID_LEN + 1);
        for id in ["", ".", "..", "a/b", &long] {
            let e = ReloadSocket::bind(tmp.path(), id).unwrap_err();
            assert!(e.to_string().contains("invalid ContainerID"), "{e}");
        }
        let e = ReloadSocket::bind(tmp.path(), "a\0b").unwrap_err();
        assert!(
            e.to_string().ends_with(": ContainerID holds a NUL byte"),
            "{e}"
        );
        assert!(
            !tmp.path().join("rp").exists(),
            "the directory made is gone again"
        );
        // A stale socket file of the same name is replaced.
        let first = ReloadSocket::bind(tmp.path(), "same").unwrap();
        std::mem::forget(first);
        let again = ReloadSocket::bind(tmp.path(), "same").unwrap();
        drop(again);
        // A symlink instead of the directory is refused.
        let elsewhere = tempfile::tempdir().unwrap();
        let linked = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), linked.path().join("rp")).unwrap();
        let e = ReloadSocket::bind(linked.path(), "x").unwrap_err();
        assert!(
            e.to_string()
                .contains("is a symbolic link; refusing to use it"),
            "{e}"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_request(&bytes);
        }
    }
}
