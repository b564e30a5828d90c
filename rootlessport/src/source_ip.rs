//! Keeping the client's address: inside the container netns, connections and UDP flows
//! to the container are made from transparent sockets bound to the real client address
//! and port, and policy routing brings the container's replies of *those* connections
//! and flows back to them. Nothing else in the netns changes its route.
//!
//! # What each helper puts into the netns
//!
//! Every helper owns a slot: a number derived from its container ID (FNV-1a, probing
//! on collision), giving its own routing table and socket mark `TABLE_BASE + slot` and
//! its own band of rule priorities (see [`Band`]).
//! - The table holds one route per family, `local default dev lo src CHILD_IP`: what
//!   is sent to it is delivered locally, to our transparent sockets.
//! - TCP: our sockets carry the helper's mark; with `net.ipv4.tcp_fwmark_accept=1` the
//!   container's accepted socket inherits it, and one rule `fwmark MARK lookup TABLE`
//!   per family diverts the packets of that connection alone. With
//!   `net.ipv{4,6}.fwmark_reflect=1` the kernel's own answers to our packets (the RST
//!   of a closed port) carry it too, so a closed port resets at once.
//! - UDP has no such inheritance, so each kept flow gets one exact rule, added before its
//!   first datagram is forwarded and removed with the flow: `to CLIENT ipproto udp sport
//!   CONTAINER_PORT dport CLIENT_PORT lookup TABLE`. Only the container's datagrams on
//!   that one 4-tuple (its replies to that client) are diverted; a sibling's query, a
//!   peer the container starts talking to from its published port, or its own lookups
//!   from a published range keep their normal route.
//! - Every rule sits in the helper's band of priorities, before `main`; a band that
//!   holds a rule of anyone else is not taken, and every jump lands inside the band.
//!   Rules the container adds later without a priority land before ours (the kernel
//!   puts them just before the second rule, and their order must stay as it is), so a
//!   container that routes everything elsewhere by policy takes our replies with it.
//!
//! # Ownership, death and sharing
//!
//! The owner of a slot holds an abstract unix socket named after it in the container
//! netns (`@rootless-net/rootlessport/<table>`); the kernel frees the name when the
//! helper dies, `kill -9` included. A starting helper removes every rule and route of a
//! slot whose owner name is free (a dead helper's); a rule is only taken for ours when
//! it has exactly the shape we add. The sysctls are shared by all helpers in a netns:
//! under a netns-wide lock (another abstract name, held for a few system calls), the
//! first helper that finds one at 0 sets it to 1 and adds a marker rule for it (`fwmark
//! M lookup M` on an empty table, which routes nothing) recording that it was 0; the
//! last helper to leave (no other owner name taken) writes 0 back and removes the
//! marker. A 1 found without the marker was set by someone else and is never changed.
//! When in doubt (the lock not had within a second, an owner that cannot be probed),
//! a helper leaves the sysctls as they are rather than pull them from under another.
//!
//! # Checked, with a fallback
//!
//! After adding a rule the helper reads the rules back. A kernel that stores less than
//! asked (before 4.17, `FRA_IP_PROTO` and the port ranges are ignored, which would
//! turn a flow rule into a catch-all for the client's host) is detected with a probe
//! rule on an empty table at start; the helper then keeps UDP client addresses off (one
//! warning line) and never adds a flow rule. Any failure to set up leaves the netns as
//! it was and forwards as podman's helper does (the container sees the child IP's side).
//! The kernel refuses port ranges that start at 0 or end at 65535: UDP flows from
//! client port 65535 or to container port 65535 are forwarded without their address.
//!
//! # Tested without root
//!
//! Everything privileged goes through [`RoutingOps`] ([`crate::routing`]): the real
//! netns in the helper, an in-memory double in the unit tests below, which can also
//! behave like a 4.16 kernel, refuse IPv6 or everything, or fail the sysctl write. The
//! owner and lock sockets stay real there, under a name prefix of each test's own.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::netlink::{IpFamily, Rule};
use crate::routing::{NetnsRouting, RoutingOps, Sysctl};

/// First table (and mark) of the range our helpers use: "RLP" and 0x5000.
pub const TABLE_BASE: u32 = 0x524c_5000;
/// Slots in the range: at most this many helpers keep addresses in one netns (their
/// bands fill the priorities up to the main table's rule).
pub const SLOTS: u32 = 240;
/// The markers' tables and marks, one per [`Sysctl`] (just below the range; nothing
/// is ever routed by them).
pub const MARKERS: [u32; 3] = [TABLE_BASE - 1, TABLE_BASE - 3, TABLE_BASE - 4];
/// The probe rule's table (empty: a probe rule routes nothing, whatever was stored).
const PROBE_TABLE: u32 = TABLE_BASE - 2;
/// The markers' and the probe's priority: after `main` and `default` (32766, 32767),
/// where they route nothing and never change where the kernel puts a rule added
/// without a priority (just before the second rule).
pub const MARKER_PRIORITY: u32 = 99_999;
/// Each slot's band of [`BAND`] priorities starts at `BAND_BASE + BAND * slot`, all
/// before the main table's rule (32766).
pub const BAND_BASE: u32 = 100;
const BAND: u32 = 136;
/// Kept UDP flows are sorted into buckets by client port, 1,024 ports each, so that a
/// datagram from a published port walks the flow rules of one bucket, not all.
const BUCKETS: usize = 64;
const BUCKET_PORTS: u32 = 65536 / BUCKETS as u32;
/// How long to wait for the netns-wide lock, which others hold for a few system calls.
/// Short enough that readiness is never late for podman (it waits 3 s).
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// The abstract unix socket names of the helpers in one netns, under one prefix: each
/// slot's owner and the netns-wide lock.
#[derive(Debug, Clone)]
struct Names {
    prefix: Cow<'static, str>,
}

impl Names {
    /// What every helper uses.
    const REAL: Names = Names {
        prefix: Cow::Borrowed("rootless-net/rootlessport"),
    };

    /// A prefix of its own: unit tests share this process's netns for the names.
    #[cfg(test)]
    fn unique() -> Names {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Names {
            prefix: format!("rootless-net-test/{}/{n}", std::process::id()).into(),
        }
    }

    /// Held by the helper owning `table` while it lives.
    fn owner(&self, table: u32) -> String {
        format!("{}/{table:08x}", self.prefix)
    }

    fn lock(&self) -> String {
        format!("{}/lock", self.prefix)
    }
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

/// The netns-wide lock: held while a helper reads and changes the shared sysctls.
struct NetnsLock(#[allow(dead_code)] OwnedFd);

impl NetnsLock {
    fn take(names: &Names) -> Result<NetnsLock, String> {
        let deadline = Instant::now() + LOCK_WAIT;
        let name = names.lock();
        loop {
            match claim(&name) {
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

/// A port range the kernel accepts in a rule: it refuses a start of 0 and an end of
/// 65535 (`fib_rule_port_range_valid`).
fn rule_ports(first: u32, last: u32) -> Option<(u16, u16)> {
    let (a, b) = (first.max(1), last.min(65534));
    (a <= b).then_some((a as u16, b as u16))
}

/// One slot's band of rule priorities, per family:
///
/// | priority | rule | |
/// |---|---|---|
/// | +0 | `ipproto udp sport A-B goto +2` | one gate per published UDP range |
/// | +1 | `goto TCP` | what no gate let in skips every flow rule |
/// | +2 | `ipproto udp dport P-Q goto +4+2b` | one per bucket holding flows |
/// | +3 | `goto TCP` | a client port whose bucket is empty |
/// | +4+2b | `to CLIENT ipproto udp sport S dport D lookup TABLE` | the flows of bucket b |
/// | +5+2b | `goto TCP` | the end of bucket b |
/// | TCP = +132 | `fwmark MARK lookup TABLE` | |
///
/// A packet that is not UDP from a published port meets one rule per published range,
/// the skip and the TCP rule; one that is walks the bucket gates and one bucket's
/// flows. Every jump lands inside the band, and a band is only taken when no rule of
/// anyone else lies in it, so no jump passes over a rule that is not ours (one added
/// later inside a live band would be; see the README's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Band {
    slot: u32,
}

impl Band {
    /// The band a priority lies in.
    fn of_priority(priority: u32) -> Option<Band> {
        let slot = priority.checked_sub(BAND_BASE)? / BAND;
        (slot < SLOTS).then_some(Band { slot })
    }
    fn gates(self) -> u32 {
        BAND_BASE + BAND * self.slot
    }
    fn skip(self) -> u32 {
        self.gates() + 1
    }
    fn bucket_gates(self) -> u32 {
        self.gates() + 2
    }
    fn bucket_skip(self) -> u32 {
        self.gates() + 3
    }
    fn flows(self, bucket: usize) -> u32 {
        self.gates() + 4 + 2 * bucket as u32
    }
    fn bucket_end(self, bucket: usize) -> u32 {
        self.flows(bucket) + 1
    }
    fn tcp(self) -> u32 {
        self.bucket_end(BUCKETS - 1) + 1
    }
    fn table(self) -> u32 {
        TABLE_BASE + self.slot
    }
    fn contains(self, priority: u32) -> bool {
        (self.gates()..=self.tcp()).contains(&priority)
    }
    /// The bucket whose flow rules sit at `priority`, if any.
    fn bucket_at(self, priority: u32) -> Option<usize> {
        let off = priority.checked_sub(self.flows(0))?;
        (off % 2 == 0 && (off / 2) < BUCKETS as u32).then_some((off / 2) as usize)
    }
    /// `fwmark MARK lookup TABLE`: the TCP rule.
    fn tcp_rule(self, family: IpFamily) -> Rule {
        Rule {
            fwmark: Some((self.table(), u32::MAX)),
            ..Rule::to_table(family, self.tcp(), self.table())
        }
    }
    /// An unconditional `goto TCP` at `priority`.
    fn skip_rule(self, family: IpFamily, priority: u32) -> Rule {
        Rule {
            goto: Some(self.tcp()),
            ..Rule::to_table(family, priority, 0)
        }
    }
    /// `ipproto udp sport A-B goto BUCKET_GATES`.
    fn gate(self, family: IpFamily, ports: (u16, u16)) -> Rule {
        Rule {
            goto: Some(self.bucket_gates()),
            ip_proto: Some(libc::IPPROTO_UDP as u8),
            sport: Some(ports),
            ..Rule::to_table(family, self.gates(), 0)
        }
    }
    /// The gate of `bucket` (`ipproto udp dport P-Q goto FLOWS(b)`) and the rule
    /// ending its flows.
    fn bucket_rules(self, family: IpFamily, bucket: usize) -> (Rule, Rule) {
        let first = bucket as u32 * BUCKET_PORTS;
        let gate = Rule {
            goto: Some(self.flows(bucket)),
            ip_proto: Some(libc::IPPROTO_UDP as u8),
            dport: rule_ports(first, first + BUCKET_PORTS - 1),
            ..Rule::to_table(family, self.bucket_gates(), 0)
        };
        (gate, self.skip_rule(family, self.bucket_end(bucket)))
    }

    /// The slot a dumped rule belongs to: only a rule with exactly one of the shapes
    /// we add, at its place in that slot's band, is taken for ours (a rule someone
    /// else put at one of our priorities, or jumping into a band, never is).
    fn owning(rule: &Rule) -> Option<Band> {
        let udp = Some(libc::IPPROTO_UDP as u8);
        let band = Band::of_priority(rule.priority)?;
        let bare = rule.dst.is_none()
            && rule.fwmark.is_none()
            && rule.ip_proto.is_none()
            && rule.sport.is_none()
            && rule.dport.is_none();
        let ours = match rule.goto {
            None => {
                let tcp = *rule == band.tcp_rule(rule.family);
                let flow = band.bucket_at(rule.priority).is_some()
                    && rule.table == band.table()
                    && rule.dst.is_some()
                    && rule.fwmark.is_none()
                    && rule.ip_proto == udp
                    && rule.sport.is_some()
                    && rule.dport.is_some();
                tcp || flow
            }
            Some(target) => {
                let gate = rule.priority == band.gates()
                    && target == band.bucket_gates()
                    && rule.ip_proto == udp
                    && rule.sport.is_some()
                    && rule.dst.is_none()
                    && rule.fwmark.is_none()
                    && rule.dport.is_none();
                let bucket_gate = rule.priority == band.bucket_gates()
                    && band
                        .bucket_at(target)
                        .is_some_and(|b| band.bucket_rules(rule.family, b).0 == *rule);
                let skip = target == band.tcp()
                    && bare
                    && (rule.priority == band.skip()
                        || rule.priority == band.bucket_skip()
                        || band.bucket_at(rule.priority.wrapping_sub(1)).is_some());
                gate || bucket_gate || skip
            }
        };
        ours.then_some(band)
    }
}

/// The routing state one helper owns in the container netns.
pub(crate) struct SourceIp {
    net: Box<dyn RoutingOps + Send>,
    names: Names,
    band: Band,
    /// Our table, also the mark of our TCP sockets.
    table: u32,
    /// Our owner name; given up only at the very end of the teardown.
    owner: Option<OwnedFd>,
    families: Vec<IpFamily>,
    /// The families whose UDP flows keep addresses (gates and exact rules stored as
    /// asked).
    udp: Vec<IpFamily>,
    udp_ranges: Vec<(u16, u16)>,
    /// Whether UDP keeping was tried for `families` (at start with UDP ports, else
    /// when the first is added): tried once, so a kernel that failed is not retried.
    udp_tried: bool,
    child: IpAddr,
    /// Kept UDP flows (client, container port), each with its rule.
    flows: HashSet<(SocketAddr, u16)>,
    /// Flows per bucket and family (v4, v6); a bucket with flows has its gate and end.
    buckets: [[u32; BUCKETS]; 2],
}

fn fam_index(f: IpFamily) -> usize {
    match f {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

impl SourceIp {
    /// Set it up from a thread inside the container netns. `udp_ranges` are the
    /// container port ranges published for UDP.
    ///
    /// # Errors
    /// Why addresses cannot be kept (the netns is left as it was).
    pub fn setup(
        container_id: &str,
        child_ip: Option<IpAddr>,
        udp_ranges: Vec<(u16, u16)>,
    ) -> Result<SourceIp, String> {
        let child = usable_child(child_ip)?;
        let net = NetnsRouting::open().map_err(|e| format!("netlink: {e}"))?;
        SourceIp::setup_in(Box::new(net), Names::REAL, container_id, child, udp_ranges)
    }

    /// [`SourceIp::setup`] on `net`, with the owner and lock sockets named under `names`.
    fn setup_in(
        net: Box<dyn RoutingOps + Send>,
        names: Names,
        container_id: &str,
        child: IpAddr,
        udp_ranges: Vec<(u16, u16)>,
    ) -> Result<SourceIp, String> {
        let mut net = net;
        let first = slot_hash(container_id);
        let (table, owner) = (0..SLOTS)
            .map(|i| TABLE_BASE + (first + i) % SLOTS)
            .find_map(|t| match claim(&names.owner(t)) {
                // A band with someone else's rule in it is passed over: our jumps
                // would skip that rule.
                Ok(Some(fd))
                    if band_is_free(
                        &mut *net,
                        Band {
                            slot: t - TABLE_BASE,
                        },
                    ) =>
                {
                    Some(Ok((t, fd)))
                }
                Ok(_) => None,
                Err(e) => Some(Err(format!("owner socket: {e}"))),
            })
            .unwrap_or_else(|| {
                Err(format!(
                    "all {SLOTS} slots of this netns are taken (or hold rules of others)"
                ))
            })?;
        let mut s = SourceIp {
            net,
            names,
            band: Band {
                slot: table - TABLE_BASE,
            },
            table,
            owner: Some(owner),
            families: Vec::new(),
            udp: Vec::new(),
            udp_ranges,
            udp_tried: false,
            child,
            flows: HashSet::new(),
            buckets: [[0; BUCKETS]; 2],
        };
        s.remove_dead();
        // On failure, dropping `s` removes what was added.
        s.add_all().map(|()| s)
    }

    fn add_all(&mut self) -> Result<(), String> {
        self.enable_sysctls()?;
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
            self.add_udp();
        }
        Ok(())
    }

    /// Set UDP keeping up for every family kept (its fixed rules and the gates of
    /// `udp_ranges`), once; a family that fails has none of its UDP rules left.
    fn add_udp(&mut self) {
        self.udp_tried = true;
        for family in self.families.clone() {
            match self.add_udp_gates(family) {
                Ok(()) => self.udp.push(family),
                Err(why) => self.udp_off(family, &why),
            }
        }
    }

    /// UDP keeping goes off for `family`: its UDP rules go (one warning line).
    fn udp_off(&mut self, family: IpFamily, why: &str) {
        if family == IpFamily::of(self.child) {
            tracing::warn!(
                "UDP client addresses are not kept (the container sees the child IP's side): {why}"
            );
        }
        self.remove_udp_gates(family);
        self.udp.retain(|f| *f != family);
    }

    /// The container ports published for UDP are now `ranges` (merged, as
    /// [`merged_ranges`] makes them): the gates follow, each new one added before an
    /// old one goes, so that a port published all along never loses its gate. The
    /// first ranges of a helper that started with none set UDP keeping up. A gate the
    /// kernel refuses turns UDP keeping off for its family ([`SourceIp::supports_udp`]
    /// says so): a port without its gate would lose its kept flows' replies.
    pub fn set_udp_ranges(&mut self, ranges: Vec<(u16, u16)>) {
        let old = std::mem::replace(&mut self.udp_ranges, ranges);
        if !self.udp_tried {
            if !self.udp_ranges.is_empty() {
                self.add_udp();
            }
            return;
        }
        let b = self.band;
        let gates = |ranges: &[(u16, u16)]| -> Vec<(u16, u16)> {
            ranges
                .iter()
                .filter_map(|(f, l)| rule_ports(u32::from(*f), u32::from(*l)))
                .collect()
        };
        let (old, new) = (gates(&old), gates(&self.udp_ranges));
        for family in self.udp.clone() {
            let added = new.iter().filter(|r| !old.contains(r)).try_for_each(|r| {
                let gate = b.gate(family, *r);
                self.net
                    .add_rule(&gate)
                    .map_err(|e| format!("adding the UDP gate for ports {}-{}: {e}", r.0, r.1))?;
                self.check_stored(&gate)
            });
            if let Err(why) = added {
                self.udp_off(family, &why);
                continue;
            }
            for r in old.iter().filter(|r| !new.contains(r)) {
                let _ = self.net.del_rule(&b.gate(family, *r));
            }
        }
    }

    fn add_family(&mut self, family: IpFamily, prefsrc: Option<IpAddr>) -> Result<(), String> {
        self.net
            .add_local_default(family, self.table, prefsrc)
            .map_err(|e| format!("adding the local route of table {}: {e}", self.table))?;
        let rule = self.band.tcp_rule(family);
        self.net
            .add_rule(&rule)
            .map_err(|e| format!("adding the fwmark rule: {e}"))?;
        self.check_stored(&rule)
            .map_err(|e| format!("the fwmark rule: {e}"))
    }

    /// Read the rules back: the kernel must have stored `rule` as asked.
    fn check_stored(&mut self, rule: &Rule) -> Result<(), String> {
        let dumped = self
            .net
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
                let _ = self.net.del_dumped_rule(d);
            }
        }
        Err("the kernel stored a different rule than asked (kernel too old?)".into())
    }

    /// Add and read back an exact flow rule on an empty table: if the kernel ignores
    /// a match, the stored rule differs (and, on an empty table, still routes nothing).
    fn probe_udp_rules(&mut self, family: IpFamily) -> Result<(), String> {
        let dst = match family {
            IpFamily::V4 => IpAddr::from([192, 0, 2, 255]),
            IpFamily::V6 => IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xffff]),
        };
        let probe = flow_rule(PROBE_TABLE, MARKER_PRIORITY, SocketAddr::new(dst, 1), 1);
        match self.net.add_rule(&probe) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("the kernel refused a port-matching rule: {e}")),
        }
        let stored = self.check_stored(&probe);
        let _ = self.net.del_rule(&probe);
        stored
    }

    /// The front-door gates of one family (a packet goes on to the flow rules only
    /// when it is UDP from a published container port), and the band's fixed rules.
    fn add_udp_gates(&mut self, family: IpFamily) -> Result<(), String> {
        self.probe_udp_rules(family)?;
        let b = self.band;
        for rule in [
            b.skip_rule(family, b.bucket_skip()),
            b.skip_rule(family, b.skip()),
        ] {
            self.net
                .add_rule(&rule)
                .map_err(|e| format!("adding a rule of the UDP flows: {e}"))?;
            self.check_stored(&rule)?;
        }
        for (first, last) in self.udp_ranges.clone() {
            // A range of only port 65535 cannot be matched: its flows are not kept.
            let Some(ports) = rule_ports(u32::from(first), u32::from(last)) else {
                continue;
            };
            let gate = b.gate(family, ports);
            self.net
                .add_rule(&gate)
                .map_err(|e| format!("adding the UDP gate for ports {first}-{last}: {e}"))?;
            self.check_stored(&gate)?;
        }
        Ok(())
    }

    /// Remove the UDP rules of one family (after a failed [`SourceIp::add_udp_gates`]).
    fn remove_udp_gates(&mut self, family: IpFamily) {
        for d in self.net.rules(family).unwrap_or_default() {
            let b = self.band;
            let mine = d.rule.as_ref().is_some_and(|r| {
                Band::owning(r) == Some(b)
                    && [b.gates(), b.skip(), b.bucket_skip()].contains(&r.priority)
            });
            if mine {
                let _ = self.net.del_dumped_rule(&d);
            }
        }
    }

    /// Turn every [`Sysctl`] on, recording with a marker each one that was 0. Under
    /// the lock: another helper may be turning them off as the last one out.
    fn enable_sysctls(&mut self) -> Result<(), String> {
        let lock = NetnsLock::take(&self.names)?;
        for (which, table) in Sysctl::ALL.into_iter().zip(MARKERS) {
            let on = match self.net.sysctl(which) {
                Ok(on) => on,
                // No IPv6 in this netns: nothing to reflect.
                Err(e) if which == Sysctl::FwmarkReflect6 => {
                    tracing::debug!(error = %e, "no net.ipv6.fwmark_reflect");
                    continue;
                }
                Err(e) => return Err(format!("{}: {e}", which.path())),
            };
            if on {
                continue;
            }
            match self.net.add_rule(&marker(table)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(format!("adding the marker rule: {e}")),
            }
            if let Err(e) = self.net.set_sysctl(which, true) {
                // Nobody else turned it on either (it was 0, under the lock).
                let _ = self.net.del_rule(&marker(table));
                return Err(format!("{}: {e}", which.path()));
            }
        }
        drop(lock);
        Ok(())
    }

    /// Remove what dead helpers left: every rule and route of a slot whose owner
    /// name is free. Our own slot's leftovers (a previous owner of it died) go too;
    /// a slot whose owner cannot be probed (out of fds) is left alone. A dead slot's
    /// name is held while its state goes, and its rules are read only then, so a
    /// helper starting meanwhile cannot take that slot and lose its fresh rules.
    fn remove_dead(&mut self) {
        let mut slots: Vec<u32> = Vec::new();
        for f in [IpFamily::V4, IpFamily::V6] {
            for d in self.net.rules(f).unwrap_or_default() {
                if let Some(band) = d.rule.as_ref().and_then(Band::owning) {
                    slots.push(band.slot);
                }
            }
            slots.extend(
                self.net
                    .routes_in(f, TABLE_BASE..TABLE_BASE + SLOTS)
                    .unwrap_or_default()
                    .iter()
                    .map(|r| r.table - TABLE_BASE),
            );
        }
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            let band = Band { slot };
            let held = if band == self.band {
                None
            } else {
                match claim(&self.names.owner(band.table())) {
                    Ok(Some(fd)) => Some(fd),
                    _ => continue, // alive, or cannot tell: not ours to touch
                }
            };
            if held.is_some() {
                tracing::info!(table = band.table(), "removing what a dead helper left");
            }
            self.remove_band(band);
            drop(held);
        }
    }

    /// Delete every rule of `band` and every route of its table, as they are now.
    fn remove_band(&mut self, band: Band) {
        for f in [IpFamily::V4, IpFamily::V6] {
            for d in self.net.rules(f).unwrap_or_default() {
                if d.rule.as_ref().and_then(Band::owning) == Some(band) {
                    let _ = self.net.del_dumped_rule(&d);
                }
            }
            let t = band.table();
            for r in self.net.routes_in(f, t..t + 1).unwrap_or_default() {
                let _ = self.net.del_route(&r);
            }
        }
    }

    /// Whether another helper lives in this netns: any other slot's owner name taken
    /// (or not probeable, which counts as taken).
    fn others_alive(&self) -> bool {
        (0..SLOTS)
            .filter(|s| *s != self.band.slot)
            .any(|s| !matches!(claim(&self.names.owner(TABLE_BASE + s)), Ok(Some(_))))
    }

    /// The last helper out writes back the 0s recorded by the markers. Our owner
    /// name is given up under the lock, before looking for others: of two helpers
    /// leaving at once, the second then sees the first gone and restores.
    fn restore_sysctls_if_last(&mut self) {
        let lock = match NetnsLock::take(&self.names) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "sysctls left on: the netns lock was not to be had");
                return;
            }
        };
        drop(self.owner.take());
        if self.others_alive() {
            return;
        }
        let rules = self.net.rules(IpFamily::V4).unwrap_or_default();
        for (which, table) in Sysctl::ALL.into_iter().zip(MARKERS) {
            if !rules
                .iter()
                .any(|d| d.rule.as_ref() == Some(&marker(table)))
            {
                continue;
            }
            // A failed write keeps the marker, so that a later helper tries again.
            if self.net.set_sysctl(which, false).is_ok() {
                let _ = self.net.del_rule(&marker(table));
            }
        }
        drop(lock);
    }

    /// Whether connections of this family can keep their source address.
    pub fn supports(&self, family: IpFamily) -> bool {
        self.families.contains(&family)
    }

    /// Whether UDP flows of this family can keep their source address.
    pub fn supports_udp(&self, family: IpFamily) -> bool {
        self.udp.contains(&family) && self.supports(family)
    }

    /// The mark our TCP sockets carry.
    pub fn mark(&self) -> u32 {
        self.table
    }

    /// Divert the container's replies on one UDP flow (client <-> container port)
    /// to our socket bound to `client`. `false`: the flow must use an ordinary socket
    /// (the same pair is kept already, e.g. two published ports to one container port;
    /// a port the kernel cannot match, 65535; or the rule could not be added).
    pub fn add_udp_flow(&mut self, client: SocketAddr, container_port: u16) -> bool {
        let family = IpFamily::of(client.ip());
        if !self.supports_udp(family)
            || client.port() == u16::MAX
            || client.port() == 0
            || container_port == u16::MAX
            || self.flows.contains(&(client, container_port))
        {
            return false;
        }
        let bucket = bucket_of(client.port());
        let count = &self.buckets[fam_index(family)][bucket];
        if *count == 0 {
            // The end first, then the gate: a gate never jumps to a bucket without one.
            let (gate, end) = self.band.bucket_rules(family, bucket);
            if let Err(e) = self.net.add_rule(&end) {
                tracing::debug!(error = %e, bucket, "UDP bucket end rule not added");
                return false;
            }
            if let Err(e) = self.net.add_rule(&gate) {
                tracing::debug!(error = %e, bucket, "UDP bucket gate not added");
                let _ = self.net.del_rule(&end);
                return false;
            }
        }
        let rule = flow_rule(self.table, self.band.flows(bucket), client, container_port);
        // Unique by construction (the set above, our own table): no duplicate check,
        // which would walk every rule of the netns for each new flow.
        match self.net.append_rule(&rule) {
            Ok(()) => {
                self.flows.insert((client, container_port));
                self.buckets[fam_index(family)][bucket] += 1;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, %client, "UDP flow rule not added");
                if self.buckets[fam_index(family)][bucket] == 0 {
                    self.remove_bucket(family, bucket);
                }
                false
            }
        }
    }

    /// The flow ended: its rule goes (and its bucket's, when it was the last).
    pub fn remove_udp_flow(&mut self, client: SocketAddr, container_port: u16) {
        if self.flows.remove(&(client, container_port)) {
            let family = IpFamily::of(client.ip());
            let bucket = bucket_of(client.port());
            let rule = flow_rule(self.table, self.band.flows(bucket), client, container_port);
            let _ = self.net.del_rule(&rule);
            let count = &mut self.buckets[fam_index(family)][bucket];
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.remove_bucket(family, bucket);
            }
        }
    }

    /// The gate first, then the end: a gate never jumps to a bucket without one.
    fn remove_bucket(&mut self, family: IpFamily, bucket: usize) {
        let (gate, end) = self.band.bucket_rules(family, bucket);
        let _ = self.net.del_rule(&gate);
        let _ = self.net.del_rule(&end);
    }

    /// The child IP changed: the routes take it as preferred source. Nothing else
    /// changes: the rules serve either family, and a child IP that is not usable
    /// (none, loopback) only means new connections are not kept until the next reload.
    /// (UDP flows to the old target are dropped by their ports as their next datagram
    /// arrives.)
    pub fn reload(&mut self, child_ip: Option<IpAddr>) {
        let child = match usable_child(child_ip) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, "client addresses not kept until the next reload");
                return;
            }
        };
        self.child = child;
        for family in self.families.clone() {
            let _ = self.net.del_local_default(family, self.table);
            let prefsrc = (IpFamily::of(child) == family).then_some(child);
            if let Err(e) = self.net.add_local_default(family, self.table, prefsrc) {
                tracing::warn!(error = %e, "re-adding the local route after reload");
                self.families.retain(|f| *f != family);
            }
        }
    }
}

impl Drop for SourceIp {
    fn drop(&mut self) {
        // Our own rules and routes need no lock: nobody else touches them while we
        // hold our owner name.
        self.remove_band(self.band);
        self.flows.clear();
        // And what helpers that died since we started left (the last one out would
        // otherwise leave it for good).
        self.remove_dead();
        self.restore_sysctls_if_last();
    }
}

/// Whether no rule but ours (of `band`, e.g. a dead helper's) lies in `band`'s
/// priorities, in either family.
fn band_is_free(net: &mut dyn RoutingOps, band: Band) -> bool {
    [IpFamily::V4, IpFamily::V6].into_iter().all(|f| {
        net.rules(f)
            .unwrap_or_default()
            .iter()
            .all(|d| match &d.rule {
                Some(r) => !band.contains(r.priority) || Band::owning(r) == Some(band),
                None => true,
            })
    })
}

fn bucket_of(client_port: u16) -> usize {
    (u32::from(client_port) / BUCKET_PORTS) as usize
}

/// `fwmark M lookup M` for the marker table `M`: an empty table, so it routes nothing.
fn marker(table: u32) -> Rule {
    Rule {
        fwmark: Some((table, u32::MAX)),
        ..Rule::to_table(IpFamily::V4, MARKER_PRIORITY, table)
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

/// Container ports as sorted ranges of consecutive ports (duplicates merged): one
/// UDP gate each.
pub(crate) fn merged_ranges(ports: impl IntoIterator<Item = u16>) -> Vec<(u16, u16)> {
    let mut ports: Vec<u16> = ports.into_iter().collect();
    ports.sort_unstable();
    ports.dedup();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for p in ports {
        match out.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(p) => *end = p,
            _ => out.push((p, p)),
        }
    }
    out
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
        let f = IpFamily::V4;
        assert_eq!(band.gates(), BAND_BASE + 7 * 136);
        assert_eq!(band.tcp(), band.gates() + 132);
        assert!(band.tcp() < Band { slot: 8 }.gates());
        // The last band ends before the main table's rule.
        assert!(Band { slot: SLOTS - 1 }.tcp() < 32766);
        for b in [0, 5, BUCKETS - 1] {
            assert_eq!(band.bucket_at(band.flows(b)), Some(b));
            assert_eq!(band.bucket_at(band.bucket_end(b)), None);
            let (gate, end) = band.bucket_rules(f, b);
            assert_eq!(Band::owning(&gate), Some(band), "{gate:?}");
            assert_eq!(Band::owning(&end), Some(band), "{end:?}");
        }
        let ours = [
            band.tcp_rule(f),
            band.tcp_rule(IpFamily::V6),
            band.skip_rule(f, band.skip()),
            band.skip_rule(f, band.bucket_skip()),
            band.gate(f, (53, 53)),
            flow_rule(
                band.table(),
                band.flows(0),
                "192.0.2.2:5".parse().unwrap(),
                53,
            ),
        ];
        for r in &ours {
            assert_eq!(Band::owning(r), Some(band), "{r:?}");
        }
        // Someone else's rules at our priorities, or jumping into a band, are not ours:
        // not a plain lookup of another table, not a goto between two priorities of
        // one band, not our TCP rule at a priority we never use.
        let g = band.gates();
        let foreign = [
            Rule::to_table(f, g + 2, 254),
            Rule {
                goto: Some(g + 10),
                ..Rule::to_table(f, g + 1, 0)
            },
            Rule {
                goto: Some(410),
                ..Rule::to_table(f, 400, 0)
            },
            Rule {
                goto: Some(g + 2),
                ..Rule::to_table(f, 50, 0)
            },
            Rule {
                priority: g + 7,
                ..band.tcp_rule(f)
            },
            Rule::to_table(f, band.tcp(), TABLE_BASE + 8),
            marker(MARKERS[0]),
        ];
        for r in &foreign {
            assert_eq!(Band::owning(r), None, "{r:?}");
        }
    }

    #[test]
    fn port_ranges_the_kernel_accepts() {
        assert_eq!(rule_ports(0, 1023), Some((1, 1023)));
        assert_eq!(rule_ports(64512, 65535), Some((64512, 65534)));
        assert_eq!(rule_ports(65535, 65535), None);
        assert_eq!(rule_ports(53, 53), Some((53, 53)));
        let band = Band { slot: 0 };
        assert_eq!(band.bucket_rules(IpFamily::V4, 0).0.dport, Some((1, 1023)));
        assert_eq!(
            band.bucket_rules(IpFamily::V4, BUCKETS - 1).0.dport,
            Some((64512, 65534))
        );
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

    // The logic above the netns, on the in-memory double of `crate::routing`.

    use crate::routing::fake::{self, FakeNetns, Kernel, Route, Snapshot};

    const CHILD: &str = "10.0.2.100";

    /// One container netns: the fake routing, and socket names of its own (the owner
    /// and lock sockets are real, in this process's netns).
    struct Netns {
        fake: FakeNetns,
        names: Names,
    }

    impl Netns {
        fn new(kernel: Kernel) -> Netns {
            Netns {
                fake: FakeNetns::new(kernel),
                names: Names::unique(),
            }
        }

        fn helper(&self, id: &str, child: &str, udp: &[(u16, u16)]) -> Result<SourceIp, String> {
            let child = child.parse().expect("a child IP");
            SourceIp::setup_in(self.fake.ops(), self.names.clone(), id, child, udp.to_vec())
        }

        /// A helper set up, given `flows`, then killed with -9: its rules and routes
        /// stay, its owner name in this netns is free. (Its sockets are named under a
        /// prefix of their own and leaked, so the names under ours were never taken.)
        fn killed_helper(&self, id: &str, flows: &[(SocketAddr, u16)]) -> Band {
            let child = CHILD.parse().expect("an IP");
            let mut s = SourceIp::setup_in(self.fake.ops(), Names::unique(), id, child, udp())
                .expect("setup");
            for &(c, p) in flows {
                assert!(s.add_udp_flow(c, p));
            }
            let band = s.band;
            std::mem::forget(s);
            band
        }
    }

    fn udp() -> Vec<(u16, u16)> {
        vec![(53, 53), (5000, 5010)]
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::from([192, 0, 2, 2]), port)
    }

    fn tcp_rule(family: IpFamily, band: Band) -> Rule {
        band.tcp_rule(family)
    }

    /// The three markers (every sysctl was 0).
    fn markers() -> [Rule; 3] {
        MARKERS.map(marker)
    }

    /// The flow rules (one host, lookup) of `after` that `before` did not have.
    fn added_flows(before: &Snapshot, after: &Snapshot) -> Vec<Rule> {
        let mut v = added(before, after);
        v.retain(|r| r.dst.is_some() && r.goto.is_none());
        v
    }

    /// The rules of `after` that `before` did not have, in order.
    fn added(before: &Snapshot, after: &Snapshot) -> Vec<Rule> {
        let mut after = after.rules.clone();
        after.retain(|r| !before.rules.contains(r));
        after
    }

    /// A rule that, stored without its port matches, would catch a whole host or
    /// jump unconditionally: a port or protocol match, `to HOST lookup`, the probe,
    /// or an unconditional `goto` at a gate's priority.
    fn hazardous(rule: &Rule, band: Band) -> bool {
        let ports = rule.ip_proto.is_some() || rule.sport.is_some() || rule.dport.is_some();
        let catch_all = rule.dst.is_some() && rule.goto.is_none();
        let open_gate = rule.priority == band.gates() && rule.goto.is_some();
        ports || catch_all || open_gate || rule.table == PROBE_TABLE
    }

    /// Run `f`, with the warnings logged meanwhile, one per line.
    fn warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
                out.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::WARN)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = lines.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let text = String::from_utf8_lossy(&text).into_owned();
        (out, text.lines().map(str::to_string).collect())
    }

    #[test]
    fn on_a_4_16_kernel_udp_keeping_is_off_and_no_port_rule_is_left() {
        // One range (then nothing but the read-back stops an unconditional gate), and
        // two (the second gate would also collide with the first as stored).
        for ranges in [vec![(53, 53)], udp()] {
            on_a_4_16_kernel(&ranges);
        }
    }

    fn on_a_4_16_kernel(ranges: &[(u16, u16)]) {
        let net = Netns::new(Kernel::V4_16);
        let before = net.fake.snapshot();
        let (s, warned) = warnings(|| net.helper("ctr", CHILD, ranges));
        let mut s = s.unwrap_or_else(|e| panic!("{e}\n{}", net.fake.log()));

        // UDP is not kept: no probe, no gate (that would now be an unconditional
        // goto), no flow rule (that would now catch every packet to the client's host).
        let band = s.band;
        let hazards = || -> Vec<Rule> {
            let rules = net.fake.rules();
            rules.into_iter().filter(|r| hazardous(r, band)).collect()
        };
        assert_eq!(hazards(), [], "{}", net.fake.log());
        assert!(!s.add_udp_flow(client(40000), 53));
        assert!(!s.add_udp_flow(client(40001), 53));
        assert_eq!(hazards(), [], "{}", net.fake.log());
        assert!(!s.supports_udp(IpFamily::V4) && !s.supports_udp(IpFamily::V6));
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].contains("WARN") && warned[0].contains("UDP client addresses are not kept"),
            "{warned:?}"
        );

        // TCP is: the fwmark rules and the routes are there, the mark is ours.
        assert!(s.supports(IpFamily::V4) && s.supports(IpFamily::V6));
        assert_eq!(s.mark(), s.band.table());
        let after = net.fake.snapshot();
        let [m0, m1, m2] = markers();
        assert_eq!(
            added(&before, &after),
            [
                tcp_rule(IpFamily::V4, s.band),
                m0,
                m1,
                m2,
                tcp_rule(IpFamily::V6, s.band)
            ],
            "{}",
            net.fake.log()
        );
        assert!(after.tcp_fwmark_accept);
        let child = CHILD.parse().ok();
        assert!(after.routes.contains(&Route {
            family: IpFamily::V4,
            table: s.table,
            prefsrc: child,
        }));
        s.remove_udp_flow(client(40000), 53);
        assert_eq!(net.fake.snapshot(), after);

        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn a_gate_stored_without_its_match_is_removed() {
        // The probe and the first gate are stored as asked, the second gate (a port
        // range) is not: the gates' own read-back turns UDP keeping off and removes
        // every gate.
        fn ranged_gotos_lose_their_matches(r: &mut Rule) {
            if r.goto.is_some() && r.sport.is_some_and(|(a, b)| a != b) {
                fake::without_port_matches(r);
            }
        }
        let net = Netns::new(Kernel {
            parses: ranged_gotos_lose_their_matches,
            ..Kernel::MODERN
        });
        let before = net.fake.snapshot();
        let (s, warned) = warnings(|| net.helper("ctr", CHILD, &udp()));
        let mut s = s.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(!s.supports_udp(IpFamily::V4));
        assert!(s.supports(IpFamily::V4));
        assert!(!s.add_udp_flow(client(40000), 53));
        let left: Vec<_> = net
            .fake
            .rules()
            .into_iter()
            .filter(|r| {
                hazardous(r, s.band) || [s.band.skip(), s.band.bucket_skip()].contains(&r.priority)
            })
            .collect();
        assert!(left.is_empty(), "{left:?}\n{}", net.fake.log());
        drop(s);
        assert_eq!(net.fake.snapshot(), before);
    }

    #[test]
    fn a_refused_band_rule_takes_the_udp_rules_back() {
        fn no_plain_gotos(r: &Rule) -> Option<i32> {
            (r.goto.is_some() && r.ip_proto.is_none()).then_some(libc::ENOSPC)
        }
        let net = Netns::new(Kernel {
            refuses: no_plain_gotos,
            ..Kernel::MODERN
        });
        let before = net.fake.snapshot();
        let (s, warned) = warnings(|| net.helper("ctr", CHILD, &udp()));
        let s = s.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0].contains("adding a rule of the UDP flows"),
            "{warned:?}"
        );
        assert!(!s.supports_udp(IpFamily::V4) && s.supports(IpFamily::V4));
        let skip = s.band.skip_rule(IpFamily::V4, s.band.bucket_skip());
        let refused = format!(
            "add {skip:?} -> {}",
            io::Error::from_raw_os_error(libc::ENOSPC)
        );
        assert!(net.fake.log().contains(&refused), "{}", net.fake.log());
        assert!(!net.fake.rules().contains(&skip), "{}", net.fake.log());
        let left: Vec<_> = net
            .fake
            .rules()
            .into_iter()
            .filter(|r| hazardous(r, s.band))
            .collect();
        assert!(left.is_empty(), "{left:?}\n{}", net.fake.log());
        drop(s);
        assert_eq!(net.fake.snapshot(), before);
    }

    #[test]
    fn a_fwmark_rule_stored_differently_fails_setup_cleanly() {
        // No kernel drops the fwmark, but one that did would turn the TCP rule into a
        // catch-all. (Preset 1: the marker, an fwmark rule too, stays out of it.)
        fn no_fwmark(r: &mut Rule) {
            r.fwmark = None;
        }
        let net = Netns::new(Kernel {
            parses: no_fwmark,
            ..Kernel::MODERN
        });
        for which in Sysctl::ALL {
            net.fake.preset_sysctl(which, true);
        }
        let before = net.fake.snapshot();
        let err = net.helper("ctr", CHILD, &udp()).err().expect("setup fails");
        assert!(
            err.contains("the fwmark rule") && err.contains("different rule"),
            "{err}"
        );
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn on_a_modern_kernel_gates_skip_and_tcp_rules_are_added_and_removed() {
        let net = Netns::new(Kernel::MODERN);
        let before = net.fake.snapshot();
        let (s, warned) = warnings(|| net.helper("ctr", CHILD, &udp()));
        let s = s.unwrap_or_else(|e| panic!("{e}"));
        assert!(warned.is_empty(), "{warned:?}");
        assert!(s.supports(IpFamily::V4) && s.supports(IpFamily::V6));
        assert!(s.supports_udp(IpFamily::V4) && s.supports_udp(IpFamily::V6));
        let band = s.band;
        let after = net.fake.snapshot();
        let mut expected = Vec::new();
        for f in [IpFamily::V4, IpFamily::V6] {
            expected.extend([
                band.gate(f, (53, 53)),
                band.gate(f, (5000, 5010)),
                band.skip_rule(f, band.skip()),
                band.skip_rule(f, band.bucket_skip()),
                tcp_rule(f, band),
            ]);
            if f == IpFamily::V4 {
                expected.extend(markers());
            }
        }
        assert_eq!(added(&before, &after), expected, "{}", net.fake.log());
        assert!(after.tcp_fwmark_accept && after.fwmark_reflect == [true, true]);
        assert!(after.tcp_fwmark_accept);
        let child = CHILD.parse().ok();
        let ours: Vec<_> = after.routes.iter().filter(|r| r.table == s.table).collect();
        assert_eq!(
            ours,
            [
                &Route {
                    family: IpFamily::V4,
                    table: s.table,
                    prefsrc: child
                },
                &Route {
                    family: IpFamily::V6,
                    table: s.table,
                    prefsrc: None
                }
            ]
        );
        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn control_udp_gates_follow_added_and_removed_ports() {
        let net = Netns::new(Kernel::MODERN);
        let before = net.fake.snapshot();
        // Started with no UDP port: no UDP rule at all, and UDP not kept.
        let mut s = net
            .helper("ctr", CHILD, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let band = s.band;
        let udp_rules = |net: &Netns| -> Vec<Rule> {
            let mut r: Vec<Rule> = net
                .fake
                .rules()
                .into_iter()
                .filter(|r| Band::owning(r) == Some(band) && r.priority < band.tcp())
                .collect();
            r.sort_by_key(|r| (r.family == IpFamily::V6, r.priority, r.sport));
            r
        };
        assert_eq!(udp_rules(&net), []);
        assert!(!s.supports_udp(IpFamily::V4));
        let expect = |ranges: &[(u16, u16)]| -> Vec<Rule> {
            let mut r = Vec::new();
            for f in [IpFamily::V4, IpFamily::V6] {
                r.extend(ranges.iter().map(|p| band.gate(f, *p)));
                r.push(band.skip_rule(f, band.skip()));
                r.push(band.skip_rule(f, band.bucket_skip()));
            }
            r.sort_by_key(|r| (r.family == IpFamily::V6, r.priority, r.sport));
            r
        };
        // The first UDP port sets UDP keeping up: gates, skips, and flows work.
        s.set_udp_ranges(merged_ranges([53]));
        assert!(s.supports_udp(IpFamily::V4) && s.supports_udp(IpFamily::V6));
        assert_eq!(udp_rules(&net), expect(&[(53, 53)]), "{}", net.fake.log());
        assert!(s.add_udp_flow(client(40000), 53));
        // Adjacent and far ports: ranges merge, each gate added before an old one goes.
        s.set_udp_ranges(merged_ranges([53, 54, 5000, 53]));
        let flows = |net: &Netns| net.fake.rules().iter().filter(|r| r.dst.is_some()).count();
        assert_eq!(flows(&net), 1, "the live flow keeps its rule");
        let gates: Vec<Rule> = udp_rules(&net)
            .into_iter()
            .filter(|r| r.priority == band.gates())
            .collect();
        assert_eq!(
            gates,
            expect(&[(53, 54), (5000, 5000)])
                .into_iter()
                .filter(|r| r.priority == band.gates())
                .collect::<Vec<_>>()
        );
        // The merged gate was added before the one it replaces went.
        let log = net.fake.log();
        let added_at = log.find(&format!("add {:?}", band.gate(IpFamily::V4, (53, 54))));
        let removed_at = log.find(&format!("del {:?}", band.gate(IpFamily::V4, (53, 53))));
        assert!(
            matches!((added_at, removed_at), (Some(a), Some(r)) if a < r),
            "{log}"
        );
        // Removing every UDP port takes the gates; the fixed rules stay for the next.
        s.remove_udp_flow(client(40000), 53);
        s.set_udp_ranges(Vec::new());
        assert_eq!(udp_rules(&net), expect(&[]), "{}", net.fake.log());
        s.set_udp_ranges(merged_ranges([65535]));
        assert_eq!(udp_rules(&net), expect(&[]), "port 65535 cannot be matched");
        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn control_merged_ranges() {
        assert_eq!(merged_ranges([]), []);
        assert_eq!(
            merged_ranges([5, 3, 4, 4, 9, 65535, 65534]),
            [(3, 5), (9, 9), (65534, 65535)]
        );
        assert_eq!(merged_ranges([1, 65535]), [(1, 1), (65535, 65535)]);
    }

    #[test]
    fn one_exact_rule_per_flow() {
        let net = Netns::new(Kernel::MODERN);
        let before = net.fake.snapshot();
        let mut s = net.helper("ctr", CHILD, &udp()).expect("setup");
        let set_up = net.fake.snapshot();
        let (table, band) = (s.table, s.band);
        let rule = |c: SocketAddr, p| flow_rule(table, band.flows(bucket_of(c.port())), c, p);

        assert!(s.add_udp_flow(client(40000), 53));
        assert_eq!(
            added_flows(&set_up, &net.fake.snapshot()),
            [rule(client(40000), 53)]
        );
        // The same (client, container port) again, e.g. a second published port to
        // the same container port: an ordinary socket, and no second rule.
        assert!(!s.add_udp_flow(client(40000), 53));
        assert_eq!(
            added_flows(&set_up, &net.fake.snapshot()),
            [rule(client(40000), 53)]
        );
        assert!(s.add_udp_flow(client(40000), 5001));
        assert!(s.add_udp_flow(client(40001), 53));
        assert_eq!(added_flows(&set_up, &net.fake.snapshot()).len(), 3);
        // The other family is kept too (its gates are there for a reload to it).
        assert!(s.add_udp_flow("[2001:db8::2]:40000".parse().expect("addr"), 53));
        s.remove_udp_flow("[2001:db8::2]:40000".parse().expect("addr"), 53);
        // Ports the kernel cannot match in a rule: an ordinary socket.
        assert!(!s.add_udp_flow(client(65535), 53));
        assert!(!s.add_udp_flow(client(40002), 65535));
        // Ports at the edges of the first and last buckets are kept.
        for p in [1, 999, 1023, 64512, 65534] {
            assert!(s.add_udp_flow(client(p), 53), "client port {p}");
            s.remove_udp_flow(client(p), 53);
        }

        s.remove_udp_flow(client(40000), 53);
        assert_eq!(
            added_flows(&set_up, &net.fake.snapshot()),
            [rule(client(40000), 5001), rule(client(40001), 53)]
        );
        s.remove_udp_flow(client(40000), 53);
        s.remove_udp_flow(client(40000), 5001);
        assert_eq!(
            added_flows(&set_up, &net.fake.snapshot()),
            [rule(client(40001), 53)]
        );
        // The flow that is still kept goes at exit with the rest.
        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn tcp_fwmark_accept_goes_back_to_0_with_the_last_helper() {
        let net = Netns::new(Kernel::MODERN);
        let before = net.fake.snapshot();
        assert!(!before.tcp_fwmark_accept);
        let a = net.helper("a", CHILD, &[]).expect("setup");
        let b = net.helper("b", CHILD, &[]).expect("setup");
        let markers = || {
            net.fake
                .rules()
                .iter()
                .filter(|r| **r == marker(MARKERS[0]))
                .count()
        };
        assert!(net.fake.snapshot().tcp_fwmark_accept);
        assert_eq!(markers(), 1);
        drop(a);
        assert!(net.fake.snapshot().tcp_fwmark_accept, "b still needs it");
        assert_eq!(markers(), 1);
        drop(b);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn tcp_fwmark_accept_set_by_someone_else_stays() {
        let net = Netns::new(Kernel::MODERN);
        net.fake.preset_tcp_fwmark_accept(true);
        let before = net.fake.snapshot();
        let a = net.helper("a", CHILD, &udp()).expect("setup");
        assert!(!net.fake.rules().contains(&marker(MARKERS[0])));
        drop(a);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
        assert!(net.fake.snapshot().tcp_fwmark_accept);
    }

    #[test]
    fn without_cap_net_admin_setup_fails_and_changes_nothing() {
        for preset in [false, true] {
            let net = Netns::new(Kernel {
                eperm: true,
                ..Kernel::MODERN
            });
            net.fake.preset_tcp_fwmark_accept(preset);
            let before = net.fake.snapshot();
            let err = net.helper("ctr", CHILD, &udp()).err().expect("setup fails");
            assert!(err.contains("Operation not permitted"), "{err}");
            assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
            assert!(net.fake.log().contains("-> Operation not permitted"));
        }
    }

    #[test]
    fn a_failed_sysctl_write_takes_the_marker_back() {
        let net = Netns::new(Kernel {
            sysctl_read_only: true,
            ..Kernel::MODERN
        });
        let before = net.fake.snapshot();
        let err = net.helper("ctr", CHILD, &udp()).err().expect("setup fails");
        assert!(err.starts_with(Sysctl::TcpFwmarkAccept.path()), "{err}");
        let marker_added = format!("add {:?} -> ok", marker(MARKERS[0]));
        assert!(net.fake.log().contains(&marker_added), "{}", net.fake.log());
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn without_ipv6_the_ipv4_side_is_kept() {
        let kernel = Kernel {
            ipv6: false,
            ..Kernel::MODERN
        };
        let net = Netns::new(kernel);
        let before = net.fake.snapshot();
        let mut s = net.helper("ctr", CHILD, &udp()).expect("setup");
        assert!(s.supports(IpFamily::V4) && !s.supports(IpFamily::V6));
        assert!(s.supports_udp(IpFamily::V4));
        assert!(s.add_udp_flow(client(40000), 53));
        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());

        // An IPv6 child IP: IPv4 only (for a reload to an IPv4 child), no IPv6 probe.
        let net = Netns::new(kernel);
        let before = net.fake.snapshot();
        let (s, warned) = warnings(|| net.helper("ctr", "fd00::100", &udp()));
        let s = s.expect("setup");
        assert!(warned.is_empty(), "{warned:?}");
        assert!(s.supports(IpFamily::V4) && !s.supports(IpFamily::V6));
        assert!(!s.supports_udp(IpFamily::V6) && s.supports_udp(IpFamily::V4));
        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn a_reload_moves_the_routes_source() {
        let net = Netns::new(Kernel::MODERN);
        let before = net.fake.snapshot();
        let mut s = net.helper("ctr", CHILD, &udp()).expect("setup");
        let new: IpAddr = "10.0.2.101".parse().expect("addr");
        s.reload(Some(new));
        let v4: Vec<_> = net
            .fake
            .snapshot()
            .routes
            .into_iter()
            .filter(|r| r.table == s.table && r.family == IpFamily::V4)
            .collect();
        assert_eq!(v4.len(), 1);
        assert_eq!(v4[0].prefsrc, Some(new));
        assert!(s.supports_udp(IpFamily::V4));
        // No child IP for a while (forwarding to the container's loopback, where no
        // address is kept), then back: nothing was torn down on the way.
        let set = net.fake.snapshot();
        s.reload(None);
        assert_eq!(net.fake.snapshot(), set);
        assert!(s.supports(IpFamily::V4) && s.supports_udp(IpFamily::V4));
        // To IPv6 and back: the routes follow, UDP stays kept in both families.
        let v6: IpAddr = "fd00::100".parse().expect("addr");
        s.reload(Some(v6));
        let table = s.table;
        let ours = |f| {
            net.fake
                .snapshot()
                .routes
                .into_iter()
                .find(|r| r.table == table && r.family == f)
                .map(|r| r.prefsrc)
        };
        assert_eq!(ours(IpFamily::V6), Some(Some(v6)));
        assert_eq!(ours(IpFamily::V4), Some(None));
        assert!(s.supports_udp(IpFamily::V6));
        assert!(s.add_udp_flow("[2001:db8::2]:40000".parse().expect("addr"), 53));
        s.reload(Some(new));
        assert_eq!(ours(IpFamily::V4), Some(Some(new)));
        assert!(s.add_udp_flow(client(40000), 53));
        drop(s);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn a_dead_helpers_state_goes_a_live_ones_stays() {
        let net = Netns::new(Kernel::MODERN);
        let before = net.fake.snapshot();
        let dead = net.killed_helper("dead", &[(client(40000), 53)]);
        let of = |band: Band| {
            let rules = net.fake.rules();
            let routes = net.fake.snapshot().routes;
            let rules = rules
                .iter()
                .filter(|r| Band::owning(r) == Some(band))
                .count();
            let routes = routes.iter().filter(|r| r.table == band.table()).count();
            (rules, routes)
        };
        // Per family: 2 gates, 2 skips, tcp; then the flow with its bucket's gate and
        // end (IPv4); routes 2.
        assert_eq!(of(dead), (13, 2));

        let mut live = net.helper("live", CHILD, &udp()).expect("setup");
        assert!(live.add_udp_flow(client(40000), 53));
        assert_eq!(of(dead), (0, 0), "the live helper's setup removed it");
        let live_band = live.band;
        assert_eq!(of(live_band), (13, 2));
        // State of a slot whose owner is alive but not a SourceIp of ours here.
        let held = Band { slot: 200 };
        let owner = claim(&net.names.owner(held.table()))
            .expect("claim")
            .expect("free");
        net.fake.insert_rule(tcp_rule(IpFamily::V4, held));

        let b = net.helper("b", CHILD, &udp()).expect("setup");
        assert_eq!(of(live_band), (13, 2), "{}", net.fake.log());
        assert_eq!(of(held), (1, 0));
        drop(b);
        drop(live);
        assert_eq!(of(live_band), (0, 0));
        assert_eq!(of(held), (1, 0));
        assert!(
            net.fake.snapshot().tcp_fwmark_accept,
            "a helper is still alive"
        );
        assert!(net.fake.rules().contains(&marker(MARKERS[0])));

        // Its owner dies: the next helper cleans up after it, and is the last one.
        drop(owner);
        let c = net.helper("c", CHILD, &udp()).expect("setup");
        assert_eq!(of(held), (0, 0));
        drop(c);
        assert_eq!(net.fake.snapshot(), before, "{}", net.fake.log());
    }

    #[test]
    fn rules_of_others_inside_a_band_are_never_touched() {
        let id = (0..)
            .map(|i| format!("ctr{i}"))
            .find(|id| slot_hash(id) == 7)
            .expect("an id of slot 7");
        // Band 7 starts at g, table TABLE_BASE + 7. The user's own rules at its
        // priorities, and jumping into it (as a reviewer's `pref 400 goto 410` did
        // within one band of an earlier layout), added while its helper lived.
        let g = Band { slot: 7 }.gates();
        let foreign = [
            Rule::to_table(IpFamily::V4, g + 2, 254),
            Rule {
                goto: Some(g + 40),
                ..Rule::to_table(IpFamily::V4, g + 1, 0)
            },
            Rule::to_table(IpFamily::V4, g + 132, TABLE_BASE + 8),
            Rule {
                ip_proto: Some(17),
                sport: Some((53, 53)),
                ..Rule::to_table(IpFamily::V6, g, 254)
            },
            Rule {
                goto: Some(410),
                ..Rule::to_table(IpFamily::V4, 400, 0)
            },
            Rule {
                goto: Some(g + 2),
                ..Rule::to_table(IpFamily::V4, 50, 0)
            },
        ];
        let net = Netns::new(Kernel::MODERN);
        let dead = net.killed_helper(&id, &[(client(40000), 53)]);
        assert_eq!(dead, Band { slot: 7 });
        for r in &foreign {
            net.fake.insert_rule(r.clone());
        }
        // What the netns should come back to: a fresh one with the user's rules.
        let expected = FakeNetns::new(Kernel::MODERN);
        for r in &foreign {
            expected.insert_rule(r.clone());
        }
        let b = net.helper("b", CHILD, &udp()).expect("setup");
        assert_ne!(b.band, dead, "a band holding rules of others is not taken");
        let left: Vec<_> = net
            .fake
            .rules()
            .into_iter()
            .filter(|r| Band::owning(r) == Some(dead))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        drop(b);
        assert_eq!(
            net.fake.snapshot(),
            expected.snapshot(),
            "{}",
            net.fake.log()
        );
    }
}
