//! Keeping the client's address: inside the container netns, connections and UDP flows
//! to the container are made from transparent sockets bound to the real client address
//! and port, and policy routing brings the container's replies back to them.
//!
//! - A table of our own routes everything as local (`local default dev lo`, with the
//!   child IP as preferred source so that a server on a wildcard address answers UDP
//!   from the address the flow was sent to), for IPv4 and IPv6.
//! - TCP: our sockets carry a mark; with `net.ipv4.tcp_fwmark_accept` the container's
//!   accepted socket inherits it, and a `fwmark` rule sends its packets (replies only)
//!   to our table. The container's other traffic, from the same port too, is untouched.
//! - UDP: a rule per published UDP port range (`ipproto udp sport A-B`, in the child
//!   IP's family) sends the container's packets from those ports to our table. (No
//!   `from CHILD_IP`: a server on a wildcard address has no source address yet when
//!   its reply is routed.) The trade-off: while
//!   published, a container's UDP port can answer clients but cannot start talking to
//!   other hosts from that same port (rare for servers; DNS forwarders and the like use
//!   other source ports).
//!
//! Everything is added when the helper starts, the UDP rules move on reload, and all of
//! it is removed at exit. When it cannot be set up, the helper forwards as podman's
//! does (the container sees the helper's address), with one warning line.

use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::netlink::{IpFamily, Rtnl, Rule};

/// The mark on our sockets and the routing table we add: "RLPT".
pub const MARK: u32 = 0x524c_5054;
pub const TABLE: u32 = 0x524c_5054;
/// Before the main table's rule (32766).
pub const PRIORITY: u32 = 99;
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// The routing state we added to the container netns.
pub struct SourceIp {
    rtnl: Rtnl,
    families: Vec<IpFamily>,
    added_routes: Vec<IpFamily>,
    added_rules: Vec<Rule>,
    udp_ranges: Vec<(u16, u16)>,
    udp_rules: Vec<Rule>,
    restore_fwmark_accept: Option<String>,
}

impl SourceIp {
    /// Set it up from a thread inside the container netns. `udp_ranges` are the
    /// container port ranges published for UDP.
    pub fn setup(
        udp_ranges: Vec<(u16, u16)>,
        child_ip: Option<IpAddr>,
    ) -> Result<SourceIp, String> {
        let child = usable_child(child_ip)?;
        let rtnl = Rtnl::open().map_err(|e| format!("netlink: {e}"))?;
        let mut s = SourceIp {
            rtnl,
            families: Vec::new(),
            added_routes: Vec::new(),
            added_rules: Vec::new(),
            udp_ranges,
            udp_rules: Vec::new(),
            restore_fwmark_accept: None,
        };
        let current =
            std::fs::read_to_string(FWMARK_ACCEPT).map_err(|e| format!("{FWMARK_ACCEPT}: {e}"))?;
        if current.trim() == "0" {
            std::fs::write(FWMARK_ACCEPT, "1").map_err(|e| format!("{FWMARK_ACCEPT}: {e}"))?;
            s.restore_fwmark_accept = Some(current.trim().to_owned());
        }
        for family in [IpFamily::V4, IpFamily::V6] {
            let prefsrc = (IpFamily::of(child) == family).then_some(child);
            match s.add_family(family, prefsrc) {
                Ok(()) => s.families.push(family),
                // No IPv6 in the container is fine; no IPv4 support is not.
                Err(e) if family == IpFamily::V6 => {
                    tracing::debug!(error = %e, "no IPv6 source-address keeping");
                }
                Err(e) => return Err(e),
            }
        }
        s.add_udp_rules(child)?;
        Ok(s)
    }

    fn add_family(&mut self, family: IpFamily, prefsrc: Option<IpAddr>) -> Result<(), String> {
        match self.rtnl.add_local_default(family, TABLE, prefsrc) {
            Ok(()) => self.added_routes.push(family),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("adding the local route: {e}")),
        }
        let rule = Rule {
            family,
            priority: PRIORITY,
            table: TABLE,
            fwmark: Some((MARK, u32::MAX)),
            ip_proto: None,
            sport: None,
            src: None,
        };
        self.add_rule_once(rule)
            .map_err(|e| format!("adding the fwmark rule: {e}"))
    }

    fn add_rule_once(&mut self, rule: Rule) -> io::Result<()> {
        match self.rtnl.add_rule(&rule) {
            Ok(()) => {
                self.added_rules.push(rule);
                Ok(())
            }
            // Another helper in this netns has the same rule: share it.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn add_udp_rules(&mut self, child: IpAddr) -> Result<(), String> {
        let family = IpFamily::of(child);
        if !self.families.contains(&family) {
            return Ok(());
        }
        for &(a, b) in &self.udp_ranges.clone() {
            let rule = Rule {
                family,
                priority: PRIORITY,
                table: TABLE,
                fwmark: None,
                ip_proto: Some(libc::IPPROTO_UDP as u8),
                sport: Some((a, b)),
                src: None,
            };
            match self.rtnl.add_rule(&rule) {
                Ok(()) => self.udp_rules.push(rule),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(format!("adding the UDP rule for ports {a}-{b}: {e}")),
            }
        }
        Ok(())
    }

    fn remove_udp_rules(&mut self) {
        for r in std::mem::take(&mut self.udp_rules) {
            let _ = self.rtnl.del_rule(&r);
        }
    }

    /// Whether connections of this family can keep their source address.
    pub fn supports(&self, family: IpFamily) -> bool {
        self.families.contains(&family)
    }

    /// The child IP changed: the routes take it as preferred source, and the UDP rules
    /// follow its family.
    pub fn reload(&mut self, child_ip: Option<IpAddr>) {
        self.remove_udp_rules();
        let child = match usable_child(child_ip) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "source addresses not kept after reload");
                return;
            }
        };
        for family in self.added_routes.clone() {
            let _ = self.rtnl.del_local_default(family, TABLE);
            let prefsrc = (IpFamily::of(child) == family).then_some(child);
            if let Err(e) = self.rtnl.add_local_default(family, TABLE, prefsrc) {
                tracing::warn!(error = %e, "re-adding the local route after reload");
                self.added_routes.retain(|f| *f != family);
                self.families.retain(|f| *f != family);
            }
        }
        if let Err(e) = self.add_udp_rules(child) {
            tracing::warn!(error = %e, "UDP source addresses not kept after reload");
        }
    }
}

impl Drop for SourceIp {
    fn drop(&mut self) {
        self.remove_udp_rules();
        for r in std::mem::take(&mut self.added_rules) {
            let _ = self.rtnl.del_rule(&r);
        }
        for f in std::mem::take(&mut self.added_routes) {
            let _ = self.rtnl.del_local_default(f, TABLE);
        }
        if let Some(v) = self.restore_fwmark_accept.take() {
            let _ = std::fs::write(FWMARK_ACCEPT, v);
        }
    }
}

fn usable_child(child_ip: Option<IpAddr>) -> Result<IpAddr, String> {
    match child_ip {
        None => Err("no child IP (connections go to the container's loopback)".into()),
        Some(ip) if ip.is_loopback() => Err(format!("child IP {ip} is a loopback address")),
        Some(ip) => Ok(ip),
    }
}

/// The address to connect from for a client, if its address can be kept: same family
/// as the target, neither loopback nor unspecified, and set up for that family.
pub(crate) fn source_for(
    families: &[IpFamily],
    client: SocketAddr,
    target: SocketAddr,
) -> Option<SocketAddr> {
    let ip = match client.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let fam = IpFamily::of(ip);
    if fam != IpFamily::of(target.ip())
        || !families.contains(&fam)
        || ip.is_loopback()
        || ip.is_unspecified()
        || target.ip().is_loopback()
    {
        return None;
    }
    Some(SocketAddr::new(ip, client.port()))
}

/// A socket bound to `source` (not an address of this netns) for `target`.
pub(crate) fn transparent_socket(
    source: SocketAddr,
    ty: socket2::Type,
    mark: bool,
) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(source), ty, None)?;
    s.set_nonblocking(true)?;
    s.set_reuse_address(true)?;
    match source {
        SocketAddr::V4(_) => s.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => s.set_ip_transparent_v6(true)?,
    }
    if mark {
        s.set_mark(MARK)?;
    }
    s.bind(&source.into())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_clients_keep_their_address() {
        let both = [IpFamily::V4, IpFamily::V6];
        let t4: SocketAddr = "10.0.2.100:80".parse().unwrap();
        let t6: SocketAddr = "[fd00::100]:80".parse().unwrap();
        let c4: SocketAddr = "192.0.2.2:5555".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.2]:5555".parse().unwrap();
        let c6: SocketAddr = "[2001:db8::2]:5555".parse().unwrap();
        assert_eq!(source_for(&both, c4, t4), Some(c4));
        assert_eq!(source_for(&both, mapped, t4), Some(c4));
        assert_eq!(source_for(&both, c6, t6), Some(c6));
        assert_eq!(source_for(&both, c6, t4), None, "family mismatch");
        assert_eq!(source_for(&both, c4, t6), None);
        assert_eq!(source_for(&[IpFamily::V4], c6, t6), None, "IPv6 not set up");
        assert_eq!(
            source_for(&both, "127.0.0.1:5".parse().unwrap(), t4),
            None,
            "loopback client"
        );
        assert_eq!(
            source_for(&both, "[::ffff:127.0.0.1]:5".parse().unwrap(), t4),
            None
        );
        assert_eq!(source_for(&both, "[::1]:5".parse().unwrap(), t6), None);
        assert_eq!(
            source_for(&both, c4, "127.0.0.1:80".parse().unwrap()),
            None,
            "loopback target"
        );
    }
}
