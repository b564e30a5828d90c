//! Control: ask a running helper about its published ports, on the socket podman uses
//! for reloads.
//!
//! # The control protocol
//!
//! **Socket.** A `SOCK_SEQPACKET` unix socket at `TmpDir/rp/<ContainerID>`
//! ([`socket_path`]), the one podman's reloads use. Our helper makes it whenever it
//! runs, whether or not its config has `RootlessCNI` (podman's helper makes it only
//! then), and removes it when it exits. The directory `TmpDir/rp` is mode 0700 and
//! owned by the helper's user; the helper answers only peers of its own user
//! (`SO_PEERCRED`). When the config has no `TmpDir` or `ContainerID`, or the socket
//! cannot be made without `RootlessCNI`, the helper runs without it and logs one
//! warning (with `RootlessCNI` that is an error before ready, as for podman).
//!
//! **Framing.** One request per connection: the client connects, sends the request as
//! one message of at most [`MAX_REQUEST`] (65536) bytes, UTF-8 JSON with optional
//! whitespace around it, and reads the reply until end of file; the reply may span
//! several messages, which are concatenated (a client may bound the total: [`list`]
//! takes up to [`MAX_REPLY`]). The helper closes the connection after its reply. A
//! connection has 5 seconds in all; an `add` or `remove` that has begun runs to its end
//! even when that time runs out first (the client then gets no reply: `list` tells).
//!
//! **Two kinds of request**, told apart by the first byte that is not JSON whitespace:
//!
//! - a JSON *string* is podman's reload (`"10.89.0.5"\n`: the container's new IP,
//!   empty for its loopback), answered `OK` or with an error text in podman's words,
//!   exactly as podman's helper does; see [`crate::reload`];
//! - a JSON *object* (`{`) is a control request, answered with a JSON object.
//!
//! **Versioning.** Every control request and reply holds `"version"`, an integer; this
//! is version [`VERSION`] (1). A helper answers a request of a version it does not
//! speak with an error reply holding its own version, so a client can tell. New fields
//! may be added to replies within a version (clients ignore unknown fields); a
//! request's fields, and the meaning of every field, change only with a new version.
//!
//! **Requests** (an object with `version`, `request` and the request's own fields; any
//! other field is an error):
//!
//! - `{"version":1,"request":"list"}`: every published port, with its counters.
//! - `{"version":1,"request":"add","mappings":[...]}`: publish more ports (see
//!   [`add`]).
//! - `{"version":1,"request":"remove","mappings":[...],"close":false}`: stop
//!   publishing ports (see [`remove`]).
//!
//! **Replies.** Success: `{"version":1,"ok":true, ...}` with the request's fields;
//! failure: `{"version":1,"ok":false,"error":"TEXT"}`, TEXT one human line. Errors:
//!
//! | cause | `error` |
//! |---|---|
//! | request over 65536 bytes | `request of N bytes is over 65536` |
//! | a peer of another user | `refused: uid N may not control this helper (only its own user, uid M, may)`; a peer whose user is not mapped in the helper's user namespace (root of the host, for a rootless helper) shows as the overflow uid, 65534 |
//! | not a JSON object, or bad JSON | `bad request: ` and the parser's words |
//! | no `version`, or not an integer | `bad request: missing field "version"` / `bad request: "version" is not an integer` |
//! | another version | `unsupported version N (this helper speaks version 1)` |
//! | no `request`, or not a string | `bad request: missing field "request"` / `bad request: "request" is not a string` |
//! | an unknown request | `unknown request "NAME"` |
//! | a field the request does not take | `bad request: unknown field "F" in request "NAME"` |
//! | a field the request needs is missing | `bad request: missing field "mappings" in request "add"` |
//! | a field of the wrong type or range | `bad request: ` and the parser's words (a port of 70000: `invalid value: integer ...`) |
//!
//! `add` and `remove` also fail with the texts of the helper's start-up (its stdout
//! line when podman's config is wrong), and with their own:
//!
//! | cause | `error` |
//! |---|---|
//! | a protocol not in `tcp`, `tcp4`, `tcp6`, `udp`, `udp4`, `udp6` | `unknown proto: "x"` (`sctp`: `unsupported proto: "sctp" (rootlessport forwards tcp and udp only)`) |
//! | a host IP that is not an address | `invalid ParentIP: "X"` |
//! | host or container port 0 | `invalid ParentPort: 0` / `invalid ChildPort: 0` |
//! | a range past port 65535 | `invalid port range: ...` |
//! | one port twice in the batch (protocol, host IP and host port) | `conflict with ID N` (N: the first one's place in the batch, from 1) |
//! | `add`: a port cannot be listened on (another process has it, or this helper publishes it already) | `listen tcp 0.0.0.0:8080: bind: address already in use` (the OS error as Go words it) |
//! | `add`: an address of the wrong family for the protocol | `listen tcp4 [::1]:8080: not an IPv4 address` |
//! | `remove`: a port that is not published now | `not published: tcp 0.0.0.0:8080 -> 80` (protocol, host address and port, container port) |
//! | `remove`: one published port named twice in other words (`127.0.0.1` and `::ffff:127.0.0.1`) | `conflict with ID N` (N: the first naming's place in the batch) |
//!
//! A request that fails changes nothing: the first error in the order above (each
//! mapping, each protocol of its list, each port of its range) is the reply, and no
//! port of the batch was published or removed.
//!
//! **`list` reply**: `"ports"`, an array with one object per published port (each
//! protocol of a mapping, each port of a range, in the order they were published):
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `host_ip` | string | the host address listened on, as in the mapping (none: `0.0.0.0`, which for a plain `tcp`/`udp` port serves IPv6 too, and `::` for `tcp6`/`udp6`) |
//! | `host_port` | integer | the host port |
//! | `container_port` | integer | the port in the container |
//! | `protocol` | string | `tcp`, `tcp4`, `tcp6`, `udp`, `udp4` or `udp6`, as in the mapping |
//! | `published_at` | integer | when the helper began listening on it, in unix seconds (UTC) |
//! | `connections_open` | integer | TCP: connections accepted and not ended yet (0 for UDP) |
//! | `connections_total` | integer | TCP: connections accepted since published (0 for UDP) |
//! | `refused` | integer | TCP: connections the container refused (no listener: the client was reset); UDP: "port unreachable" errors the container's side sent back |
//! | `bytes_in` | integer | bytes from clients to the container (TCP payload, UDP datagram payload) |
//! | `bytes_out` | integer | bytes from the container back to clients |
//! | `flows_live` | integer | UDP: flows (client address and port) open now (0 for TCP) |
//! | `flows_total` | integer | UDP: flows opened since published (0 for TCP) |
//! | `datagrams_in` | integer | UDP: datagrams forwarded to the container (0 for TCP) |
//! | `datagrams_out` | integer | UDP: datagrams forwarded back to clients (0 for TCP) |
//!
//! Counters start at 0 when the port is published and only grow (`*_open` and
//! `flows_live` go down too); each is read on its own, so a reply is not one instant's
//! snapshot of all of them. Bytes are counted when written to the other side.
//!
//! ```text
//! -> {"version":1,"request":"list"}
//! <- {"version":1,"ok":true,"ports":[{"host_ip":"127.0.0.1","host_port":8080,
//!     "container_port":80,"protocol":"tcp","published_at":1700000000,
//!     "connections_open":1,"connections_total":3,"refused":0,"bytes_in":100000,
//!     "bytes_out":100024,"flows_live":0,"flows_total":0,"datagrams_in":0,
//!     "datagrams_out":0}]}
//! ```
//!
//! **`add`**: `"mappings"`, an array of podman's mapping objects, exactly as in the
//! helper's config (`Mappings`: `host_ip`, `container_port`, `host_port`, `range`,
//! `protocol`; a missing field is 0 or empty, `range` 0 means 1, `protocol` may be a
//! comma list, empty means `tcp`). The batch is checked as at start-up, then every
//! listener of it is made in the engine's network namespace (where the config's ports
//! listen: the helper keeps a thread there for it), all or none: the first that fails
//! closes every socket made for the batch, and is the error. Then each port is served
//! as the config's are, client-address keeping included (UDP: its container ports get
//! their routing gate before the first datagram is forwarded). The reply's `"ports"`
//! holds the ports published, in that order, counters at 0.
//!
//! ```text
//! -> {"version":1,"request":"add","mappings":[{"host_ip":"","container_port":80,
//!     "host_port":8081,"range":1,"protocol":"tcp,udp"}]}
//! <- {"version":1,"ok":true,"ports":[{"host_ip":"0.0.0.0","host_port":8081,
//!     "container_port":80,"protocol":"tcp",...},{...,"protocol":"udp",...}]}
//! ```
//!
//! **`remove`**: `"mappings"` as for `add`, and `"close"`, a boolean (default
//! `false`). Every port the mappings expand to must be published now, matched on its
//! host address, host port, container port and protocol as `list` shows them (a
//! mapping with host IP `""` matches `0.0.0.0`). Each listener is closed before the
//! reply (new connections are refused at once, and the address can be published
//! again); the port leaves `list`, and its UDP gate goes when no other published UDP
//! port needs it. Its live TCP connections run on until either side ends them, or,
//! with `"close":true`, are reset on both sides (the client and the container each
//! see a reset). A UDP port's flows end with it: the container's replies went back
//! through the published socket, which is closed, so a client's next datagram gets
//! "port unreachable". The reply's `"ports"` holds the ports removed with their final
//! counters (connections kept open move bytes on, but are no longer listed).
//!
//! ```text
//! -> {"version":1,"request":"remove","mappings":[{"host_ip":"","container_port":80,
//!     "host_port":8081,"range":1,"protocol":"tcp"}],"close":true}
//! <- {"version":1,"ok":true,"ports":[{"host_ip":"0.0.0.0","host_port":8081,
//!     "container_port":80,"protocol":"tcp",...,"connections_total":4,...}]}
//! ```
//!
//! Requests are handled one at a time per helper (a second `add` or `remove` waits
//! for the first).
//!
//! **Live changes last for the helper's life only.** podman does not know of them:
//! `podman port` and `podman inspect` show the container's own `-p` ports, a removed
//! one included and an added one not; when the container restarts (or its helper is
//! started again), podman's own set is published again and the changes are gone. The
//! same host port may later be refused to podman itself if an added port holds it.
//!
//! This module is the client's side ([`list`], [`add`], [`remove`]) and the types both
//! sides share.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use slirp_config::PortMapping;

pub use crate::reload::MAX_REQUEST;
use crate::reload::{exchange, ExchangeError};

/// The protocol version this crate speaks.
pub const VERSION: u64 = 1;

/// The most reply bytes [`list`] takes (64 MiB: far more than 65,535 ports need).
pub const MAX_REPLY: usize = 64 * 1024 * 1024;

/// The control socket of the helper of `container_id` whose `TmpDir` is `tmp_dir`:
/// `tmp_dir/rp/<container_id>` (it may be longer than a unix socket address holds;
/// the clients here connect through the directory).
pub fn socket_path(tmp_dir: &Path, container_id: &str) -> PathBuf {
    tmp_dir.join("rp").join(container_id)
}

/// A control request (the `request` field and the request's own fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Every published port with its counters.
    List,
    /// Publish more ports, all or none: podman's mappings, checked and listened on as
    /// at start-up.
    Add {
        /// The ports to publish (the helper config's `Mappings` objects).
        mappings: Vec<PortMapping>,
    },
    /// Stop publishing ports, all or none: each port the mappings expand to must be
    /// published now.
    Remove {
        /// The ports to stop publishing, as they were added.
        mappings: Vec<PortMapping>,
        /// Also reset the live TCP connections of the removed ports (default `false`:
        /// they run on until either side ends them).
        #[serde(default)]
        close: bool,
    },
}

/// Every request's name on the wire, with the fields it takes.
const REQUESTS: [(&str, &[&str]); 3] = [
    ("list", &[]),
    ("add", &["mappings"]),
    ("remove", &["mappings", "close"]),
];

/// One published port and its counters, as `list` replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PortStatus {
    /// The host address listened on (`0.0.0.0` for a wildcard; a plain `tcp`/`udp`
    /// wildcard listens on IPv6 too).
    pub host_ip: IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The port in the container.
    pub container_port: u16,
    /// The protocol and family, as in the mapping (`tcp`, `udp6`, ...).
    #[serde(with = "proto_text")]
    pub protocol: slirp_config::Proto,
    /// When the helper began listening on it, in unix seconds.
    pub published_at: u64,
    /// What went through it since.
    #[serde(flatten)]
    pub counters: Counters,
}

/// The counters of a published port. TCP ports leave the UDP counters at 0, and the
/// other way round; see the module docs for each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Counters {
    /// TCP: connections accepted and not ended yet.
    pub connections_open: u64,
    /// TCP: connections accepted.
    pub connections_total: u64,
    /// TCP: connections the container refused; UDP: "port unreachable" errors back.
    pub refused: u64,
    /// Bytes from clients to the container.
    pub bytes_in: u64,
    /// Bytes from the container to clients.
    pub bytes_out: u64,
    /// UDP: flows open now.
    pub flows_live: u64,
    /// UDP: flows opened.
    pub flows_total: u64,
    /// UDP: datagrams forwarded to the container.
    pub datagrams_in: u64,
    /// UDP: datagrams forwarded back to clients.
    pub datagrams_out: u64,
}

/// A reply on the wire: `version`, `ok`, and `error` or the request's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reply {
    version: u64,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<PortStatus>>,
}

/// A request on the wire: the version, then the request.
#[derive(Serialize)]
struct Envelope<'a> {
    version: u64,
    #[serde(flatten)]
    request: &'a Request,
}

mod proto_text {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use slirp_config::Proto;

    pub(super) fn serialize<S: Serializer>(p: &Proto, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(p)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Proto, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|_| D::Error::custom(format!("unknown protocol {text:?}")))
    }
}

/// Errors of the control client, each with its cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No helper listens at the socket (no such file, no permission): the container
    /// is not running, or its helper is not ours.
    #[error("cannot connect to the control socket {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the reply failed; a helper that takes no
    /// request or sends no reply within 10 s is an error of kind
    /// [`io::ErrorKind::TimedOut`] (`no reply within 10 s`). A request the helper had
    /// begun by then is still carried out to its end (`list` shows the outcome); one it
    /// had not yet accepted (a helper out of files accepts late) is not acted on.
    #[error("control request failed: {0}")]
    Io(#[source] io::Error),
    /// The request is larger than a helper takes ([`MAX_REQUEST`]): it is not sent.
    /// Fewer mappings per request, or ranges (`8000-8999:8000-8999` is one mapping),
    /// make it fit.
    #[error(
        "a request of {bytes} bytes is over the helper's limit of {limit}: \
         send fewer mappings at a time, or ranges"
    )]
    TooLarge {
        /// The request's size.
        bytes: usize,
        /// The limit, [`MAX_REQUEST`].
        limit: usize,
    },
    /// The helper said no: its `error` text.
    #[error("the helper refused the request: {0}")]
    Refused(String),
    /// The reply is not this protocol (a helper that does not speak it answers with a
    /// text, for example podman's, which knows reloads only).
    #[error("the helper's reply is not understood: {0}")]
    BadReply(String),
}

/// Every port the helper listening at `socket` publishes, with its counters.
///
/// ```no_run
/// # fn main() -> Result<(), rootlessport::control::ControlError> {
/// use rootlessport::control;
/// let socket = control::socket_path("/run/user/1000/libpod/tmp".as_ref(), "ctr1");
/// for p in control::list(&socket)? {
///     println!("{}:{} -> {}/{}: {} bytes in", p.host_ip, p.host_port,
///         p.container_port, p.protocol, p.counters.bytes_in);
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`ControlError::Connect`] when nothing listens there, [`ControlError::Io`] when the
/// exchange fails or times out, [`ControlError::Refused`] with the helper's error
/// text, [`ControlError::BadReply`] when the reply is not version 1 of this protocol.
pub fn list(socket: &Path) -> Result<Vec<PortStatus>, ControlError> {
    ports_of(request(socket, &Request::List)?)
}

/// Publish `mappings` on the helper listening at `socket`, all or none, checked and
/// listened on as at its start-up (podman's [`PortMapping`]s: each protocol of the
/// comma list, each port of the range). Returns the ports this request published, in
/// that order, counters at 0. The change lasts for the helper's life: podman does not
/// know of it (see the module docs).
///
/// ```no_run
/// # fn main() -> Result<(), rootlessport::control::ControlError> {
/// use rootlessport::control;
/// use slirp_config::PortMapping;
/// let socket = control::socket_path("/run/user/1000/libpod/tmp".as_ref(), "ctr1");
/// // Host port 8081 (TCP and UDP, every address) to the container's port 80.
/// let added = control::add(&socket, &[PortMapping::new("", 8081, 80, 1, "tcp,udp")])?;
/// assert_eq!(added.len(), 2);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// As [`list`]; [`ControlError::Refused`] holds the helper's start-up text for a bad
/// mapping (`unknown proto: "x"`, `invalid ParentPort: 0`, `conflict with ID 2`) or a
/// port that cannot be listened on (`listen tcp 0.0.0.0:8080: bind: address already in
/// use`, also when the helper publishes it already); then nothing was published.
/// [`ControlError::TooLarge`] when the batch does not fit in one request (nothing sent).
pub fn add(socket: &Path, mappings: &[PortMapping]) -> Result<Vec<PortStatus>, ControlError> {
    ports_of(request(
        socket,
        &Request::Add {
            mappings: mappings.to_vec(),
        },
    )?)
}

/// Stop publishing `mappings` on the helper listening at `socket`, all or none: each
/// port they expand to must be published now (same host IP, host port, container port
/// and protocol as [`list`] shows). The listeners close at once (new connections are
/// refused); live TCP connections run on, or are reset on both sides when `close`;
/// the UDP flows of a removed port end with it. Returns the ports removed, with their
/// final counters.
///
/// # Errors
///
/// As [`list`]; [`ControlError::Refused`] holds the start-up text for a bad mapping, or
/// names the first port that is not published (`not published: tcp 0.0.0.0:8080 ->
/// 80`); then nothing was removed. [`ControlError::TooLarge`] as for [`add`].
pub fn remove(
    socket: &Path,
    mappings: &[PortMapping],
    close: bool,
) -> Result<Vec<PortStatus>, ControlError> {
    ports_of(request(
        socket,
        &Request::Remove {
            mappings: mappings.to_vec(),
            close,
        },
    )?)
}

/// The `ports` of a successful reply.
fn ports_of(reply: Reply) -> Result<Vec<PortStatus>, ControlError> {
    reply
        .ports
        .ok_or_else(|| ControlError::BadReply("no \"ports\" in the reply".to_owned()))
}

/// Send `request`, read the reply; an `ok: false` reply is [`ControlError::Refused`].
fn request(path: &Path, request: &Request) -> Result<Reply, ControlError> {
    let msg = encode_request(request);
    if msg.len() > MAX_REQUEST {
        return Err(ControlError::TooLarge {
            bytes: msg.len(),
            limit: MAX_REQUEST,
        });
    }
    let connect = |source: io::Error| ControlError::Connect {
        path: path.to_owned(),
        source,
    };
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            },
            n,
        ),
        _ => return Err(connect(io::Error::from(io::ErrorKind::InvalidInput))),
    };
    let name = name
        .to_str()
        .ok_or_else(|| connect(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let dir = std::fs::File::open(dir).map_err(connect)?;
    // SO_RCVTIMEO/SO_SNDTIMEO running out is EAGAIN: said as what it is.
    let failed = |e: Errno, what: &str| {
        ControlError::Io(if e == Errno::EAGAIN {
            io::Error::new(io::ErrorKind::TimedOut, format!("{what} within 10 s"))
        } else {
            e.into()
        })
    };
    let reply = exchange(&dir, name, &msg, false, MAX_REPLY).map_err(|e| match e {
        ExchangeError::Connect(e) => connect(e.into()),
        ExchangeError::Send(e) => failed(e, "the helper took no request"),
        ExchangeError::Recv(e) => failed(e, "no reply"),
        ExchangeError::TooLong => ControlError::BadReply(format!("reply over {MAX_REPLY} bytes")),
    })?;
    decode_reply(&reply)
}

/// A request as sent: `{"version":1,"request":"list"}`.
fn encode_request(request: &Request) -> Vec<u8> {
    let envelope = Envelope {
        version: VERSION,
        request,
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

fn decode_reply(bytes: &[u8]) -> Result<Reply, ControlError> {
    let reply: Reply = serde_json::from_slice(bytes).map_err(|e| {
        let text = String::from_utf8_lossy(bytes);
        ControlError::BadReply(format!(
            "{:?}: {e}",
            text.chars().take(200).collect::<String>()
        ))
    })?;
    if reply.version != VERSION {
        return Err(ControlError::BadReply(format!(
            "version {} (this client speaks version {VERSION}){}",
            reply.version,
            reply.error.map(|e| format!(": {e}")).unwrap_or_default()
        )));
    }
    if !reply.ok {
        return Err(ControlError::Refused(
            reply.error.unwrap_or_else(|| "(no error text)".to_owned()),
        ));
    }
    Ok(reply)
}

// ---- The helper's side: pure decoding and answering, served by `reload::server`. ----

/// Whether a message on the socket is a control request (a JSON object) rather than
/// podman's reload (a JSON string).
pub(crate) fn is_control(msg: &[u8]) -> bool {
    msg.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'{')
}

/// What the helper's state answers requests with.
pub(crate) trait Ports {
    /// Every published port, in the order published.
    fn list(&self) -> Vec<PortStatus>;
    /// Publish `mappings`, all or none; the ports published, or the one-line error.
    async fn add(&self, mappings: &[PortMapping]) -> Result<Vec<PortStatus>, String>;
    /// Stop publishing `mappings`, all or none; the ports removed with their final
    /// counters, or the one-line error.
    async fn remove(
        &self,
        mappings: &[PortMapping],
        close: bool,
    ) -> Result<Vec<PortStatus>, String>;
}

/// Decode a control request, or say why not (the reply's `error`).
pub(crate) fn parse_request(msg: &[u8]) -> Result<Request, String> {
    let bad = |e: String| format!("bad request: {e}");
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(msg).map_err(|e| bad(e.to_string()))?;
    let version = match map.remove("version") {
        None => return Err(bad("missing field \"version\"".to_owned())),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("\"version\" is not an integer".to_owned()))?,
    };
    if version != VERSION {
        return Err(format!(
            "unsupported version {version} (this helper speaks version {VERSION})"
        ));
    }
    let name = match map.get("request") {
        None => return Err(bad("missing field \"request\"".to_owned())),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("\"request\" is not a string".to_owned())),
    };
    let q = slirp_config::go_quote;
    let Some((_, fields)) = REQUESTS.iter().find(|(n, _)| *n == name) else {
        return Err(format!("unknown request {}", q(&name)));
    };
    if let Some(field) = map
        .keys()
        .find(|k| *k != "request" && !fields.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown field {} in request {}",
            q(field),
            q(&name)
        )));
    }
    // Every field but `close` is required (serde's own text quotes differently).
    if let Some(field) = fields
        .iter()
        .find(|f| **f != "close" && !map.contains_key(**f))
    {
        return Err(bad(format!(
            "missing field {} in request {}",
            q(field),
            q(&name)
        )));
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| bad(e.to_string()))
}

/// The reply to the control request `msg`, as sent.
pub(crate) async fn answer<P: Ports>(msg: &[u8], ports: &P) -> Vec<u8> {
    let done = match parse_request(msg) {
        Ok(Request::List) => Ok(ports.list()),
        Ok(Request::Add { mappings }) => ports.add(&mappings).await,
        Ok(Request::Remove { mappings, close }) => ports.remove(&mappings, close).await,
        Err(why) => Err(why),
    };
    match done {
        Ok(ports) => encode_reply(Reply {
            version: VERSION,
            ok: true,
            error: None,
            ports: Some(ports),
        }),
        Err(why) => error_reply(&why),
    }
}

/// An error reply with `why`, as sent.
pub(crate) fn error_reply(why: &str) -> Vec<u8> {
    encode_reply(Reply {
        version: VERSION,
        ok: false,
        error: Some(why.to_owned()),
        ports: None,
    })
}

fn encode_reply(reply: Reply) -> Vec<u8> {
    // Serializing these types cannot fail (string keys, no maps of other keys).
    serde_json::to_vec(&reply).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists its ports; adds and removes answer them too, or the error it holds,
    /// and remember what they were asked.
    struct Fake(
        Vec<PortStatus>,
        Option<String>,
        std::sync::Mutex<Vec<Request>>,
    );
    impl Ports for Fake {
        fn list(&self) -> Vec<PortStatus> {
            self.0.clone()
        }
        async fn add(&self, mappings: &[PortMapping]) -> Result<Vec<PortStatus>, String> {
            self.2.lock().unwrap().push(Request::Add {
                mappings: mappings.to_vec(),
            });
            self.1.clone().map_or_else(|| Ok(self.0.clone()), Err)
        }
        async fn remove(
            &self,
            mappings: &[PortMapping],
            close: bool,
        ) -> Result<Vec<PortStatus>, String> {
            self.2.lock().unwrap().push(Request::Remove {
                mappings: mappings.to_vec(),
                close,
            });
            self.1.clone().map_or_else(|| Ok(self.0.clone()), Err)
        }
    }

    fn fake(ports: Vec<PortStatus>) -> Fake {
        Fake(ports, None, Default::default())
    }

    /// `answer`, run to its end.
    fn answer_now(msg: &[u8], ports: &Fake) -> Vec<u8> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(answer(msg, ports))
    }

    fn port() -> PortStatus {
        PortStatus {
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: 8080,
            container_port: 80,
            protocol: "tcp4".parse().unwrap(),
            published_at: 1_700_000_000,
            counters: Counters {
                connections_open: 1,
                connections_total: 3,
                bytes_in: 100_000,
                bytes_out: 100_024,
                ..Counters::default()
            },
        }
    }

    fn error_of(msg: &[u8]) -> String {
        let reply: Reply = serde_json::from_slice(&answer_now(msg, &fake(vec![]))).unwrap();
        assert_eq!((reply.version, reply.ok), (1, false));
        reply.error.unwrap()
    }

    #[test]
    fn control_requests_encode_as_documented() {
        assert_eq!(
            encode_request(&Request::List),
            br#"{"version":1,"request":"list"}"#
        );
        assert!(is_control(&encode_request(&Request::List)));
        assert_eq!(
            parse_request(&encode_request(&Request::List)),
            Ok(Request::List)
        );
        assert_eq!(
            parse_request(b" \n{ \"request\" : \"list\", \"version\": 1 }\n"),
            Ok(Request::List)
        );
        assert!(!is_control(b"\"10.0.0.1\"\n"));
        assert!(!is_control(b""));
        assert!(is_control(b"\r\n\t {"));
    }

    #[test]
    fn control_list_reply_round_trips_with_documented_fields() {
        let reply = answer_now(br#"{"version":1,"request":"list"}"#, &fake(vec![port()]));
        let text = String::from_utf8(reply.clone()).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"ok":true,"ports":[{"host_ip":"127.0.0.1","host_port":8080,"container_port":80,"protocol":"tcp4","published_at":1700000000,"connections_open":1,"connections_total":3,"refused":0,"bytes_in":100000,"bytes_out":100024,"flows_live":0,"flows_total":0,"datagrams_in":0,"datagrams_out":0}]}"#
        );
        let decoded = decode_reply(&reply).unwrap();
        assert_eq!(decoded.ports, Some(vec![port()]));
        // An empty helper lists nothing, and says so.
        let empty = answer_now(br#"{"version":1,"request":"list"}"#, &fake(vec![]));
        assert_eq!(
            std::str::from_utf8(&empty).unwrap(),
            r#"{"version":1,"ok":true,"ports":[]}"#
        );
    }

    #[test]
    fn control_bad_requests_get_clear_errors() {
        assert_eq!(
            error_of(br#"{"version":2,"request":"list"}"#),
            "unsupported version 2 (this helper speaks version 1)"
        );
        assert_eq!(
            error_of(br#"{"request":"list"}"#),
            r#"bad request: missing field "version""#
        );
        assert_eq!(
            error_of(br#"{"version":"1","request":"list"}"#),
            r#"bad request: "version" is not an integer"#
        );
        assert_eq!(
            error_of(br#"{"version":1}"#),
            r#"bad request: missing field "request""#
        );
        assert_eq!(
            error_of(br#"{"version":1,"request":7}"#),
            r#"bad request: "request" is not a string"#
        );
        assert_eq!(
            error_of(br#"{"version":1,"request":"frobnicate"}"#),
            r#"unknown request "frobnicate""#
        );
        assert_eq!(
            error_of(br#"{"version":1,"request":"list","all":true}"#),
            r#"bad request: unknown field "all" in request "list""#
        );
        let e = error_of(br#"{"version":1,"request":"list""#);
        assert!(e.starts_with("bad request: EOF while parsing"), "{e}");
        let e = error_of(b"{\"version\":1,\"request\":\"list\"} trailing");
        assert!(e.starts_with("bad request: trailing characters"), "{e}");
        let e = error_of(b"[1]");
        assert!(e.starts_with("bad request: invalid type"), "{e}");
    }

    #[test]
    fn control_client_refuses_a_request_over_the_limit_before_sending() {
        // About 90 bytes a mapping: 1,000 of them are over 64 KiB.
        let many: Vec<PortMapping> = (0..1000)
            .map(|i| PortMapping::new("127.0.0.1", 20000 + i, 80, 1, "tcp,udp"))
            .collect();
        let e = add(Path::new("/nonexistent/rp/ctr"), &many).unwrap_err();
        let ControlError::TooLarge { bytes, limit } = e else {
            panic!("{e}")
        };
        assert!(bytes > limit && limit == MAX_REQUEST);
        assert_eq!(
            e.to_string(),
            format!(
                "a request of {bytes} bytes is over the helper's limit of 65536: send fewer \
                 mappings at a time, or ranges"
            )
        );
        // One range of as many ports fits.
        let one = [PortMapping::new("127.0.0.1", 20000, 80, 1000, "tcp,udp")];
        let e = add(Path::new("/nonexistent/rp/ctr"), &one).unwrap_err();
        assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    }

    #[test]
    fn control_client_decodes_errors_and_foreign_replies() {
        let refused = decode_reply(&error_reply("unknown request \"x\"")).unwrap_err();
        assert!(matches!(&refused, ControlError::Refused(t) if t == "unknown request \"x\""));
        // podman's helper (reloads only) answers a text.
        let e = decode_reply(b"rootless port failed to decode ports: x").unwrap_err();
        assert!(matches!(e, ControlError::BadReply(_)), "{e}");
        let e = decode_reply(br#"{"version":2,"ok":false,"error":"new"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the helper's reply is not understood: version 2 (this client speaks version 1): new"
        );
    }

    fn mapping(host_port: u16, protocol: &str) -> PortMapping {
        PortMapping::new("", host_port, 80, 1, protocol)
    }

    #[test]
    fn control_add_and_remove_encode_as_documented() {
        let add = Request::Add {
            mappings: vec![mapping(8081, "tcp")],
        };
        assert_eq!(
            std::str::from_utf8(&encode_request(&add)).unwrap(),
            r#"{"version":1,"request":"add","mappings":[{"host_ip":"","container_port":80,"host_port":8081,"range":1,"protocol":"tcp"}]}"#
        );
        assert_eq!(parse_request(&encode_request(&add)), Ok(add));
        let remove = Request::Remove {
            mappings: vec![mapping(8081, "tcp,udp")],
            close: true,
        };
        assert_eq!(
            std::str::from_utf8(&encode_request(&remove)).unwrap(),
            r#"{"version":1,"request":"remove","mappings":[{"host_ip":"","container_port":80,"host_port":8081,"range":1,"protocol":"tcp,udp"}],"close":true}"#
        );
        assert_eq!(parse_request(&encode_request(&remove)), Ok(remove));
        // `close` defaults to false; a mapping's missing fields take zero, as at
        // start-up (Go's decoder), and are refused later by the port checks.
        assert_eq!(
            parse_request(br#"{"version":1,"request":"remove","mappings":[{"host_port":8081,"container_port":80}]}"#),
            Ok(Request::Remove {
                mappings: vec![PortMapping::new("", 8081, 80, 0, "")],
                close: false
            })
        );
        assert_eq!(
            parse_request(br#"{"version":1,"request":"add","mappings":[]}"#),
            Ok(Request::Add { mappings: vec![] })
        );
    }

    #[test]
    fn control_add_and_remove_bad_requests_get_clear_errors() {
        assert_eq!(
            error_of(br#"{"version":1,"request":"add"}"#),
            r#"bad request: missing field "mappings" in request "add""#
        );
        assert_eq!(
            error_of(br#"{"version":1,"request":"remove","close":true}"#),
            r#"bad request: missing field "mappings" in request "remove""#
        );
        assert_eq!(
            error_of(br#"{"version":1,"request":"add","mappings":[],"close":true}"#),
            r#"bad request: unknown field "close" in request "add""#
        );
        assert_eq!(
            error_of(br#"{"version":1,"request":"remove","mappings":[],"all":1}"#),
            r#"bad request: unknown field "all" in request "remove""#
        );
        let e = error_of(br#"{"version":1,"request":"add","mappings":[{"host_port":70000}]}"#);
        assert!(
            e.starts_with("bad request: invalid value: integer `70000`"),
            "{e}"
        );
        let e = error_of(br#"{"version":1,"request":"remove","mappings":[],"close":"yes"}"#);
        assert!(
            e.starts_with("bad request: invalid type: string \"yes\""),
            "{e}"
        );
        let e = error_of(br#"{"version":1,"request":"add","mappings":{}}"#);
        assert!(e.starts_with("bad request: invalid type: map"), "{e}");
    }

    #[test]
    fn control_add_and_remove_replies_carry_ports_or_the_error() {
        let ports = fake(vec![port()]);
        let reply = answer_now(
            br#"{"version":1,"request":"add","mappings":[{"host_port":8080,"container_port":80}]}"#,
            &ports,
        );
        assert_eq!(decode_reply(&reply).unwrap().ports, Some(vec![port()]));
        let reply = answer_now(
            br#"{"version":1,"request":"remove","mappings":[{"host_port":8080,"container_port":80}],"close":true}"#,
            &ports,
        );
        assert_eq!(
            ports_of(decode_reply(&reply).unwrap()).unwrap(),
            vec![port()]
        );
        assert_eq!(
            *ports.2.lock().unwrap(),
            [
                Request::Add {
                    mappings: vec![PortMapping::new("", 8080, 80, 0, "")]
                },
                Request::Remove {
                    mappings: vec![PortMapping::new("", 8080, 80, 0, "")],
                    close: true
                }
            ]
        );
        // The state's error is the reply's, as one line; a bad request never reaches it.
        let failing = Fake(
            vec![],
            Some("conflict with ID 2".to_owned()),
            Default::default(),
        );
        let reply = answer_now(br#"{"version":1,"request":"add","mappings":[]}"#, &failing);
        assert_eq!(
            std::str::from_utf8(&reply).unwrap(),
            r#"{"version":1,"ok":false,"error":"conflict with ID 2"}"#
        );
        assert!(
            matches!(decode_reply(&reply), Err(ControlError::Refused(t)) if t == "conflict with ID 2")
        );
        answer_now(br#"{"version":1,"request":"add"}"#, &failing);
        assert_eq!(failing.2.lock().unwrap().len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn control_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_request(&bytes);
            let _ = answer_now(&bytes, &fake(vec![port()]));
            let _ = decode_reply(&bytes);
        }
    }
}
