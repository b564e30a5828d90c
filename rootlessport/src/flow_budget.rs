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
    /// this port.
    CloseSourceOldest,
    /// The helper holds its bound: close this port's least recently used flow.
    ClosePortOldest,
    /// Nothing this port may give up: drop the datagram.
    Refuse(&'static str),
}

/// The helper-wide decision for a new flow of a source address that holds `now.source`
/// live flows, on a port where it holds a flow (`source_here`) and that holds any
/// (`port_has_flows`).
fn room(limits: Limits, now: Counts, source_here: bool, port_has_flows: bool) -> Room {
    if now.sockets >= limits.sockets {
        // Closing a flow would not release its socket before this datagram is handled.
        Room::Refuse("UDP sockets of closed flows not released yet")
    } else if now.source >= limits.per_source {
        if source_here {
            Room::CloseSourceOldest
        } else {
            Room::Refuse("source address holds its helper-wide share of UDP flows on other ports")
        }
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
/// (given back when a flow closes), live flows per source address, and flow sockets
/// (given back when the socket is dropped, a moment after an evicted flow closed).
pub(crate) struct FlowBudget {
    limits: Limits,
    counts: Mutex<BudgetCounts>,
}

#[derive(Default)]
struct BudgetCounts {
    live: usize,
    sockets: usize,
    by_source: HashMap<IpAddr, usize>,
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

    fn now(&self, source: IpAddr) -> Counts {
        counts_of(&self.counts(), source)
    }

    /// What a new flow of `source` needs, on a port where that source holds a flow
    /// (`source_here`) and that holds any (`port_has_flows`).
    pub(crate) fn room_for(&self, source: IpAddr, source_here: bool, port_has_flows: bool) -> Room {
        room(self.limits, self.now(source), source_here, port_has_flows)
    }

    /// Count one more flow of `source` if every limit allows it.
    pub(crate) fn take(&self, source: IpAddr) -> bool {
        let mut c = self.counts();
        if room(self.limits, counts_of(&c, source), false, false) != Room::Free {
            return false;
        }
        c.live += 1;
        c.sockets += 1;
        *c.by_source.entry(source).or_insert(0) += 1;
        true
    }

    /// A flow of `source` closed (its socket may live on for a moment).
    pub(crate) fn end_live(&self, source: IpAddr) {
        let mut c = self.counts();
        c.live = c.live.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
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
        source: c.by_source.get(&source).copied().unwrap_or(0),
        sockets: c.sockets,
    }
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
        for (here, any) in [(false, false), (false, true), (true, true)] {
            assert_eq!(room(l, at(0, 0, 0), here, any), Room::Free);
            assert_eq!(room(l, at(255, 63, 319), here, any), Room::Free);
        }
        // The source at its share: only its own flow on this port may go.
        assert_eq!(room(l, at(64, 64, 64), true, true), Room::CloseSourceOldest);
        assert!(matches!(
            room(l, at(64, 64, 64), false, true),
            Room::Refuse(_)
        ));
        // Its share is checked before the helper-wide bound: a sprayer evicts itself.
        assert_eq!(
            room(l, at(256, 64, 256), true, true),
            Room::CloseSourceOldest
        );
        assert!(matches!(
            room(l, at(256, 64, 256), false, true),
            Room::Refuse(_)
        ));
        // The helper at its bound: this port's oldest goes, if it has one.
        assert_eq!(room(l, at(256, 0, 256), false, true), Room::ClosePortOldest);
        assert_eq!(room(l, at(256, 3, 300), true, true), Room::ClosePortOldest);
        assert!(matches!(
            room(l, at(256, 0, 256), false, false),
            Room::Refuse(_)
        ));
        // Too many sockets of closed flows still open: nothing helps right now.
        assert!(matches!(
            room(l, at(10, 0, 320), true, true),
            Room::Refuse(_)
        ));
    }

    #[test]
    fn flow_bounds_budget_counts_live_flows_sources_and_sockets() {
        let b = FlowBudget::new(8); // per source 2, sockets 10
        let a = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(b.take(a));
        assert!(b.take(mapped.to_canonical()));
        assert!(!b.take(a), "a third flow of one source");
        let others: Vec<IpAddr> = (2..8u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
            .collect();
        for ip in &others {
            assert!(b.take(*ip));
        }
        assert_eq!(b.totals(), (8, 8));
        let nine = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
        assert!(!b.take(nine), "past the bound");
        // A closed flow makes room at once; its socket still counts until dropped.
        b.end_live(others[0]);
        assert_eq!(b.totals(), (7, 8));
        assert!(b.take(nine));
        b.end_live(others[1]);
        assert!(b.take(others[1]));
        assert_eq!(b.totals(), (8, 10));
        b.end_live(others[2]);
        assert!(!b.take(others[2]), "ten sockets open: none more");
        b.socket_closed();
        assert!(b.take(others[2]));
        b.end_live(a);
        assert_eq!(b.now(a).source, 1);
        b.end_live(a);
        assert!(!b.counts().by_source.contains_key(&a));
    }
}
