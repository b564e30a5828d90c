//! UDP forwarding: one flow per client address. Each flow has a socket connected to
//! the container (made inside its netns); replies come back through the published
//! socket to the client they belong to. Idle flows expire; the number of flows per
//! port is capped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::config::Family;
use crate::forward::Shared;
use crate::source_ip::source_for;
use crate::source_ip::transparent_socket;
use crate::tcp::target;

/// Flows per published port at most; datagrams from further clients are dropped
/// until a flow expires.
pub const MAX_FLOWS_PER_PORT: usize = 4096;
/// Largest datagram we carry.
const MAX_DATAGRAM: usize = 65536;

thread_local! {
    // One buffer per thread, used only between awaits: no flow or port owns one.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

struct Flow {
    upstream: UdpSocket,
    /// Milliseconds since `epoch` of the last datagram either way.
    last: AtomicU64,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

/// Serve one published UDP port until the runtime stops.
pub(crate) async fn serve(
    published: UdpSocket,
    child_port: u16,
    family: Family,
    shared: Arc<Shared>,
) {
    let published = Arc::new(published);
    let flows: Flows = Arc::default();
    let epoch = Instant::now();
    loop {
        if published.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // Drain everything that is queued before waiting again.
        loop {
            let more = BUF.with(|b| {
                let mut b = b.borrow_mut();
                let (n, client) = match published.try_recv_from(&mut b) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true, // e.g. an ICMP error queued on the socket
                };
                if let Some(flow) = flow_for(
                    &flows, client, child_port, family, &shared, &published, epoch,
                ) {
                    flow.last
                        .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    // Straight to the kernel: tokio's try_send refuses until the new
                    // socket's first readiness event. A full buffer drops the datagram,
                    // as the network would.
                    let _ = socket2::SockRef::from(&flow.upstream).send(&b[..n]);
                }
                true
            });
            if !more {
                break;
            }
        }
    }
}

fn flow_for(
    flows: &Flows,
    client: SocketAddr,
    child_port: u16,
    family: Family,
    shared: &Arc<Shared>,
    published: &Arc<UdpSocket>,
    epoch: Instant,
) -> Option<Arc<Flow>> {
    let mut map = flows.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = map.get(&client) {
        return Some(f.clone());
    }
    if map.len() >= MAX_FLOWS_PER_PORT {
        tracing::debug!(%client, "too many UDP flows; datagram dropped");
        return None;
    }
    let to = target(shared.child_ip(), family, child_port);
    let source = source_for(&shared.source_families, client, to);
    let upstream = match connect_upstream(to, source) {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, %to, "UDP socket in the container failed");
            return None;
        }
    };
    let flow = Arc::new(Flow {
        upstream,
        last: AtomicU64::new(epoch.elapsed().as_millis() as u64),
    });
    map.insert(client, flow.clone());
    tokio::spawn(replies(
        flow.clone(),
        client,
        published.clone(),
        flows.clone(),
        shared.udp_idle,
        epoch,
    ));
    Some(flow)
}

/// A socket connected to the container, made on this thread (inside its netns), from
/// the client's own address when it can be kept.
fn connect_upstream(to: SocketAddr, source: Option<SocketAddr>) -> io::Result<UdpSocket> {
    let transparent =
        source.and_then(|src| transparent_socket(src, socket2::Type::DGRAM, false).ok());
    let s = match transparent {
        Some(s) => s,
        None => {
            let s =
                socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::DGRAM, None)?;
            s.set_nonblocking(true)?;
            s
        }
    };
    s.connect(&to.into())?;
    UdpSocket::from_std(s.into())
}

/// Carry the container's replies back to `client` until the flow has been idle for
/// `idle`.
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
        loop {
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
                Ok(false) => break,
                // ECONNREFUSED: nothing listens in the container (an ICMP came back).
                Err(_) => {}
            }
        }
    }
    let mut map = flows.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
        map.remove(&client);
    }
}
