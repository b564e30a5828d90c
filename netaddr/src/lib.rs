//! Address arithmetic for slirp4netns networks.
//!
//! slirp4netns derives every address of its virtual network from one IPv4 subnet
//! (default `10.0.2.0/24`), counting from the network address: the gateway is at
//! offset 2, the DNS forwarder at 3 and the guest (the container's `tap0`) at 100.
//! IPv6, when enabled, always uses `fd00::/64` with the gateway at `fd00::2` and DNS
//! at `fd00::3`; the guest picks its own address by SLAAC.
//!
//! The error texts are podman's, word for word, because engines show them to users.
//! The functions mirror `GetSlirp4netnsIP`, `GetSlirp4netnsGateway`,
//! `GetSlirp4netnsDNS` and `addToIP` of podman 4.x's `libpod/networking_slirp4netns.go`;
//! the addresses themselves are the ones slirp4netns's manual page lists.
//!
//! ```
//! let subnet: netaddr::Ipv4Net = "10.5.0.0/16".parse().unwrap();
//! assert_eq!(netaddr::slirp4netns_ip(Some(&subnet)).unwrap().to_string(), "10.5.0.100");
//! assert_eq!(netaddr::slirp4netns_gateway(None).unwrap().to_string(), "10.0.2.2");
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, clippy::missing_errors_doc)]

/// The README's example, compiled (and run unless `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use ipnet::{Ipv4Net, Ipv6Net};

/// Offset of the gateway (the host side of slirp4netns) from the network address.
pub const GATEWAY_OFFSET: u32 = 2;
/// Offset of slirp4netns's DNS forwarder from the network address.
pub const DNS_OFFSET: u32 = 3;
/// Offset of the guest (container) address from the network address.
pub const GUEST_OFFSET: u32 = 100;

/// Errors of the address arithmetic, worded as podman words them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The network address plus the offset does not fit in 32 bits.
    #[error("integer overflow while calculating ip address offset, {network} + {offset}")]
    Overflow {
        /// The subnet's network address (host bits cleared).
        network: Ipv4Addr,
        /// The offset that was added to it.
        offset: u32,
    },
    /// The computed address falls outside the subnet (the subnet is too small).
    #[error("calculated ip address {addr} is not within given subnet {subnet}")]
    NotInSubnet {
        /// The address computed: network address plus offset.
        addr: Ipv4Addr,
        /// The subnet, with its host bits cleared.
        subnet: Ipv4Net,
    },
}

/// slirp4netns's default network, `10.0.2.0/24`.
pub fn default_subnet() -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 2, 0), 24)
}

/// The address `offset` past the network address of `subnet`.
///
/// Host bits of `subnet` are ignored: `10.0.2.77/24` counts from `10.0.2.0`.
/// The result must lie inside the subnet (network and broadcast addresses included,
/// as podman checks with `Contains`). podman's `addToIP`.
///
/// ```
/// let subnet: netaddr::Ipv4Net = "10.0.2.77/24".parse().unwrap();
/// assert_eq!(netaddr::add_to_ip(&subnet, 3).unwrap().to_string(), "10.0.2.3");
/// assert!(netaddr::add_to_ip(&subnet, 256).is_err());
/// ```
///
/// # Errors
///
/// [`Error::Overflow`] when the sum passes `255.255.255.255`, [`Error::NotInSubnet`]
/// when it leaves the subnet.
pub fn add_to_ip(subnet: &Ipv4Net, offset: u32) -> Result<Ipv4Addr, Error> {
    let subnet = subnet.trunc();
    let network = subnet.network();
    let sum = u32::from(network)
        .checked_add(offset)
        .ok_or(Error::Overflow { network, offset })?;
    let addr = Ipv4Addr::from(sum);
    if subnet.contains(&addr) {
        Ok(addr)
    } else {
        Err(Error::NotInSubnet { addr, subnet })
    }
}

fn offset_in(subnet: Option<&Ipv4Net>, offset: u32) -> Result<Ipv4Addr, Error> {
    match subnet {
        Some(subnet) => add_to_ip(subnet, offset),
        None => add_to_ip(&default_subnet(), offset),
    }
}

/// The guest (container) address: network + 100, the address slirp4netns gives `tap0`
/// (`10.0.2.100` by default). `None` means [`default_subnet`]. podman's
/// `GetSlirp4netnsIP`.
///
/// # Errors
///
/// As [`add_to_ip`]: a subnet too small to hold offset 100 (a `/26` or longer).
pub fn slirp4netns_ip(subnet: Option<&Ipv4Net>) -> Result<Ipv4Addr, Error> {
    offset_in(subnet, GUEST_OFFSET)
}

/// The gateway address: network + 2, where the container reaches the host side
/// (`10.0.2.2` by default). `None` means [`default_subnet`]. podman's
/// `GetSlirp4netnsGateway`.
///
/// # Errors
///
/// As [`add_to_ip`]: a subnet too small to hold offset 2 (a `/31` or `/32`).
pub fn slirp4netns_gateway(subnet: Option<&Ipv4Net>) -> Result<Ipv4Addr, Error> {
    offset_in(subnet, GATEWAY_OFFSET)
}

/// The DNS forwarder address: network + 3 (`10.0.2.3` by default). `None` means
/// [`default_subnet`]. podman's `GetSlirp4netnsDNS`.
///
/// # Errors
///
/// As [`add_to_ip`]: a subnet too small to hold offset 3 (a `/31` or `/32`).
pub fn slirp4netns_dns(subnet: Option<&Ipv4Net>) -> Result<Ipv4Addr, Error> {
    offset_in(subnet, DNS_OFFSET)
}

/// The IPv6 prefix slirp4netns always uses, `fd00::/64`.
pub fn slirp4netns_ipv6_subnet() -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0), 64)
}

/// The IPv6 gateway, `fd00::2`.
pub fn slirp4netns_gateway6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)
}

/// The IPv6 DNS forwarder, `fd00::3`.
pub fn slirp4netns_dns6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_match_slirp4netns() {
        assert_eq!(default_subnet().to_string(), "10.0.2.0/24");
        assert_eq!(slirp4netns_ip(None).unwrap(), Ipv4Addr::new(10, 0, 2, 100));
        assert_eq!(
            slirp4netns_gateway(None).unwrap(),
            Ipv4Addr::new(10, 0, 2, 2)
        );
        assert_eq!(slirp4netns_dns(None).unwrap(), Ipv4Addr::new(10, 0, 2, 3));
    }

    #[test]
    fn custom_subnets() {
        let cases = [
            ("10.5.0.0/16", "10.5.0.100", "10.5.0.2", "10.5.0.3"),
            (
                "192.168.77.0/24",
                "192.168.77.100",
                "192.168.77.2",
                "192.168.77.3",
            ),
            (
                "172.16.0.128/25",
                "172.16.0.228",
                "172.16.0.130",
                "172.16.0.131",
            ),
            ("0.0.0.0/0", "0.0.0.100", "0.0.0.2", "0.0.0.3"),
        ];
        for (subnet, ip, gw, dns) in cases {
            let s = net(subnet);
            assert_eq!(
                slirp4netns_ip(Some(&s)).unwrap().to_string(),
                ip,
                "{subnet}"
            );
            assert_eq!(
                slirp4netns_gateway(Some(&s)).unwrap().to_string(),
                gw,
                "{subnet}"
            );
            assert_eq!(
                slirp4netns_dns(Some(&s)).unwrap().to_string(),
                dns,
                "{subnet}"
            );
        }
    }

    #[test]
    fn host_bits_are_ignored() {
        let s = net("10.0.2.77/24");
        assert_eq!(slirp4netns_ip(Some(&s)).unwrap().to_string(), "10.0.2.100");
        assert_eq!(add_to_ip(&s, 0).unwrap().to_string(), "10.0.2.0");
    }

    #[test]
    fn subnet_too_small_is_podmans_error() {
        let s = net("10.0.2.0/26");
        assert_eq!(
            slirp4netns_ip(Some(&s)).unwrap_err().to_string(),
            "calculated ip address 10.0.2.100 is not within given subnet 10.0.2.0/26"
        );
        let s = net("10.0.2.9/31");
        assert_eq!(
            slirp4netns_dns(Some(&s)).unwrap_err().to_string(),
            "calculated ip address 10.0.2.11 is not within given subnet 10.0.2.8/31"
        );
        // The edges are inside: podman's Contains includes network and broadcast.
        let s = net("10.0.2.0/30");
        assert_eq!(slirp4netns_dns(Some(&s)).unwrap().to_string(), "10.0.2.3");
        let s = net("1.2.3.4/32");
        assert_eq!(add_to_ip(&s, 0).unwrap().to_string(), "1.2.3.4");
        assert!(add_to_ip(&s, 1).is_err());
    }

    #[test]
    fn overflow_is_podmans_error() {
        let s = net("255.255.255.0/24");
        assert_eq!(
            add_to_ip(&s, 300).unwrap_err().to_string(),
            "integer overflow while calculating ip address offset, 255.255.255.0 + 300"
        );
        let s = net("0.0.0.0/0");
        assert_eq!(
            add_to_ip(&s, u32::MAX).unwrap().to_string(),
            "255.255.255.255"
        );
        let s = net("0.0.0.1/32");
        assert!(matches!(
            add_to_ip(&s, u32::MAX),
            Err(Error::Overflow { .. })
        ));
        // Overflow is reported before containment, as podman checks it first.
        let s = net("255.255.255.255/32");
        assert_eq!(
            add_to_ip(&s, 1).unwrap_err().to_string(),
            "integer overflow while calculating ip address offset, 255.255.255.255 + 1"
        );
    }

    #[test]
    fn ipv6_constants() {
        assert_eq!(slirp4netns_ipv6_subnet().to_string(), "fd00::/64");
        assert_eq!(slirp4netns_gateway6().to_string(), "fd00::2");
        assert_eq!(slirp4netns_dns6().to_string(), "fd00::3");
        assert!(slirp4netns_ipv6_subnet().contains(&slirp4netns_gateway6()));
        assert!(slirp4netns_ipv6_subnet().contains(&slirp4netns_dns6()));
    }

    proptest! {
        #[test]
        fn never_panics_and_ok_is_inside(addr in any::<u32>(), prefix in 0u8..=32, offset in any::<u32>()) {
            let subnet = Ipv4Net::new(Ipv4Addr::from(addr), prefix).unwrap();
            match add_to_ip(&subnet, offset) {
                Ok(ip) => {
                    prop_assert!(subnet.trunc().contains(&ip));
                    prop_assert_eq!(u32::from(ip) - u32::from(subnet.network()), offset);
                }
                Err(Error::Overflow { network, offset: o }) => {
                    prop_assert_eq!(o, offset);
                    prop_assert!(u32::from(network).checked_add(offset).is_none());
                }
                Err(Error::NotInSubnet { addr, subnet: s }) => {
                    prop_assert_eq!(s, subnet.trunc());
                    prop_assert!(!s.contains(&addr));
                    let size = 1u64 << (32 - u32::from(prefix));
                    prop_assert!(u64::from(offset) >= size);
                }
            }
        }

        #[test]
        fn named_addresses_are_inside(addr in any::<u32>(), prefix in 0u8..=32) {
            let subnet = Ipv4Net::new(Ipv4Addr::from(addr), prefix).unwrap();
            for f in [slirp4netns_ip, slirp4netns_gateway, slirp4netns_dns] {
                if let Ok(ip) = f(Some(&subnet)) {
                    prop_assert!(subnet.contains(&ip));
                }
            }
            // Any subnet of /25 or larger holds all three.
            if prefix <= 25 {
                prop_assert!(slirp4netns_ip(Some(&subnet)).is_ok());
            }
        }
    }
}
