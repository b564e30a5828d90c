//! The helper's side of the reload socket (podman's helper's `reloadPortMappings`
//! listener): a `SOCK_SEQPACKET` socket at `TmpDir/rp/<ContainerID>`, one request per
//! connection, answered `OK` or with the error text, then closed. Only the helper's own
//! user may reload it; a request larger than [`MAX_REQUEST`] is refused.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
use crate::config::parse_child_ip;
use crate::state::{register, Shared};
use crate::Error;
use slirp_config::go_quote as q;
use tokio::io::unix::AsyncFd;

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
        let path = crate::control::socket_path(tmp_dir, container_id);
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

    /// As [`ReloadSocket::bind`], but a socket of that name that a live helper still
    /// answers on is left alone (an error): only podman's reloads may take the name
    /// over from a helper it thinks is gone.
    pub(crate) fn bind_if_free(tmp_dir: &Path, container_id: &str) -> Result<ReloadSocket, Error> {
        let path = crate::control::socket_path(tmp_dir, container_id);
        if check_container_id(container_id).is_ok() && answers(&path) {
            return Err(Error::ReloadSocket {
                path: path.display().to_string(),
                reason: "in use by another live helper".to_owned(),
                source: None,
            });
        }
        ReloadSocket::bind(tmp_dir, container_id)
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

/// Whether a socket at `path` accepts connections (a live helper's).
fn answers(path: &Path) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    let Ok(dir) = std::fs::File::open(dir) else {
        return false;
    };
    let Ok(sock) = seqpacket(SockFlag::empty()) else {
        return false;
    };
    proc_addr(&dir, name)
        .and_then(|addr| socket::connect(sock.as_raw_fd(), &addr))
        .is_ok()
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

/// Accept reload and control requests until the runtime stops.
/// Its fd is duplicated and registered now, not when the task first runs, so that
/// every fd of the helper is made before it reports ready (and closes ReadyFD): none
/// takes that number afterwards. Call it inside the runtime.
pub(crate) fn serve(
    sock: &ReloadSocket,
    shared: Arc<Shared>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let listener = sock
        .listener
        .try_clone()
        .and_then(|fd| register(fd).map_err(io::Error::from));
    async move {
        match listener {
            Ok(l) => accept_loop(l, shared).await,
            Err(e) => tracing::warn!(error = %e, "reload socket cannot be served"),
        }
    }
}

async fn accept_loop(listener: AsyncFd<OwnedFd>, shared: Arc<Shared>) {
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

async fn handle(conn: OwnedFd, shared: &Arc<Shared>) {
    let conn = match register(conn) {
        Ok(afd) => afd,
        Err(e) => {
            let (conn, e) = e.into_parts();
            let why = format!(
                "{}: {}",
                crate::listen::epoll_ctl_failed(&e),
                crate::error::errno_text(&e)
            );
            tracing::warn!("a control or reload connection was refused: {why}");
            // What the client sent so far is read (and dropped) first: closing with it
            // unread would reset the connection before the client saw the reply. It also
            // tells which kind of reply the client understands.
            let mut unread = [0u8; 4096];
            let (mut left, mut control) = (MAX_REQUEST + unread.len(), None);
            while left > 0 {
                match socket::recv(conn.as_raw_fd(), &mut unread, MsgFlags::MSG_DONTWAIT) {
                    Ok(n) if n > 0 => {
                        control.get_or_insert_with(|| crate::control::is_control(&unread[..n]));
                        left = left.saturating_sub(n);
                    }
                    _ => break,
                }
            }
            let reply = if control == Some(true) {
                crate::control::error_reply(&why)
            } else {
                format!("reload failed: {why}").into_bytes()
            };
            let _ = socket::send(conn.as_raw_fd(), &reply, MsgFlags::MSG_NOSIGNAL);
            return;
        }
    };
    // Counted as activity: a `list` of thousands of ports leaves megabytes of freed
    // heap, given back once the helper is quiet again (`heap_trim`).
    let _busy = shared.idle.busy();
    // The request is read first (bounded), so that a refused peer gets its answer
    // rather than a broken pipe; it is acted on only for our own user.
    let reply = match recv_request(&conn).await {
        Err(why) => why.into_bytes(),
        Ok(msg) if crate::control::is_control(&msg.head) && peer_hung_up(conn.get_ref()) => {
            // Accepted late (the helper was out of files): its client has given up
            // ("no reply within 10 s"), so it is not carried out behind its back.
            tracing::warn!("control request dropped: its client closed before it was read");
            return;
        }
        Ok(msg) => answer(&msg, peer_allowed(conn.get_ref()), shared).await,
    };
    send_reply(&conn, &reply).await;
}

/// Whether the peer of `conn` has closed its end (not merely shut down writing, as a
/// client does after its request): `POLLHUP` on a connected unix socket.
fn peer_hung_up(conn: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

/// The reply to `msg` (the first [`MAX_REQUEST`] + 1 bytes of the message, and its
/// whole length) from a peer `allowed` or not: podman's reload (a JSON string) gets
/// `OK` or podman's error text, a control request (a JSON object) a JSON reply.
async fn answer(msg: &Request, allowed: Result<(), Denied>, shared: &Arc<Shared>) -> Vec<u8> {
    let control = crate::control::is_control(&msg.head);
    if msg.len > MAX_REQUEST {
        let why = format!("request of {} bytes is over {MAX_REQUEST}", msg.len);
        return if control {
            crate::control::error_reply(&why)
        } else {
            format!("reload refused: {why}").into_bytes()
        };
    }
    match (allowed, control) {
        (Err(Denied::NoCredentials(e)), true) => {
            crate::control::error_reply(&format!("refused: cannot read peer credentials: {e}"))
        }
        (Err(Denied::Uid(uid)), true) => crate::control::error_reply(&format!(
            "refused: uid {uid} may not control this helper (only its own user, uid {}, may)",
            nix::unistd::geteuid()
        )),
        (Err(Denied::NoCredentials(e)), false) => {
            format!("reload refused: cannot read peer credentials: {e}").into_bytes()
        }
        (Err(Denied::Uid(uid)), false) => {
            format!("reload refused: uid {uid} may not reload this helper").into_bytes()
        }
        (Ok(()), true) => {
            // A task of its own: an add or remove once begun runs to its end (UDP gates
            // included) even when the connection's time runs out first.
            let (head, shared) = (msg.head.clone(), shared.clone());
            tokio::spawn(async move { crate::control::answer(&head, &shared).await })
                .await
                .unwrap_or_else(|e| crate::control::error_reply(&format!("request failed: {e}")))
        }
        (Ok(()), false) => match parse_request(&msg.head) {
            Ok(ip) => {
                shared.set_child_ip(ip);
                tracing::debug!(?ip, "reloaded child IP");
                b"OK".to_vec()
            }
            Err(why) => why.into_bytes(),
        },
    }
}

/// Why a peer may not use the socket.
enum Denied {
    /// Its credentials could not be read.
    NoCredentials(Errno),
    /// It runs as another user.
    Uid(u32),
}

/// Only our own user may reload or control us.
fn peer_allowed(conn: &OwnedFd) -> Result<(), Denied> {
    let cred = socket::getsockopt(conn, socket::sockopt::PeerCredentials)
        .map_err(Denied::NoCredentials)?;
    if cred.uid() == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(Denied::Uid(cred.uid()))
    }
}

/// A received request: its first [`MAX_REQUEST`] + 1 bytes, and its whole length.
struct Request {
    head: Vec<u8>,
    len: usize,
}

async fn recv_request(afd: &AsyncFd<OwnedFd>) -> Result<Request, String> {
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
        buf.truncate(n.min(MAX_REQUEST + 1));
        return Ok(Request { head: buf, len: n });
    }
}

/// Send `reply` in messages of at most [`REPLY_CHUNK`] bytes (the client reads to
/// EOF); a failed send only loses the reply.
async fn send_reply(afd: &AsyncFd<OwnedFd>, reply: &[u8]) {
    let mut chunks = reply.chunks(REPLY_CHUNK).peekable();
    while let Some(chunk) = chunks.peek() {
        match socket::send(afd.get_ref().as_raw_fd(), chunk, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => {
                chunks.next();
            }
            Err(Errno::EAGAIN) => match afd.writable().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => return,
            },
            Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// The largest message of a reply: well under the default socket buffer (208 KiB).
const REPLY_CHUNK: usize = 32 * 1024;

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
        let serving = {
            let _in_rt = rt.enter();
            serve(&socket, shared.clone())
        };
        rt.spawn(serving);
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

    /// Send `msg` raw on the socket `id` of `s`; the whole reply, read to EOF.
    fn raw(s: &Served, id: &str, msg: &[u8]) -> String {
        let sock = super::super::seqpacket(SockFlag::empty()).unwrap();
        let dir = std::fs::File::open(s.tmp.path().join("rp")).unwrap();
        socket::connect(sock.as_raw_fd(), &proc_addr(&dir, id).unwrap()).unwrap();
        socket::send(sock.as_raw_fd(), msg, MsgFlags::MSG_NOSIGNAL).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn control_list_and_podman_reload_share_the_socket() {
        let s = served("ctl");
        let state = Arc::new(crate::tcp::TcpPortState::default());
        s.shared.publish(vec![crate::state::Entry {
            port: crate::counters::Published {
                host_ip: "127.0.0.1".parse().unwrap(),
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".parse().unwrap(),
                published_at: 1_700_000_000,
            },
            id: s.shared.new_ids(1),
            serving: crate::state::Serving::Tcp(Some(state.clone())),
        }]);
        let counters = &state.counters;
        counters.conn_opened();
        counters.moved_in(0, 5);
        let path = crate::control::socket_path(s.tmp.path(), "ctl");
        let ports = crate::control::list(&path).unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!((ports[0].host_port, ports[0].container_port), (8080, 80));
        assert_eq!(ports[0].protocol.to_string(), "tcp");
        assert_eq!(ports[0].counters.connections_open, 1);
        assert_eq!(ports[0].counters.bytes_in, 5);
        counters.conn_closed();
        // podman's request, on the same socket: `OK`, exactly.
        assert_eq!(raw(&s, "ctl", b"\"10.89.0.7\"\n"), "OK");
        assert_eq!(s.shared.child_ip(), "10.89.0.7".parse().ok());
        let ports = crate::control::list(&path).unwrap();
        assert_eq!(ports[0].counters.connections_open, 0);
        // Control errors are JSON replies; podman's stay texts.
        assert_eq!(
            raw(&s, "ctl", br#"{"version":9,"request":"list"}"#),
            r#"{"version":1,"ok":false,"error":"unsupported version 9 (this helper speaks version 1)"}"#
        );
        assert_eq!(
            raw(&s, "ctl", br#"{"version":1,"request":"nope"}"#),
            r#"{"version":1,"ok":false,"error":"unknown request \"nope\""}"#
        );
        let mut big = b"{".to_vec();
        big.resize(MAX_REQUEST + 1, b' ');
        assert_eq!(
            raw(&s, "ctl", &big),
            format!(
                r#"{{"version":1,"ok":false,"error":"request of {} bytes is over {MAX_REQUEST}"}}"#,
                MAX_REQUEST + 1
            )
        );
        assert!(raw(&s, "ctl", b"10.0.0.1").starts_with("rootless port failed to decode ports: "));
        assert_eq!(s.shared.child_ip(), "10.89.0.7".parse().ok());
        let e =
            crate::control::list(&crate::control::socket_path(s.tmp.path(), "gone")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot connect to the control socket "),
            "{e}"
        );
    }

    #[test]
    fn control_list_replies_span_messages() {
        // Thousands of ports: a reply far over one message, read back whole.
        let s = served("many");
        let _in_rt = s.rt.enter();
        for port in 1..=5000u16 {
            s.shared.publish(vec![crate::state::Entry {
                port: crate::counters::Published {
                    host_ip: "::".parse().unwrap(),
                    host_port: port,
                    container_port: port,
                    protocol: "udp6".parse().unwrap(),
                    published_at: 1,
                },
                id: s.shared.new_ids(1),
                serving: crate::state::Serving::Udp(Box::new(crate::state::UdpPort {
                    task: tokio::spawn(async {}),
                    counters: Arc::default(),
                })),
            }]);
        }
        let path = crate::control::socket_path(s.tmp.path(), "many");
        let ports = crate::control::list(&path).unwrap();
        assert_eq!(ports.len(), 5000);
        assert_eq!(ports[4999].host_port, 5000);
    }

    #[test]
    fn control_bind_if_free_leaves_a_live_socket_alone() {
        let s = served("live");
        let e = ReloadSocket::bind_if_free(s.tmp.path(), "live").unwrap_err();
        assert!(
            e.to_string().ends_with(": in use by another live helper"),
            "{e}"
        );
        assert!(crate::control::list(&crate::control::socket_path(s.tmp.path(), "live")).is_ok());
        // A stale file (its helper died) is taken over.
        let dir = std::fs::File::open(s.tmp.path().join("rp")).unwrap();
        let dead = super::super::seqpacket(SockFlag::empty()).unwrap();
        socket::bind(dead.as_raw_fd(), &proc_addr(&dir, "stale").unwrap()).unwrap();
        drop(dead);
        assert!(s.tmp.path().join("rp/stale").exists());
        drop(ReloadSocket::bind_if_free(s.tmp.path(), "stale").unwrap());
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
