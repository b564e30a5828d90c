//! The helper-wide bound on UDP flows (see [`crate::udp`] for the policy): how many
//! flows may be live over every published port, how many one source address may hold,
//! and how many flow sockets may be open, closed flows' included. Pure counting, shared
//! by every published UDP port through [`crate::state::Shared`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// The helper-wide bound on live flows is never below this, however low the open-file
/// limit.
pub(crate) const MIN_FLOW_BOUND: usize = 256;

/// Names a published UDP port in the budget: its [`Entry::id`](crate::state::Entry::id),
/// unique for the helper's life.
pub(crate) type PortKey = u32;

/// The helper-wide bound on live UDP flows for an open-file limit of `nofile`: a
/// quarter of it, at least [`MIN_FLOW_BOUND`].
pub(crate) fn flow_bound(nofile: u64) -> usize {
    usize::try_from(nofile / 4)
        .unwrap_or(usize::MAX)
        .max(MIN_FLOW_BOUND)
}

/// The helper-wide limits derived from a bound of `live` flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// Live flows, over every published port.
    live: usize,
    /// Live flows of one source address, over every published port.
    per_source: usize,
    /// Flow sockets, closed flows whose socket is not released yet included.
    sockets: usize,
}

impl Limits {
    fn new(live: usize) -> Limits {
        let live = live.max(1);
        Limits {
            live,
            per_source: (live / 4).max(1),
            sockets: live.saturating_add(live / 4),
        }
    }
}

/// The helper-wide counts, as [`FlowBudget`] keeps them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    live: usize,
    /// Live flows of the source address in question.
    source: usize,
    sockets: usize,
}

/// What a new flow needs before it may be opened, helper-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// Within every limit.
    Free,
    /// The source address holds its share: close its least recently used flow on
    /// the ports where it holds the most ([`FlowBudget::busiest_ports`]).
    CloseSourceOldest,
    /// The helper holds its bound: close this port's least recently used flow.
    ClosePortOldest,
    /// Nothing this port may give up: drop the datagram.
    Refuse(&'static str),
}

/// The helper-wide decision for a new flow of a source address that holds
/// `now.source` live flows, on a port that holds any flow (`port_has_flows`).
fn room(limits: Limits, now: Counts, port_has_flows: bool) -> Room {
    if now.sockets >= limits.sockets {
        // Closing a flow would not release its socket before this datagram is handled.
        Room::Refuse("UDP sockets of closed flows not released yet")
    } else if now.source >= limits.per_source {
        // A source's flows on the ports it uses most give way first, so that a host
        // spraying one port never loses its few flows on others, and a host at its
        // share is still served on a port where it holds none.
        Room::CloseSourceOldest
    } else if now.live >= limits.live {
        if port_has_flows {
            Room::ClosePortOldest
        } else {
            Room::Refuse("helper-wide UDP flow bound reached and this port holds no flow")
        }
    } else {
        Room::Free
    }
}

/// The helper-wide bound on UDP flows, and the counts it is checked against: live flows
/// (given back when a flow closes), live flows per source address and port, and flow
/// sockets (given back when the socket is dropped, a moment after an evicted flow
/// closed).
pub(crate) struct FlowBudget {
    limits: Limits,
    counts: Mutex<BudgetCounts>,
}

#[derive(Default)]
struct BudgetCounts {
    live: usize,
    sockets: usize,
    by_source: HashMap<IpAddr, SourceFlows>,
}

/// The live flows of one source address.
#[derive(Default)]
struct SourceFlows {
    live: usize,
    /// Per port where it holds any (absent at zero).
    by_port: HashMap<PortKey, usize>,
}

impl FlowBudget {
    /// A budget of `bound` live flows (see [`flow_bound`]).
    pub(crate) fn new(bound: usize) -> FlowBudget {
        FlowBudget {
            limits: Limits::new(bound),
            counts: Mutex::default(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, BudgetCounts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a new flow of `source` needs, on a port that holds any flow
    /// (`port_has_flows`).
    pub(crate) fn room_for(&self, source: IpAddr, port_has_flows: bool) -> Room {
        room(
            self.limits,
            counts_of(&self.counts(), source),
            port_has_flows,
        )
    }

    /// The ports where `source` holds the most live flows, lowest keys first, at most
    /// `max` of them (none when it holds none). Costs a look at every port where it
    /// holds flows: called only when it is at its share.
    pub(crate) fn busiest_ports(&self, source: IpAddr, max: usize) -> Vec<PortKey> {
        self.counts()
            .by_source
            .get(&source)
            .map_or_else(Vec::new, |s| busiest(&s.by_port, max))
    }

    /// Count one more flow of `source` on port `here` if every limit allows it.
    pub(crate) fn take(&self, source: IpAddr, here: PortKey) -> bool {
        let mut c = self.counts();
        if room(self.limits, counts_of(&c, source), false) != Room::Free {
            return false;
        }
        c.live += 1;
        c.sockets += 1;
        let s = c.by_source.entry(source).or_default();
        s.live += 1;
        *s.by_port.entry(here).or_insert(0) += 1;
        true
    }

    /// A flow of `source` on port `port` closed (its socket may live on for a moment).
    pub(crate) fn end_live(&self, source: IpAddr, port: PortKey) {
        let mut c = self.counts();
        c.live = c.live.saturating_sub(1);
        if let Some(s) = c.by_source.get_mut(&source) {
            s.live = s.live.saturating_sub(1);
            if let Some(n) = s.by_port.get_mut(&port) {
                *n -= 1;
                if *n == 0 {
                    s.by_port.remove(&port);
                }
            }
            if s.live == 0 {
                c.by_source.remove(&source);
            }
        }
    }

    /// A flow's socket was dropped.
    pub(crate) fn socket_closed(&self) {
        let mut c = self.counts();
        c.sockets = c.sockets.saturating_sub(1);
    }

    /// Live flows, flow sockets (for logs and tests).
    pub(crate) fn totals(&self) -> (usize, usize) {
        let c = self.counts();
        (c.live, c.sockets)
    }
}

/// The counts a new flow of `source` is judged by.
fn counts_of(c: &BudgetCounts, source: IpAddr) -> Counts {
    Counts {
        live: c.live,
        source: c.by_source.get(&source).map_or(0, |s| s.live),
        sockets: c.sockets,
    }
}

/// The ports holding the most of `by_port`'s flows, lowest keys first (so that the
/// choice does not hang on the map's order), at most `max` of them.
fn busiest(by_port: &HashMap<PortKey, usize>, max: usize) -> Vec<PortKey> {
    let Some(most) = by_port.values().copied().max() else {
        return Vec::new();
    };
    let mut ports: Vec<PortKey> = by_port
        .iter()
        .filter(|(_, n)| **n == most)
        .map(|(p, _)| *p)
        .collect();
    ports.sort_unstable();
    ports.truncate(max);
    ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn flow_bounds_bound_is_a_quarter_of_the_fd_limit_and_at_least_256() {
        assert_eq!(flow_bound(0), 256);
        assert_eq!(flow_bound(1024), 256);
        assert_eq!(flow_bound(1027), 256);
        assert_eq!(flow_bound(1028), 257);
        assert_eq!(flow_bound(20_000), 5_000); // podman's limit
        assert_eq!(flow_bound(1 << 20), 1 << 18);
        // RLIM_INFINITY: no overflow anywhere.
        let huge = flow_bound(u64::MAX);
        assert!(huge >= usize::MAX / 8);
        let l = Limits::new(huge);
        assert!(l.sockets >= l.live && l.per_source <= l.live);
    }

    #[test]
    fn flow_bounds_limits_derived_from_the_bound() {
        assert_eq!(
            Limits::new(256),
            Limits {
                live: 256,
                per_source: 64,
                sockets: 320
            }
        );
        assert_eq!(
            Limits::new(5_000),
            Limits {
                live: 5_000,
                per_source: 1_250,
                sockets: 6_250
            }
        );
        // Degenerate bounds still let one flow through.
        assert_eq!(
            Limits::new(0),
            Limits {
                live: 1,
                per_source: 1,
                sockets: 1
            }
        );
    }

    #[test]
    fn flow_bounds_room_decisions() {
        let l = Limits::new(256);
        let at = |live, source, sockets| Counts {
            live,
            source,
            sockets,
        };
        // Within every limit, whatever the port holds.
        for any in [false, true] {
            assert_eq!(room(l, at(0, 0, 0), any), Room::Free);
            assert_eq!(room(l, at(255, 63, 319), any), Room::Free);
        }
        // The source at its share: its own oldest goes, whether or not this port holds
        // any flow.
        assert_eq!(room(l, at(64, 64, 64), true), Room::CloseSourceOldest);
        assert_eq!(room(l, at(64, 64, 64), false), Room::CloseSourceOldest);
        // Its share is checked before the helper-wide bound: a sprayer evicts itself.
        assert_eq!(room(l, at(256, 64, 256), true), Room::CloseSourceOldest);
        assert_eq!(room(l, at(256, 64, 256), false), Room::CloseSourceOldest);
        // The helper at its bound: this port's oldest goes, if it has one.
        assert_eq!(room(l, at(256, 0, 256), true), Room::ClosePortOldest);
        assert_eq!(room(l, at(256, 3, 300), true), Room::ClosePortOldest);
        assert!(matches!(room(l, at(256, 0, 256), false), Room::Refuse(_)));
        // Too many sockets of closed flows still open: nothing helps right now.
        assert!(matches!(room(l, at(10, 0, 320), true), Room::Refuse(_)));
    }

    #[test]
    fn flow_bounds_busiest_ports_lowest_keys_first() {
        let m = |pairs: &[(PortKey, usize)]| pairs.iter().copied().collect::<HashMap<_, _>>();
        assert_eq!(busiest(&m(&[]), 8), Vec::<PortKey>::new());
        assert_eq!(busiest(&m(&[(1, 3)]), 8), [1]);
        assert_eq!(busiest(&m(&[(1, 2), (5, 3), (2, 1)]), 8), [5]);
        assert_eq!(busiest(&m(&[(4, 3), (2, 3), (9, 3), (1, 2)]), 8), [2, 4, 9]);
        assert_eq!(busiest(&m(&[(4, 3), (2, 3), (9, 3)]), 2), [2, 4]);
    }

    #[test]
    fn flow_bounds_budget_counts_live_flows_sources_and_sockets() {
        let b = FlowBudget::new(8); // per source 2, sockets 10
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(b.take(a, 0));
        assert!(b.take(mapped.to_canonical(), 1));
        assert!(!b.take(a, 0), "a third flow of one source");
        assert_eq!(b.room_for(a, false), Room::CloseSourceOldest);
        assert_eq!(b.busiest_ports(a, 8), [0, 1]);
        let others: Vec<IpAddr> = (2..8u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
            .collect();
        for ip in &others {
            assert!(b.take(*ip, 0));
        }
        assert_eq!(b.totals(), (8, 8));
        let nine = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
        assert!(!b.take(nine, 0), "past the bound");
        // A closed flow makes room at once; its socket still counts until dropped.
        b.end_live(others[0], 0);
        assert_eq!(b.totals(), (7, 8));
        assert!(b.take(nine, 0));
        b.end_live(others[1], 0);
        assert!(b.take(others[1], 0));
        assert_eq!(b.totals(), (8, 10));
        b.end_live(others[2], 0);
        assert!(!b.take(others[2], 0), "ten sockets open: none more");
        b.socket_closed();
        assert!(b.take(others[2], 0));
        // Per port: the source's flow on port 0 closed, its busiest port is now 1.
        b.end_live(a, 0);
        assert_eq!(b.counts().by_source[&a].live, 1);
        b.socket_closed();
        assert_eq!(b.room_for(a, false), Room::Free);
        assert_eq!(b.busiest_ports(a, 8), [1], "its one flow left is on port 1");
        b.end_live(a, 1);
        assert!(!b.counts().by_source.contains_key(&a));
    }
}
