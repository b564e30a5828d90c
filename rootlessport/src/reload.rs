//! Reload: the engine tells a running helper the container's new IP (after a network
//! reload) over a `SOCK_SEQPACKET` socket at `TmpDir/rp/<ContainerID>`, which the
//! helper listens on when its config has `RootlessCNI` set. Ours keeps every listener
//! and live connection and only points new connections and new UDP flows at the new
//! address.
//!
//! One request per connection: a JSON string and a newline (`"10.89.0.5"\n`, as
//! podman's JSON encoder writes it); the reply is `OK` or an error text, then the
//! helper closes the connection. This module is the engine's side, [`reload()`].
//!
//! The same socket takes our own control requests (JSON objects): see
//! [`crate::control`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

pub(crate) mod server;

/// Requests larger than this many bytes are refused (the helper's limit, 64 KiB: a
/// control batch of about 700 mappings; podman's reload, an IP address, is far under).
pub const MAX_REQUEST: usize = 64 * 1024;

/// Errors of the engine-side reload client, in podman's words (its
/// `reloadRootlessRLKPortMapping`), each with the OS error as its source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// No helper listens at `TmpDir/rp/<ContainerID>` (no such directory or socket,
    /// or no permission): the helper is gone, or was started without `RootlessCNI`.
    #[error("could not reload rootless port mappings, port forwarding may no longer work correctly: {0}")]
    Connect(#[source] io::Error),
    /// Sending the request or reading the reply failed (a 10 s timeout each way).
    #[error("port reloading failed: {0}")]
    Io(#[source] io::Error),
    /// The helper answered with an error text instead of `OK` (for example
    /// `rootless port failed to add port: invalid ChildIP: "x"`).
    #[error("port reloading failed: {0}")]
    Refused(String),
}

/// Tell the helper of `container_id` (socket in `tmp_dir/rp/`) its new `child_ip` (an
/// IPv4 or IPv6 address; empty: the container netns's loopback), as podman's
/// `reloadRootlessRLKPortMapping` does, and wait for its answer. Blocks at most about
/// 10 s for sending and 10 s for the reply.
///
/// ```no_run
/// # fn main() -> Result<(), rootlessport::reload::ReloadError> {
/// // After `podman network reload`: the container's bridge address changed.
/// rootlessport::reload::reload("/run/user/1000/libpod/tmp".as_ref(), "ctr1", "10.89.0.6")?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`ReloadError::Connect`] when no helper listens there, [`ReloadError::Io`] when the
/// exchange fails, [`ReloadError::Refused`] with the helper's text when it says no.
pub fn reload(tmp_dir: &Path, container_id: &str, child_ip: &str) -> Result<(), ReloadError> {
    let dir = std::fs::File::open(tmp_dir.join("rp")).map_err(ReloadError::Connect)?;
    let mut msg = serde_json::to_string(child_ip).map_err(|e| ReloadError::Io(e.into()))?;
    msg.push('\n');
    let reply =
        exchange(&dir, container_id, msg.as_bytes(), true, usize::MAX).map_err(|e| match e {
            ExchangeError::Connect(e) => ReloadError::Connect(e.into()),
            ExchangeError::Send(e) | ExchangeError::Recv(e) => ReloadError::Io(e.into()),
            ExchangeError::TooLong => ReloadError::Io(io::ErrorKind::FileTooLarge.into()),
        })?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if reply == "OK" {
        Ok(())
    } else {
        Err(ReloadError::Refused(reply))
    }
}

/// How one client exchange on a helper's socket failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// Making the socket or connecting.
    Connect(Errno),
    /// Sending the request (`EAGAIN`: not taken within 10 s).
    Send(Errno),
    /// Reading the reply (`EAGAIN`: none within 10 s).
    Recv(Errno),
    /// The reply grew past the caller's bound.
    TooLong,
}

/// The client's side of one request on a helper's socket (reload or control): connect
/// to `name` in `dir` (through [`proc_addr`]), 10 s timeouts each way, send `msg`, read
/// the reply to end of file (at most `max` bytes). With `closed_ok`, a helper that
/// closed before the request went out is not an error: its answer is read.
pub(crate) fn exchange(
    dir: &std::fs::File,
    name: &str,
    msg: &[u8],
    closed_ok: bool,
    max: usize,
) -> Result<Vec<u8>, ExchangeError> {
    let sock = seqpacket(SockFlag::empty()).map_err(ExchangeError::Connect)?;
    proc_addr(dir, name)
        .and_then(|addr| socket::connect(sock.as_raw_fd(), &addr))
        .map_err(ExchangeError::Connect)?;
    let timeout = nix::sys::time::TimeVal::new(10, 0);
    let _ = socket::setsockopt(&sock, socket::sockopt::ReceiveTimeout, &timeout);
    let _ = socket::setsockopt(&sock, socket::sockopt::SendTimeout, &timeout);
    match socket::send(sock.as_raw_fd(), msg, MsgFlags::MSG_NOSIGNAL) {
        Ok(_) => {}
        Err(Errno::EPIPE | Errno::ECONNRESET) if closed_ok => {}
        Err(e) => return Err(ExchangeError::Send(e)),
    }
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return Ok(reply),
            Ok(n) if reply.len() + n > max => return Err(ExchangeError::TooLong),
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(ExchangeError::Recv(e)),
        }
    }
}

/// A close-on-exec `AF_UNIX` `SOCK_SEQPACKET` socket, with `flags` besides.
pub(crate) fn seqpacket(flags: SockFlag) -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | flags,
        None,
    )
}

/// The address of `name` in the directory `dir`, through `/proc/self/fd/<dir>/<name>`
/// so that a long directory path still fits `sockaddr_un`'s 108 bytes.
pub(crate) fn proc_addr(dir: impl AsFd, name: &str) -> nix::Result<UnixAddr> {
    UnixAddr::new(format!("/proc/self/fd/{}/{name}", dir.as_fd().as_raw_fd()).as_str())
}
