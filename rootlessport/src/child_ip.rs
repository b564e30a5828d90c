//! Which container address the helper forwards to (podman's `getRootlessPortChildIP`).

use std::net::IpAddr;

use netaddr::Ipv4Net;

/// What the engine knows about the container's network.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ChildNetwork<'a> {
    /// slirp4netns networking: the guest address of its subnet.
    Slirp4netns {
        /// The `cidr` option; `None`: slirp4netns's default, 10.0.2.0/24.
        subnet: Option<&'a Ipv4Net>,
    },
    /// Any other network: the container's interface addresses, in order.
    Interfaces(&'a [IpAddr]),
}

/// The child IP for the helper's config: slirp4netns -> subnet + 100; otherwise the
/// first IPv4 address, else the last IPv6 one, else empty.
///
/// ```
/// use rootlessport::child_ip::{child_ip, ChildNetwork};
/// assert_eq!(child_ip(ChildNetwork::Slirp4netns { subnet: None }), "10.0.2.100");
/// let addrs = ["fd00::5".parse().unwrap(), "10.89.0.5".parse().unwrap()];
/// assert_eq!(child_ip(ChildNetwork::Interfaces(&addrs)), "10.89.0.5");
/// ```
pub fn child_ip(net: ChildNetwork<'_>) -> String {
    match net {
        ChildNetwork::Slirp4netns { subnet } => netaddr::slirp4netns_ip(subnet)
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        ChildNetwork::Interfaces(addrs) => {
            let mut last_v6 = None;
            for a in addrs {
                match a {
                    IpAddr::V4(v4) => return v4.to_string(),
                    IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                        Some(v4) => return v4.to_string(),
                        None => last_v6 = Some(*v6),
                    },
                }
            }
            last_v6.map(|a| a.to_string()).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices() {
        let s: Ipv4Net = "10.5.0.0/16".parse().unwrap();
        assert_eq!(
            child_ip(ChildNetwork::Slirp4netns { subnet: Some(&s) }),
            "10.5.0.100"
        );
        let tiny: Ipv4Net = "10.5.0.0/28".parse().unwrap();
        assert_eq!(
            child_ip(ChildNetwork::Slirp4netns {
                subnet: Some(&tiny)
            }),
            ""
        );
        let v6: Vec<IpAddr> = vec!["fd00::1".parse().unwrap(), "fd00::2".parse().unwrap()];
        assert_eq!(child_ip(ChildNetwork::Interfaces(&v6)), "fd00::2");
        assert_eq!(child_ip(ChildNetwork::Interfaces(&[])), "");
        let mixed: Vec<IpAddr> = vec![
            "fd00::1".parse().unwrap(),
            "10.1.0.2".parse().unwrap(),
            "10.1.0.3".parse().unwrap(),
        ];
        assert_eq!(child_ip(ChildNetwork::Interfaces(&mixed)), "10.1.0.2");
    }
}
