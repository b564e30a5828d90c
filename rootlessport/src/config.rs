//! The helper's input, exactly as podman writes it, and its validation into the list of
//! ports to forward. Pure: no sockets, no fds.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};
use slirp_config::{PortError, PortMapping, PortSide, Proto, Protocol};

use crate::Error;

/// The config podman writes on the helper's stdin: podman's `rootlessport.Config`
/// (`pkg/rootlessport/rootlessport_linux.go` in podman 4.x), JSON with its field names
/// and in its order, so that [`serde_json`] writes what podman writes, byte for byte.
///
/// Fields may be missing or `null`: they take their zero value, as with Go's decoder
/// (and [`Config::default`]). New fields may come, so outside this crate a config is
/// made with [`Config::new`] (or [`Config::default`]) and then changed field by field
/// or with the `with_*` methods:
///
/// ```
/// use rootlessport::Config;
/// use slirp_config::PortMapping;
///
/// let config = Config::new("ctr1", "/run/netns/ctr1", "10.0.2.100", "/run/myengine")
///     .with_mappings(vec![PortMapping::new("", 8080, 80, 1, "tcp")]);
/// assert_eq!(config.check_ports()?, 1);
/// # Ok::<(), rootlessport::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Config {
    /// The published ports (podman's wire form, `slirp_config`'s model): each host IP
    /// (`""` for every address), host port, container port, range (0 means 1) and
    /// protocol list (`tcp,udp`; empty means `tcp`). JSON `Mappings`. Default none.
    #[serde(rename = "Mappings", deserialize_with = "nullable")]
    pub mappings: Vec<PortMapping>,
    /// The container's network namespace, a path such as `/run/netns/NAME` or
    /// `/proc/PID/ns/net`; required. JSON `NetNSPath`.
    #[serde(rename = "NetNSPath", deserialize_with = "nullable")]
    pub netns_path: String,
    /// The helper's fd number of the exit pipe's read end (the helper exits when it
    /// reads EOF); must be above 0. [`Launcher::start`](crate::launcher::Launcher::start)
    /// sets 3, as podman does. JSON `ExitFD`.
    #[serde(rename = "ExitFD", deserialize_with = "nullable")]
    pub exit_fd: i32,
    /// The helper's fd number of the ready pipe's write end (it writes `1` there once
    /// every port is served); must be above 0. The launcher sets 4. JSON `ReadyFD`.
    #[serde(rename = "ReadyFD", deserialize_with = "nullable")]
    pub ready_fd: i32,
    /// The engine's runtime directory: the reload socket is `TmpDir/rp/<ContainerID>`,
    /// and the launcher keeps the helper's start-up log there. JSON `TmpDir`.
    #[serde(rename = "TmpDir", deserialize_with = "nullable")]
    pub tmp_dir: String,
    /// The container's address that connections go to, IPv4 or IPv6 text (see
    /// [`child_ip`](crate::child_ip::child_ip)); empty: the netns's loopback. JSON
    /// `ChildIP`.
    #[serde(rename = "ChildIP", deserialize_with = "nullable")]
    pub child_ip: String,
    /// podman's container ID: names the reload socket (no `/`, not `.` or `..`) and the
    /// routing state this helper owns in the netns. JSON `ContainerID`.
    #[serde(rename = "ContainerID", deserialize_with = "nullable")]
    pub container_id: String,
    /// `true`: the helper listens for reloads (podman sets it for rootless bridge
    /// networks, whose child IP can change). Default `false`. JSON `RootlessCNI`.
    #[serde(rename = "RootlessCNI", deserialize_with = "nullable")]
    pub rootless_cni: bool,
    /// Ours, not podman's (its helper ignores it): `false` turns off keeping the
    /// client's source address, so the container sees the helper's address as
    /// podman's helper makes it. Absent, `null` or `true` (the default): kept where
    /// possible. JSON `PreserveSourceIP`, written only when `false`.
    #[serde(
        rename = "PreserveSourceIP",
        deserialize_with = "nullable_true",
        skip_serializing_if = "is_true"
    )]
    pub preserve_source_ip: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mappings: Vec::new(),
            netns_path: String::new(),
            exit_fd: 0,
            ready_fd: 0,
            tmp_dir: String::new(),
            child_ip: String::new(),
            container_id: String::new(),
            rootless_cni: false,
            preserve_source_ip: true,
        }
    }
}

fn is_true(b: &bool) -> bool {
    *b
}

fn nullable_true<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Option::<bool>::deserialize(d).map(|b| b.unwrap_or(true))
}

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

impl Config {
    /// A config for the container `container_id` whose netns is at `netns_path`,
    /// forwarding to `child_ip` (empty: the netns's loopback), with `tmp_dir` for the
    /// reload socket and logs; no ports yet, everything else as [`Config::default`].
    pub fn new(
        container_id: impl Into<String>,
        netns_path: impl Into<String>,
        child_ip: impl Into<String>,
        tmp_dir: impl Into<String>,
    ) -> Config {
        Config {
            container_id: container_id.into(),
            netns_path: netns_path.into(),
            child_ip: child_ip.into(),
            tmp_dir: tmp_dir.into(),
            ..Config::default()
        }
    }

    /// The same config publishing `mappings` (see [`Config::mappings`]).
    #[must_use]
    pub fn with_mappings(mut self, mappings: Vec<PortMapping>) -> Config {
        self.mappings = mappings;
        self
    }

    /// The same config with `RootlessCNI` set to `on` (see [`Config::rootless_cni`]).
    #[must_use]
    pub fn with_rootless_cni(mut self, on: bool) -> Config {
        self.rootless_cni = on;
        self
    }

    /// The same config keeping client addresses or not (see
    /// [`Config::preserve_source_ip`]).
    #[must_use]
    pub fn with_preserve_source_ip(mut self, on: bool) -> Config {
        self.preserve_source_ip = on;
        self
    }

    /// Parse the helper's stdin bytes.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyConfig`] for empty or blank input (Go's words, `unexpected end of
    /// JSON input`), [`Error::NotAnObject`] for JSON that is not an object,
    /// [`Error::Json`] for anything serde refuses (`invalid config JSON: ...`).
    pub fn from_json(bytes: &[u8]) -> Result<Config, Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::EmptyConfig);
        }
        // The common case in one pass: an object decoded straight into the config,
        // with no tree of values in between (a tenth of the start-up at 10,000 ports).
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'{') {
            if let Ok(config) = serde_json::from_slice(bytes) {
                return Ok(config);
            }
        }
        // Anything else is refused the way it always was, through a tree: only an
        // object is a config (serde would also take a bare array as a struct), and
        // the errors keep their words (a direct decode adds positions to them).
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(Error::Json)?;
        if !value.is_object() {
            return Err(Error::NotAnObject);
        }
        serde_json::from_value(value).map_err(Error::Json)
    }

    /// The helper's checks of its ports and child IP, made before anything listens and
    /// in the helper's order: every mapping expanded and checked with RootlessKit's
    /// rules (see [`Error`]), each listener's address against its protocol's family,
    /// then `ChildIP`. An engine can call it before starting anything. Returns the
    /// number of ports (listeners) the helper will make: each protocol of each mapping,
    /// times its range.
    ///
    /// # Errors
    ///
    /// The first failure, with the helper's text: `unknown proto: "X"`,
    /// `invalid ParentIP: "X"`, `conflict with ID N`, `invalid ChildIP: "X"`, ...
    pub fn check_ports(&self) -> Result<usize, Error> {
        let specs = plan_ports(&self.mappings)?;
        for spec in &specs {
            spec.listen_plan()?;
        }
        parse_child_ip(&self.child_ip)?;
        Ok(specs.len())
    }

    /// The checks podman's helper makes on the config itself, in its order:
    /// `NetNSPath` given, `ExitFD` and `ReadyFD` above 0.
    ///
    /// # Errors
    ///
    /// [`Error::MissingNetNsPath`], [`Error::MissingExitFd`] or
    /// [`Error::MissingReadyFd`] (`missing NetNSPath`, ...), the first that applies.
    pub fn check_required(&self) -> Result<(), Error> {
        if self.netns_path.is_empty() {
            return Err(Error::MissingNetNsPath);
        }
        if self.exit_fd <= 0 {
            return Err(Error::MissingExitFd);
        }
        if self.ready_fd <= 0 {
            return Err(Error::MissingReadyFd);
        }
        Ok(())
    }
}

/// Transport of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Transport {
    Tcp,
    Udp,
}

/// Which address families a listener serves, from the proto suffix (`tcp`: a wildcard
/// listens on IPv4 and IPv6 at once; `tcp4`, `udp6`: that family only).
pub(crate) use slirp_config::Family;

/// One validated port to forward (RootlessKit's `port.Spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortSpec {
    /// 1-based, in the order podman adds them; named in conflict errors.
    pub(crate) id: u32,
    /// The proto as given (`tcp`, `udp6`, ...: [`PortSpec::proto`] writes it back).
    pub(crate) protocol: slirp_config::Proto,
    pub(crate) transport: Transport,
    pub(crate) family: Family,
    /// The host IP as given, `""` made `0.0.0.0` (not allocated: podman's usual case).
    pub(crate) parent_ip: Cow<'static, str>,
    pub(crate) parent_addr: IpAddr,
    pub(crate) parent_port: u16,
    pub(crate) child_port: u16,
}

/// How a listener is made for a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenPlan {
    pub(crate) addr: SocketAddr,
    /// `Some(false)`: an IPv6 socket that also takes IPv4 (dual-stack).
    pub(crate) only_v6: Option<bool>,
}

impl PortSpec {
    /// The proto as given (`tcp`, `udp6`, ...), as error texts name it.
    pub(crate) fn proto(&self) -> &'static str {
        self.protocol.as_str()
    }

    /// A failure to listen on this port in Go's `listen tcp ADDR: REASON` shape: `reason`
    /// is the call that failed (with its OS error as `source`) or what is wrong with
    /// the address; ADDR is the host IP as given (`""` shown as `0.0.0.0`).
    pub(crate) fn listen_error(&self, reason: &'static str, source: Option<io::Error>) -> Error {
        Error::Listen {
            proto: self.proto().to_owned(),
            addr: display_addr(&self.parent_ip, self.parent_port),
            reason,
            source,
        }
    }

    /// Where and how to listen: wildcards of plain `tcp`/`udp` are dual-stack, like
    /// podman's helper; `*4`/`*6` stay in their family; specific addresses bind only
    /// that address.
    pub(crate) fn listen_plan(&self) -> Result<ListenPlan, Error> {
        let port = self.parent_port;
        let wrong = |why| self.listen_error(why, None);
        let plan = match (self.family, self.parent_addr) {
            (Family::Any, a) if a.is_unspecified() => ListenPlan {
                addr: SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
                only_v6: Some(false),
            },
            (Family::V4, a) if a.is_unspecified() => ListenPlan {
                addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                only_v6: None,
            },
            (Family::V6, a) if a.is_unspecified() => ListenPlan {
                addr: SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
                only_v6: Some(true),
            },
            (Family::V4, IpAddr::V6(_)) => return Err(wrong("not an IPv4 address")),
            (Family::V6, IpAddr::V4(_)) => return Err(wrong("not an IPv6 address")),
            (_, IpAddr::V4(a)) => ListenPlan {
                addr: SocketAddr::new(a.into(), port),
                only_v6: None,
            },
            (_, IpAddr::V6(a)) => ListenPlan {
                addr: SocketAddr::new(a.into(), port),
                only_v6: Some(true),
            },
        };
        Ok(plan)
    }
}

/// `host:port` the way Go prints it (`[::1]:80` for IPv6).
pub(crate) fn display_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Parse an IP the way Go's `net.ParseIP` does; IPv4-mapped IPv6 counts as IPv4.
pub(crate) fn parse_ip(s: &str) -> Option<IpAddr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V6(a) => Some(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)),
        v4 => Some(v4),
    }
}

/// Parse a reloaded or configured child IP: empty means "the loopback of the netns".
pub(crate) fn parse_child_ip(s: &str) -> Result<Option<IpAddr>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    parse_ip(s)
        .map(Some)
        .ok_or_else(|| Error::InvalidChildIp(s.to_owned()))
}

/// The host IP text of a mapping without one, as RootlessKit writes and compares it.
const NO_HOST_IP: &str = "0.0.0.0";

/// Expand and validate the mappings into port specs, in podman's order (each mapping,
/// each protocol of its comma list, each port of its range: [`slirp_config::forwards`]),
/// with RootlessKit's checks and texts. Everything is checked before anything listens.
///
/// # Errors
///
/// The first failure in that order, as RootlessKit's `ValidatePortSpec` words it (the
/// helper's stdout line): `unknown proto: "X"`, `invalid ParentIP: "X"`,
/// `invalid ParentPort: 0`, `invalid ChildPort: 0`, our `invalid port range: ...` for a
/// range past 65535 (podman's helper wraps around), `conflict with ID N` for a proto,
/// host IP and host port given twice, and our `unsupported proto: "sctp..."` where
/// RootlessKit accepts what it then cannot forward.
pub(crate) fn plan_ports(mappings: &[PortMapping]) -> Result<Vec<PortSpec>, Error> {
    // Most mappings are one port over one protocol: one spec each.
    let mut specs: Vec<PortSpec> = Vec::with_capacity(mappings.len());
    let mut taken = TakenPorts::default();
    for f in slirp_config::forwards(mappings) {
        let f = f.map_err(rootlesskit_error)?;
        let transport = match f.proto.protocol {
            Protocol::Tcp => Transport::Tcp,
            Protocol::Udp => Transport::Udp,
            Protocol::Sctp => return Err(Error::UnsupportedProto(f.proto.to_string())),
        };
        // RootlessKit compares host IPs as text, "" made 0.0.0.0.
        let given = f.mapping.host_ip.as_str();
        let host_ip = if given.is_empty() { NO_HOST_IP } else { given };
        if !taken.take(f.proto, host_ip, f.host_port) {
            // Rare: the first spec with the same key is looked for only now (it is
            // always there: a port is taken only by a spec that was then pushed).
            let first = specs.iter().find(|s| {
                (s.protocol, &*s.parent_ip, s.parent_port) == (f.proto, host_ip, f.host_port)
            });
            return Err(Error::Conflict(first.map_or(0, |s| s.id)));
        }
        // No host IP: the wildcard of the family listened on (`::` for tcp6/udp6).
        let wildcard = match f.proto.family {
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
            _ => Ipv4Addr::UNSPECIFIED.into(),
        };
        let parent_addr = f.host_ip.map_or(wildcard, |a| a.to_canonical());
        let parent_ip = if given.is_empty() {
            Cow::Borrowed(NO_HOST_IP)
        } else {
            Cow::Owned(given.to_owned())
        };
        specs.push(PortSpec {
            id: specs.len() as u32 + 1,
            protocol: f.proto,
            transport,
            family: f.proto.family,
            parent_ip,
            parent_addr,
            parent_port: f.host_port,
            child_port: f.container_port,
        });
    }
    Ok(specs)
}

/// The host ports planned so far under each key RootlessKit compares for conflicts
/// (the proto and the host IP as text), as bitmaps of 64 ports made only where a port
/// is taken: 10,000 ports of one key take 157 words, not a table entry each.
#[derive(Default)]
struct TakenPorts<'a> {
    /// Each key's number, and the last key looked up (mappings come in runs of one).
    keys: HashMap<(Proto, &'a str), u32>,
    last: Option<(Proto, &'a str, u32)>,
    /// (key number, port / 64) -> bit `port % 64` set where taken.
    words: HashMap<(u32, u16), u64>,
}

impl<'a> TakenPorts<'a> {
    /// Take `port` under `(proto, host_ip)`; `false` if it was taken already.
    fn take(&mut self, proto: Proto, host_ip: &'a str, port: u16) -> bool {
        let key = match self.last {
            Some((p, ip, key)) if p == proto && ip == host_ip => key,
            _ => {
                let next = self.keys.len() as u32;
                let key = *self.keys.entry((proto, host_ip)).or_insert(next);
                self.last = Some((proto, host_ip, key));
                key
            }
        };
        let word = self.words.entry((key, port / 64)).or_default();
        let bit = 1u64 << (port % 64);
        let free = *word & bit == 0;
        *word |= bit;
        free
    }
}

/// A shared check's failure in RootlessKit's words.
fn rootlesskit_error(e: PortError) -> Error {
    match e {
        PortError::UnknownProtocol(p) => Error::UnknownProto(p),
        PortError::InvalidHostIp(ip) => Error::InvalidParentIp(ip),
        PortError::PortZero(PortSide::Host) => Error::InvalidParentPort(0),
        PortError::PortZero(PortSide::Container) => Error::InvalidChildPort(0),
        PortError::RangePastEnd { side, first, count } => Error::RangePastEnd {
            which: side.as_str(),
            port: first,
            range: count,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../fixtures/podman-4.3.1-rootlessport-config.json");

    #[test]
    fn podman_fixture_roundtrips_byte_for_byte() {
        let cfg = Config::from_json(FIXTURE.as_bytes()).unwrap();
        assert_eq!(
            cfg.netns_path,
            "/run/netns/netns-06849103-42c1-5111-4780-f54aa7858fb6"
        );
        assert_eq!((cfg.exit_fd, cfg.ready_fd), (3, 4));
        assert_eq!(cfg.tmp_dir, "/run/libpod");
        assert_eq!(cfg.child_ip, "10.0.2.100");
        assert!(!cfg.rootless_cni);
        assert_eq!(cfg.mappings.len(), 2);
        assert_eq!(serde_json::to_string(&cfg).unwrap(), FIXTURE.trim_end());
        let specs = plan_ports(&cfg.mappings).unwrap();
        let got: Vec<_> = specs
            .iter()
            .map(|s| (s.id, s.proto(), &*s.parent_ip, s.parent_port, s.child_port))
            .collect();
        assert_eq!(
            got,
            [
                (1, "tcp", "127.0.0.1", 18082, 80),
                (2, "udp", "0.0.0.0", 18090, 90),
                (3, "udp", "0.0.0.0", 18091, 91)
            ]
        );
    }

    #[test]
    fn preserve_source_ip_field() {
        let cfg = Config::from_json(FIXTURE.as_bytes()).unwrap();
        assert!(cfg.preserve_source_ip, "on unless asked off");
        let off = Config::from_json(br#"{"PreserveSourceIP":false}"#).unwrap();
        assert!(!off.preserve_source_ip);
        assert!(
            Config::from_json(br#"{"PreserveSourceIP":null}"#)
                .unwrap()
                .preserve_source_ip
        );
        assert!(serde_json::to_string(&off)
            .unwrap()
            .ends_with(r#","PreserveSourceIP":false}"#));
    }

    #[test]
    fn zero_values_and_nulls() {
        let cfg =
            Config::from_json(br#"{"Mappings":null,"NetNSPath":null,"ExitFD":null}"#).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(
            cfg.check_required().unwrap_err().to_string(),
            "missing NetNSPath"
        );
        let cfg = Config::from_json(br#"{"NetNSPath":"/x","Unknown":1}"#).unwrap();
        assert_eq!(
            cfg.check_required().unwrap_err().to_string(),
            "missing ExitFD"
        );
        let cfg = Config::from_json(br#"{"NetNSPath":"/x","ExitFD":-3}"#).unwrap();
        assert_eq!(
            cfg.check_required().unwrap_err().to_string(),
            "missing ExitFD"
        );
        let cfg = Config::from_json(br#"{"NetNSPath":"/x","ExitFD":3}"#).unwrap();
        assert_eq!(
            cfg.check_required().unwrap_err().to_string(),
            "missing ReadyFD"
        );
        let cfg = Config::from_json(br#"{"NetNSPath":"/x","ExitFD":3,"ReadyFD":4}"#).unwrap();
        cfg.check_required().unwrap();
    }

    #[test]
    fn json_errors() {
        assert_eq!(
            Config::from_json(b"").unwrap_err().to_string(),
            "unexpected end of JSON input"
        );
        assert_eq!(
            Config::from_json(b" \n").unwrap_err().to_string(),
            "unexpected end of JSON input"
        );
        for bad in [
            &b"{"[..],
            b"[]",
            b"\"x\"",
            b"{\"ExitFD\":\"3\"}",
            b"nul",
            b"{\"Mappings\":[{\"host_port\":70000}]}",
        ] {
            let e = Config::from_json(bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid config JSON: "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        // serde's error is kept as the cause, and is what the line ends with.
        let e = Config::from_json(b"{").unwrap_err();
        let cause = std::error::Error::source(&e).expect("a source");
        assert!(cause.is::<serde_json::Error>());
        assert_eq!(e.to_string(), format!("invalid config JSON: {cause}"));
        assert!(matches!(Config::from_json(b"[]"), Err(Error::NotAnObject)));
        assert!(matches!(Config::from_json(b""), Err(Error::EmptyConfig)));
    }

    #[test]
    fn constructor_and_setters() {
        let cfg = Config::new("ctr1", "/run/netns/ctr1", "10.0.2.100", "/run/engine")
            .with_mappings(vec![PortMapping::new("", 8080, 80, 2, "tcp,udp")])
            .with_rootless_cni(true)
            .with_preserve_source_ip(false);
        assert_eq!(
            serde_json::to_string(&cfg).unwrap(),
            r#"{"Mappings":[{"host_ip":"","container_port":80,"host_port":8080,"range":2,"protocol":"tcp,udp"}],"NetNSPath":"/run/netns/ctr1","ExitFD":0,"ReadyFD":0,"TmpDir":"/run/engine","ChildIP":"10.0.2.100","ContainerID":"ctr1","RootlessCNI":true,"PreserveSourceIP":false}"#
        );
        let plain = Config::new("c", "/n", "", "/t");
        assert_eq!(
            plain,
            Config {
                container_id: "c".into(),
                netns_path: "/n".into(),
                tmp_dir: "/t".into(),
                ..Config::default()
            }
        );
        assert!(plain.preserve_source_ip && !plain.rootless_cni);
    }

    #[test]
    fn check_ports_counts_and_refuses_as_the_helper() {
        let cfg = Config::new("c", "/n", "10.0.2.100", "/t")
            .with_mappings(vec![PortMapping::new("", 8080, 80, 2, "tcp,udp")]);
        assert_eq!(cfg.check_ports().unwrap(), 4);
        assert_eq!(Config::default().check_ports().unwrap(), 0);
        let bad_ip = Config::new("c", "/n", "10.0.2.x", "/t");
        assert_eq!(
            bad_ip.check_ports().unwrap_err().to_string(),
            r#"invalid ChildIP: "10.0.2.x""#
        );
        // The ports are checked before the child IP, as the helper does.
        let both = bad_ip.with_mappings(vec![PortMapping::new("", 0, 80, 1, "tcp")]);
        assert_eq!(
            both.check_ports().unwrap_err().to_string(),
            "invalid ParentPort: 0"
        );
        let family =
            Config::default().with_mappings(vec![PortMapping::new("::1", 80, 80, 1, "tcp4")]);
        assert_eq!(
            family.check_ports().unwrap_err().to_string(),
            "listen tcp4 [::1]:80: not an IPv4 address"
        );
    }

    #[test]
    fn protocols_and_ranges_expand_in_podmans_order() {
        let specs = plan_ports(&[
            PortMapping::new("", 8080, 80, 2, "tcp,udp"),
            PortMapping::new("::1", 9000, 90, 0, ""),
        ])
        .unwrap();
        let got: Vec<_> = specs
            .iter()
            .map(|s| (s.proto(), s.parent_port, s.child_port))
            .collect();
        assert_eq!(
            got,
            [
                ("tcp", 8080, 80),
                ("tcp", 8081, 81),
                ("udp", 8080, 80),
                ("udp", 8081, 81),
                ("tcp", 9000, 90)
            ]
        );
        assert_eq!(specs[4].parent_addr, "::1".parse::<IpAddr>().unwrap());
        // No host IP: the wildcard of the family listened on.
        let wild = plan_ports(&[
            PortMapping::new("", 7000, 70, 1, "tcp,udp6,tcp4"),
            PortMapping::new("0.0.0.0", 7001, 70, 1, "tcp6"),
        ])
        .unwrap();
        let addrs: Vec<String> = wild.iter().map(|s| s.parent_addr.to_string()).collect();
        assert_eq!(addrs, ["0.0.0.0", "::", "0.0.0.0", "0.0.0.0"]);
        assert_eq!(wild[1].listen_plan().unwrap().addr.to_string(), "[::]:7000");
        // The last port of a range may be 65535.
        assert_eq!(
            plan_ports(&[PortMapping::new("", 65534, 65534, 2, "udp")])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn validation_texts() {
        let e = |ms: &[PortMapping]| plan_ports(ms).unwrap_err().to_string();
        assert_eq!(
            e(&[PortMapping::new("", 80, 80, 1, "icmp")]),
            r#"unknown proto: "icmp""#
        );
        assert_eq!(
            e(&[PortMapping::new("", 80, 80, 1, "tcp,")]),
            r#"unknown proto: """#
        );
        assert_eq!(
            e(&[PortMapping::new("", 80, 80, 1, "TCP")]),
            r#"unknown proto: "TCP""#
        );
        assert_eq!(
            e(&[PortMapping::new("", 80, 80, 1, "sctp")]),
            r#"unsupported proto: "sctp" (rootlessport forwards tcp and udp only)"#
        );
        assert_eq!(
            e(&[PortMapping::new("localhost", 80, 80, 1, "tcp")]),
            r#"invalid ParentIP: "localhost""#
        );
        assert_eq!(
            e(&[PortMapping::new("1.2.3", 80, 80, 1, "tcp")]),
            r#"invalid ParentIP: "1.2.3""#
        );
        assert_eq!(
            e(&[PortMapping::new("", 0, 80, 1, "tcp")]),
            "invalid ParentPort: 0"
        );
        assert_eq!(
            e(&[PortMapping::new("", 80, 0, 1, "tcp")]),
            "invalid ChildPort: 0"
        );
        assert_eq!(
            e(&[PortMapping::new("", 65535, 80, 2, "tcp")]),
            "invalid port range: host port 65535 with range 2 goes past 65535"
        );
        assert_eq!(
            e(&[PortMapping::new("", 80, 65000, 600, "tcp")]),
            "invalid port range: container port 65000 with range 600 goes past 65535"
        );
        assert_eq!(
            e(&[
                PortMapping::new("", 80, 80, 1, "tcp"),
                PortMapping::new("", 80, 81, 1, "tcp")
            ]),
            "conflict with ID 1"
        );
        assert_eq!(
            e(&[
                PortMapping::new("", 80, 80, 3, "tcp,udp"),
                PortMapping::new("", 82, 82, 1, "udp")
            ]),
            "conflict with ID 6"
        );
        // Found whatever came between, on either side of a 64-port word's edge, with
        // "" and 0.0.0.0 the same host IP.
        assert_eq!(
            e(&[
                PortMapping::new("", 63, 1, 2, "tcp"),
                PortMapping::new("127.0.0.1", 64, 1, 1, "tcp"),
                PortMapping::new("", 127, 1, 2, "udp"),
                PortMapping::new("", 65535, 1, 1, "tcp"),
                PortMapping::new("0.0.0.0", 64, 1, 1, "tcp"),
            ]),
            "conflict with ID 2"
        );
        assert_eq!(
            e(&[
                PortMapping::new("::1", 65535, 1, 1, "udp6"),
                PortMapping::new("", 65535, 1, 1, "udp6"),
                PortMapping::new("::1", 65535, 2, 1, "udp6"),
            ]),
            "conflict with ID 1"
        );
        // Different proto strings or host IP texts do not conflict in validation.
        plan_ports(&[
            PortMapping::new("", 80, 80, 1, "tcp"),
            PortMapping::new("", 80, 80, 1, "udp"),
            PortMapping::new("127.0.0.1", 80, 80, 1, "tcp"),
        ])
        .unwrap();
        assert_eq!(
            parse_child_ip("10.0.2.x").unwrap_err().to_string(),
            r#"invalid ChildIP: "10.0.2.x""#
        );
        assert_eq!(parse_child_ip("").unwrap(), None);
    }

    #[test]
    fn listen_plans() {
        let plan = |ip: &str, proto: &str| {
            plan_ports(&[PortMapping::new(ip, 80, 80, 1, proto)]).unwrap()[0].listen_plan()
        };
        assert_eq!(
            plan("", "tcp").unwrap(),
            ListenPlan {
                addr: "[::]:80".parse().unwrap(),
                only_v6: Some(false)
            }
        );
        assert_eq!(plan("0.0.0.0", "udp").unwrap().only_v6, Some(false));
        assert_eq!(plan("::", "tcp").unwrap().only_v6, Some(false));
        assert_eq!(
            plan("", "tcp4").unwrap(),
            ListenPlan {
                addr: "0.0.0.0:80".parse().unwrap(),
                only_v6: None
            }
        );
        assert_eq!(
            plan("::", "udp6").unwrap(),
            ListenPlan {
                addr: "[::]:80".parse().unwrap(),
                only_v6: Some(true)
            }
        );
        assert_eq!(
            plan("127.0.0.1", "tcp").unwrap(),
            ListenPlan {
                addr: "127.0.0.1:80".parse().unwrap(),
                only_v6: None
            }
        );
        assert_eq!(
            plan("::ffff:127.0.0.1", "tcp").unwrap().addr,
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            plan("::1", "tcp6").unwrap(),
            ListenPlan {
                addr: "[::1]:80".parse().unwrap(),
                only_v6: Some(true)
            }
        );
        assert_eq!(
            plan("::1", "tcp4").unwrap_err().to_string(),
            "listen tcp4 [::1]:80: not an IPv4 address"
        );
        assert_eq!(
            plan("127.0.0.1", "udp6").unwrap_err().to_string(),
            "listen udp6 127.0.0.1:80: not an IPv6 address"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(json in "\\PC{0,300}") {
            if let Ok(cfg) = Config::from_json(json.as_bytes()) {
                let _ = cfg.check_required();
                if let Ok(specs) = plan_ports(&cfg.mappings) {
                    for s in specs { let _ = s.listen_plan(); }
                }
            }
        }

        #[test]
        fn specs_stay_in_range(host in 0u16.., ctr in 0u16.., range in 0u16..2000, p in "(tcp|udp|tcp4|udp6)(,(tcp|udp))?") {
            if let Ok(specs) = plan_ports(&[PortMapping::new("", host, ctr, range, &p)]) {
                proptest::prop_assert!(!specs.is_empty());
                for s in &specs {
                    proptest::prop_assert!(s.parent_port >= host && s.child_port >= ctr);
                    proptest::prop_assert!(s.parent_port > 0 && s.child_port > 0);
                }
            }
        }
    }
}
