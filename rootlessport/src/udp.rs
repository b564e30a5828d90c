//! UDP forwarding: one flow per client address and port. Each flow has a socket
//! connected to the container (made inside its netns, from the client's own address
//! when it is kept); the container's replies come back through the published socket
//! to the client they belong to.
//!
//! # Limits
//!
//! Each flow costs the helper one open file (its socket), so flows are bounded twice:
//! per published port, and across the whole helper, whose bound comes from its
//! open-file limit. A flow idle for the idle timeout (podman's 90 s) is closed.
//!
//! - Per published port: at most [`MAX_FLOWS_PER_PORT`] (4,096) flows, of which one
//!   source address holds at most [`MAX_FLOWS_PER_SOURCE`] (1,024). When a new client
//!   comes and the port's table is full, its least recently used flow is closed to
//!   make room; a source address at its share closes its own least recently used flow
//!   on that port instead, so a host spraying source ports only evicts itself.
//! - Helper-wide, over every published port: at most `B` live flows, where `B` is a
//!   quarter of the open-file limit (`RLIMIT_NOFILE`, read when the forwarder starts,
//!   after the helper raised its soft limit to the hard one), and at least
//!   [`MIN_FLOW_BOUND`](crate::flow_budget::MIN_FLOW_BOUND) (256):
//!   [`flow_bound`](crate::flow_budget::flow_bound), counted in [`crate::flow_budget`].
//!   With a limit of 20,000 that is 5,000.
//!   The other three quarters stay for TCP connections (two sockets each, and a pipe
//!   pair while data moves), listeners and the rest, so that no number of UDP clients,
//!   over however many published ports, can make `accept` or `socket` fail with
//!   `EMFILE`. One source address holds at most `B / 4` of those flows (1,250 with a
//!   limit of 20,000, 64 at the floor), whichever ports they are on. An IPv4 client
//!   counts as the same address on an IPv4 and a dual-stack listener; each address
//!   counts on its own (a host with many addresses has a share per address).
//!
//! "Least recently used" counts datagrams either way, as the idle timeout does: a flow
//! the container still sends on is marked used (in its port's table, at most every
//! [`MARK_REPLIES_EVERY_MS`] ms), so it is not the first to give way.
//!
//! A datagram from a client without a flow on its port, once that port's own limits
//! made room:
//!
//! 1. if its source address holds its helper-wide share: that address's least
//!    recently used flow (by its last datagram either way) on the published ports
//!    where it holds the most flows is closed to make room (when more than
//!    [`MAX_EVICTION_CANDIDATES`] ports hold that many, on the ones first published
//!    among them). So a host spraying source ports over many published ports only
//!    ever evicts its own flows, a host busy on one port keeps its few flows on the
//!    others, and a host at its share is still served on a port where it holds none
//!    (say, many clients behind one NAT address, busy on a DNS port, and a new one of
//!    them on a WireGuard port): the newcomer is served and the address's least
//!    recently used flow goes. Each listener counts as a port here (a `udp4` and a
//!    `udp6` listener of one host port are two);
//! 2. otherwise, if the helper holds `B` flows: this port's least recently used flow
//!    is closed to make room; if the port holds none, the datagram is dropped;
//! 3. then the flow is opened.
//!
//! A dropped datagram is logged at debug level and costs nothing else, as a drop in
//! the network would: the client's next datagram tries again, and every existing flow,
//! every other port and all TCP keep working. So a new client is turned away only
//! when the helper holds `B` flows and the client's port holds none to give up, or
//! for a moment: while closed flows' sockets are still being released, or when the
//! flow chosen to give way on another port went (or was used) just before it could be
//! closed.
//!
//! A closed flow gives its place back at once, but its socket is released only when
//! the event loop next runs the flow's task (an idle one at once, an evicted one after
//! the current burst of datagrams). Those sockets count too: while `B + B / 4` flow
//! sockets are open, new clients' datagrams are dropped until some are released, so
//! UDP flows never hold more than `B + B / 4` open files (6,250 with a limit of
//! 20,000, 320 at the floor).
//!
//! After a reload, a flow aimed at the old child IP is closed when its next datagram
//! arrives, and that datagram opens a flow to the new one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use crate::config::Family;
use crate::counters::PortCounters;
use crate::flow_budget::{FlowBudget, PortKey, Room};
use crate::source_ip::{source_for, transparent_socket};
use crate::state::Shared;
use crate::tcp::target;

/// Flows per published port at most; a new client then replaces the least recently
/// used flow.
pub const MAX_FLOWS_PER_PORT: usize = 4096;
/// Flows one source address may hold on a published port (a quarter of the table).
pub const MAX_FLOWS_PER_SOURCE: usize = MAX_FLOWS_PER_PORT / 4;
/// A source address at its helper-wide share gives up its least recently used flow
/// among at most this many of the ports where it holds the most (each is locked in
/// turn to find it).
pub const MAX_EVICTION_CANDIDATES: usize = 64;
/// A flow carrying only the container's datagrams is marked used in its port's table
/// (which locks it) at most this often, in milliseconds.
pub const MARK_REPLIES_EVERY_MS: u64 = 100;
/// Datagrams handled per socket per wake-up before other sockets get their turn.
const BURST: usize = 64;
/// Largest datagram we carry.
const MAX_DATAGRAM: usize = 65536;

/// A flow's place in the helper-wide budget, taken before its socket is made: the live
/// count is given back when the flow closes, the socket count when this is dropped
/// (after the socket, which is declared before it in [`Flow`]).
struct FlowSlot {
    shared: Arc<Shared>,
    source: IpAddr,
    port: PortKey,
    live: std::sync::atomic::AtomicBool,
    /// The port's counters: the flow is counted live while the slot is.
    counters: Arc<PortCounters>,
}

impl FlowSlot {
    fn take(
        shared: &Arc<Shared>,
        source: IpAddr,
        port: PortKey,
        counters: &Arc<PortCounters>,
    ) -> Option<FlowSlot> {
        shared.udp_budget.take(source, port).then(|| {
            counters.flow_opened();
            FlowSlot {
                shared: shared.clone(),
                source,
                port,
                live: true.into(),
                counters: counters.clone(),
            }
        })
    }

    fn end_live(&self) {
        if self.live.swap(false, Ordering::Relaxed) {
            self.shared.udp_budget.end_live(self.source, self.port);
            self.counters.flow_ended();
        }
    }
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.end_live();
        self.shared.udp_budget.socket_closed();
    }
}

thread_local! {
    // One buffer per thread, used only between awaits: no flow or port owns one.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

struct Flow {
    upstream: UdpSocket,
    /// Where it was aimed (the child IP of its time).
    to: SocketAddr,
    /// The client address the upstream socket is bound to, when kept (it has a rule
    /// until released).
    kept: Option<SocketAddr>,
    released: std::sync::atomic::AtomicBool,
    /// Milliseconds since the helper's UDP epoch ([`FlowTables`]) of the last datagram
    /// either way: comparable between ports.
    last: AtomicU64,
    /// When (same clock) the flow was last marked used in its port's table: at each
    /// datagram from the client, and for the container's replies at most every
    /// [`MARK_REPLIES_EVERY_MS`], so that a flow the container still sends on is not
    /// the first to give way.
    marked: AtomicU64,
    replies: OnceLock<AbortHandle>,
    shared: Arc<Shared>,
    /// Last: released after the socket closed.
    slot: FlowSlot,
}

impl Flow {
    /// End the flow now: its reply task stops and its rule goes at once (a new flow
    /// of the same client may need the same rule right away, after a reload).
    fn close(&self) {
        if let Some(task) = self.replies.get() {
            task.abort();
        }
        self.release();
        // The socket closes once the aborted task is dropped; the flow no longer counts.
        self.slot.end_live();
    }

    fn release(&self) {
        if let Some(src) = self.kept {
            if !self.released.swap(true, Ordering::Relaxed) {
                self.shared.release_udp_flow(src, self.to);
            }
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.release();
    }
}

/// The flows of one published port, least recently used first out.
#[derive(Default)]
struct FlowTable {
    by_client: Option<LruCache<SocketAddr, Arc<Flow>>>,
    /// Per source address: its clients' ports, least recently used first out.
    by_source: HashMap<IpAddr, LruCache<u16, ()>>,
}

impl FlowTable {
    fn flows(&mut self) -> &mut LruCache<SocketAddr, Arc<Flow>> {
        self.by_client.get_or_insert_with(LruCache::unbounded)
    }

    /// The live flow of `client`, marked as just used.
    fn get(&mut self, client: SocketAddr) -> Option<Arc<Flow>> {
        let f = self.flows().get(&client)?.clone();
        if let Some(ports) = self.by_source.get_mut(&client.ip()) {
            ports.get(&client.port());
        }
        Some(f)
    }

    fn remove(&mut self, client: SocketAddr) -> Option<Arc<Flow>> {
        let f = self.flows().pop(&client)?;
        if let Some(ports) = self.by_source.get_mut(&client.ip()) {
            ports.pop(&client.port());
            if ports.is_empty() {
                self.by_source.remove(&client.ip());
            }
        }
        f.close();
        Some(f)
    }

    /// The least recently used flow of `client`'s source address on this port.
    fn source_oldest(&self, client: SocketAddr) -> Option<SocketAddr> {
        let ports = self.by_source.get(&client.ip())?;
        ports
            .peek_lru()
            .map(|(p, ())| SocketAddr::new(client.ip(), *p))
    }

    /// The least recently used flow of the canonical source address `source` on this
    /// port (whose clients' addresses are IPv4-mapped when it is dual-stack).
    fn oldest_of_source(&self, source: IpAddr) -> Option<SocketAddr> {
        let mapped = match source {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        [Some(source), mapped]
            .into_iter()
            .flatten()
            .find_map(|ip| self.source_oldest(SocketAddr::new(ip, 0)))
    }

    /// Whether `flow` is (still) `client`'s flow here.
    fn holds(&mut self, client: SocketAddr, flow: &Arc<Flow>) -> bool {
        self.flows()
            .peek(&client)
            .is_some_and(|f| Arc::ptr_eq(f, flow))
    }

    /// When `client`'s flow last carried a datagram (see [`Flow::last`]), without
    /// marking it used.
    fn peek_last(&self, client: SocketAddr) -> Option<u64> {
        let f = self.by_client.as_ref()?.peek(&client)?;
        Some(f.last.load(Ordering::Relaxed))
    }

    /// The least recently used flow of this port.
    fn oldest(&self) -> Option<SocketAddr> {
        self.by_client.as_ref()?.peek_lru().map(|(c, _)| *c)
    }

    /// Make room for one more flow of `client`'s source address on this port.
    fn make_room(&mut self, client: SocketAddr) {
        let at_share = self
            .by_source
            .get(&client.ip())
            .is_some_and(|ports| ports.len() >= MAX_FLOWS_PER_SOURCE);
        if let Some(own) = self.source_oldest(client).filter(|_| at_share) {
            self.remove(own);
            tracing::debug!(source = %client.ip(), "flows of one source at their share: oldest closed");
        } else if self.flows().len() >= MAX_FLOWS_PER_PORT {
            if let Some(oldest) = self.oldest() {
                self.remove(oldest);
                tracing::debug!("UDP flow table full: least recently used flow closed");
            }
        }
    }

    /// Make room for one more flow of `client` on port `here` within the helper-wide
    /// limits (this port's own limits made room first).
    fn make_room_helper_wide(
        &mut self,
        client: SocketAddr,
        here: PortKey,
        budget: &FlowBudget,
    ) -> Made {
        let source = client.ip().to_canonical();
        let oldest = self.oldest();
        match budget.room_for(source, oldest.is_some()) {
            Room::Free => Made::Room,
            Room::CloseSourceOldest => {
                let ports = budget.busiest_ports(source, MAX_EVICTION_CANDIDATES);
                if ports != [here] {
                    return Made::Elsewhere(ports);
                }
                // Only this port: no other table to look at.
                let Some(own) = self.source_oldest(client) else {
                    return Made::Refused;
                };
                self.remove(own);
                tracing::debug!(%source, "UDP flows of one source at their helper-wide share: its oldest on this port closed");
                Made::Room
            }
            Room::ClosePortOldest => {
                if let Some(oldest) = oldest {
                    self.remove(oldest);
                }
                tracing::debug!("helper-wide UDP flow bound reached: this port's least recently used flow closed");
                Made::Room
            }
            Room::Refuse(why) => {
                tracing::debug!(%client, "{why}: datagram dropped");
                Made::Refused
            }
        }
    }

    fn insert(&mut self, client: SocketAddr, flow: Arc<Flow>) {
        self.flows().put(client, flow);
        self.by_source
            .entry(client.ip())
            .or_insert_with(LruCache::unbounded)
            .put(client.port(), ());
    }

    fn len(&mut self) -> usize {
        self.flows().len()
    }
}

/// What [`FlowTable::make_room_helper_wide`] did.
#[derive(Debug, PartialEq, Eq)]
enum Made {
    /// There is room now.
    Room,
    /// The source must first give up its least recently used flow on these ports
    /// (with this port's table unlocked: they may include it).
    Elsewhere(Vec<PortKey>),
    /// Drop the datagram.
    Refused,
}

type Flows = Arc<Mutex<FlowTable>>;

/// A port's flow table, locked (a panic while it was held left nothing half-done).
fn lock(flows: &Flows) -> std::sync::MutexGuard<'_, FlowTable> {
    flows.lock().unwrap_or_else(|p| p.into_inner())
}

/// The flow table of every published UDP port that holds or held a flow, by its key,
/// so that a source address at its helper-wide share can give up a flow on another
/// port (see the module's policy), and the clock of every flow's last use. Kept in
/// [`Shared`]; a port is in it from its first flow until it stops.
pub(crate) struct FlowTables {
    /// Flows' last use is counted in milliseconds from here.
    epoch: Instant,
    tables: Mutex<HashMap<PortKey, std::sync::Weak<Mutex<FlowTable>>>>,
}

impl FlowTables {
    pub(crate) fn new() -> FlowTables {
        FlowTables {
            epoch: Instant::now(),
            tables: Mutex::default(),
        }
    }

    fn tables(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PortKey, std::sync::Weak<Mutex<FlowTable>>>> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, key: PortKey, flows: &Flows) {
        self.tables().insert(key, Arc::downgrade(flows));
    }

    fn unregister(&self, key: PortKey) {
        self.tables().remove(&key);
    }

    /// Close the least recently used flow of the canonical source address `source` on
    /// the ports `keys`; whether one was closed. Called with no flow table locked: each
    /// is locked in turn.
    fn close_source_oldest(&self, keys: &[PortKey], source: IpAddr) -> bool {
        let tables: Vec<Flows> = {
            let all = self.tables();
            keys.iter()
                .filter_map(|k| all.get(k).and_then(std::sync::Weak::upgrade))
                .collect()
        };
        // (last use, table, client) of the least recently used candidate.
        let mut lru: Option<(u64, usize, SocketAddr)> = None;
        for (i, flows) in tables.iter().enumerate() {
            let table = lock(flows);
            let Some(client) = table.oldest_of_source(source) else {
                continue;
            };
            let Some(last) = table.peek_last(client) else {
                continue;
            };
            if lru.is_none_or(|(l, ..)| last < l) {
                lru = Some((last, i, client));
            }
        }
        let Some((_, i, client)) = lru else {
            return false;
        };
        let closed = lock(&tables[i]).remove(client).is_some();
        if closed {
            tracing::debug!(%source, "UDP flows of one source at their helper-wide share: its least recently used on its busiest ports closed");
        }
        closed
    }
}

/// One published UDP port and what its flows need.
struct Port {
    published: Arc<UdpSocket>,
    flows: Flows,
    /// Its key in the helper-wide budget and in [`FlowTables`]: its published port's
    /// [`Entry::id`](crate::state::Entry::id).
    key: PortKey,
    /// In [`FlowTables`] yet (from its first flow).
    registered: std::sync::atomic::AtomicBool,
    child_port: u16,
    family: Family,
    shared: Arc<Shared>,
    epoch: Instant,
    counters: Arc<PortCounters>,
}

/// Serve one published UDP port until the runtime stops.
pub(crate) async fn serve(
    published: UdpSocket,
    key: PortKey,
    child_port: u16,
    family: Family,
    shared: Arc<Shared>,
    counters: Arc<PortCounters>,
) {
    let port = Port::new(published, key, child_port, family, shared, counters);
    // Stopped (the port removed, or the runtime dropped): its flows end with it, and
    // the published socket closes once their reply tasks are dropped.
    let _flows_end = EndFlows(port.flows.clone(), port.key, port.shared.clone());
    loop {
        if port.published.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // A bounded batch, then the other sockets get their turn.
        let mut drained = false;
        // Counted once per batch, not per datagram.
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        for _ in 0..BURST {
            match BUF.with(|b| port.forward_one(&mut b.borrow_mut())) {
                Step::Empty => {
                    drained = true;
                    break;
                }
                Step::Sent(n) => {
                    datagrams += 1;
                    bytes += n as u64;
                }
                Step::Skipped => {}
            }
        }
        port.counters.moved_in(datagrams, bytes);
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// Closes every flow of a port (its table, its key) when dropped, and takes the table
/// out of [`FlowTables`].
struct EndFlows(Flows, PortKey, Arc<Shared>);

impl Drop for EndFlows {
    fn drop(&mut self) {
        self.2.udp_tables.unregister(self.1);
        let mut table = lock(&self.0);
        while let Some(client) = table.oldest() {
            table.remove(client);
        }
    }
}

/// What one try at forwarding a datagram did.
enum Step {
    /// None was queued.
    Empty,
    /// One of this many bytes went to the container.
    Sent(usize),
    /// One was dropped, or an error was read instead.
    Skipped,
}

impl Port {
    fn new(
        published: UdpSocket,
        key: PortKey,
        child_port: u16,
        family: Family,
        shared: Arc<Shared>,
        counters: Arc<PortCounters>,
    ) -> Port {
        Port {
            published: Arc::new(published),
            flows: Arc::default(),
            key,
            registered: false.into(),
            child_port,
            family,
            epoch: shared.udp_tables.epoch,
            shared,
            counters,
        }
    }

    /// Forward one queued datagram.
    fn forward_one(&self, buf: &mut [u8]) -> Step {
        let (n, client) = match self.published.try_recv_from(buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Empty,
            Err(_) => return Step::Skipped, // e.g. an ICMP error queued on the socket
        };
        let Some(flow) = self.flow_for(client) else {
            return Step::Skipped;
        };
        // flow_for marked it used in the table.
        let now = self.now_ms();
        flow.last.store(now, Ordering::Relaxed);
        flow.marked.store(now, Ordering::Relaxed);
        // Straight to the kernel: tokio's try_send refuses until the new socket's first
        // readiness event. A full buffer drops the datagram, as the network would.
        let up = socket2::SockRef::from(&flow.upstream);
        match up.send(&buf[..n]) {
            Ok(_) => Step::Sent(n),
            // An ICMP error from an earlier datagram (nothing listened then) is reported
            // by this send, which then sent nothing: send again, once.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                self.counters.refused();
                match up.send(&buf[..n]) {
                    Ok(_) => Step::Sent(n),
                    Err(_) => Step::Skipped,
                }
            }
            Err(_) => Step::Skipped,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn flow_for(&self, client: SocketAddr) -> Option<Arc<Flow>> {
        let to = target(self.shared.child_ip(), self.family, self.child_port);
        let mut table = lock(&self.flows);
        if let Some(f) = table.get(client) {
            if f.to == to {
                return Some(f);
            }
            // A reload moved the container: this flow goes, a new one is made.
            table.remove(client);
        }
        table.make_room(client);
        let budget = &self.shared.udp_budget;
        let source = client.ip().to_canonical();
        match table.make_room_helper_wide(client, self.key, budget) {
            Made::Room => {}
            Made::Refused => return None,
            Made::Elsewhere(ports) => {
                // The other ports' tables are locked with this one unlocked, so that
                // two ports doing this to each other cannot deadlock.
                drop(table);
                self.shared.udp_tables.close_source_oldest(&ports, source);
                table = lock(&self.flows);
                if table.make_room_helper_wide(client, self.key, budget) != Made::Room {
                    tracing::debug!(%client, "UDP flows of one source at their helper-wide share, none closed: datagram dropped");
                    return None;
                }
            }
        }
        // Taken before the socket is made, so that the bound holds for sockets too.
        let Some(slot) = FlowSlot::take(&self.shared, source, self.key, &self.counters) else {
            // Another thread took the room meanwhile.
            tracing::debug!(%client, "helper-wide UDP flow bound reached: datagram dropped");
            return None;
        };
        let flow = Arc::new(self.open_flow(client, to, slot)?);
        table.insert(client, flow.clone());
        if !self.registered.swap(true, Ordering::Relaxed) {
            self.shared.udp_tables.register(self.key, &self.flows);
        }
        let task = tokio::spawn(replies(
            flow.clone(),
            client,
            self.published.clone(),
            self.flows.clone(),
            self.shared.udp_idle,
            self.epoch,
            self.counters.clone(),
        ));
        let _ = flow.replies.set(task.abort_handle());
        // Counted only when trace lines are on (the fields are evaluated lazily).
        tracing::trace!(
            %client,
            %to,
            flows = table.len(),
            live_and_sockets = ?self.shared.udp_budget.totals(),
            "new UDP flow"
        );
        Some(flow)
    }

    /// A socket connected to the container, made on this thread (inside its netns),
    /// from the client's own address when it can be kept.
    fn open_flow(&self, client: SocketAddr, to: SocketAddr, slot: FlowSlot) -> Option<Flow> {
        let mut kept = source_for(self.shared.udp_families(), client, to)
            .filter(|src| self.shared.keep_udp_flow(*src, to));
        let sock = match kept.map(|src| transparent_socket(src, socket2::Type::DGRAM, None)) {
            Some(Ok(s)) => Ok(s),
            other => {
                if let (Some(Err(e)), Some(src)) = (other, kept.take()) {
                    tracing::debug!(error = %e, %src, "transparent UDP socket failed");
                    self.shared.release_udp_flow(src, to);
                }
                plain_socket(to)
            }
        };
        let upstream = sock.and_then(|s| {
            s.connect(&to.into())?;
            UdpSocket::from_std(s.into())
        });
        match upstream {
            Ok(upstream) => Some(Flow {
                upstream,
                to,
                kept,
                released: Default::default(),
                last: AtomicU64::new(self.now_ms()),
                marked: AtomicU64::new(self.now_ms()),
                replies: OnceLock::new(),
                shared: self.shared.clone(),
                slot,
            }),
            Err(e) => {
                if let Some(src) = kept {
                    self.shared.release_udp_flow(src, to);
                }
                tracing::debug!(error = %e, %to, "UDP socket in the container failed");
                None
            }
        }
    }
}

fn plain_socket(to: SocketAddr) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::DGRAM, None)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Carry the container's replies back to `client` until the flow has been idle for
/// `idle` (or is closed).
async fn replies(
    flow: Arc<Flow>,
    client: SocketAddr,
    published: Arc<UdpSocket>,
    flows: Flows,
    idle: Duration,
    epoch: Instant,
    counters: Arc<PortCounters>,
) {
    loop {
        let last = Duration::from_millis(flow.last.load(Ordering::Relaxed));
        let idle_for = epoch.elapsed().saturating_sub(last);
        if idle_for >= idle {
            break;
        }
        match tokio::time::timeout(idle - idle_for, flow.upstream.readable()).await {
            Err(_) => continue, // re-check idleness
            Ok(Err(_)) => break,
            Ok(Ok(())) => {}
        }
        let mut drained = false;
        // Counted once per batch, not per datagram.
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        for _ in 0..BURST {
            let res = BUF.with(|b| {
                let mut b = b.borrow_mut();
                match flow.upstream.try_recv(&mut b) {
                    Ok(n) => {
                        let sent =
                            socket2::SockRef::from(&*published).send_to(&b[..n], &client.into());
                        Ok(Some(sent.ok()))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            });
            match res {
                Ok(Some(sent)) => {
                    if let Some(n) = sent {
                        datagrams += 1;
                        bytes += n as u64;
                    }
                    flow.last
                        .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                Ok(None) => {
                    drained = true;
                    break;
                }
                // ECONNREFUSED: nothing listens in the container (an ICMP came back).
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => counters.refused(),
                Err(_) => {}
            }
        }
        counters.moved_out(datagrams, bytes);
        // Used by the container: marked in the table too, now and then.
        let last = flow.last.load(Ordering::Relaxed);
        if last.saturating_sub(flow.marked.load(Ordering::Relaxed)) >= MARK_REPLIES_EVERY_MS {
            flow.marked.store(last, Ordering::Relaxed);
            let mut table = lock(&flows);
            if table.holds(client, &flow) {
                table.get(client);
            }
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
    let mut table = lock(&flows);
    if table.holds(client, &flow) {
        table.remove(client);
    }
}

#[cfg(test)]
mod flow_bounds_tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A port of `shared`'s helper, published on loopback, forwarding to `child_port`
    /// on loopback (no child IP).
    fn port(shared: &Arc<Shared>, child_port: u16) -> Port {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        let published = UdpSocket::from_std(s).unwrap();
        // Unique, as the published ports' ids are.
        static NEXT_KEY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        Port::new(
            published,
            NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            child_port,
            Family::V4,
            shared.clone(),
            Arc::default(),
        )
    }

    fn client(a: u8, port: u16) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(192, 0, 2, a).into(), port)
    }

    fn flows_of(p: &Port, a: u8) -> usize {
        let t = p.flows.lock().unwrap();
        t.by_source
            .get(&IpAddr::V4(Ipv4Addr::new(192, 0, 2, a)))
            .map_or(0, |ports| ports.len())
    }

    /// `test` on a current-thread runtime, given a helper's state with 16 flows
    /// helper-wide: 4 per source, 20 sockets.
    fn with_16_flows<F: std::future::Future<Output = ()>>(test: impl FnOnce(Arc<Shared>) -> F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared::new(None, Duration::from_secs(60), None, 16));
        rt.block_on(test(shared));
    }

    /// Whether port `p` holds a flow of `client`.
    fn has(p: &Port, client: SocketAddr) -> bool {
        p.flows.lock().unwrap().flows().contains(&client)
    }

    /// Let the event loop drop the tasks of closed flows (their sockets close).
    async fn settle() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn flow_bounds_ports_share_one_helper_wide_bound() {
        with_16_flows(|shared| async move {
            let ports: Vec<Port> = (0..4).map(|_| port(&shared, 9)).collect();
            let live = || shared.udp_budget.totals().0;

            // A source spraying over every port holds 4 flows at most, and once at its
            // share evicts only its own flow on the port in question.
            for i in 0..40u16 {
                let p = &ports[usize::from(i % 4)];
                let opened = p.flow_for(client(1, 1000 + i)).is_some();
                assert!(opened, "datagram {i}: the source has a flow on every port");
                assert!(live() <= 4);
                settle().await;
            }
            assert_eq!(live(), 4);
            assert_eq!((0..4).map(|i| flows_of(&ports[i], 1)).sum::<usize>(), 4);

            // Three more sources fill the helper (4 x 4) on port 0.
            for a in 2..5u8 {
                for i in 0..4 {
                    assert!(ports[0].flow_for(client(a, 2000 + i)).is_some());
                }
            }
            assert_eq!(live(), 16);
            // A new source on port 0 replaces port 0's least recently used flow.
            assert!(ports[0].flow_for(client(5, 3000)).is_some());
            assert_eq!(live(), 16);
            // On port 1 it replaces port 1's (the sprayer's) flow.
            assert_eq!(flows_of(&ports[1], 1), 1);
            assert!(ports[1].flow_for(client(6, 3000)).is_some());
            assert_eq!(flows_of(&ports[1], 1), 0);
            settle().await;
            // Port 1 still holds a flow (source 6); a port that holds none refuses.
            let empty = port(&shared, 9);
            assert!(empty.flow_for(client(7, 3000)).is_none());
            assert_eq!(live(), 16);
            // A known client keeps its flow, even with the helper full.
            assert!(ports[1].flow_for(client(6, 3000)).is_some());
            assert_eq!(live(), 16);
            // One flow closing (idle, evicted elsewhere) gives the empty port its turn.
            ports[1].flows.lock().unwrap().remove(client(6, 3000));
            assert!(empty.flow_for(client(7, 3000)).is_some());
            assert_eq!(live(), 16);
        });
    }

    #[test]
    fn flow_bounds_a_source_at_its_share_gives_way_on_its_busiest_port() {
        with_16_flows(|shared| async move {
            let ports: Vec<Port> = (0..3).map(|_| port(&shared, 9)).collect();
            let live = || shared.udp_budget.totals().0;

            // One address (clients behind one NAT, say) holds its share: three flows on
            // port 0, one on port 1.
            for i in 0..3 {
                assert!(ports[0].flow_for(client(1, 1000 + i)).is_some());
            }
            assert!(ports[1].flow_for(client(1, 2000)).is_some());
            assert_eq!(live(), 4);

            // A new client of it on port 2, where it holds none: served, and the flow
            // that goes is the least recently used one on port 0, its busiest.
            ports[0].flow_for(client(1, 1000)); // used again: 1001 is now the oldest
            assert!(
                ports[2].flow_for(client(1, 3000)).is_some(),
                "a source at its share is served on a port where it holds no flow"
            );
            assert_eq!(live(), 4);
            assert!(!has(&ports[0], client(1, 1001)), "port 0's oldest closed");
            assert!(has(&ports[0], client(1, 1000)) && has(&ports[0], client(1, 1002)));
            assert!(
                has(&ports[1], client(1, 2000)),
                "its one flow on port 1 kept"
            );
            settle().await;

            // A new client of it on port 1, where it holds one flow: port 0 (two) gives
            // way again, and port 1's flow stays.
            assert!(ports[1].flow_for(client(1, 2001)).is_some());
            assert!(has(&ports[1], client(1, 2000)) && has(&ports[1], client(1, 2001)));
            assert_eq!(flows_of(&ports[0], 1), 1);
            assert_eq!(live(), 4);
            settle().await;

            // Now level (1, 2, 1): port 1 is its busiest and gives up its own oldest.
            assert!(ports[2].flow_for(client(1, 3001)).is_some());
            assert!(!has(&ports[1], client(1, 2000)));
            assert_eq!(
                (0..3).map(|i| flows_of(&ports[i], 1)).collect::<Vec<_>>(),
                [1, 1, 2]
            );
            // Level again: a new client on a port with as many as any gives up its own.
            assert!(ports[2].flow_for(client(1, 3002)).is_some());
            assert!(!has(&ports[2], client(1, 3000)));
            assert_eq!(live(), 4);
            settle().await;

            // A port whose task stopped is out of the tables: its flows closed with it.
            let stopped = EndFlows(ports[2].flows.clone(), ports[2].key, shared.clone());
            drop(stopped);
            assert_eq!(live(), 2);
            assert!(!shared
                .udp_tables
                .close_source_oldest(&[ports[2].key], client(1, 0).ip()));
        });
    }

    #[test]
    fn flow_bounds_a_source_at_its_share_gives_up_its_least_recently_used_flow_on_a_tie() {
        with_16_flows(|shared| async move {
            // One flow on each of ports 0-3.
            let ports: Vec<Port> = (0..5).map(|_| port(&shared, 9)).collect();
            for p in &ports[..4] {
                assert!(p.flow_for(client(1, 1000)).is_some());
            }
            // Used again from port 3 down to port 0 (a clock tick apart): port 3's flow is
            // now the least recently used, port 0's (the lowest key) the most.
            for i in (0..4).rev() {
                std::thread::sleep(Duration::from_millis(3));
                // As forwarding a datagram does.
                let f = ports[i].flow_for(client(1, 1000)).unwrap();
                f.last.store(ports[i].now_ms(), Ordering::Relaxed);
            }
            assert!(ports[4].flow_for(client(1, 1000)).is_some());
            assert!(
                !has(&ports[3], client(1, 1000)),
                "the least recently used went"
            );
            for i in [0, 1, 2, 4] {
                assert!(has(&ports[i], client(1, 1000)), "port {i}'s flow kept");
            }
            assert_eq!(shared.udp_budget.totals().0, 4);
            settle().await;
        });
    }

    #[test]
    fn flow_bounds_a_flow_the_container_still_sends_on_is_not_the_first_to_go() {
        with_16_flows(|shared| async move {
            let container = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let p = port(&shared, container.local_addr().unwrap().port());
            // The source's share, 4 flows: 1000 is the least recently used.
            for i in 0..4 {
                assert!(p.flow_for(client(1, 1000 + i)).is_some());
            }
            // The container sends on 1000's flow (the client says nothing more).
            tokio::time::sleep(Duration::from_millis(MARK_REPLIES_EVERY_MS + 20)).await;
            let upstream = {
                let mut t = p.flows.lock().unwrap();
                t.flows()
                    .peek(&client(1, 1000))
                    .unwrap()
                    .upstream
                    .local_addr()
            };
            container.send_to(b"push", upstream.unwrap()).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A new client of the source: 1001 gives way, not 1000.
            assert!(p.flow_for(client(1, 2000)).is_some());
            assert!(
                has(&p, client(1, 1000)),
                "the flow the container sends on kept"
            );
            assert!(
                !has(&p, client(1, 1001)),
                "the least recently used either way went"
            );
            settle().await;
        });
    }

    #[test]
    fn flow_bounds_sockets_of_closed_flows_count_until_released() {
        with_16_flows(|shared| async move {
            let p = port(&shared, 9);
            for a in 1..5u8 {
                for i in 0..4 {
                    assert!(p.flow_for(client(a, 1000 + i)).is_some());
                }
            }
            // Without the event loop running, evicted flows keep their sockets: four
            // replacements, then new clients wait for those sockets to close.
            for a in 10..14u8 {
                assert!(p.flow_for(client(a, 1)).is_some());
            }
            assert_eq!(shared.udp_budget.totals(), (16, 20));
            assert!(p.flow_for(client(14, 1)).is_none());
            settle().await;
            assert_eq!(shared.udp_budget.totals(), (16, 16));
            assert!(p.flow_for(client(14, 1)).is_some());
            // Every flow closed (as idle ones are): nothing counted any more.
            let clients: Vec<SocketAddr> = {
                let mut t = p.flows.lock().unwrap();
                t.flows().iter().map(|(c, _)| *c).collect()
            };
            for c in clients {
                p.flows.lock().unwrap().remove(c);
            }
            settle().await;
            assert_eq!(shared.udp_budget.totals(), (0, 0));
        });
    }
}
