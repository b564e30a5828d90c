//! UDP forwarding: one flow per client address and port. Each flow has a socket
//! connected to the container (made inside its netns, from the client's own address
//! when it is kept); the container's replies come back through the published socket
//! to the client they belong to.
//!
//! Limits, per published port: at most [`MAX_FLOWS_PER_PORT`] flows; when a new client
//! comes and the table is full, the least recently used flow is closed to make room
//! (so a new client is never refused). One source address holds at most
//! [`MAX_FLOWS_PER_SOURCE`] of them: past that its own least recently used flow makes
//! room, so a host spraying source ports only evicts itself. A flow idle for the idle
//! timeout (podman's 90 s) is closed. After a reload, a flow aimed at the old child
//! IP is closed when its next datagram arrives, and that datagram opens a flow to the
//! new one.

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
use crate::forward::Shared;
use crate::source_ip::{source_for, transparent_socket};
use crate::tcp::target;

/// Flows per published port at most; a new client then replaces the least recently
/// used flow.
pub const MAX_FLOWS_PER_PORT: usize = 4096;
/// Flows one source address may hold on a published port (a quarter of the table).
pub const MAX_FLOWS_PER_SOURCE: usize = MAX_FLOWS_PER_PORT / 4;
/// Datagrams handled per socket per wake-up before other sockets get their turn.
const BURST: usize = 64;
/// Largest datagram we carry.
const MAX_DATAGRAM: usize = 65536;

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
    /// Milliseconds since the port's epoch of the last datagram either way.
    last: AtomicU64,
    replies: OnceLock<AbortHandle>,
    shared: Arc<Shared>,
}

impl Flow {
    /// End the flow now: its reply task stops and its rule goes at once (a new flow
    /// of the same client may need the same rule right away, after a reload).
    fn close(&self) {
        if let Some(task) = self.replies.get() {
            task.abort();
        }
        self.release();
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

    /// Make room for one more flow of `client`'s source address.
    fn make_room(&mut self, client: SocketAddr) {
        let own = self.by_source.get_mut(&client.ip()).and_then(|ports| {
            (ports.len() >= MAX_FLOWS_PER_SOURCE)
                .then(|| ports.peek_lru().map(|(p, ())| *p))
                .flatten()
        });
        if let Some(port) = own {
            self.remove(SocketAddr::new(client.ip(), port));
            tracing::debug!(source = %client.ip(), "flows of one source at their share: oldest closed");
        } else if self.flows().len() >= MAX_FLOWS_PER_PORT {
            if let Some(oldest) = self.flows().peek_lru().map(|(c, _)| *c) {
                self.remove(oldest);
                tracing::debug!("UDP flow table full: least recently used flow closed");
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

type Flows = Arc<Mutex<FlowTable>>;

/// One published UDP port and what its flows need.
struct Port {
    published: Arc<UdpSocket>,
    flows: Flows,
    child_port: u16,
    family: Family,
    shared: Arc<Shared>,
    epoch: Instant,
}

/// Serve one published UDP port until the runtime stops.
pub(crate) async fn serve(
    published: UdpSocket,
    child_port: u16,
    family: Family,
    shared: Arc<Shared>,
) {
    let port = Port {
        published: Arc::new(published),
        flows: Arc::default(),
        child_port,
        family,
        shared,
        epoch: Instant::now(),
    };
    loop {
        if port.published.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // A bounded batch, then the other sockets get their turn.
        let mut drained = false;
        for _ in 0..BURST {
            if !BUF.with(|b| port.forward_one(&mut b.borrow_mut())) {
                drained = true;
                break;
            }
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

impl Port {
    /// Forward one queued datagram; `false` when none was queued.
    fn forward_one(&self, buf: &mut [u8]) -> bool {
        let (n, client) = match self.published.try_recv_from(buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true, // e.g. an ICMP error queued on the socket
        };
        let Some(flow) = self.flow_for(client) else {
            return true;
        };
        flow.last.store(self.now_ms(), Ordering::Relaxed);
        // Straight to the kernel: tokio's try_send refuses until the new socket's first
        // readiness event. A full buffer drops the datagram, as the network would.
        let up = socket2::SockRef::from(&flow.upstream);
        if let Err(e) = up.send(&buf[..n]) {
            // An ICMP error from an earlier datagram (nothing listened then) is reported
            // by this send, which then sent nothing: send again, once.
            if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                let _ = up.send(&buf[..n]);
            }
        }
        true
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn flow_for(&self, client: SocketAddr) -> Option<Arc<Flow>> {
        let to = target(self.shared.child_ip(), self.family, self.child_port);
        let mut table = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = table.get(client) {
            if f.to == to {
                return Some(f);
            }
            // A reload moved the container: this flow goes, a new one is made.
            table.remove(client);
        }
        table.make_room(client);
        let flow = Arc::new(self.open_flow(client, to)?);
        table.insert(client, flow.clone());
        let task = tokio::spawn(replies(
            flow.clone(),
            client,
            self.published.clone(),
            self.flows.clone(),
            self.shared.udp_idle,
            self.epoch,
        ));
        let _ = flow.replies.set(task.abort_handle());
        tracing::trace!(%client, %to, flows = table.len(), "new UDP flow");
        Some(flow)
    }

    /// A socket connected to the container, made on this thread (inside its netns),
    /// from the client's own address when it can be kept.
    fn open_flow(&self, client: SocketAddr, to: SocketAddr) -> Option<Flow> {
        let mut kept = source_for(&self.shared.udp_families, client, to)
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
                replies: OnceLock::new(),
                shared: self.shared.clone(),
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
        for _ in 0..BURST {
            let res = BUF.with(|b| {
                let mut b = b.borrow_mut();
                match flow.upstream.try_recv(&mut b) {
                    Ok(n) => {
                        let _ =
                            socket2::SockRef::from(&*published).send_to(&b[..n], &client.into());
                        Ok(true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                    Err(e) => Err(e),
                }
            });
            match res {
                Ok(true) => flow
                    .last
                    .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed),
                Ok(false) => {
                    drained = true;
                    break;
                }
                // ECONNREFUSED: nothing listens in the container (an ICMP came back).
                Err(_) => {}
            }
        }
        if !drained {
            tokio::task::yield_now().await;
        }
    }
    let mut table = flows.lock().unwrap_or_else(|p| p.into_inner());
    if table
        .flows()
        .peek(&client)
        .is_some_and(|f| Arc::ptr_eq(f, &flow))
    {
        table.remove(client);
    }
}
