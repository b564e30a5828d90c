//! Per published port counters, read by the control socket's `list`.
//!
//! The data path holds each port's counters (a UDP port's from its publication, a TCP
//! port's from its first connection: see [`crate::tcp`]) and adds to them with `Relaxed`
//! atomics, once per splice (TCP) or per batch of datagrams (UDP): no lock, no
//! ordering with anything else, one uncontended cache line per port next to a
//! syscall. A reader sees each counter on its own (the set is not a snapshot of one
//! instant), which is all a monitoring tool needs.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use slirp_config::Proto;

use crate::control::{Counters, PortStatus};

/// The counters of one published port.
#[derive(Debug, Default)]
pub(crate) struct PortCounters {
    /// TCP: connections accepted and not yet ended.
    conns_open: AtomicU64,
    /// TCP: connections accepted.
    conns_total: AtomicU64,
    /// TCP: connections the container refused (the connect inside failed); UDP:
    /// errors the container's side reported back (ICMP port unreachable).
    refused: AtomicU64,
    /// Bytes from the host side into the container (payload only).
    bytes_in: AtomicU64,
    /// Bytes from the container back to the host side.
    bytes_out: AtomicU64,
    /// UDP: flows open now.
    flows_live: AtomicU64,
    /// UDP: flows opened.
    flows_total: AtomicU64,
    /// UDP: datagrams forwarded into the container.
    datagrams_in: AtomicU64,
    /// UDP: datagrams forwarded back to clients.
    datagrams_out: AtomicU64,
}

impl PortCounters {
    /// A TCP connection was accepted: counted open until [`PortCounters::conn_closed`].
    pub(crate) fn conn_opened(&self) {
        self.conns_total.fetch_add(1, Relaxed);
        self.conns_open.fetch_add(1, Relaxed);
    }

    /// A connection counted by [`PortCounters::conn_opened`] ended (once per connection).
    pub(crate) fn conn_closed(&self) {
        self.conns_open.fetch_sub(1, Relaxed);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    /// `bytes` moved into the container in `datagrams` datagrams (0 for TCP).
    pub(crate) fn moved_in(&self, datagrams: u64, bytes: u64) {
        if datagrams > 0 {
            self.datagrams_in.fetch_add(datagrams, Relaxed);
        }
        if bytes > 0 {
            self.bytes_in.fetch_add(bytes, Relaxed);
        }
    }

    /// `bytes` moved back from the container in `datagrams` datagrams (0 for TCP).
    pub(crate) fn moved_out(&self, datagrams: u64, bytes: u64) {
        if datagrams > 0 {
            self.datagrams_out.fetch_add(datagrams, Relaxed);
        }
        if bytes > 0 {
            self.bytes_out.fetch_add(bytes, Relaxed);
        }
    }

    pub(crate) fn flow_opened(&self) {
        self.flows_total.fetch_add(1, Relaxed);
        self.flows_live.fetch_add(1, Relaxed);
    }

    /// A flow counted by [`PortCounters::flow_opened`] ended (called once per flow).
    pub(crate) fn flow_ended(&self) {
        self.flows_live.fetch_sub(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Counters {
        Counters {
            connections_open: self.conns_open.load(Relaxed),
            connections_total: self.conns_total.load(Relaxed),
            refused: self.refused.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            flows_live: self.flows_live.load(Relaxed),
            flows_total: self.flows_total.load(Relaxed),
            datagrams_in: self.datagrams_in.load(Relaxed),
            datagrams_out: self.datagrams_out.load(Relaxed),
        }
    }
}

/// One published port as the control socket lists it: what it is and since when (its
/// counters are kept by what serves it: [`crate::state`]).
#[derive(Debug, Clone)]
pub(crate) struct Published {
    pub(crate) host_ip: IpAddr,
    pub(crate) host_port: u16,
    pub(crate) container_port: u16,
    pub(crate) protocol: Proto,
    /// Unix seconds.
    pub(crate) published_at: u64,
}

impl Published {
    /// As `list` shows it, with `counters` now.
    pub(crate) fn status(&self, counters: Counters) -> PortStatus {
        PortStatus {
            host_ip: self.host_ip,
            host_port: self.host_port,
            container_port: self.container_port,
            protocol: self.protocol,
            published_at: self.published_at,
            counters,
        }
    }
}

/// Now, in unix seconds.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_counts_and_open_connections() {
        let c = PortCounters::default();
        c.conn_opened();
        c.conn_opened();
        c.moved_in(0, 100);
        c.moved_out(0, 40);
        c.refused();
        c.conn_closed();
        let s = c.snapshot();
        assert_eq!((s.connections_open, s.connections_total), (1, 2));
        assert_eq!((s.bytes_in, s.bytes_out, s.refused), (100, 40, 1));
        c.conn_closed();
        c.flow_opened();
        c.flow_opened();
        c.flow_ended();
        c.moved_in(3, 30);
        c.moved_out(2, 20);
        let s = c.snapshot();
        assert_eq!(s.connections_open, 0);
        assert_eq!((s.flows_live, s.flows_total), (1, 2));
        assert_eq!((s.datagrams_in, s.datagrams_out), (3, 2));
        assert_eq!((s.bytes_in, s.bytes_out), (130, 60));
    }
}
