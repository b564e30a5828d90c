//! The helper's input, exactly as podman writes it, and its validation into the list of
//! ports to forward. Pure: no sockets, no fds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};
use slirp_config::{go_quote, PortError, PortMapping, PortSide, Protocol};

use crate::Error;

/// The config podman writes on the helper's stdin (its field names and order).
///
/// Fields may be missing or `null`: they take their zero value, as with Go's decoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(rename = "Mappings", deserialize_with = "nullable")]
    pub mappings: Vec<PortMapping>,
    #[serde(rename = "NetNSPath", deserialize_with = "nullable")]
    pub netns_path: String,
    #[serde(rename = "ExitFD", deserialize_with = "nullable")]
    pub exit_fd: i32,
    #[serde(rename = "ReadyFD", deserialize_with = "nullable")]
    pub ready_fd: i32,
    #[serde(rename = "TmpDir", deserialize_with = "nullable")]
    pub tmp_dir: String,
    #[serde(rename = "ChildIP", deserialize_with = "nullable")]
    pub child_ip: String,
    #[serde(rename = "ContainerID", deserialize_with = "nullable")]
    pub container_id: String,
    #[serde(rename = "RootlessCNI", deserialize_with = "nullable")]
    pub rootless_cni: bool,
    /// Ours, not podman's (its helper ignores it): `false` turns off keeping the
    /// client's source address, so the container sees the helper's address as
    /// podman's helper makes it. Absent or `true`: kept where possible.
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
    /// Parse the stdin bytes. Empty input gets Go's words for it.
    pub fn from_json(bytes: &[u8]) -> Result<Config, Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::Json("unexpected end of JSON input".into()));
        }
        let bad = |e: serde_json::Error| Error::Json(format!("invalid config JSON: {e}"));
        // Only an object is a config (serde would also take a bare array as a struct).
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(bad)?;
        if !value.is_object() {
            return Err(Error::Json(
                "invalid config JSON: expected an object".to_owned(),
            ));
        }
        serde_json::from_value(value).map_err(bad)
    }

    /// The checks podman's helper makes on the config itself, in its order.
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
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Which address families a listener serves, from the proto suffix (`tcp`: a wildcard
/// listens on IPv4 and IPv6 at once; `tcp4`, `udp6`: that family only).
pub use slirp_config::Family;

/// One validated port to forward (RootlessKit's `port.Spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// 1-based, in the order podman adds them; named in conflict errors.
    pub id: u32,
    /// The proto as given (`tcp`, `udp6`, ...).
    pub proto: String,
    pub transport: Transport,
    pub family: Family,
    /// The host IP as given, `""` made `0.0.0.0`.
    pub parent_ip: String,
    pub parent_addr: IpAddr,
    pub parent_port: u16,
    pub child_port: u16,
}

/// How a listener is made for a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenPlan {
    pub addr: SocketAddr,
    /// `Some(false)`: an IPv6 socket that also takes IPv4 (dual-stack).
    pub only_v6: Option<bool>,
}

impl PortSpec {
    /// Where and how to listen: wildcards of plain `tcp`/`udp` are dual-stack, like
    /// podman's helper; `*4`/`*6` stay in their family; specific addresses bind only
    /// that address.
    pub fn listen_plan(&self) -> Result<ListenPlan, Error> {
        let port = self.parent_port;
        let wrong = |why: &str| Error::Listen {
            proto: self.proto.clone(),
            addr: display_addr(&self.parent_ip, port),
            reason: why.to_owned(),
        };
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
pub fn display_addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Parse an IP the way Go's `net.ParseIP` does; IPv4-mapped IPv6 counts as IPv4.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V6(a) => Some(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)),
        v4 => Some(v4),
    }
}

/// Parse a reloaded or configured child IP: empty means "the loopback of the netns".
pub fn parse_child_ip(s: &str) -> Result<Option<IpAddr>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    parse_ip(s)
        .map(Some)
        .ok_or_else(|| Error::InvalidChildIp(s.to_owned()))
}

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
pub fn plan_ports(mappings: &[PortMapping]) -> Result<Vec<PortSpec>, Error> {
    let mut specs: Vec<PortSpec> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for f in slirp_config::forwards(mappings) {
        let f = f.map_err(rootlesskit_error)?;
        let proto = f.proto.to_string();
        let transport = match f.proto.protocol {
            Protocol::Tcp => Transport::Tcp,
            Protocol::Udp => Transport::Udp,
            Protocol::Sctp => return Err(Error::UnsupportedProto(proto)),
        };
        // RootlessKit compares host IPs as text, "" made 0.0.0.0.
        let parent_ip = match f.mapping.host_ip.as_str() {
            "" => "0.0.0.0".to_owned(),
            ip => ip.to_owned(),
        };
        let parent_addr = f
            .host_ip
            .map_or(Ipv4Addr::UNSPECIFIED.into(), |a| a.to_canonical());
        let key = (proto.clone(), parent_ip.clone(), f.host_port);
        if let Some(id) = seen.get(&key) {
            return Err(Error::Conflict(*id));
        }
        let id = specs.len() as u32 + 1;
        seen.insert(key, id);
        specs.push(PortSpec {
            id,
            proto,
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

/// Quote for error texts (Go's `%q`).
pub(crate) fn q(s: &str) -> String {
    go_quote(s)
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
            .map(|s| {
                (
                    s.id,
                    s.proto.as_str(),
                    s.parent_ip.as_str(),
                    s.parent_port,
                    s.child_port,
                )
            })
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
            .map(|s| (s.proto.as_str(), s.parent_port, s.child_port))
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
