//! Reload: the engine tells a running helper the container's new IP (after a network
//! reload) over a `SOCK_SEQPACKET` socket at `TmpDir/rp/<ContainerID>`. Ours keeps every
//! listener and live connection and only points new connections and new UDP flows at
//! the new address.
//!
//! One request per connection: a JSON string and a newline (`"10.89.0.5"\n`); the
//! reply is `OK` or an error text, then the helper closes the connection.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{parse_child_ip, q};
use crate::error::errno_text;
use crate::forward::{register, Shared};
use crate::Error;

/// Requests larger than this are refused.
pub const MAX_REQUEST: usize = 4096;
/// How long one reload connection may take.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Decode a reload request into the new child IP (`None`: the netns loopback), with
/// podman's error texts.
///
/// ```
/// use rootlessport::reload::parse_request;
/// assert_eq!(parse_request(b"\"10.89.0.5\"\n").unwrap().unwrap().to_string(), "10.89.0.5");
/// assert!(parse_request(b"10.89.0.5").unwrap_err().starts_with("rootless port failed to decode ports: "));
/// ```
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
pub struct ReloadSocket {
    dir: OwnedFd,
    name: CString,
    listener: OwnedFd,
    /// `TmpDir/rp` when we created it: removed again (if empty) with the socket.
    created_dir: Option<CString>,
}

impl ReloadSocket {
    /// Create `tmp_dir/rp` (mode 0700, never through a symlink), remove a stale socket
    /// of that name, and listen at `tmp_dir/rp/<container_id>`, bound through
    /// `/proc/self/fd/<dir>/<id>` so that long tmp dirs fit the 108-byte limit.
    pub fn bind(tmp_dir: &Path, container_id: &str) -> Result<ReloadSocket, Error> {
        let path = tmp_dir.join("rp").join(container_id);
        let fail = |reason: String| Error::ReloadSocket {
            path: path.display().to_string(),
            reason,
        };
        if container_id.is_empty()
            || container_id.contains('/')
            || container_id == "."
            || container_id == ".."
        {
            return Err(fail(format!("invalid ContainerID {}", q(container_id))));
        }
        let (dir, created_dir) = open_private_dir(&tmp_dir.join("rp")).map_err(&fail)?;
        // Whatever fails from here on, a directory we made does not stay behind.
        let undo_dir = |e: Error| {
            if let Some(d) = &created_dir {
                // SAFETY: rmdir with a valid C string; fails harmlessly if not empty.
                unsafe { libc::rmdir(d.as_ptr()) };
            }
            e
        };
        let name = CString::new(container_id.as_bytes())
            .map_err(|_| undo_dir(fail("ContainerID holds a NUL byte".into())))?;
        // A stale socket from a crashed helper would make bind fail.
        // SAFETY: unlinkat with a dirfd we own and a C string.
        unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
        let listener = seqpacket_socket()
            .map_err(|e| undo_dir(fail(format!("socket: {}", errno_text(&e)))))?;
        let via = format!("/proc/self/fd/{}/{}", dir.as_raw_fd(), container_id);
        let addr = unix_addr(via.as_bytes())
            .map_err(|e| undo_dir(fail(format!("bind: {}", errno_text(&e)))))?;
        // SAFETY: bind/listen on a socket we own with a valid sockaddr_un.
        unsafe {
            if libc::bind(
                listener.as_raw_fd(),
                &addr.0 as *const libc::sockaddr_un as *const libc::sockaddr,
                addr.1,
            ) < 0
            {
                let e = io::Error::last_os_error();
                return Err(undo_dir(fail(format!("bind: {}", errno_text(&e)))));
            }
            if libc::listen(listener.as_raw_fd(), 16) < 0 {
                let e = io::Error::last_os_error();
                // SAFETY: unlinkat with a dirfd and C string we own: the bound file goes.
                libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0);
                return Err(undo_dir(fail(format!("listen: {}", errno_text(&e)))));
            }
        }
        Ok(ReloadSocket {
            dir,
            name,
            listener,
            created_dir,
        })
    }
    /// Remove the socket file now (also done on drop). Idempotent.
    pub fn remove(&self) {
        // SAFETY: unlinkat with a dirfd we own and a C string.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        if let Some(d) = &self.created_dir {
            // SAFETY: rmdir with a valid C string; other helpers' sockets keep it.
            unsafe { libc::rmdir(d.as_ptr()) };
        }
    }
}

impl Drop for ReloadSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `dir` as an O_PATH fd: created 0700 if missing; an existing one must be a real
/// directory (not a symlink) owned by us, and is made 0700.
fn open_private_dir(dir: &Path) -> Result<(OwnedFd, Option<CString>), String> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| "path holds a NUL byte".to_string())?;
    let mut created = None;
    // SAFETY: mkdir with a valid C string.
    if unsafe { libc::mkdir(c.as_ptr(), 0o700) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("mkdir {}: {}", dir.display(), errno_text(&e)));
        }
    } else {
        created = Some(c.clone());
    }
    // SAFETY: open with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        return Err(if is_link {
            format!("{} is a symbolic link; refusing to use it", dir.display())
        } else {
            format!("open {}: {}", dir.display(), errno_text(&e))
        });
    }
    // SAFETY: we just opened fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st =
        nix::sys::stat::fstat(fd.as_fd()).map_err(|e| format!("stat {}: {e}", dir.display()))?;
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(format!("{} is not owned by us", dir.display()));
    }
    if st.st_mode & 0o777 != 0o700 {
        // chmod through /proc: fchmod does not take O_PATH fds.
        let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::set_permissions(&via, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {}", dir.display(), errno_text(&e)))?;
    }
    Ok((fd, created))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we just created fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unix_addr(path: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
    Ok((addr, len as libc::socklen_t))
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
        // SAFETY: accept4 on our listening socket; the result is checked.
        let fd = unsafe {
            libc::accept4(
                listener.get_ref().as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        // SAFETY: accept4 just returned fd.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
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
    // SAFETY: send on a socket we own; a short or failed send only loses the reply.
    unsafe {
        libc::send(
            conn.as_raw_fd(),
            reply.as_ptr().cast(),
            reply.len(),
            libc::MSG_NOSIGNAL,
        )
    };
}

/// Only our own user may reload us.
fn peer_allowed(conn: &OwnedFd) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
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
        // SAFETY: recv into a buffer we own; MSG_TRUNC makes it report the real length.
        let n = unsafe {
            libc::recv(
                afd.get_ref().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(format!("reload failed: {e}"));
        }
        let n = n as usize;
        if n > MAX_REQUEST {
            return Err(format!(
                "reload refused: request of {n} bytes is over {MAX_REQUEST}"
            ));
        }
        buf.truncate(n);
        return Ok(buf);
    }
}

/// Errors of the engine-side reload client, in podman's words.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("could not reload rootless port mappings, port forwarding may no longer work correctly: {0}")]
    Connect(io::Error),
    #[error("port reloading failed: {0}")]
    Io(io::Error),
    #[error("port reloading failed: {0}")]
    Refused(String),
}

/// Tell the helper of `container_id` (socket in `tmp_dir/rp/`) its new child IP, as
/// podman's `reloadRootlessRLKPortMapping` does.
pub fn reload(tmp_dir: &Path, container_id: &str, child_ip: &str) -> Result<(), ReloadError> {
    let dir = std::fs::File::open(tmp_dir.join("rp")).map_err(ReloadError::Connect)?;
    let via = format!("/proc/self/fd/{}/{}", dir.as_raw_fd(), container_id);
    let sock = seqpacket_socket().map_err(ReloadError::Connect)?;
    set_blocking(&sock).map_err(ReloadError::Connect)?;
    let addr = unix_addr(via.as_bytes()).map_err(ReloadError::Connect)?;
    // SAFETY: connect on a socket we own with a valid sockaddr_un.
    if unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr.0 as *const libc::sockaddr_un as *const libc::sockaddr,
            addr.1,
        )
    } < 0
    {
        return Err(ReloadError::Connect(io::Error::last_os_error()));
    }
    drop(dir);
    let timeout = nix::sys::time::TimeVal::new(10, 0);
    let _ =
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
    let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &timeout);
    let mut msg = serde_json::to_string(child_ip).map_err(|e| ReloadError::Io(e.into()))?;
    msg.push('\n');
    // SAFETY: send from a buffer we own.
    if unsafe {
        libc::send(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_NOSIGNAL,
        )
    } < 0
    {
        let e = io::Error::last_os_error();
        // The helper may have answered and closed already: read its answer then.
        if !matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) {
            return Err(ReloadError::Io(e));
        }
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; MAX_REQUEST];
    loop {
        // SAFETY: recv into a buffer we own.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ReloadError::Io(e));
        }
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n as usize]);
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if reply == "OK" {
        Ok(())
    } else {
        Err(ReloadError::Refused(reply))
    }
}

fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_request(&bytes);
        }
    }
}
