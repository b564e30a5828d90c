//! The `podman run -p` syntax for a [`PortMapping`]: `[IP:]HOST:CONTAINER[/PROTO]`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::port::{PortMapping, PortRange, Protocol};
use crate::quote::go_quote;

/// A `-p` value that [`PortMapping`]'s `FromStr` refused: the value and why.
///
/// Display: `invalid -p "VALUE": REASON`, the value quoted as Go's `%q` quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid -p {}: {reason}", go_quote(.spec))]
pub struct ParsePublishError {
    spec: String,
    reason: PublishSyntaxError,
}

impl ParsePublishError {
    /// The refused value, as given.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Why it was refused.
    pub fn reason(&self) -> &PublishSyntaxError {
        &self.reason
    }
}

/// Why a `-p` value (or one of its port ranges) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishSyntaxError {
    /// Not two or three `:`-separated parts (an IPv6 address goes in brackets).
    #[error("expected [IP:]HOST:CONTAINER[/PROTO]")]
    Shape,
    /// A bracketed address followed by one part only.
    #[error("expected HOST:CONTAINER")]
    NoContainerPart,
    /// `[` without `]:` after the address.
    #[error("missing \"]:\" after the IPv6 address")]
    UnclosedBracket,
    /// The IP part, as given.
    #[error("{} is not an IP address", go_quote(.0))]
    NotAnIp(String),
    /// A port that is not decimal digits from 1 to 65535, as given.
    #[error("{} is not a port (1-65535)", go_quote(.0))]
    NotAPort(String),
    /// A range `A-B` with `B` below `A`, as given.
    #[error("range {} runs backwards", go_quote(.0))]
    Backwards(String),
    /// `HOST` and `CONTAINER` ranges of different lengths.
    #[error("host and container ranges differ in length")]
    LengthMismatch,
    /// A protocol name other than `tcp` and `udp`, as given.
    #[error("protocol {} is not tcp or udp", go_quote(.0))]
    Protocol(String),
}

impl FromStr for PortMapping {
    type Err = ParsePublishError;

    /// Parse a `podman run -p` value, `[IP:]HOST:CONTAINER[/PROTO]`: `HOST` and
    /// `CONTAINER` are ports or ranges of the same length (`8000-8002:80-82`), an IPv6
    /// address goes in brackets (`[::1]:8080:80`), `PROTO` is `tcp` (the default),
    /// `udp` or a comma list of them.
    ///
    /// The mapping's `protocol` is the list as written (`tcp` when absent), its
    /// `range` the number of ports, at least 1. What parses always expands through
    /// [`PortMapping::forwards`] without error.
    ///
    /// Narrower than podman's parser (`pkg/specgenutil`): no port-less or
    /// container-only forms, no host name, protocols in lower case, and no `sctp`,
    /// which no forwarder here carries.
    ///
    /// ```
    /// use slirp_config::PortMapping;
    /// let m: PortMapping = "127.0.0.1:8000-8001:80-81/tcp,udp".parse()?;
    /// assert_eq!(m, PortMapping::new("127.0.0.1", 8000, 80, 2, "tcp,udp"));
    /// assert_eq!(m.to_string(), "127.0.0.1:8000-8001:80-81/tcp,udp");
    /// let e = "8080:80/sctp".parse::<PortMapping>().unwrap_err();
    /// assert_eq!(e.to_string(), r#"invalid -p "8080:80/sctp": protocol "sctp" is not tcp or udp"#);
    /// # Ok::<(), slirp_config::ParsePublishError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ParsePublishError`], whose [`PublishSyntaxError`] reason is the first problem
    /// found: the protocol list first, then the address, then the ports.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        parse(spec).map_err(|reason| ParsePublishError {
            spec: spec.to_owned(),
            reason,
        })
    }
}

impl FromStr for PortRange {
    type Err = PublishSyntaxError;

    /// `PORT` or `FIRST-LAST`, each port decimal digits from 1 to 65535.
    ///
    /// # Errors
    ///
    /// [`PublishSyntaxError::NotAPort`] naming the bad port,
    /// [`PublishSyntaxError::Backwards`] when `LAST` is below `FIRST`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            _ => Err(PublishSyntaxError::NotAPort(p.to_owned())),
        };
        match s.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (port(first)?, port(last)?);
                if last < first {
                    return Err(PublishSyntaxError::Backwards(s.to_owned()));
                }
                Ok(PortRange {
                    first,
                    count: last - first + 1,
                })
            }
            None => port(s).map(|first| PortRange { first, count: 1 }),
        }
    }
}

fn parse(spec: &str) -> Result<PortMapping, PublishSyntaxError> {
    let (addr_ports, protocol) = spec.rsplit_once('/').unwrap_or((spec, "tcp"));
    for name in protocol.split(',') {
        if !matches!(name.parse(), Ok(Protocol::Tcp | Protocol::Udp)) {
            return Err(PublishSyntaxError::Protocol(name.to_owned()));
        }
    }
    let (host_ip, ports) = match addr_ports.strip_prefix('[') {
        Some(v6) => v6
            .split_once("]:")
            .ok_or(PublishSyntaxError::UnclosedBracket)?,
        None => match addr_ports.matches(':').count() {
            1 => ("", addr_ports),
            2 => addr_ports
                .split_once(':')
                .ok_or(PublishSyntaxError::Shape)?,
            _ => return Err(PublishSyntaxError::Shape),
        },
    };
    if !host_ip.is_empty() && host_ip.parse::<IpAddr>().is_err() {
        return Err(PublishSyntaxError::NotAnIp(host_ip.to_owned()));
    }
    let (host, container) = ports
        .split_once(':')
        .ok_or(PublishSyntaxError::NoContainerPart)?;
    let host: PortRange = host.parse()?;
    let container: PortRange = container.parse()?;
    if host.count != container.count {
        return Err(PublishSyntaxError::LengthMismatch);
    }
    Ok(PortMapping::new(
        host_ip,
        host.first,
        container.first,
        host.count,
        protocol,
    ))
}

impl fmt::Display for PortMapping {
    /// The `-p` form, `[IP:]HOST:CONTAINER/PROTO`, that `FromStr` reads back to the
    /// same mapping: an IPv6 address in brackets, ranges as `A-B`, the protocol list
    /// always written (`tcp` for an empty one). Written as is for any field values,
    /// checked or not.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip.as_str() {
            "" => {}
            ip if ip.contains(':') => write!(f, "[{ip}]:")?,
            ip => write!(f, "{ip}:")?,
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_ports(),
            self.container_ports(),
            self.protocol_list()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_publish(spec: &str) -> Result<PortMapping, String> {
        spec.parse().map_err(|e: ParsePublishError| e.to_string())
    }

    #[test]
    fn publish_specs() {
        let m = parse_publish("8080:80").unwrap();
        assert_eq!(
            (
                m.host_ip.as_str(),
                m.host_port,
                m.container_port,
                m.range,
                &*m.protocol
            ),
            ("", 8080, 80, 1, "tcp")
        );
        let m = parse_publish("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(
            (
                m.host_ip.as_str(),
                m.host_port,
                m.container_port,
                &*m.protocol
            ),
            ("127.0.0.1", 5353, 53, "udp")
        );
        let m = parse_publish("[::1]:8443:443/tcp,udp").unwrap();
        assert_eq!((m.host_ip.as_str(), &*m.protocol), ("::1", "tcp,udp"));
        let m = parse_publish("8000-8002:80-82").unwrap();
        assert_eq!((m.host_port, m.container_port, m.range), (8000, 80, 3));
    }

    #[test]
    fn bad_publish_specs() {
        let e = |s: &str| parse_publish(s).unwrap_err();
        assert_eq!(
            e("80"),
            r#"invalid -p "80": expected [IP:]HOST:CONTAINER[/PROTO]"#
        );
        assert_eq!(
            e("1.2.3.4:80"),
            r#"invalid -p "1.2.3.4:80": "1.2.3.4" is not a port (1-65535)"#
        );
        assert_eq!(
            e("a:80"),
            r#"invalid -p "a:80": "a" is not a port (1-65535)"#
        );
        assert_eq!(
            e("0:80"),
            r#"invalid -p "0:80": "0" is not a port (1-65535)"#
        );
        assert_eq!(
            e("8080:80/sctp"),
            r#"invalid -p "8080:80/sctp": protocol "sctp" is not tcp or udp"#
        );
        assert_eq!(
            e("x.y:8080:80"),
            r#"invalid -p "x.y:8080:80": "x.y" is not an IP address"#
        );
        assert_eq!(
            e("1:2:3:4"),
            r#"invalid -p "1:2:3:4": expected [IP:]HOST:CONTAINER[/PROTO]"#
        );
        assert_eq!(
            e("8000-8002:80"),
            r#"invalid -p "8000-8002:80": host and container ranges differ in length"#
        );
        assert_eq!(
            e("8002-8000:80-82"),
            r#"invalid -p "8002-8000:80-82": range "8002-8000" runs backwards"#
        );
        assert_eq!(
            e("[::1:80:80"),
            r#"invalid -p "[::1:80:80": missing "]:" after the IPv6 address"#
        );
        assert_eq!(
            e("70000:80"),
            r#"invalid -p "70000:80": "70000" is not a port (1-65535)"#
        );
    }

    #[test]
    fn every_reason() {
        let reason = |s: &str| s.parse::<PortMapping>().unwrap_err().reason().clone();
        use PublishSyntaxError as R;
        assert_eq!(reason("80"), R::Shape);
        assert_eq!(reason("::1:80:80"), R::Shape);
        assert_eq!(reason("[::1]:80"), R::NoContainerPart);
        assert_eq!(reason("[::1]80:80"), R::UnclosedBracket);
        assert_eq!(reason("[::1:80:80"), R::UnclosedBracket);
        assert_eq!(
            reason("[fe80::1%eth0]:80:80"),
            R::NotAnIp("fe80::1%eth0".into())
        );
        assert_eq!(reason("localhost:80:80"), R::NotAnIp("localhost".into()));
        assert_eq!(reason("+80:80"), R::NotAPort("+80".into()));
        assert_eq!(reason("80:"), R::NotAPort("".into()));
        assert_eq!(reason("80-81:90-"), R::NotAPort("".into()));
        assert_eq!(reason("80:82-81"), R::Backwards("82-81".into()));
        assert_eq!(reason("80-81:80-82"), R::LengthMismatch);
        assert_eq!(reason("80:80/"), R::Protocol("".into()));
        assert_eq!(reason("80:80/tcp,"), R::Protocol("".into()));
        assert_eq!(reason("80:80/TCP"), R::Protocol("TCP".into()));
        assert_eq!(reason("80:80/tcp4"), R::Protocol("tcp4".into()));
        // The protocol list is checked before the rest.
        assert_eq!(reason("80/icmp"), R::Protocol("icmp".into()));
        let e = "a\tb:80".parse::<PortMapping>().unwrap_err();
        assert_eq!(e.spec(), "a\tb:80");
        assert_eq!(
            e.to_string(),
            r#"invalid -p "a\tb:80": "a\tb" is not a port (1-65535)"#
        );
    }

    #[test]
    fn port_ranges() {
        let r = |s: &str| s.parse::<PortRange>();
        assert_eq!(
            r("80"),
            Ok(PortRange {
                first: 80,
                count: 1
            })
        );
        assert_eq!(
            r("1-65535"),
            Ok(PortRange {
                first: 1,
                count: 65535
            })
        );
        assert_eq!(r("7-7"), Ok(PortRange { first: 7, count: 1 }));
        for bad in [
            "", "0", "65536", "+80", "-1", "8o", " 80", "1-", "-", "1-2-3",
        ] {
            assert!(r(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            r("1-2-3").unwrap_err().to_string(),
            r#""2-3" is not a port (1-65535)"#
        );
        assert_eq!(
            r("9-8").unwrap_err(),
            PublishSyntaxError::Backwards("9-8".into())
        );
        assert_eq!(
            PortRange {
                first: 80,
                count: 0
            }
            .to_string(),
            "80"
        );
        assert_eq!(
            PortRange {
                first: 80,
                count: 0
            }
            .last(),
            80
        );
        assert_eq!(
            PortRange {
                first: 80,
                count: 3
            }
            .to_string(),
            "80-82"
        );
        assert_eq!(
            PortRange {
                first: 65535,
                count: 2
            }
            .last(),
            65536
        );
        let m = PortMapping::new("", 8000, 80, 3, "");
        assert_eq!(m.host_ports().to_string(), "8000-8002");
        assert_eq!(m.container_ports().to_string(), "80-82");
        assert_eq!(m.protocol_list(), "tcp");
    }

    #[test]
    fn display_round_trips() {
        for (spec, shown) in [
            ("8080:80", "8080:80/tcp"),
            ("127.0.0.1:5353:53/udp", "127.0.0.1:5353:53/udp"),
            ("[::1]:8443:443/tcp,udp", "[::1]:8443:443/tcp,udp"),
            ("[1.2.3.4]:1:2", "1.2.3.4:1:2/tcp"),
            ("8000-8002:80-82/udp,tcp", "8000-8002:80-82/udp,tcp"),
            ("1-65535:1-65535", "1-65535:1-65535/tcp"),
            ("7-7:8-8", "7:8/tcp"),
            (":80:80", "80:80/tcp"),
        ] {
            let m: PortMapping = spec.parse().unwrap();
            assert_eq!(m.to_string(), shown, "{spec}");
            assert_eq!(shown.parse::<PortMapping>().unwrap(), m, "{spec}");
            assert!(m.forwards().all(|f| f.is_ok()), "{spec}");
        }
        // Any field values are written, checked or not.
        assert_eq!(
            PortMapping::new("", 65535, 0, 2, "").to_string(),
            "65535-65536:0-1/tcp"
        );
        assert_eq!(
            PortMapping::new("fe80::1", 1, 2, 0, "sctp").to_string(),
            "[fe80::1]:1:2/sctp"
        );
    }

    fn arb_mapping() -> impl proptest::strategy::Strategy<Value = PortMapping> {
        use proptest::prelude::*;
        let ip = prop_oneof![
            Just(String::new()),
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        ];
        let proto = proptest::sample::select(vec!["tcp", "udp", "tcp,udp", "udp,tcp", "udp,udp"]);
        (ip, 1u16.., 1u16.., 0u16..1000, proto).prop_filter_map(
            "ranges within 65535",
            |(ip, host, ctr, range, proto)| {
                let m = PortMapping::new(&ip, host, ctr, range.max(1), proto);
                (m.host_ports().last() <= 65535 && m.container_ports().last() <= 65535).then_some(m)
            },
        )
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<PortMapping>();
        }

        #[test]
        fn parsed_mappings_round_trip_and_expand(
            s in "(\\[?[0-9a-f:.x]{0,10}\\]?:)?[0-9]{0,5}(-[0-9]{0,5})?:[0-9]{0,5}(-[0-9]{1,5})?(/(tcp|udp|sctp|)(,(tcp|udp))?)?"
        ) {
            if let Ok(m) = s.parse::<PortMapping>() {
                let shown = m.to_string();
                proptest::prop_assert_eq!(shown.parse::<PortMapping>(), Ok(m.clone()));
                proptest::prop_assert!(m.forwards().all(|f| f.is_ok()));
            }
        }

        #[test]
        fn display_then_parse_is_identity(m in arb_mapping()) {
            proptest::prop_assert_eq!(m.to_string().parse::<PortMapping>(), Ok(m));
        }
    }
}
