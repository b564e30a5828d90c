//! The policy-routing requests the client-address keeping needs (rules, and the one
//! route of our own tables), as typed values over `netlink-packet-route`. Works on the
//! netns the socket was made in (the calling thread's at [`Rtnl::open`]).

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{
    RuleAction, RuleAttribute, RuleHeader, RuleMessage, RulePortRange,
};
use netlink_packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A policy-routing rule: `[to DST] [fwmark M/MASK] [ipproto P] [sport A-B] [dport
/// C-D] lookup TABLE priority PRIO` (or `goto PRIO2` instead of the lookup, when `goto`
/// is set; `table` is then 0). `dst` is a single host (/32 or /128).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Rule {
    pub family: IpFamily,
    pub priority: u32,
    pub table: u32,
    pub goto: Option<u32>,
    pub dst: Option<IpAddr>,
    pub fwmark: Option<(u32, u32)>,
    pub ip_proto: Option<u8>,
    pub sport: Option<(u16, u16)>,
    pub dport: Option<(u16, u16)>,
}

impl Rule {
    /// A rule sending what matches nothing else of it to `table`.
    pub fn to_table(family: IpFamily, priority: u32, table: u32) -> Rule {
        Rule {
            family,
            priority,
            table,
            goto: None,
            dst: None,
            fwmark: None,
            ip_proto: None,
            sport: None,
            dport: None,
        }
    }

    fn message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header = RuleHeader {
            family: self.family.af(),
            dst_len: match self.dst {
                Some(IpAddr::V4(_)) => 32,
                Some(IpAddr::V6(_)) => 128,
                None => 0,
            },
            action: if self.goto.is_some() {
                RuleAction::Goto
            } else {
                RuleAction::ToTable
            },
            ..Default::default()
        };
        let a = &mut m.attributes;
        match self.goto {
            Some(target) => a.push(RuleAttribute::Goto(target)),
            None => a.push(RuleAttribute::Table(self.table)),
        }
        a.push(RuleAttribute::Priority(self.priority));
        if let Some(dst) = self.dst {
            a.push(RuleAttribute::Destination(dst));
        }
        if let Some((mark, mask)) = self.fwmark {
            a.push(RuleAttribute::FwMark(mark));
            a.push(RuleAttribute::FwMask(mask));
        }
        if let Some(p) = self.ip_proto {
            a.push(RuleAttribute::IpProtocol(IpProtocol::from(p)));
        }
        if let Some((start, end)) = self.sport {
            a.push(RuleAttribute::SourcePortRange(RulePortRange { start, end }));
        }
        if let Some((start, end)) = self.dport {
            a.push(RuleAttribute::DestinationPortRange(RulePortRange {
                start,
                end,
            }));
        }
        m
    }

    /// The rule as the kernel stored it (from a dump), in our terms. Attributes we
    /// never set are ignored here; `from_message(m.message()) == self` for every rule
    /// we make, so a kernel that dropped one of ours shows as a difference.
    pub fn from_message(m: &RuleMessage) -> Option<Rule> {
        let family = match m.header.family {
            AddressFamily::Inet => IpFamily::V4,
            AddressFamily::Inet6 => IpFamily::V6,
            _ => return None,
        };
        let mut r = match m.header.action {
            RuleAction::ToTable => Rule::to_table(family, 0, u32::from(m.header.table)),
            RuleAction::Goto => Rule::to_table(family, 0, 0),
            _ => return None,
        };
        let (mut mark, mut mask) = (None, None);
        for a in &m.attributes {
            match a {
                RuleAttribute::Table(t)
                    if r.goto.is_none() && m.header.action == RuleAction::ToTable =>
                {
                    r.table = *t
                }
                RuleAttribute::Goto(t) => r.goto = Some(*t),
                RuleAttribute::Priority(p) => r.priority = *p,
                RuleAttribute::Destination(d) => r.dst = Some(*d),
                RuleAttribute::FwMark(v) => mark = Some(*v),
                RuleAttribute::FwMask(v) => mask = Some(*v),
                RuleAttribute::IpProtocol(p) => r.ip_proto = Some(u8::from(*p)),
                RuleAttribute::SourcePortRange(p) => r.sport = Some((p.start, p.end)),
                RuleAttribute::DestinationPortRange(p) => r.dport = Some((p.start, p.end)),
                _ => {}
            }
        }
        if let Some(mark) = mark {
            r.fwmark = Some((mark, mask.unwrap_or(u32::MAX)));
        }
        let full = match r.dst {
            Some(IpAddr::V4(_)) => 32,
            Some(IpAddr::V6(_)) => 128,
            None => 0,
        };
        if m.header.dst_len != full {
            // A prefix rather than one host: not one of ours.
            r.dst = None;
            r.table = u32::MAX;
        }
        Some(r)
    }
}

/// IPv4 or IPv6, for requests that take a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn af(self) -> AddressFamily {
        match self {
            IpFamily::V4 => AddressFamily::Inet,
            IpFamily::V6 => AddressFamily::Inet6,
        }
    }

    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// A route in one of our tables, as dumped: enough to delete it again.
#[derive(Debug, Clone)]
pub(crate) struct TableRoute {
    pub table: u32,
    message: RouteMessage,
}

/// A dumped rule: our view of it, and the message to delete it with.
#[derive(Debug, Clone)]
pub(crate) struct DumpedRule {
    pub rule: Option<Rule>,
    message: RuleMessage,
}

impl DumpedRule {
    fn from_message(message: RuleMessage) -> DumpedRule {
        DumpedRule {
            rule: Rule::from_message(&message),
            message,
        }
    }

    /// How a dump shows `rule` once the kernel stored it as it is (for test doubles:
    /// our view goes through the same message round trip as a real dump).
    #[cfg(test)]
    pub fn stored(rule: &Rule) -> DumpedRule {
        DumpedRule::from_message(rule.message())
    }
}

#[cfg(test)]
impl TableRoute {
    /// How a dump shows `local default dev lo table TABLE [src PREFSRC]` (for test
    /// doubles; `lo` as index 1).
    pub fn local_default(family: IpFamily, table: u32, prefsrc: Option<IpAddr>) -> TableRoute {
        TableRoute {
            table,
            message: local_default(family, table, prefsrc, 1),
        }
    }

    /// The route's family (`None`: neither IPv4 nor IPv6).
    pub fn family(&self) -> Option<IpFamily> {
        match self.message.header.address_family {
            AddressFamily::Inet => Some(IpFamily::V4),
            AddressFamily::Inet6 => Some(IpFamily::V6),
            _ => None,
        }
    }
}

/// The message of `local default dev OIF table TABLE [src PREFSRC]`.
fn local_default(family: IpFamily, table: u32, prefsrc: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = RouteHeader {
        address_family: family.af(),
        table: RouteHeader::RT_TABLE_UNSPEC,
        protocol: RouteProtocol::Static,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..Default::default()
    };
    m.attributes.push(RouteAttribute::Table(table));
    m.attributes.push(RouteAttribute::Oif(oif));
    if let Some(src) = prefsrc {
        m.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
    }
    m
}

/// A NETLINK_ROUTE socket in the netns it was made in; requests are synchronous.
pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    /// # Errors
    /// The socket cannot be made or bound.
    pub fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // A kernel that never answers must not hang the helper.
        let tv = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
        Ok(Rtnl { sock, seq: 1 })
    }

    /// Send one request; with `dump`, collect every reply message until DONE,
    /// otherwise wait for the acknowledgement.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = loop {
                match self.sock.recv(&mut &mut rbuf[..], 0) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::Done(_) if dump => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, msg: RouteNetlinkMessage, extra: u16) -> io::Result<()> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK | extra)
            .map(drop)
    }

    /// # Errors
    /// The kernel's answer: `EEXIST` for a rule already there, `EPERM` without
    /// `CAP_NET_ADMIN` over the netns, `EAFNOSUPPORT` without IPv6.
    pub fn add_rule(&mut self, r: &Rule) -> io::Result<()> {
        self.ack(
            RouteNetlinkMessage::NewRule(r.message()),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Like [`Rtnl::add_rule`] without `NLM_F_EXCL`: the kernel skips its walk over
    /// every rule looking for a duplicate.
    ///
    /// # Errors
    /// As [`Rtnl::add_rule`], without `EEXIST`.
    pub fn append_rule(&mut self, r: &Rule) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::NewRule(r.message()), NLM_F_CREATE)
    }

    /// # Errors
    /// The kernel's answer (`ENOENT` for a rule that is not there).
    pub fn del_rule(&mut self, r: &Rule) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::DelRule(r.message()), 0)
    }

    /// Delete a rule exactly as it was dumped.
    pub fn del_dumped_rule(&mut self, r: &DumpedRule) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::DelRule(r.message.clone()), 0)
    }

    /// Every rule of `family` in this netns.
    pub fn rules(&mut self, family: IpFamily) -> io::Result<Vec<DumpedRule>> {
        let mut m = RuleMessage::default();
        m.header.family = family.af();
        let replies = self.exchange(RouteNetlinkMessage::GetRule(m), NLM_F_REQUEST | NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRule(m) => Some(m),
                _ => None,
            })
            .map(DumpedRule::from_message)
            .collect())
    }

    /// Every route of `family` in every table whose number `keep` accepts.
    pub fn routes_in(
        &mut self,
        family: IpFamily,
        keep: impl Fn(u32) -> bool,
    ) -> io::Result<Vec<TableRoute>> {
        let mut m = RouteMessage::default();
        m.header.address_family = family.af();
        let replies =
            self.exchange(RouteNetlinkMessage::GetRoute(m), NLM_F_REQUEST | NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(m) => Some(m),
                _ => None,
            })
            .filter_map(|m| {
                let table = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                keep(table).then_some(TableRoute { table, message: m })
            })
            .collect())
    }

    /// Delete a route exactly as it was dumped.
    pub fn del_route(&mut self, r: &TableRoute) -> io::Result<()> {
        self.ack(RouteNetlinkMessage::DelRoute(r.message.clone()), 0)
    }

    fn local_default(
        family: IpFamily,
        table: u32,
        prefsrc: Option<IpAddr>,
    ) -> io::Result<RouteMessage> {
        let oif = nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)?;
        Ok(local_default(family, table, prefsrc, oif))
    }

    /// `local default dev lo table TABLE [src PREFSRC]`: everything routed by that
    /// table is delivered locally; an unbound socket replying through it speaks from
    /// PREFSRC.
    ///
    /// # Errors
    /// The kernel's answer (`EEXIST` when the table has a default route already).
    pub fn add_local_default(
        &mut self,
        family: IpFamily,
        table: u32,
        prefsrc: Option<IpAddr>,
    ) -> io::Result<()> {
        let m = Self::local_default(family, table, prefsrc)?;
        self.ack(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// # Errors
    /// The kernel's answer (`ESRCH` when there is no such route).
    pub fn del_local_default(&mut self, family: IpFamily, table: u32) -> io::Result<()> {
        let m = Self::local_default(family, table, None)?;
        self.ack(RouteNetlinkMessage::DelRoute(m), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_flow() -> Rule {
        Rule {
            dst: Some("192.0.2.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
            ip_proto: Some(17),
            sport: Some((53, 53)),
            dport: Some((40000, 40000)),
            ..Rule::to_table(IpFamily::V4, 99, 0x524c_5001)
        }
    }

    #[test]
    fn rules_survive_the_round_trip_through_a_message() {
        let mut fw = Rule::to_table(IpFamily::V6, 99, 7);
        fw.fwmark = Some((7, u32::MAX));
        let mut gate = Rule::to_table(IpFamily::V4, 100, 0);
        gate.goto = Some(102);
        gate.ip_proto = Some(17);
        gate.sport = Some((53, 60));
        for r in [udp_flow(), fw, gate, Rule::to_table(IpFamily::V4, 1, 2)] {
            assert_eq!(Rule::from_message(&r.message()), Some(r));
        }
    }

    #[test]
    fn a_kernel_that_drops_match_attributes_shows_as_a_different_rule() {
        // What a kernel before 4.17 stores: it ignores FRA_IP_PROTO and the port
        // ranges, leaving `to 192.0.2.2 lookup TABLE`, a catch-all for that host.
        let asked = udp_flow();
        let mut m = asked.message();
        m.attributes.retain(|a| {
            !matches!(
                a,
                RuleAttribute::IpProtocol(_)
                    | RuleAttribute::SourcePortRange(_)
                    | RuleAttribute::DestinationPortRange(_)
            )
        });
        let stored = Rule::from_message(&m);
        assert_ne!(stored.as_ref(), Some(&asked));
        assert_eq!(stored.and_then(|s| s.dst), asked.dst);
    }
}
