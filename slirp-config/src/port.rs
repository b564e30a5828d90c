//! The port mapping podman hands to its port forwarders, and the one typed model every
//! forwarder here reads it through: protocol names, port ranges, and the expansion of
//! mappings into single forwards, each check made once, here.

use std::borrow::Cow;
use std::fmt;
use std::iter::FusedIterator;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::quote::go_quote;

/// One published port (or range), with podman's JSON field names: the `PortMapping` of
/// podman's network types (`containers/common` `libnetwork/types`), as podman writes it
/// into `rootlessport`'s config and publishes it through slirp4netns's API.
///
/// This is the wire type and stays as loose as the wire: any field may hold what the
/// forwarders refuse. [`PortMapping::forwards`] (and [`forwards`] for a list) reads it
/// into checked single forwards; `FromStr` and `Display` speak the `podman run -p`
/// syntax (see [`ParsePublishError`](crate::ParsePublishError)).
///
/// Missing fields take their zero value, as Go's decoder does.
///
/// ```
/// let m: slirp_config::PortMapping = serde_json::from_str(
///     r#"{"host_ip":"","container_port":80,"host_port":8080,"range":2,"protocol":"tcp,udp"}"#,
/// ).unwrap();
/// assert_eq!(m.protocols().collect::<Vec<_>>(), ["tcp", "udp"]);
/// assert_eq!(m.count(), 2);
/// assert_eq!(m.to_string(), "8080-8081:80-81/tcp,udp");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PortMapping {
    /// Host address to listen on; empty means every address.
    pub host_ip: String,
    /// The first container port; 0 is refused by every forwarder.
    pub container_port: u16,
    /// The first host port; 0 is refused by every forwarder.
    pub host_port: u16,
    /// Number of consecutive ports; 0 means 1.
    pub range: u16,
    /// `tcp`, `udp`, ... or a comma list of them; empty means `tcp`. Decoded (and set
    /// through [`PortMapping::new`] or [`PortMapping::set_protocol`]), the lists podman
    /// writes (`tcp`, `udp`, `tcp,udp`, ...) borrow a static text instead of taking an
    /// allocation each: a config of 10,000 ports holds 10,000 of them. Read it as
    /// `&*m.protocol` or with [`PortMapping::protocol_list`]; any `String` or
    /// `&'static str` converts into it with `.into()`. (It was a `String` until issue
    /// 15's start-up work: code that called `m.protocol.as_str()` now reads
    /// `&*m.protocol`.)
    #[serde(deserialize_with = "protocol_list")]
    pub protocol: Cow<'static, str>,
}

impl PortMapping {
    /// `range` ports from `host_ip:host_port` (`""`: every address) to
    /// `container_port`, over `protocol` (`tcp`, `udp`, `tcp,udp`, ...).
    pub fn new(
        host_ip: &str,
        host_port: u16,
        container_port: u16,
        range: u16,
        protocol: &str,
    ) -> Self {
        PortMapping {
            host_ip: host_ip.to_owned(),
            container_port,
            host_port,
            range,
            protocol: protocol_text(protocol),
        }
    }

    /// Set the protocol list to `list` (`tcp`, `udp,tcp`, ...), as written; a list podman
    /// writes is kept as a static text (see [`PortMapping::protocol`]).
    pub fn set_protocol(&mut self, list: &str) {
        self.protocol = protocol_text(list);
    }

    /// How many ports the mapping covers (`range` 0 counts as 1).
    pub fn count(&self) -> u16 {
        self.range.max(1)
    }

    /// The protocol field, `tcp` when it is empty.
    pub fn protocol_list(&self) -> &str {
        if self.protocol.is_empty() {
            "tcp"
        } else {
            &self.protocol
        }
    }

    /// The protocols of the comma list (`tcp` when empty), as written: empty items and
    /// unknown names included. [`PortMapping::forwards`] reads them as [`Proto`]s.
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        self.protocol_list().split(',')
    }

    /// The host ports, unchecked: `host_port` and the `count() - 1` after it.
    pub fn host_ports(&self) -> PortRange {
        PortRange {
            first: self.host_port,
            count: self.count(),
        }
    }

    /// The container ports, unchecked: `container_port` and the `count() - 1` after it.
    pub fn container_ports(&self) -> PortRange {
        PortRange {
            first: self.container_port,
            count: self.count(),
        }
    }

    /// The single forwards of this mapping; see [`forwards`].
    pub fn forwards(&self) -> Forwards<'_> {
        forwards(std::slice::from_ref(self))
    }
}

/// The protocol lists a mapping usually holds, as static texts.
const KNOWN_LISTS: [&str; 12] = [
    "tcp", "udp", "sctp", "tcp,udp", "udp,tcp", "", "tcp4", "tcp6", "udp4", "udp6", "sctp4",
    "sctp6",
];

/// `list` as one of [`KNOWN_LISTS`], if it is one.
fn known_list(list: &str) -> Option<&'static str> {
    KNOWN_LISTS.iter().copied().find(|k| *k == list)
}

/// `list` as a mapping holds it: static if known, else a copy.
fn protocol_text(list: &str) -> Cow<'static, str> {
    known_list(list).map_or_else(|| list.to_owned().into(), Cow::Borrowed)
}

/// A mapping's `protocol`: whatever serde takes for a `String` (a string, or bytes
/// that are UTF-8), a known list borrowing its static text.
fn protocol_list<'de, D: Deserializer<'de>>(d: D) -> Result<Cow<'static, str>, D::Error> {
    struct List;
    impl serde::de::Visitor<'_> for List {
        type Value = Cow<'static, str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(protocol_text(v))
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(known_list(&v).map_or(Cow::Owned(v), Cow::Borrowed))
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            match std::str::from_utf8(v) {
                Ok(s) => self.visit_str(s),
                Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(v), &self)),
            }
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
            match String::from_utf8(v) {
                Ok(s) => self.visit_string(s),
                Err(e) => Err(E::invalid_value(
                    serde::de::Unexpected::Bytes(&e.into_bytes()),
                    &self,
                )),
            }
        }
    }
    d.deserialize_string(List)
}

/// A transport protocol a port is published for: the names podman's port parsing
/// (`pkg/specgen/generate/ports.go`) lets into a mapping's protocol list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// `tcp`: the protocol of a mapping whose list is empty.
    Tcp,
    /// `udp`: forwarded as flows, one per client address and port.
    Udp,
    /// Passed on by podman; neither slirp4netns nor our `rootlessport` forwards it.
    Sctp,
}

impl Protocol {
    /// The name on the wire: `tcp`, `udp` or `sctp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = PortError;

    /// `tcp`, `udp` or `sctp`, in lower case as podman writes them.
    ///
    /// # Errors
    ///
    /// [`PortError::UnknownProtocol`] for anything else, the text as given.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(PortError::UnknownProtocol(s.to_owned())),
        }
    }
}

/// The address families a forward is limited to: the `4`/`6` suffix RootlessKit's port
/// specs accept on a protocol name (`tcp4`, `udp6`). podman writes names without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// No suffix: a wildcard host address serves IPv4 and IPv6 at once.
    Any,
    /// `4`: IPv4 only.
    V4,
    /// `6`: IPv6 only.
    V6,
}

/// One name of a mapping's protocol list as the forwarders read it: a [`Protocol`] and
/// the [`Family`] of its suffix.
///
/// Parsed exactly as RootlessKit's port-spec validation takes names (`tcp`, `tcp4`,
/// `tcp6`, `udp`, `udp4`, `udp6`, `sctp`, `sctp4`, `sctp6`; lower case); `Display`
/// writes the name back unchanged.
///
/// ```
/// use slirp_config::{Family, Proto, Protocol};
/// let p: Proto = "udp6".parse()?;
/// assert_eq!((p.protocol, p.family), (Protocol::Udp, Family::V6));
/// assert_eq!(p.to_string(), "udp6");
/// assert_eq!(Proto::from(Protocol::Tcp).to_string(), "tcp");
/// # Ok::<(), slirp_config::PortError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Proto {
    /// The protocol the name starts with.
    pub protocol: Protocol,
    /// The family its suffix limits it to ([`Family::Any`] without one).
    pub family: Family,
}

impl From<Protocol> for Proto {
    /// The protocol with no family suffix.
    fn from(protocol: Protocol) -> Self {
        Proto {
            protocol,
            family: Family::Any,
        }
    }
}

impl Proto {
    /// The name as RootlessKit and podman write it (`tcp`, `udp6`, `sctp4`, ...): what
    /// `Display` writes, without formatting or allocating.
    pub fn as_str(&self) -> &'static str {
        match (self.protocol, self.family) {
            (Protocol::Tcp, Family::Any) => "tcp",
            (Protocol::Tcp, Family::V4) => "tcp4",
            (Protocol::Tcp, Family::V6) => "tcp6",
            (Protocol::Udp, Family::Any) => "udp",
            (Protocol::Udp, Family::V4) => "udp4",
            (Protocol::Udp, Family::V6) => "udp6",
            (Protocol::Sctp, Family::Any) => "sctp",
            (Protocol::Sctp, Family::V4) => "sctp4",
            (Protocol::Sctp, Family::V6) => "sctp6",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = PortError;

    /// # Errors
    ///
    /// [`PortError::UnknownProtocol`] for a name that is not one of the nine above
    /// (the empty name of `tcp,` included), the whole name as given.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, family) = match s.as_bytes().last() {
            Some(b'4') => (&s[..s.len() - 1], Family::V4),
            Some(b'6') => (&s[..s.len() - 1], Family::V6),
            _ => (s, Family::Any),
        };
        let protocol = name
            .parse()
            .map_err(|_| PortError::UnknownProtocol(s.to_owned()))?;
        Ok(Proto { protocol, family })
    }
}

/// Consecutive ports: `first` and the ones after it, `count` in all (0 counts as 1, as
/// a mapping's `range` does). A plain value: [`forwards`] is what checks a mapping's
/// ranges.
///
/// `Display` and `FromStr` use the form of a `-p` port: `8080`, or `8080-8082` for
/// three ports.
///
/// ```
/// use slirp_config::PortRange;
/// let r: PortRange = "8000-8002".parse()?;
/// assert_eq!((r.first, r.count, r.last()), (8000, 3, 8002));
/// assert_eq!(PortRange { first: 53, count: 1 }.to_string(), "53");
/// # Ok::<(), slirp_config::PublishSyntaxError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// The first port of the range.
    pub first: u16,
    /// How many ports, `first` included; 0 counts as 1.
    pub count: u16,
}

impl PortRange {
    /// The last port; past 65535 for a range that overflows (which [`forwards`]
    /// refuses).
    pub fn last(self) -> u32 {
        u32::from(self.first) + u32::from(self.count.max(1)) - 1
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count <= 1 {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last())
        }
    }
}

/// Which end of a forward a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSide {
    /// The port the forwarder listens on, on the host side.
    Host,
    /// The port inside the container the forwarder connects to.
    Container,
}

impl PortSide {
    /// `host` or `container`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PortSide::Host => "host",
            PortSide::Container => "container",
        }
    }
}

impl fmt::Display for PortSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a mapping cannot be expanded into forwards.
///
/// These are the checks every forwarder shares; each words them its own way (the
/// slirp4netns publisher in ours, `rootlessport` in RootlessKit's), so the Display here
/// is only a plain default.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// A name of the protocol list that is no [`Proto`]: the name as given, empty for
    /// the empty item of `tcp,`.
    #[error("unknown protocol {}", go_quote(.0))]
    UnknownProtocol(String),
    /// A non-empty `host_ip` that is no IPv4 or IPv6 address, as given.
    #[error("invalid host IP {}", go_quote(.0))]
    InvalidHostIp(String),
    /// A `host_port` or `container_port` of 0.
    #[error("{0} port 0 cannot be forwarded")]
    PortZero(PortSide),
    /// `first` and the `count - 1` ports after it go past 65535.
    #[error("{side} port {first} with range {count} goes past 65535")]
    RangePastEnd {
        /// The end of the forward whose range overflows.
        side: PortSide,
        /// Its first port.
        first: u16,
        /// The mapping's `range`.
        count: u16,
    },
}

/// One forward of a mapping: one host port to one container port over one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward<'a> {
    /// The mapping it comes from, for its texts (`host_ip` as written) in messages.
    pub mapping: &'a PortMapping,
    /// The protocol, and the family its name limits the forward to.
    pub proto: Proto,
    /// The host address; `None` when `host_ip` is empty (every address). An
    /// IPv4-mapped IPv6 address stays IPv6 here.
    pub host_ip: Option<IpAddr>,
    /// The host port to listen on, 1 to 65535.
    pub host_port: u16,
    /// The container port to forward to, 1 to 65535.
    pub container_port: u16,
}

/// Expand `mappings` into single forwards, in podman's order: each mapping, each name
/// of its protocol list, each port of its range (as podman's slirp4netns publisher in
/// `libpod/networking_slirp4netns.go` and its `rootlessport` add them).
///
/// A mapping is checked when its first protocol name is reached, in RootlessKit's order
/// (`pkg/port` `ValidatePortSpec`), plus the range checks podman leaves to integer
/// wrap-around:
/// 1. the name parses as a [`Proto`] (each further name when it is reached);
/// 2. `host_ip` is empty or an IP address;
/// 3. `host_port`, then `container_port`, is not 0;
/// 4. the host range, then the container range, ends at 65535 at the latest.
///
/// The first failure is yielded as an `Err` and ends the iteration, so the forwards
/// before it come out first: a forwarder that checks something per forward (a
/// conflict, a protocol it cannot carry) reports whatever comes first, as podman's
/// helper does adding them one by one. Collect into a `Result<Vec<_>, _>` to check
/// everything before acting.
///
/// ```
/// use slirp_config::{forwards, PortMapping, PortSide, PortError, Protocol};
/// let ms = [PortMapping::new("127.0.0.1", 8080, 80, 2, "tcp,udp")];
/// let fw: Vec<_> = forwards(&ms).collect::<Result<_, _>>()?;
/// let got: Vec<_> = fw.iter().map(|f| (f.proto.protocol, f.host_port, f.container_port)).collect();
/// assert_eq!(got, [(Protocol::Tcp, 8080, 80), (Protocol::Tcp, 8081, 81),
///                  (Protocol::Udp, 8080, 80), (Protocol::Udp, 8081, 81)]);
/// assert_eq!(fw[0].host_ip, Some("127.0.0.1".parse().unwrap()));
///
/// let bad = PortMapping::new("", 65535, 80, 2, "tcp");
/// assert_eq!(bad.forwards().next(), Some(Err(PortError::RangePastEnd {
///     side: PortSide::Host, first: 65535, count: 2 })));
/// # Ok::<(), PortError>(())
/// ```
pub fn forwards(mappings: &[PortMapping]) -> Forwards<'_> {
    Forwards {
        mappings: mappings.iter(),
        current: None,
        failed: false,
    }
}

/// The iterator of [`forwards`]: `Ok` forwards, then at most one `Err`, then the end.
#[derive(Debug, Clone)]
pub struct Forwards<'a> {
    mappings: std::slice::Iter<'a, PortMapping>,
    current: Option<Expanding<'a>>,
    failed: bool,
}

/// A mapping being expanded.
#[derive(Debug, Clone)]
struct Expanding<'a> {
    mapping: &'a PortMapping,
    names: std::str::Split<'a, char>,
    /// Set once the mapping passed its checks (at its first protocol name).
    checked: Option<Checked>,
    /// The protocol being expanded and the offset of its next port.
    proto: Option<Proto>,
    next: u16,
}

#[derive(Debug, Clone, Copy)]
struct Checked {
    host_ip: Option<IpAddr>,
    count: u16,
}

/// Steps 2 to 4 of [`forwards`].
fn check(m: &PortMapping) -> Result<Checked, PortError> {
    let host_ip = match m.host_ip.as_str() {
        "" => None,
        ip => Some(
            ip.parse()
                .map_err(|_| PortError::InvalidHostIp(ip.to_owned()))?,
        ),
    };
    if m.host_port == 0 {
        return Err(PortError::PortZero(PortSide::Host));
    }
    if m.container_port == 0 {
        return Err(PortError::PortZero(PortSide::Container));
    }
    for (side, range) in [
        (PortSide::Host, m.host_ports()),
        (PortSide::Container, m.container_ports()),
    ] {
        if range.last() > 65535 {
            return Err(PortError::RangePastEnd {
                side,
                first: range.first,
                count: range.count,
            });
        }
    }
    Ok(Checked {
        host_ip,
        count: m.count(),
    })
}

impl<'a> Forwards<'a> {
    fn step(&mut self) -> Option<Result<PortForward<'a>, PortError>> {
        loop {
            if self.current.is_none() {
                let mapping = self.mappings.next()?;
                self.current = Some(Expanding {
                    mapping,
                    names: mapping.protocol_list().split(','),
                    checked: None,
                    proto: None,
                    next: 0,
                });
            }
            let cur = self.current.as_mut()?;
            if let (Some(proto), Some(checked)) = (cur.proto, cur.checked) {
                if cur.next < checked.count {
                    let i = cur.next;
                    cur.next += 1;
                    // In range: check() saw both last ports within 65535.
                    return Some(Ok(PortForward {
                        mapping: cur.mapping,
                        proto,
                        host_ip: checked.host_ip,
                        host_port: cur.mapping.host_port + i,
                        container_port: cur.mapping.container_port + i,
                    }));
                }
            }
            let Some(name) = cur.names.next() else {
                self.current = None;
                continue;
            };
            let proto = match name.parse() {
                Ok(p) => p,
                Err(e) => return Some(Err(e)),
            };
            if cur.checked.is_none() {
                match check(cur.mapping) {
                    Ok(c) => cur.checked = Some(c),
                    Err(e) => return Some(Err(e)),
                }
            }
            cur.proto = Some(proto);
            cur.next = 0;
        }
    }
}

impl<'a> Iterator for Forwards<'a> {
    type Item = Result<PortForward<'a>, PortError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.step();
        self.failed = matches!(item, Some(Err(_)));
        item
    }
}

impl FusedIterator for Forwards<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_json_roundtrip() {
        let json = r#"{"host_ip":"127.0.0.1","container_port":80,"host_port":18082,"range":1,"protocol":"tcp"}"#;
        let m: PortMapping = serde_json::from_str(json).unwrap();
        assert_eq!(
            m,
            PortMapping {
                host_ip: "127.0.0.1".into(),
                container_port: 80,
                host_port: 18082,
                range: 1,
                protocol: "tcp".into()
            }
        );
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
    }

    #[test]
    fn zero_values() {
        let m: PortMapping = serde_json::from_str(r#"{"host_port":8080}"#).unwrap();
        assert_eq!(m.count(), 1);
        assert_eq!(m.protocols().collect::<Vec<_>>(), ["tcp"]);
        assert_eq!(m.host_ip, "");
        assert!(serde_json::from_str::<PortMapping>(r#"{"host_port":70000}"#).is_err());
        assert!(serde_json::from_str::<PortMapping>(r#"{"host_port":-1}"#).is_err());
    }

    #[test]
    fn decoded_protocol_lists() {
        let m = |json: &str| serde_json::from_str::<PortMapping>(json);
        let known = m(r#"{"protocol":"tcp,udp"}"#).unwrap();
        assert!(matches!(known.protocol, Cow::Borrowed("tcp,udp")));
        // An escaped known list is the same list; anything else is kept as written.
        let escaped = m(r#"{"protocol":"\u0074cp"}"#).unwrap();
        assert!(matches!(escaped.protocol, Cow::Borrowed("tcp")));
        assert_eq!(m(r#"{"protocol":"TCP"}"#).unwrap().protocol, "TCP");
        assert_eq!(m(r#"{"protocol":"tcp,"}"#).unwrap().protocol_list(), "tcp,");
        assert_eq!(
            m(r#"{"protocol":5}"#).unwrap_err().to_string(),
            "invalid type: integer `5`, expected a string at line 1 column 13"
        );
        assert!(m(r#"{"protocol":null}"#).is_err());
        let mut set = PortMapping::new("", 1, 1, 1, "udp6");
        assert!(matches!(set.protocol, Cow::Borrowed("udp6")));
        set.set_protocol("udp,tcp");
        assert!(matches!(set.protocol, Cow::Borrowed("udp,tcp")));
        set.set_protocol("tcp,tcp");
        assert!(matches!(&set.protocol, Cow::Owned(p) if p == "tcp,tcp"));
        // Bytes that are UTF-8 are taken, as for a `String` field; others are not.
        use serde::de::value::{BytesDeserializer, Error as ValueError};
        let bytes = |b: &[u8]| protocol_list(BytesDeserializer::<ValueError>::new(b));
        assert!(matches!(bytes(b"tcp").unwrap(), Cow::Borrowed("tcp")));
        assert_eq!(bytes(b"tcp9").unwrap(), "tcp9");
        assert_eq!(
            bytes(b"\xff").unwrap_err().to_string(),
            "invalid value: byte array, expected a string"
        );
    }

    #[test]
    fn struct_update_syntax_still_works() {
        let base = PortMapping::new("", 8080, 80, 1, "tcp");
        let m = PortMapping {
            protocol: "udp".into(),
            ..base.clone()
        };
        assert_eq!((m.host_port, &*m.protocol), (8080, "udp"));
    }

    #[test]
    fn protocol_names() {
        for (name, protocol, family) in [
            ("tcp", Protocol::Tcp, Family::Any),
            ("tcp4", Protocol::Tcp, Family::V4),
            ("tcp6", Protocol::Tcp, Family::V6),
            ("udp", Protocol::Udp, Family::Any),
            ("udp4", Protocol::Udp, Family::V4),
            ("udp6", Protocol::Udp, Family::V6),
            ("sctp", Protocol::Sctp, Family::Any),
            ("sctp4", Protocol::Sctp, Family::V4),
            ("sctp6", Protocol::Sctp, Family::V6),
        ] {
            let p: Proto = name.parse().unwrap();
            assert_eq!(p, Proto { protocol, family }, "{name}");
            assert_eq!(p.to_string(), name);
            assert_eq!(p.as_str(), name);
        }
        for name in ["tcp", "udp", "sctp"] {
            assert_eq!(name.parse::<Protocol>().unwrap().to_string(), name);
        }
        for bad in [
            "", "TCP", "icmp", "tcp46", "4", "6", "tcp 4", " tcp", "udp,tcp",
        ] {
            assert_eq!(
                bad.parse::<Proto>(),
                Err(PortError::UnknownProtocol(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            "tcp4".parse::<Protocol>(),
            Err(PortError::UnknownProtocol("tcp4".into()))
        );
        assert_eq!(
            PortError::UnknownProtocol("ic\"mp".into()).to_string(),
            r#"unknown protocol "ic\"mp""#
        );
    }

    fn flat(ms: &[PortMapping]) -> Vec<(String, Option<IpAddr>, u16, u16)> {
        forwards(ms)
            .map(|f| {
                let f = f.unwrap();
                (
                    f.proto.to_string(),
                    f.host_ip,
                    f.host_port,
                    f.container_port,
                )
            })
            .collect()
    }

    #[test]
    fn expands_protocols_then_ports_in_podmans_order() {
        let ms = [
            PortMapping::new("", 8080, 80, 3, "tcp,udp6"),
            PortMapping::new("::1", 9000, 90, 0, ""),
            PortMapping::new("10.0.0.1", 7000, 70, 1, "sctp,tcp,tcp"),
        ];
        let v6: IpAddr = "::1".parse().unwrap();
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let t = |p: &str, ip, h, c| (p.to_owned(), ip, h, c);
        assert_eq!(
            flat(&ms),
            [
                t("tcp", None, 8080, 80),
                t("tcp", None, 8081, 81),
                t("tcp", None, 8082, 82),
                t("udp6", None, 8080, 80),
                t("udp6", None, 8081, 81),
                t("udp6", None, 8082, 82),
                t("tcp", Some(v6), 9000, 90),
                t("sctp", Some(v4), 7000, 70),
                t("tcp", Some(v4), 7000, 70),
                t("tcp", Some(v4), 7000, 70),
            ]
        );
        let all: Vec<_> = forwards(&ms).map(Result::unwrap).collect();
        assert!(std::ptr::eq(all[6].mapping, &ms[1]));
        assert_eq!(ms[0].forwards().count(), 6);
        assert_eq!(forwards(&[]).count(), 0);
        // The last port of a range may be 65535, on both sides.
        assert_eq!(
            flat(&[PortMapping::new("", 65534, 65535, 1, "udp")]).len(),
            1
        );
        assert_eq!(
            flat(&[PortMapping::new("", 65534, 65534, 2, "udp")])[1],
            t("udp", None, 65535, 65535)
        );
        assert_eq!(
            flat(&[PortMapping::new("", 1, 1, 65535, "tcp")]).len(),
            65535
        );
        // IPv4-mapped addresses are left as written.
        assert_eq!(
            flat(&[PortMapping::new("::ffff:127.0.0.1", 1, 1, 1, "tcp")])[0].1,
            Some("::ffff:127.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn each_error() {
        let first_err = |m: PortMapping| m.forwards().find_map(Result::err).unwrap();
        let cases = [
            (
                PortMapping::new("", 80, 80, 1, "icmp"),
                PortError::UnknownProtocol("icmp".into()),
                r#"unknown protocol "icmp""#,
            ),
            (
                PortMapping::new("", 80, 80, 1, "tcp,"),
                PortError::UnknownProtocol("".into()),
                r#"unknown protocol """#,
            ),
            (
                PortMapping::new("localhost", 80, 80, 1, "tcp"),
                PortError::InvalidHostIp("localhost".into()),
                r#"invalid host IP "localhost""#,
            ),
            (
                PortMapping::new("1.2.3", 80, 80, 1, "tcp"),
                PortError::InvalidHostIp("1.2.3".into()),
                r#"invalid host IP "1.2.3""#,
            ),
            (
                PortMapping::new("", 0, 80, 1, "tcp"),
                PortError::PortZero(PortSide::Host),
                "host port 0 cannot be forwarded",
            ),
            (
                PortMapping::new("", 80, 0, 1, "tcp"),
                PortError::PortZero(PortSide::Container),
                "container port 0 cannot be forwarded",
            ),
            (
                PortMapping::new("", 65535, 80, 2, "tcp"),
                PortError::RangePastEnd {
                    side: PortSide::Host,
                    first: 65535,
                    count: 2,
                },
                "host port 65535 with range 2 goes past 65535",
            ),
            (
                PortMapping::new("", 80, 65000, 600, "tcp"),
                PortError::RangePastEnd {
                    side: PortSide::Container,
                    first: 65000,
                    count: 600,
                },
                "container port 65000 with range 600 goes past 65535",
            ),
            (
                PortMapping::new("", 2, 1, u16::MAX, "udp"),
                PortError::RangePastEnd {
                    side: PortSide::Host,
                    first: 2,
                    count: u16::MAX,
                },
                "host port 2 with range 65535 goes past 65535",
            ),
        ];
        for (m, want, text) in cases {
            let got = first_err(m.clone());
            assert_eq!(got, want, "{m:?}");
            assert_eq!(got.to_string(), text);
        }
    }

    #[test]
    fn checks_come_in_rootlesskits_order() {
        let first = |m: PortMapping| m.forwards().find_map(Result::err).unwrap();
        // The protocol name before the address, the address before the ports, the
        // ports before the ranges, host before container.
        assert_eq!(
            first(PortMapping::new("x", 0, 0, 0, "icmp")),
            PortError::UnknownProtocol("icmp".into())
        );
        assert_eq!(
            first(PortMapping::new("x", 0, 0, 0, "tcp")),
            PortError::InvalidHostIp("x".into())
        );
        assert_eq!(
            first(PortMapping::new("", 65535, 0, 2, "tcp")),
            PortError::PortZero(PortSide::Container)
        );
        assert_eq!(
            first(PortMapping::new("", 65535, 65535, 2, "tcp")),
            PortError::RangePastEnd {
                side: PortSide::Host,
                first: 65535,
                count: 2
            }
        );
        // A bad name later in the list comes after the forwards of the good ones, and
        // ends the iteration.
        let ms = [
            PortMapping::new("", 80, 80, 2, "tcp,icmp"),
            PortMapping::new("", 90, 90, 1, "tcp"),
        ];
        let got: Vec<_> = forwards(&ms).collect();
        assert_eq!(got.len(), 3);
        assert!(got[..2].iter().all(Result::is_ok));
        assert_eq!(got[2], Err(PortError::UnknownProtocol("icmp".into())));
        let mut it = forwards(&ms);
        assert_eq!(it.by_ref().count(), 3);
        assert_eq!(it.next(), None, "fused after the error");
        // A mapping that fails stops what follows it.
        let ms = [
            PortMapping::new("", 0, 80, 1, "tcp"),
            PortMapping::new("", 90, 90, 1, "tcp"),
        ];
        assert_eq!(forwards(&ms).count(), 1);
    }

    proptest::proptest! {
        #[test]
        fn expansion_stays_in_range(
            host in 0u16.., ctr in 0u16.., range in 0u16..300,
            ip in "|127.0.0.1|::1|x", p in "(tcp|udp6|sctp|icmp|)(,(tcp4|udp|))?",
        ) {
            let m = PortMapping::new(&ip, host, ctr, range, &p);
            let all: Vec<_> = m.forwards().collect();
            let errors = all.iter().filter(|f| f.is_err()).count();
            proptest::prop_assert!(errors <= 1);
            if errors == 0 {
                proptest::prop_assert_eq!(all.len(), m.protocols().count() * usize::from(m.count()));
            }
            for f in all.iter().flatten() {
                proptest::prop_assert!(f.host_port >= host && f.container_port >= ctr);
                proptest::prop_assert!(f.host_port > 0 && f.container_port > 0);
                proptest::prop_assert_eq!(f.host_port - host, f.container_port - ctr);
            }
        }
    }
}
