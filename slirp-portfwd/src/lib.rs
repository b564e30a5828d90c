//! The slirp4netns API socket client: add, list and remove host forwards, and publish a
//! container's podman port mappings through it (`port_handler=slirp4netns`).
//!
//! The protocol: one JSON request per connection, our side then shuts down writing,
//! slirp4netns answers and closes. Replies are read to EOF; both shapes of the list
//! reply (bare and wrapped in `"return"`) are accepted.
//!
//! [`publish_ports`] is podman's `setupRootlessPortMappingViaSlirp`
//! (`libpod/networking_slirp4netns.go`): wait for the socket, then one `add_hostfwd` per
//! port; here the mappings are checked first and a failure takes back what was added.
//! The request and reply shapes are those of slirp4netns's manual (`slirp4netns.1`,
//! "API socket").
//!
//! ```no_run
//! use std::path::Path;
//! let sock = Path::new("/run/user/1000/libpod/tmp/ctr1.net");
//! let id = slirp_portfwd::add_hostfwd(sock, "tcp", "127.0.0.1", 8080, 80)?;
//! for f in slirp_portfwd::list_hostfwd(sock)? {
//!     println!("{} {}:{} -> {}", f.proto, f.host_addr, f.host_port, f.guest_port);
//! }
//! slirp_portfwd::remove_hostfwd(sock, id)?;
//! # Ok::<(), slirp_portfwd::Error>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, clippy::missing_errors_doc)]

/// The README's example, compiled (and run unless `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use slirp_config::{go_quote, Family, PortError, PortMapping, PortRange, Proto, Protocol};

/// How long one request may take, sending and answering (5 s); past it,
/// [`Error::Timeout`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`publish_ports`] waits for the API socket to appear (podman's figure).
pub const SOCKET_WAIT: Duration = Duration::from_secs(60);
/// slirp4netns reads at most this much of a request.
const MAX_REQUEST: usize = 4095;
/// Replies larger than this are refused (a list of 65535 forwards fits).
const MAX_REPLY: u64 = 16 * 1024 * 1024;

/// Errors of the API client. The refused-publication text is podman's (its
/// `setupRootlessPortMappingViaSlirp`); the checks made before anything is sent are
/// worded by us, as podman makes none.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Connecting to the socket failed (`ENOENT`: no such socket; `ECONNREFUSED`: no
    /// slirp4netns listens on it).
    #[error("cannot connect to the slirp4netns API socket {}: {source}", .socket.display())]
    Connect {
        /// The API socket.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Sending the request or reading the reply failed, or setting up the wait for the
    /// socket did (inotify, poll).
    #[error("talking to slirp4netns at {}: {source}", .socket.display())]
    Io {
        /// The API socket.
        socket: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// slirp4netns had not answered within [`REQUEST_TIMEOUT`].
    #[error("slirp4netns at {} did not answer within {}s", .socket.display(), REQUEST_TIMEOUT.as_secs())]
    Timeout {
        /// The API socket.
        socket: PathBuf,
    },
    /// A reply that is not the JSON expected; `source` is the JSON error, when the reply
    /// did not parse or did not have the expected shape.
    #[error("unexpected reply from slirp4netns to {op}: {}", go_quote(.reply))]
    BadReply {
        /// The request's name: `add_hostfwd`, `list_hostfwd` or `remove_hostfwd`.
        op: &'static str,
        /// The reply as received (lossily decoded), or a note that it was too large.
        reply: String,
        /// Why it did not parse.
        source: Option<serde_json::Error>,
    },
    /// slirp4netns refused to add a forward.
    #[error("from slirp4netns while setting up port redirection: {desc}")]
    Refused {
        /// slirp4netns's `error.desc` (e.g. `bad request: add_hostfwd: slirp_add_hostfwd
        /// failed`), or the whole reply when the error has another shape.
        desc: String,
    },
    /// slirp4netns refused a list or remove request.
    #[error("slirp4netns refused {op}: {desc}")]
    RefusedOther {
        /// The request's name: `list_hostfwd` or `remove_hostfwd`.
        op: &'static str,
        /// As for [`Error::Refused`].
        desc: String,
    },
    /// The request would be longer than slirp4netns reads (4095 bytes).
    #[error("request to slirp4netns is {len} bytes; its API takes at most {MAX_REQUEST}")]
    RequestTooLarge {
        /// Its length in bytes.
        len: usize,
    },
    /// A mapping's host or container range ends past 65535.
    #[error("port range {first}-{last} ({what}) goes past 65535")]
    RangeOverflow {
        /// `host` or `container`.
        what: &'static str,
        /// The range's first port.
        first: u16,
        /// Where it would end.
        last: u32,
    },
    /// A mapping's host or container port is 0.
    #[error("{what} port 0 cannot be forwarded")]
    PortZero {
        /// `host` or `container`.
        what: &'static str,
    },
    /// A protocol name other than `tcp` and `udp` (`sctp`, `tcp6`, an unknown name),
    /// as given.
    #[error("protocol {} cannot be forwarded by slirp4netns (tcp and udp only)", go_quote(.0))]
    UnsupportedProtocol(String),
    /// A host IP that is no IPv4 address (slirp4netns's `host_addr` is IPv4 only), as
    /// given.
    #[error("host IP {} cannot be used with slirp4netns port forwarding (IPv4 addresses only)", go_quote(.0))]
    UnsupportedHostIp(String),
    /// The API socket did not accept connections in time (podman's wait is
    /// [`SOCKET_WAIT`]).
    #[error("slirp4netns API socket {} did not appear within {}s", .socket.display(), .timeout.as_secs())]
    SocketWait {
        /// The API socket.
        socket: PathBuf,
        /// How long was waited.
        timeout: Duration,
    },
    /// slirp4netns died: while we waited for its API socket, or during a request, which
    /// then failed with `source`.
    #[error("slirp4netns exited before its API socket {} was ready", .socket.display())]
    HelperDied {
        /// The API socket.
        socket: PathBuf,
        /// The request's failure, when it was one.
        source: Option<Box<Error>>,
    },
}

/// One forward as slirp4netns lists it: an entry of the `list_hostfwd` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFwd {
    /// The id slirp4netns gave it, for [`remove_hostfwd`].
    pub id: u64,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The host address it listens on (`0.0.0.0` for every address).
    pub host_addr: String,
    /// The host port.
    pub host_port: u16,
    /// The guest address it forwards to (the configured guest, `10.0.2.100` by
    /// default).
    pub guest_addr: String,
    /// The guest port.
    pub guest_port: u16,
}

/// A request to the API socket. Serialized as podman writes it (its Go struct's field
/// order): `{"execute":"add_hostfwd","arguments":{"proto":...}}`, and a request without
/// arguments as `{"execute":"list_hostfwd"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "execute", content = "arguments")]
enum Request<'a> {
    #[serde(rename = "add_hostfwd")]
    Add(AddHostfwd<'a>),
    #[serde(rename = "list_hostfwd")]
    List,
    #[serde(rename = "remove_hostfwd")]
    Remove { id: u64 },
}

/// The arguments of `add_hostfwd`. slirp4netns reads an empty `host_addr` as 0.0.0.0
/// and an empty `guest_addr` as the guest it configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct AddHostfwd<'a> {
    proto: &'a str,
    host_addr: &'a str,
    host_port: u16,
    guest_addr: &'a str,
    guest_port: u16,
}

impl Request<'_> {
    /// The request's `execute` name, which errors give it by.
    fn op(&self) -> &'static str {
        match self {
            Request::Add(_) => "add_hostfwd",
            Request::List => "list_hostfwd",
            Request::Remove { .. } => "remove_hostfwd",
        }
    }
}

/// A reply: slirp4netns's refusal, or the answer `A`. Any reply holding `"error"` is a
/// refusal, whatever else it holds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Reply<A> {
    Error { error: ApiError },
    Answer(A),
}

/// The `"error"` of a reply.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ApiError {
    /// What slirp4netns sends: `{"desc":"bad request: ..."}`.
    Desc { desc: String },
    /// Any other shape: the refusal quotes the whole reply.
    Other(IgnoredAny),
}

/// The answer to `add_hostfwd`: `{"return":{"id":N}}`.
#[derive(Debug, Deserialize)]
struct Added {
    r#return: AddedId,
}

#[derive(Debug, Deserialize)]
struct AddedId {
    id: u64,
}

/// The answer to `list_hostfwd`: `{"entries":[...]}` as slirp4netns 1.2.0 sends it, or
/// wrapped in `"return"` as its manual shows.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Listed {
    Bare(Entries),
    Wrapped { r#return: Entries },
}

#[derive(Debug, Deserialize)]
struct Entries {
    entries: Vec<HostFwd>,
}

/// The answer to `remove_hostfwd`: `{"return":{}}` (any `"return"` will do).
#[derive(Debug, Deserialize)]
struct Removed {
    #[serde(rename = "return")]
    _return: IgnoredAny,
}

/// Ask slirp4netns to forward `host_addr:host_port` (`""` = 0.0.0.0) to the guest's
/// `guest_port` over `proto` (`tcp` or `udp`). Returns the forward's id. One request,
/// as podman sends it: `{"execute":"add_hostfwd","arguments":{...}}`.
///
/// # Errors
///
/// [`Error::Connect`], [`Error::Io`], [`Error::Timeout`] for the exchange;
/// [`Error::Refused`] when slirp4netns says no (the port in use, say);
/// [`Error::BadReply`] for a reply of another shape; [`Error::RequestTooLarge`].
pub fn add_hostfwd(
    socket: &Path,
    proto: &str,
    host_addr: &str,
    host_port: u16,
    guest_port: u16,
) -> Result<u64, Error> {
    let req = Request::Add(AddHostfwd {
        proto,
        host_addr: if host_addr.is_empty() {
            "0.0.0.0"
        } else {
            host_addr
        },
        host_port,
        guest_addr: "",
        guest_port,
    });
    decode_add(&request(socket, &req)?)
}

/// The forwards slirp4netns has.
///
/// # Errors
///
/// As [`add_hostfwd`], with [`Error::RefusedOther`] for a refusal.
pub fn list_hostfwd(socket: &Path) -> Result<Vec<HostFwd>, Error> {
    decode_list(&request(socket, &Request::List)?)
}

/// Remove the forward `id`.
///
/// # Errors
///
/// As [`add_hostfwd`], with [`Error::RefusedOther`] for a refusal (no such id).
pub fn remove_hostfwd(socket: &Path, id: u64) -> Result<(), Error> {
    decode_remove(&request(socket, &Request::Remove { id })?)
}

/// Send one request and read the reply to EOF, bounded by [`REQUEST_TIMEOUT`].
fn request(socket: &Path, req: &Request<'_>) -> Result<Vec<u8>, Error> {
    let op = req.op();
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Error::Timeout {
                socket: socket.to_owned(),
            }
        } else {
            Error::Io {
                socket: socket.to_owned(),
                source,
            }
        }
    };
    let body = serde_json::to_vec(req).map_err(|e| io_err(e.into()))?;
    if body.len() > MAX_REQUEST {
        return Err(Error::RequestTooLarge { len: body.len() });
    }
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io_err)?;
    stream.write_all(&body).map_err(io_err)?;
    stream.shutdown(Shutdown::Write).map_err(io_err)?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_err(io::ErrorKind::TimedOut.into()));
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.len() as u64 > MAX_REPLY {
                    return Err(Error::BadReply {
                        op,
                        reply: format!("(more than {MAX_REPLY} bytes)"),
                        source: None,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(reply)
}

/// Decode slirp4netns's reply to `op` as the answer `A`, or its refusal in our words.
/// A reply that is neither is [`Error::BadReply`], quoting it as received.
fn decode<A: DeserializeOwned>(op: &'static str, reply: &[u8]) -> Result<A, Error> {
    let quoted = || String::from_utf8_lossy(reply).into_owned();
    let desc = match serde_json::from_slice(reply) {
        Ok(Reply::Answer(a)) => return Ok(a),
        Ok(Reply::Error {
            error: ApiError::Desc { desc },
        }) => desc,
        Ok(Reply::Error {
            error: ApiError::Other(_),
        }) => quoted(),
        Err(e) => {
            return Err(Error::BadReply {
                op,
                reply: quoted(),
                source: Some(e),
            })
        }
    };
    Err(if op == "add_hostfwd" {
        Error::Refused { desc }
    } else {
        Error::RefusedOther { op, desc }
    })
}

/// The id in a reply to `add_hostfwd` (`{"return":{"id":N}}`).
///
/// # Errors
///
/// [`Error::Refused`] for a reply holding `"error"`, [`Error::BadReply`] for any
/// other shape.
pub fn decode_add(reply: &[u8]) -> Result<u64, Error> {
    decode::<Added>("add_hostfwd", reply).map(|a| a.r#return.id)
}

/// The forwards in a reply to `list_hostfwd`, bare or wrapped in `"return"`.
///
/// # Errors
///
/// [`Error::RefusedOther`] for a reply holding `"error"`, [`Error::BadReply`] for any
/// other shape.
pub fn decode_list(reply: &[u8]) -> Result<Vec<HostFwd>, Error> {
    Ok(match decode::<Listed>("list_hostfwd", reply)? {
        Listed::Bare(e) | Listed::Wrapped { r#return: e } => e.entries,
    })
}

/// A reply to `remove_hostfwd` (`{"return":{}}`).
///
/// # Errors
///
/// As [`decode_list`].
pub fn decode_remove(reply: &[u8]) -> Result<(), Error> {
    decode::<Removed>("remove_hostfwd", reply).map(drop)
}

/// One `add_hostfwd` request of a publication plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// The host address (`0.0.0.0` for a mapping's empty `host_ip`).
    pub host_addr: Ipv4Addr,
    /// The host port, 1 to 65535.
    pub host_port: u16,
    /// The guest (container) port, 1 to 65535.
    pub guest_port: u16,
}

/// The requests that publish `ports`, in podman's order (each mapping, each protocol
/// of its comma list, each port of its range: [`slirp_config::forwards`]); host IP
/// `""` is 0.0.0.0, `range` 0 is 1, protocol `""` is tcp.
///
/// Everything is checked before anything is sent. podman sends what it is given and
/// leaves the refusal to slirp4netns, one forward in; we refuse the whole list first,
/// in our words.
///
/// # Errors
///
/// The shared checks of [`slirp_config::forwards`] ([`Error::PortZero`],
/// [`Error::RangeOverflow`], an unknown protocol or a host IP that is no address), and
/// what slirp4netns's API cannot carry: a protocol other than plain `tcp`/`udp`
/// ([`Error::UnsupportedProtocol`]) or a host IP other than IPv4
/// ([`Error::UnsupportedHostIp`]).
pub fn plan(ports: &[PortMapping]) -> Result<Vec<Forward>, Error> {
    slirp_config::forwards(ports)
        .map(|f| {
            let f = f.map_err(refusal)?;
            let proto = match f.proto {
                Proto {
                    protocol: p @ (Protocol::Tcp | Protocol::Udp),
                    family: Family::Any,
                } => p.as_str(),
                other => return Err(Error::UnsupportedProtocol(other.to_string())),
            };
            let host_addr = match f.host_ip {
                None => Ipv4Addr::UNSPECIFIED,
                Some(IpAddr::V4(a)) => a,
                Some(IpAddr::V6(_)) => {
                    return Err(Error::UnsupportedHostIp(f.mapping.host_ip.clone()))
                }
            };
            Ok(Forward {
                proto,
                host_addr,
                host_port: f.host_port,
                guest_port: f.container_port,
            })
        })
        .collect()
}

/// A shared check's failure, in our words.
fn refusal(e: PortError) -> Error {
    match e {
        PortError::UnknownProtocol(p) => Error::UnsupportedProtocol(p),
        PortError::InvalidHostIp(ip) => Error::UnsupportedHostIp(ip),
        PortError::PortZero(side) => Error::PortZero {
            what: side.as_str(),
        },
        PortError::RangePastEnd { side, first, count } => Error::RangeOverflow {
            what: side.as_str(),
            first,
            last: PortRange { first, count }.last(),
        },
    }
}

/// Wait until `socket` exists and accepts connections, for at most `timeout`. When
/// `helper` (a pidfd of slirp4netns) is given, its death ends the wait at once; without
/// one (no pidfd on kernels before 5.3) a dead helper is noticed only at `timeout`.
/// podman's `WaitForFile` (`libpod/util.go`) waits for the file alone (inotify, and a
/// stat every 25 ms); this also waits until it accepts connections.
///
/// # Errors
///
/// [`Error::SocketWait`] at `timeout`, [`Error::HelperDied`] when the helper dies
/// first, [`Error::Connect`] when connecting fails other than with `ECONNREFUSED`,
/// [`Error::Io`] when inotify or poll fails.
pub fn wait_for_socket(
    socket: &Path,
    helper: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    let io_err = |source: io::Error| Error::Io {
        socket: socket.to_owned(),
        source,
    };
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| io_err(e.into()))?;
    inotify
        .add_watch(
            dir,
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ATTRIB,
        )
        .map_err(|e| io_err(e.into()))?;
    loop {
        if socket.exists() {
            match UnixStream::connect(socket) {
                Ok(_) => return Ok(()),
                // Bound but not yet listening: try again shortly.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(source) => {
                    return Err(Error::Connect {
                        socket: socket.to_owned(),
                        source,
                    })
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::SocketWait {
                socket: socket.to_owned(),
                timeout,
            });
        }
        // Wake on a change in the directory, the helper's death, or every 20 ms for
        // the bound-but-not-listening case.
        let mut fds = vec![PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        if let Some(h) = helper {
            fds.push(PollFd::new(h, PollFlags::POLLIN));
        }
        let wait = left.min(Duration::from_millis(20));
        match poll(
            &mut fds,
            PollTimeout::try_from(wait.as_millis() as i32 + 1).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io_err(e.into())),
        }
        if fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty())
        {
            return Err(Error::HelperDied {
                socket: socket.to_owned(),
                source: None,
            });
        }
        let _ = inotify.read_events();
    }
}

/// Whether the process behind `pidfd` exits within a short grace: a dying process
/// closes its sockets a moment before its pidfd says so.
fn is_dead(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(200u8)), Ok(n) if n > 0)
}

/// Publish `ports` through slirp4netns (podman's slirp4netns port path): check them
/// all, wait for the API socket while watching `helper`, then add one forward per port
/// and protocol. On failure the forwards already added are removed again, so nothing
/// is left half-published. Returns the ids, in [`plan`] order.
///
/// # Errors
///
/// [`plan`]'s refusals, before anything is sent; [`wait_for_socket`]'s; then the first
/// failed [`add_hostfwd`], as [`Error::HelperDied`] (with the request's error as
/// source) when slirp4netns died meanwhile.
pub fn publish_ports(
    socket: &Path,
    helper: Option<BorrowedFd<'_>>,
    ports: &[PortMapping],
) -> Result<Vec<u64>, Error> {
    let forwards = plan(ports)?;
    if forwards.is_empty() {
        return Ok(Vec::new());
    }
    wait_for_socket(socket, helper, SOCKET_WAIT)?;
    let mut ids = Vec::with_capacity(forwards.len());
    for f in &forwards {
        match add_hostfwd(
            socket,
            f.proto,
            &f.host_addr.to_string(),
            f.host_port,
            f.guest_port,
        ) {
            Ok(id) => {
                tracing::debug!(
                    id,
                    proto = f.proto,
                    port = f.host_port,
                    "slirp4netns forward added"
                );
                ids.push(id);
            }
            Err(e) => {
                // A request that failed because slirp4netns died says so.
                let e = match helper {
                    Some(h) if is_dead(h) => Error::HelperDied {
                        socket: socket.to_owned(),
                        source: Some(Box::new(e)),
                    },
                    _ => e,
                };
                for id in ids {
                    if let Err(re) = remove_hostfwd(socket, id) {
                        tracing::warn!(id, error = %re, "removing a forward after a failed publication");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_expands_ranges_and_protocols() {
        let p = plan(&[PortMapping::new("", 8080, 80, 3, "tcp,udp")]).unwrap();
        assert_eq!(p.len(), 6);
        assert_eq!(
            p[0],
            Forward {
                proto: "tcp",
                host_addr: Ipv4Addr::UNSPECIFIED,
                host_port: 8080,
                guest_port: 80
            }
        );
        assert_eq!(
            p[5],
            Forward {
                proto: "udp",
                host_addr: Ipv4Addr::UNSPECIFIED,
                host_port: 8082,
                guest_port: 82
            }
        );
        let p = plan(&[PortMapping::new("127.0.0.1", 9000, 90, 0, "")]).unwrap();
        assert_eq!(
            p,
            [Forward {
                proto: "tcp",
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: 9000,
                guest_port: 90
            }]
        );
        assert!(plan(&[]).unwrap().is_empty());
    }

    #[test]
    fn plan_refuses_before_sending() {
        let e = |m: PortMapping| plan(&[m]).unwrap_err().to_string();
        assert_eq!(
            e(PortMapping::new("", 65535, 80, 2, "tcp")),
            "port range 65535-65536 (host) goes past 65535"
        );
        assert_eq!(
            e(PortMapping::new("", 80, 65000, 1000, "tcp")),
            "port range 65000-65999 (container) goes past 65535"
        );
        assert_eq!(
            e(PortMapping::new("", 0, 80, 1, "tcp")),
            "host port 0 cannot be forwarded"
        );
        assert_eq!(
            e(PortMapping::new("", 80, 0, 1, "tcp")),
            "container port 0 cannot be forwarded"
        );
        assert_eq!(
            e(PortMapping::new("", 80, 80, 1, "sctp")),
            r#"protocol "sctp" cannot be forwarded by slirp4netns (tcp and udp only)"#
        );
        assert_eq!(
            e(PortMapping::new("", 80, 80, 1, "tcp,")),
            r#"protocol "" cannot be forwarded by slirp4netns (tcp and udp only)"#
        );
        assert_eq!(
            e(PortMapping::new("::1", 80, 80, 1, "tcp")),
            r#"host IP "::1" cannot be used with slirp4netns port forwarding (IPv4 addresses only)"#
        );
        // The last port of a range may be 65535.
        assert_eq!(
            plan(&[PortMapping::new("", 65534, 65534, 2, "udp")])
                .unwrap()
                .len(),
            2
        );
    }

    /// The requests, byte for byte as podman writes them (REFERENCE section 4).
    #[test]
    fn requests_are_podmans_bytes() {
        let bytes = |r: &Request<'_>| String::from_utf8(serde_json::to_vec(r).unwrap()).unwrap();
        let add = Request::Add(AddHostfwd {
            proto: "tcp",
            host_addr: "0.0.0.0",
            host_port: 8080,
            guest_addr: "",
            guest_port: 80,
        });
        assert_eq!(
            bytes(&add),
            r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"","guest_port":80}}"#
        );
        assert_eq!(bytes(&Request::List), r#"{"execute":"list_hostfwd"}"#);
        assert_eq!(
            bytes(&Request::Remove { id: 1 }),
            r#"{"execute":"remove_hostfwd","arguments":{"id":1}}"#
        );
        assert_eq!(
            (add.op(), Request::List.op(), Request::Remove { id: 1 }.op()),
            ("add_hostfwd", "list_hostfwd", "remove_hostfwd")
        );
    }

    #[test]
    fn replies_decode() {
        assert_eq!(decode_add(br#"{"return":{"id":7}}"#).unwrap(), 7);
        let entry = HostFwd {
            id: 1,
            proto: "tcp".into(),
            host_addr: "127.0.0.1".into(),
            host_port: 18080,
            guest_addr: "10.0.2.100".into(),
            guest_port: 80,
        };
        // slirp4netns 1.2.0's shape, then its manual's.
        let bare = br#"{"entries":[{"id":1,"proto":"tcp","host_addr":"127.0.0.1","host_port":18080,"guest_addr":"10.0.2.100","guest_port":80}]}"#;
        assert_eq!(decode_list(bare).unwrap(), std::slice::from_ref(&entry));
        let wrapped = format!(r#"{{"return":{}}}"#, String::from_utf8_lossy(bare));
        assert_eq!(decode_list(wrapped.as_bytes()).unwrap(), [entry]);
        assert!(decode_list(br#"{"return":{"entries":[]}}"#)
            .unwrap()
            .is_empty());
        decode_remove(br#"{"return":{}}"#).unwrap();
    }

    #[test]
    fn refusals_and_bad_replies_in_our_words() {
        let refusal = br#"{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}"#;
        assert_eq!(
            decode_add(refusal).unwrap_err().to_string(),
            "from slirp4netns while setting up port redirection: bad request: add_hostfwd: slirp_add_hostfwd failed"
        );
        assert_eq!(
            decode_remove(br#"{"error":{"desc":"bad request: remove_hostfwd: bad id"}}"#)
                .unwrap_err()
                .to_string(),
            "slirp4netns refused remove_hostfwd: bad request: remove_hostfwd: bad id"
        );
        // An error wins over an answer beside it; one without a desc is quoted whole.
        assert_eq!(
            decode_list(br#"{"entries":[],"error":{"desc":"no"}}"#)
                .unwrap_err()
                .to_string(),
            "slirp4netns refused list_hostfwd: no"
        );
        assert_eq!(
            decode_add(br#"{"error":"x","return":{"id":1}}"#)
                .unwrap_err()
                .to_string(),
            r#"from slirp4netns while setting up port redirection: {"error":"x","return":{"id":1}}"#
        );
        let bad = |r: Result<(), Error>| r.unwrap_err().to_string();
        assert_eq!(
            bad(decode_add(b"not json").map(drop)),
            r#"unexpected reply from slirp4netns to add_hostfwd: "not json""#
        );
        assert_eq!(
            bad(decode_add(br#"{"return":{"id":-1}}"#).map(drop)),
            r#"unexpected reply from slirp4netns to add_hostfwd: "{\"return\":{\"id\":-1}}""#
        );
        assert_eq!(
            bad(decode_list(br#"{"return":{}}"#).map(drop)),
            r#"unexpected reply from slirp4netns to list_hostfwd: "{\"return\":{}}""#
        );
        assert_eq!(
            bad(decode_list(br#"{"entries":[{"id":1}]}"#).map(drop)),
            r#"unexpected reply from slirp4netns to list_hostfwd: "{\"entries\":[{\"id\":1}]}""#
        );
        assert_eq!(
            bad(decode_remove(b"{}")),
            r#"unexpected reply from slirp4netns to remove_hostfwd: "{}""#
        );
    }

    proptest::proptest! {
        #[test]
        fn plan_never_panics_and_stays_in_range(host in 0u16.., ctr in 0u16.., range in 0u16.., p in "[a-z,]{0,9}") {
            if let Ok(fwds) = plan(&[PortMapping::new("", host, ctr, range, &p)]) {
                for f in fwds {
                    proptest::prop_assert!(f.host_port >= host && f.guest_port >= ctr);
                }
            }
        }
    }
}
