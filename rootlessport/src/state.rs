//! What every serving task shares: where new connections and flows go, from which
//! address, and the helper-wide UDP budget. The forwarder makes it once; the TCP, UDP
//! and reload tasks read it (a reload also changes the child IP), and the control
//! socket lists the published ports it holds.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::io::unix::{AsyncFd, AsyncFdRegisterError};

use crate::control::PortStatus;
use crate::counters::Published;
use crate::flow_budget::FlowBudget;
use crate::netlink::IpFamily;
use crate::source_ip::SourceIp;

/// State every task reads: where new connections go, and from which address.
pub(crate) struct Shared {
    child_ip: RwLock<Option<IpAddr>>,
    pub(crate) udp_idle: Duration,
    /// Bytes moved per splice call at most, and the pipe size asked for.
    pub(crate) pipe_size: usize,
    /// Families whose TCP client addresses are kept (empty: none).
    pub(crate) source_families: Vec<IpFamily>,
    /// Families whose UDP client addresses are kept (empty: none).
    pub(crate) udp_families: Vec<IpFamily>,
    /// The mark of our TCP sockets when client addresses are kept.
    pub(crate) mark: Option<u32>,
    source_ip: Mutex<Option<SourceIp>>,
    /// The helper-wide bound on UDP flows (see [`crate::udp`]), from the open-file limit.
    pub(crate) udp_budget: FlowBudget,
    /// Every published port, for the control socket's `list`. Locked only by the
    /// control path and when a port is published: the data path holds each port's
    /// counters itself.
    published: Mutex<Vec<Published>>,
}

impl Shared {
    /// The state of a forwarder to `child_ip` keeping client addresses as `source`
    /// allows (none without it), with a UDP budget of `udp_bound` live flows. The
    /// families and the mark are copied out of `source` once, so that the data path
    /// reads them without its lock.
    pub(crate) fn new(
        child_ip: Option<IpAddr>,
        udp_idle: Duration,
        source: Option<SourceIp>,
        udp_bound: usize,
    ) -> Shared {
        let families = |kept: fn(&SourceIp, IpFamily) -> bool| -> Vec<IpFamily> {
            [IpFamily::V4, IpFamily::V6]
                .into_iter()
                .filter(|f| source.as_ref().is_some_and(|s| kept(s, *f)))
                .collect()
        };
        Shared {
            child_ip: RwLock::new(child_ip),
            udp_idle,
            pipe_size: DEFAULT_PIPE_SIZE,
            source_families: families(SourceIp::supports),
            udp_families: families(SourceIp::supports_udp),
            mark: source.as_ref().map(SourceIp::mark),
            source_ip: Mutex::new(source),
            udp_budget: FlowBudget::new(udp_bound),
            published: Mutex::new(Vec::new()),
        }
    }

    /// The same, moving up to `bytes` per splice call (at least one page).
    pub(crate) fn with_pipe_size(mut self, bytes: usize) -> Shared {
        self.pipe_size = bytes.max(4096);
        self
    }

    pub(crate) fn child_ip(&self) -> Option<IpAddr> {
        *self.child_ip.read().unwrap_or_else(|p| p.into_inner())
    }

    fn source_ip(&self) -> MutexGuard<'_, Option<SourceIp>> {
        self.source_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload: new connections and flows go to `ip`; our routes follow.
    pub(crate) fn set_child_ip(&self, ip: Option<IpAddr>) {
        *self.child_ip.write().unwrap_or_else(|p| p.into_inner()) = ip;
        if let Some(s) = self.source_ip().as_mut() {
            s.reload(ip);
        }
    }

    /// Route the container's replies on the UDP flow `client` <-> `target` to our
    /// socket bound to `client`; `false` when that flow cannot keep the address.
    pub(crate) fn keep_udp_flow(&self, client: SocketAddr, target: SocketAddr) -> bool {
        self.source_ip()
            .as_mut()
            .is_some_and(|s| s.add_udp_flow(client, target.port()))
    }

    /// The flow kept by [`Shared::keep_udp_flow`] ended.
    pub(crate) fn release_udp_flow(&self, client: SocketAddr, target: SocketAddr) {
        if let Some(s) = self.source_ip().as_mut() {
            s.remove_udp_flow(client, target.port());
        }
    }

    /// A port is published: listed from now on.
    pub(crate) fn publish(&self, port: Published) {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(port);
    }

    /// Every published port with its counters now, in the order published.
    pub(crate) fn port_statuses(&self) -> Vec<PortStatus> {
        let published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        published.iter().map(Published::status).collect()
    }

    /// Take the reply routing out, to tear it down now (from a thread inside the
    /// container netns); the tasks still running forward without it.
    pub(crate) fn take_source_ip(&self) -> Option<SourceIp> {
        self.source_ip().take()
    }
}

/// The splice size when the helper is not told otherwise (`ROOTLESSPORT_PIPE_KB`).
pub(crate) const DEFAULT_PIPE_SIZE: usize = 256 * 1024;

/// Register an owned fd with the event loop.
pub(crate) fn register(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, AsyncFdRegisterError<OwnedFd>> {
    // SAFETY: an OwnedFd owns its fd, keeps it open until dropped and always returns the
    // same raw fd, which is what registration requires.
    unsafe { AsyncFd::register(fd) }
}
