//! Keeping the client's address: inside the container netns, connections and UDP flows
//! to the container are made from transparent sockets bound to the real client address
//! and port, and policy routing brings the container's replies of *those* connections
//! and flows back to them. Nothing else in the netns changes its route.
//!
//! # What each helper puts into the netns
//!
//! Every helper owns a slot: a number derived from its container ID (FNV-1a, probing
//! on collision), giving its own routing table and socket mark `TABLE_BASE + slot`.
//! - The table holds one route per family, `local default dev lo src CHILD_IP`: what
//!   is sent to it is delivered locally, to our transparent sockets.
//! - TCP: our sockets carry the helper's mark; with `net.ipv4.tcp_fwmark_accept=1` the
//!   container's accepted socket inherits it, and one rule `fwmark MARK lookup TABLE`
//!   per family diverts the packets of that connection alone. The container's other
//!   connections, siblings' connections and other helpers' (other mark) are untouched.
//! - UDP has no such inheritance, so each kept flow gets one exact rule, added before its
//!   first datagram is forwarded and removed with the flow: `to CLIENT ipproto udp sport
//!   CONTAINER_PORT dport CLIENT_PORT lookup TABLE`. Only the container's datagrams on
//!   that one 4-tuple (its replies to that client) are diverted; a sibling's query, a
//!   peer the container starts talking to from its published port, or its own lookups
//!   from a published range keep their normal route.
//!
//! # Ownership, death and sharing
//!
//! The owner of a slot holds an abstract unix socket named after it in the container
//! netns (`@rootless-net/rootlessport/<table>`); the kernel frees the name when the
//! helper dies, `kill -9` included. A helper starting or exiting takes the netns-wide
//! lock (another abstract name), removes every rule and route of a table in our range
//! whose owner name is free (a dead helper's), and only then adds or removes its own.
//! `tcp_fwmark_accept` is shared by all helpers in a netns: the first one that finds it
//! 0 sets it to 1 and adds a marker rule (`fwmark M lookup M` on an empty table, which
//! routes nothing) recording that it was 0; the last helper to leave (no live owner
//! left) writes 0 back and removes the marker. A value of 1 found without the marker
//! was set by someone else and is never changed.
//!
//! # Checked, with a fallback
//!
//! After adding a rule the helper reads the rules back. A kernel that stores less than
//! asked (before 4.17, `FRA_IP_PROTO` and the port ranges are ignored, which would
//! turn a flow rule into a catch-all for the client's host) is detected with a probe
//! rule on an empty table at start; the helper then keeps UDP client addresses off (one
//! warning line) and never adds a flow rule. Any failure to set up leaves the netns as
//! it was and forwards as podman's helper does (the container sees the child IP's side).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::netlink::{DumpedRule, IpFamily, Rtnl, Rule};

/// First table (and mark) of the range our helpers use: "RLP" and 0x5000.
pub const TABLE_BASE: u32 = 0x524c_5000;
/// Slots in the range: at most this many helpers keep addresses in one netns.
pub const SLOTS: u32 = 4096;
/// The marker's table and mark (just below the range; nothing is ever routed by it).
pub const MARKER: u32 = TABLE_BASE - 1;
/// The probe rule's table (empty: a probe rule routes nothing, whatever was stored).
const PROBE_TABLE: u32 = TABLE_BASE - 2;
/// The marker's and the probe's rule priority (before every helper's band).
pub const PRIORITY: u32 = 99;
/// Each slot's rules sit in a band of 4 priorities from `BAND_BASE + 4 * slot`
/// (all before the main table's rule, 32766): UDP gates, the skip, UDP flows, TCP.
pub const BAND_BASE: u32 = 100;
const BAND: u32 = 4;
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// How long to wait for another helper's setup or teardown in the same netns.
const LOCK_WAIT: Duration = Duration::from_secs(5);

fn owner_name(table: u32) -> String {
    format!("rootless-net/rootlessport/{table:08x}")
}

/// Bind an abstract unix socket in the calling thread's netns: `Ok(None)` when the
/// name is taken.
fn claim(name: &str) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new_abstract(name.as_bytes())?;
    match bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => Ok(Some(fd)),
        Err(nix::errno::Errno::EADDRINUSE) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The netns-wide lock: held while a helper sets up or tears down.
struct NetnsLock(#[allow(dead_code)] OwnedFd);

impl NetnsLock {
    fn take() -> Result<NetnsLock, String> {
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match claim("rootless-net/rootlessport/lock") {
                Ok(Some(fd)) => return Ok(NetnsLock(fd)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => return Err("another helper holds the netns lock".into()),
                Err(e) => return Err(format!("netns lock: {e}")),
            }
        }
    }
}

/// FNV-1a: stable across builds and processes, so a restarted container gets its
/// slot back (and finds its own leftovers first).
fn slot_hash(container_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in container_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SLOTS
}

/// The rule priorities of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Band {
    slot: u32,
}

impl Band {
    /// `ipproto udp sport A-B goto FLOWS`, one per published UDP range.
    fn gates(self) -> u32 {
        BAND_BASE + BAND * self.slot
    }
    /// `goto TCP`: what no gate let in skips the flow rules.
    fn skip(self) -> u32 {
        self.gates() + 1
    }
    /// One exact rule per kept UDP flow.
    fn flows(self) -> u32 {
        self.gates() + 2
    }
    /// `fwmark MARK lookup TABLE`; also the skip's target.
    fn tcp(self) -> u32 {
        self.gates() + 3
    }
    fn table(self) -> u32 {
        TABLE_BASE + self.slot
    }
    fn contains(self, priority: u32) -> bool {
        (self.gates()..=self.tcp()).contains(&priority)
    }

    /// The slot a dumped rule belongs to: its priority is in that slot's band and it
    /// looks up that slot's table or jumps inside the band (a rule someone else put
    /// at such a priority is never taken for ours).
    fn owning(rule: &Rule) -> Option<Band> {
        let slot = rule.priority.checked_sub(BAND_BASE)? / BAND;
        let band = Band { slot };
        (slot < SLOTS
            && (rule.table == band.table() || rule.goto.is_some_and(|g| band.contains(g))))
        .then_some(band)
    }
}

/// The routing state one helper owns in the container netns.
pub(crate) struct SourceIp {
    rtnl: Rtnl,
    band: Band,
    /// Our table, also the mark of our TCP sockets.
    table: u32,
    _owner: OwnedFd,
    families: Vec<IpFamily>,
    /// The family whose UDP flows keep addresses (gates and exact rules stored as
    /// asked), if any.
    udp: Option<IpFamily>,
    udp_ranges: Vec<(u16, u16)>,
    child: IpAddr,
    /// Kept UDP flows (client, container port), each with its rule.
    flows: HashSet<(SocketAddr, u16)>,
}

impl SourceIp {
    /// Set it up from a thread inside the container netns.
    ///
    /// # Errors
    /// Why addresses cannot be kept (the netns is left as it was).
    /// `udp_ranges` are the container port ranges published for UDP.
    pub fn setup(
        container_id: &str,
        child_ip: Option<IpAddr>,
        udp_ranges: Vec<(u16, u16)>,
    ) -> Result<SourceIp, String> {
        let child = usable_child(child_ip)?;
        let rtnl = Rtnl::open().map_err(|e| format!("netlink: {e}"))?;
        let lock = NetnsLock::take()?;
        let first = slot_hash(container_id);
        let (table, owner) = (0..SLOTS)
            .map(|i| TABLE_BASE + (first + i) % SLOTS)
            .find_map(|t| match claim(&owner_name(t)) {
                Ok(Some(fd)) => Some(Ok((t, fd))),
                Ok(None) => None,
                Err(e) => Some(Err(format!("owner socket: {e}"))),
            })
            .unwrap_or_else(|| Err(format!("all {SLOTS} slots of this netns are taken")))?;
        let mut s = SourceIp {
            rtnl,
            band: Band {
                slot: table - TABLE_BASE,
            },
            table,
            _owner: owner,
            families: Vec::new(),
            udp: None,
            udp_ranges,
            child,
            flows: HashSet::new(),
        };
        s.remove_dead();
        let result = s.add_all();
        drop(lock);
        // On failure, dropping `s` removes what was added (under the lock again).
        result.map(|()| s)
    }

    fn add_all(&mut self) -> Result<(), String> {
        self.enable_fwmark_accept()?;
        for family in [IpFamily::V4, IpFamily::V6] {
            let prefsrc = (IpFamily::of(self.child) == family).then_some(self.child);
            match self.add_family(family, prefsrc) {
                Ok(()) => self.families.push(family),
                // No IPv6 in the container is fine; no IPv4 support is not.
                Err(e) if family == IpFamily::V6 => {
                    tracing::debug!(error = %e, "no IPv6 client-address keeping");
                }
                Err(e) => return Err(e),
            }
        }
        if !self.udp_ranges.is_empty() {
            match self.add_udp_gates() {
                Ok(()) => self.udp = Some(IpFamily::of(self.child)),
                Err(why) => {
                    tracing::warn!(
                        "UDP client addresses are not kept (the container sees the child IP's side): {why}"
                    );
                    self.remove_rules_at(&[self.band.gates(), self.band.skip()]);
                }
            }
        }
        Ok(())
    }

    fn add_family(&mut self, family: IpFamily, prefsrc: Option<IpAddr>) -> Result<(), String> {
        self.rtnl
            .add_local_default(family, self.table, prefsrc)
            .map_err(|e| format!("adding the local route of table {}: {e}", self.table))?;
        let rule = Rule {
            fwmark: Some((self.table, u32::MAX)),
            ..Rule::to_table(family, self.band.tcp(), self.table)
        };
        self.rtnl
            .add_rule(&rule)
            .map_err(|e| format!("adding the fwmark rule: {e}"))?;
        self.check_stored(&rule)
            .map_err(|e| format!("the fwmark rule: {e}"))
    }

    /// Read the rules back: the kernel must have stored `rule` as asked.
    fn check_stored(&mut self, rule: &Rule) -> Result<(), String> {
        let dumped = self
            .rtnl
            .rules(rule.family)
            .map_err(|e| format!("reading the rules back: {e}"))?;
        if dumped.iter().any(|d| d.rule.as_ref() == Some(rule)) {
            return Ok(());
        }
        // What was stored instead goes (same priority, same table or jump).
        for d in &dumped {
            let same = d.rule.as_ref().is_some_and(|r| {
                r.priority == rule.priority && r.table == rule.table && r.goto == rule.goto
            });
            if same {
                let _ = self.rtnl.del_dumped_rule(d);
            }
        }
        Err("the kernel stored a different rule than asked (kernel too old?)".into())
    }

    /// Add and read back an exact flow rule on an empty table: if the kernel ignores
    /// a match, the stored rule differs (and, on an empty table, still routes nothing).
    fn probe_udp_rules(&mut self) -> Result<(), String> {
        let family = IpFamily::of(self.child);
        if !self.families.contains(&family) {
            return Err(format!("no {family:?} routing set up"));
        }
        let dst = match family {
            IpFamily::V4 => IpAddr::from([192, 0, 2, 255]),
            IpFamily::V6 => IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xffff]),
        };
        let probe = Rule {
            priority: PRIORITY,
            ..flow_rule(PROBE_TABLE, 0, SocketAddr::new(dst, 1), 1)
        };
        match self.rtnl.add_rule(&probe) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("the kernel refused a port-matching rule: {e}")),
        }
        let stored = self.check_stored(&probe);
        let _ = self.rtnl.del_rule(&probe);
        stored
    }

    /// The gates in front of the flow rules: a packet of the child's family goes on
    /// to them only when it is UDP from a published container port; everything else
    /// skips them (so thousands of flows cost other traffic nothing).
    fn add_udp_gates(&mut self) -> Result<(), String> {
        self.probe_udp_rules()?;
        let family = IpFamily::of(self.child);
        for &(a, b) in &self.udp_ranges.clone() {
            let gate = Rule {
                goto: Some(self.band.flows()),
                ip_proto: Some(libc::IPPROTO_UDP as u8),
                sport: Some((a, b)),
                ..Rule::to_table(family, self.band.gates(), 0)
            };
            self.rtnl
                .add_rule(&gate)
                .map_err(|e| format!("adding the UDP gate for ports {a}-{b}: {e}"))?;
            self.check_stored(&gate)?;
        }
        let skip = Rule {
            goto: Some(self.band.tcp()),
            ..Rule::to_table(family, self.band.skip(), 0)
        };
        self.rtnl
            .add_rule(&skip)
            .map_err(|e| format!("adding the UDP skip rule: {e}"))?;
        self.check_stored(&skip)
    }

    /// Remove every rule of ours at these priorities.
    fn remove_rules_at(&mut self, priorities: &[u32]) {
        for f in [IpFamily::V4, IpFamily::V6] {
            for d in self.rtnl.rules(f).unwrap_or_default() {
                let mine = d.rule.as_ref().is_some_and(|r| {
                    priorities.contains(&r.priority) && Band::owning(r) == Some(self.band)
                });
                if mine {
                    let _ = self.rtnl.del_dumped_rule(&d);
                }
            }
        }
    }

    /// Set `tcp_fwmark_accept`, recording with the marker that it was 0.
    fn enable_fwmark_accept(&mut self) -> Result<(), String> {
        let current =
            std::fs::read_to_string(FWMARK_ACCEPT).map_err(|e| format!("{FWMARK_ACCEPT}: {e}"))?;
        if current.trim() != "0" {
            return Ok(());
        }
        match self.rtnl.add_rule(&marker()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("adding the marker rule: {e}")),
        }
        if let Err(e) = std::fs::write(FWMARK_ACCEPT, "1") {
            let _ = self.restore_fwmark_accept_if_last();
            return Err(format!("{FWMARK_ACCEPT}: {e}"));
        }
        Ok(())
    }

    /// Remove what dead helpers left: every rule and route of a slot whose owner
    /// name is free. Our own slot's leftovers (a previous owner of it died) go too.
    /// Returns whether a live helper other than us remains.
    fn remove_dead(&mut self) -> bool {
        let mut rules: Vec<(Band, DumpedRule)> = Vec::new();
        let mut routes = Vec::new();
        for f in [IpFamily::V4, IpFamily::V6] {
            for d in self.rtnl.rules(f).unwrap_or_default() {
                if let Some(band) = d.rule.as_ref().and_then(Band::owning) {
                    rules.push((band, d));
                }
            }
            routes.extend(
                self.rtnl
                    .routes_in(f, |t| (TABLE_BASE..TABLE_BASE + SLOTS).contains(&t))
                    .unwrap_or_default(),
            );
        }
        let mut slots: Vec<u32> = rules
            .iter()
            .map(|(b, _)| b.slot)
            .chain(routes.iter().map(|r| r.table - TABLE_BASE))
            .collect();
        slots.sort_unstable();
        slots.dedup();
        let mut others_alive = false;
        for slot in slots {
            let band = Band { slot };
            let dead = band == self.band
                || match claim(&owner_name(band.table())) {
                    Ok(Some(_probe)) => true, // freed again when _probe drops
                    Ok(None) => {
                        others_alive = true;
                        false
                    }
                    Err(_) => false,
                };
            if dead {
                if band != self.band {
                    tracing::info!(table = band.table(), "removing what a dead helper left");
                }
                for (_, d) in rules.iter().filter(|(b, _)| *b == band) {
                    let _ = self.rtnl.del_dumped_rule(d);
                }
                for r in routes.iter().filter(|r| r.table == band.table()) {
                    let _ = self.rtnl.del_route(r);
                }
            }
        }
        others_alive
    }

    /// The last helper out writes back the 0 recorded by the marker.
    fn restore_fwmark_accept_if_last(&mut self) -> bool {
        if self.remove_dead() {
            return false;
        }
        let has_marker = self
            .rtnl
            .rules(IpFamily::V4)
            .unwrap_or_default()
            .iter()
            .any(|d| d.rule.as_ref() == Some(&marker()));
        if has_marker {
            let _ = std::fs::write(FWMARK_ACCEPT, "0");
            let _ = self.rtnl.del_rule(&marker());
        }
        true
    }

    /// Remove our own rules (flows included) and routes, then the marker if we are
    /// the last; the caller holds the lock.
    fn teardown_locked(&mut self) {
        // Our slot counts as dead here: everything of it goes.
        self.flows.clear();
        self.restore_fwmark_accept_if_last();
    }

    /// Whether connections of this family can keep their source address.
    pub fn supports(&self, family: IpFamily) -> bool {
        self.families.contains(&family)
    }

    /// Whether UDP flows of this family can keep their source address.
    pub fn supports_udp(&self, family: IpFamily) -> bool {
        self.udp == Some(family) && self.supports(family)
    }

    /// The mark our TCP sockets carry.
    pub fn mark(&self) -> u32 {
        self.table
    }

    /// Divert the container's replies on one UDP flow (client <-> container port)
    /// to our socket bound to `client`. `false`: the flow must use an ordinary socket
    /// (the same pair is kept already, e.g. two published ports to one container port,
    /// or the rule could not be added).
    pub fn add_udp_flow(&mut self, client: SocketAddr, container_port: u16) -> bool {
        if !self.supports_udp(IpFamily::of(client.ip()))
            || self.flows.contains(&(client, container_port))
        {
            return false;
        }
        let rule = flow_rule(self.table, self.band.flows(), client, container_port);
        match self.rtnl.add_rule(&rule) {
            Ok(()) => {
                self.flows.insert((client, container_port));
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, %client, "UDP flow rule not added");
                false
            }
        }
    }

    /// The flow ended: its rule goes.
    pub fn remove_udp_flow(&mut self, client: SocketAddr, container_port: u16) {
        if self.flows.remove(&(client, container_port)) {
            let rule = flow_rule(self.table, self.band.flows(), client, container_port);
            let _ = self.rtnl.del_rule(&rule);
        }
    }

    /// The child IP changed: the routes take it as preferred source. (UDP flows to the
    /// old target are dropped by their ports as their next datagram arrives.)
    pub fn reload(&mut self, child_ip: Option<IpAddr>) {
        let child = match usable_child(child_ip) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "client addresses not kept after reload");
                self.families.clear();
                self.udp = None;
                return;
            }
        };
        self.child = child;
        if self.udp.is_some_and(|f| f != IpFamily::of(child)) {
            tracing::warn!("UDP client addresses not kept after a reload to another family");
            self.udp = None;
        }
        for family in self.families.clone() {
            let _ = self.rtnl.del_local_default(family, self.table);
            let prefsrc = (IpFamily::of(child) == family).then_some(child);
            if let Err(e) = self.rtnl.add_local_default(family, self.table, prefsrc) {
                tracing::warn!(error = %e, "re-adding the local route after reload");
                self.families.retain(|f| *f != family);
            }
        }
    }
}

impl Drop for SourceIp {
    fn drop(&mut self) {
        // Without the lock (another helper stuck mid-setup) we still remove our own.
        let lock = NetnsLock::take();
        if let Err(e) = &lock {
            tracing::warn!(error = %e, "tearing down without the netns lock");
        }
        self.teardown_locked();
        drop(lock);
    }
}

/// `fwmark MARKER lookup MARKER`: an empty table, so it routes nothing.
fn marker() -> Rule {
    Rule {
        fwmark: Some((MARKER, u32::MAX)),
        ..Rule::to_table(IpFamily::V4, PRIORITY, MARKER)
    }
}

/// `to CLIENT ipproto udp sport CONTAINER_PORT dport CLIENT_PORT lookup TABLE`.
fn flow_rule(table: u32, priority: u32, client: SocketAddr, container_port: u16) -> Rule {
    Rule {
        dst: Some(client.ip()),
        ip_proto: Some(libc::IPPROTO_UDP as u8),
        sport: Some((container_port, container_port)),
        dport: Some((client.port(), client.port())),
        ..Rule::to_table(IpFamily::of(client.ip()), priority, table)
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

/// A socket bound to `source` (not an address of this netns) for a connection or
/// flow to the container; `mark` for TCP, so that the container's accepted socket
/// inherits it.
pub(crate) fn transparent_socket(
    source: SocketAddr,
    ty: socket2::Type,
    mark: Option<u32>,
) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(source), ty, None)?;
    s.set_nonblocking(true)?;
    s.set_reuse_address(true)?;
    match source {
        SocketAddr::V4(_) => s.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => s.set_ip_transparent_v6(true)?,
    }
    if let Some(mark) = mark {
        s.set_mark(mark)?;
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

    #[test]
    fn slots_are_stable_and_in_range() {
        assert_eq!(slot_hash("abc"), slot_hash("abc"));
        assert_ne!(slot_hash("abc"), slot_hash("abd"));
        for id in [
            "",
            "x",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(slot_hash(id) < SLOTS);
        }
    }

    #[test]
    fn bands_own_only_their_own_rules() {
        let band = Band { slot: 7 };
        assert_eq!(band.gates(), 128);
        assert_eq!(band.tcp(), 131);
        let tcp = Rule {
            fwmark: Some((band.table(), u32::MAX)),
            ..Rule::to_table(IpFamily::V4, band.tcp(), band.table())
        };
        assert_eq!(Band::owning(&tcp), Some(band));
        let skip = Rule {
            goto: Some(band.tcp()),
            ..Rule::to_table(IpFamily::V4, band.skip(), 0)
        };
        assert_eq!(Band::owning(&skip), Some(band));
        let flow = flow_rule(
            band.table(),
            band.flows(),
            "192.0.2.2:5".parse().unwrap(),
            53,
        );
        assert_eq!(Band::owning(&flow), Some(band));
        // Someone else's rules at a priority inside a band are not ours.
        assert_eq!(Band::owning(&Rule::to_table(IpFamily::V4, 130, 254)), None);
        let foreign_goto = Rule {
            goto: Some(32000),
            ..Rule::to_table(IpFamily::V4, 129, 0)
        };
        assert_eq!(Band::owning(&foreign_goto), None);
        // Another slot's table at our priority is not ours either.
        assert_eq!(
            Band::owning(&Rule::to_table(IpFamily::V4, 131, TABLE_BASE + 8)),
            None
        );
        assert_eq!(
            Band::owning(&Rule::to_table(IpFamily::V4, 99, MARKER)),
            None
        );
        // The last band ends before the main table's rule.
        assert!(Band { slot: SLOTS - 1 }.tcp() < 32766);
    }

    #[test]
    fn a_flow_rule_names_one_4_tuple() {
        let c: SocketAddr = "192.0.2.2:40000".parse().unwrap();
        let r = flow_rule(TABLE_BASE + 3, 114, c, 53);
        assert_eq!(r.dst, Some(c.ip()));
        assert_eq!(r.sport, Some((53, 53)));
        assert_eq!(r.dport, Some((40000, 40000)));
        assert_eq!(r.ip_proto, Some(17));
        assert_eq!(r.family, IpFamily::V4);
        assert_eq!(r.fwmark, None);
    }
}
