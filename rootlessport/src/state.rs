//! What every serving task shares: where new connections and flows go, from which
//! address, and the helper-wide UDP budget. The forwarder makes it once; the TCP, UDP
//! and reload tasks read it (a reload also changes the child IP), and the control
//! socket lists the published ports it holds.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::io::unix::{AsyncFd, AsyncFdRegisterError};
use tokio::task::JoinHandle;

use crate::config::{display_addr, PortSpec};
use crate::control::PortStatus;
use crate::counters::{PortCounters, Published};
use crate::flow_budget::FlowBudget;
use crate::listen::Binder;
use crate::netlink::IpFamily;
use crate::source_ip::{merged_ranges, SourceIp};
use crate::tcp::{HubCommand, TcpPortState};

/// State every task reads: where new connections go, and from which address.
pub(crate) struct Shared {
    child_ip: RwLock<Option<IpAddr>>,
    pub(crate) udp_idle: Duration,
    /// Bytes moved per splice call at most, and the pipe size asked for.
    pub(crate) pipe_size: usize,
    /// Families whose TCP client addresses are kept (empty: none).
    pub(crate) source_families: Vec<IpFamily>,
    /// Families whose UDP client addresses are kept ([`families_bits`]): read by every
    /// new UDP flow without a lock, changed when ports are added or removed.
    udp_families: AtomicU8,
    /// The mark of our TCP sockets when client addresses are kept.
    pub(crate) mark: Option<u32>,
    source_ip: Mutex<Option<SourceIp>>,
    /// The helper-wide bound on UDP flows (see [`crate::udp`]), from the open-file limit.
    pub(crate) udp_budget: FlowBudget,
    /// Every published UDP port's flows, for [`FlowBudget`]'s evictions on other ports.
    pub(crate) udp_tables: crate::udp::FlowTables,
    /// Every published port, for the control socket's `list`, with what serves it, in
    /// the order published (so sorted by [`Entry::id`]). Locked by the control path,
    /// when ports are published or removed, and by the accept hub when a TCP port gets
    /// its first connection; the data path holds each port's counters itself.
    published: Mutex<Vec<Entry>>,
    /// The next [`Entry::id`].
    next_id: AtomicU32,
    /// Where TCP listeners are added and removed: the accept hub ([`crate::tcp`]).
    /// None: this state serves no TCP ports (unit tests).
    hub: Option<tokio::sync::mpsc::UnboundedSender<HubCommand>>,
    /// Binds the listeners of added ports in the engine's netns (none: ports cannot be
    /// added).
    binder: Option<Binder>,
    /// Held through each `add` and `remove`, so that their listeners, lists and UDP
    /// gates change one request at a time.
    pub(crate) changes: tokio::sync::Mutex<()>,
    /// Live TCP connections and control requests, for giving freed heap back once
    /// there are none ([`crate::heap_trim`]).
    pub(crate) idle: Arc<crate::heap_trim::Idle>,
}

/// A published port and what serves it. 56 bytes: one per port, for the life of the
/// port.
pub(crate) struct Entry {
    pub(crate) port: Published,
    /// Names the port to the accept hub; unique for the helper's life, rising in the
    /// order published.
    pub(crate) id: u32,
    pub(crate) serving: Serving,
}

/// What serves a published port.
pub(crate) enum Serving {
    /// Its listener, in the accept hub under the entry's id, and the port's counters
    /// and close signal once it has had a connection (none before: nothing to count).
    Tcp(Option<Arc<TcpPortState>>),
    /// Its own task and counters.
    Udp(Box<UdpPort>),
}

/// A published UDP port's task (which owns the socket and every flow) and counters.
pub(crate) struct UdpPort {
    pub(crate) task: JoinHandle<()>,
    pub(crate) counters: Arc<PortCounters>,
}

impl Entry {
    /// As `list` shows it now.
    pub(crate) fn status(&self) -> PortStatus {
        let counters = match &self.serving {
            Serving::Tcp(state) => state
                .as_ref()
                .map(|s| s.counters.snapshot())
                .unwrap_or_default(),
            Serving::Udp(u) => u.counters.snapshot(),
        };
        self.port.status(counters)
    }
}

/// A set of families as bits: 1 for IPv4, 2 for IPv6.
fn families_bits(kept: impl Fn(IpFamily) -> bool) -> u8 {
    u8::from(kept(IpFamily::V4)) | (u8::from(kept(IpFamily::V6)) << 1)
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
            udp_families: AtomicU8::new(families_bits(|f| {
                source.as_ref().is_some_and(|s| s.supports_udp(f))
            })),
            mark: source.as_ref().map(SourceIp::mark),
            source_ip: Mutex::new(source),
            udp_budget: FlowBudget::new(udp_bound),
            udp_tables: crate::udp::FlowTables::new(),
            published: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(0),
            hub: None,
            binder: None,
            changes: tokio::sync::Mutex::new(()),
            idle: Arc::default(),
        }
    }

    /// The same, adding ports' listeners through `binder`.
    pub(crate) fn with_binder(mut self, binder: Binder) -> Shared {
        self.binder = Some(binder);
        self
    }

    /// The same, serving TCP ports through the accept hub that `hub` commands.
    pub(crate) fn with_hub(
        mut self,
        hub: tokio::sync::mpsc::UnboundedSender<HubCommand>,
    ) -> Shared {
        self.hub = Some(hub);
        self
    }

    /// Send the accept hub the command `command` makes around its reply channel, and
    /// wait for the reply. `None`: this state serves no TCP ports (unit tests).
    pub(crate) async fn ask_hub<T>(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> HubCommand,
    ) -> Option<std::io::Result<T>> {
        let hub = self.hub.as_ref()?;
        let (done, reply) = tokio::sync::oneshot::channel();
        let stopped = || std::io::Error::other("the accept hub stopped");
        Some(match hub.send(command(done)) {
            Ok(()) => reply.await.map_err(|_| stopped()),
            Err(_) => Err(stopped()),
        })
    }

    /// What binds added ports' listeners, if they may be added.
    pub(crate) fn binder(&self) -> Option<&Binder> {
        self.binder.as_ref()
    }

    /// Families whose UDP client addresses are kept now (one atomic load).
    pub(crate) fn udp_families(&self) -> &'static [IpFamily] {
        match self.udp_families.load(Relaxed) {
            1 => &[IpFamily::V4],
            2 => &[IpFamily::V6],
            3 => &[IpFamily::V4, IpFamily::V6],
            _ => &[],
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

    fn published(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.published.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` new entry ids, the first of them returned. (32 bits: they would wrap after
    /// 4 billion ports published over one helper's life.)
    pub(crate) fn new_ids(&self, n: usize) -> u32 {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.next_id.fetch_add(n, Relaxed)
    }

    /// Ports are published: listed from now on, after those published before (their ids
    /// from [`Shared::new_ids`], rising).
    pub(crate) fn publish(&self, entries: Vec<Entry>) {
        let mut published = self.published();
        if published.is_empty() {
            // The start-up batch becomes the list as it is: no copy of 10,000 entries.
            *published = entries;
        } else {
            published.extend(entries);
        }
    }

    /// Every published port with its counters now, in the order published.
    pub(crate) fn port_statuses(&self) -> Vec<PortStatus> {
        self.published().iter().map(Entry::status).collect()
    }

    /// The TCP port `id` has had its first connection: `list` reads its counters from
    /// `state` from now on. Nothing when it is no longer listed.
    pub(crate) fn attach_tcp_state(&self, id: u32, state: &Arc<TcpPortState>) {
        let mut published = self.published();
        if let Ok(i) = published.binary_search_by_key(&id, |e| e.id) {
            if let Serving::Tcp(s) = &mut published[i].serving {
                *s = Some(state.clone());
            }
        }
    }

    /// The ids of the published ports of `specs`, all or none: each must be published
    /// now (same host address, host port, container port and protocol), else the error
    /// names the first that is not.
    pub(crate) fn find_published(&self, specs: &[PortSpec]) -> Result<Vec<u32>, String> {
        use std::collections::HashMap;
        // One pass over each list, not one over the published list per spec: removing
        // thousands of ports out of thousands stays linear. A port is published once
        // (a second listener on its address could not be bound), so each port is
        // looked for by the first spec that names it; a later spec naming it again
        // (`127.0.0.1` and `::ffff:127.0.0.1`) is a conflict, as `plan_ports` makes two
        // identical ones.
        let key = |spec: &PortSpec| {
            (
                spec.parent_addr,
                spec.parent_port,
                spec.child_port,
                spec.protocol,
            )
        };
        let mut first_of: HashMap<_, usize> = HashMap::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            first_of.entry(key(spec)).or_insert(i);
        }
        let mut found: Vec<Option<u32>> = vec![None; specs.len()];
        for e in self.published().iter() {
            let p = &e.port;
            let k = (p.host_ip, p.host_port, p.container_port, p.protocol);
            if let Some(&i) = first_of.get(&k) {
                found[i] = Some(e.id);
            }
        }
        let mut ids = Vec::with_capacity(specs.len());
        for (i, (spec, id)) in specs.iter().zip(found).enumerate() {
            match id {
                Some(id) => ids.push(id),
                None => match first_of.get(&key(spec)) {
                    Some(&first) if first != i => {
                        return Err(format!("conflict with ID {}", specs[first].id))
                    }
                    _ => {
                        return Err(format!(
                            "not published: {} {} -> {}",
                            spec.proto(),
                            display_addr(&spec.parent_ip, spec.parent_port),
                            spec.child_port
                        ))
                    }
                },
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Take the ports `ids` (sorted) off the list, in the order published.
    pub(crate) fn unpublish(&self, ids: &[u32]) -> Vec<Entry> {
        let mut published = self.published();
        let all = std::mem::take(&mut *published);
        let mut kept = Vec::with_capacity(all.len().saturating_sub(ids.len()));
        let mut taken = Vec::with_capacity(ids.len());
        for e in all {
            if ids.binary_search(&e.id).is_ok() {
                taken.push(e);
            } else {
                kept.push(e);
            }
        }
        *published = kept;
        taken
    }

    /// Make the UDP gates of the client-address keeping match the published UDP
    /// ports and `extra` container ports (about to be published), and the families
    /// kept follow. Runs on a thread inside the container netns (the runtime's).
    pub(crate) fn update_udp_gates(&self, extra: &[u16]) {
        let ports: Vec<u16> = self
            .published()
            .iter()
            .filter(|e| matches!(e.serving, Serving::Udp(_)))
            .map(|e| e.port.container_port)
            .chain(extra.iter().copied())
            .collect();
        let mut source = self.source_ip();
        if let Some(s) = source.as_mut() {
            s.set_udp_ranges(merged_ranges(ports));
            self.udp_families
                .store(families_bits(|f| s.supports_udp(f)), Relaxed);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use slirp_config::PortMapping;

    fn shared_with(ports: &[(u16, u16, &str)]) -> Shared {
        let shared = Shared::new(None, Duration::from_secs(90), None, 64);
        let specs = crate::config::plan_ports(
            &ports
                .iter()
                .map(|&(host, container, proto)| {
                    PortMapping::new("127.0.0.1", host, container, 1, proto)
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let first = shared.new_ids(specs.len());
        let entries = (first..)
            .zip(specs)
            .map(|(id, spec)| Entry {
                port: Published {
                    host_ip: spec.parent_addr,
                    host_port: spec.parent_port,
                    container_port: spec.child_port,
                    protocol: spec.protocol,
                    published_at: 0,
                },
                id,
                serving: Serving::Tcp(None),
            })
            .collect();
        shared.publish(entries);
        shared
    }

    fn find(shared: &Shared, mappings: &[(&str, u16, u16, &str)]) -> Result<Vec<u32>, String> {
        let mappings: Vec<_> = mappings
            .iter()
            .map(|&(ip, host, container, proto)| PortMapping::new(ip, host, container, 1, proto))
            .collect();
        shared.find_published(&crate::config::plan_ports(&mappings).unwrap())
    }

    /// `remove`'s lookup: every spec must be a published port, all or none; the ids
    /// come back sorted whatever the batch's order; one port named twice (two texts of
    /// one address) is a conflict with its first naming, as two identical specs are.
    #[test]
    fn find_published_all_or_none_each_port_once() {
        let shared = shared_with(&[(8080, 80, "tcp"), (8081, 81, "tcp"), (8082, 82, "udp")]);
        assert_eq!(
            find(
                &shared,
                &[
                    ("127.0.0.1", 8082, 82, "udp"),
                    ("127.0.0.1", 8080, 80, "tcp")
                ]
            ),
            Ok(vec![0, 2])
        );
        assert_eq!(
            find(&shared, &[("127.0.0.1", 8081, 81, "udp")]),
            Err("not published: udp 127.0.0.1:8081 -> 81".to_owned())
        );
        assert_eq!(
            find(
                &shared,
                &[
                    ("127.0.0.1", 8081, 81, "tcp"),
                    ("127.0.0.1", 8080, 80, "tcp"),
                    ("::ffff:127.0.0.1", 8080, 80, "tcp"),
                    ("127.0.0.1", 8090, 80, "tcp"),
                ]
            ),
            Err("conflict with ID 2".to_owned())
        );
        assert_eq!(
            find(
                &shared,
                &[
                    ("::ffff:127.0.0.1", 8082, 82, "udp"),
                    ("127.0.0.1", 8082, 82, "udp"),
                ]
            ),
            Err("conflict with ID 1".to_owned())
        );
        // Thousands out of thousands, in reverse: each found, once.
        let many: Vec<_> = (0..3000u16)
            .map(|i| (20000 + i, 30000 + i, "tcp"))
            .collect();
        let shared = shared_with(&many);
        let batch: Vec<_> = many
            .iter()
            .rev()
            .step_by(2)
            .map(|&(h, c, p)| ("127.0.0.1", h, c, p))
            .collect();
        let ids = find(&shared, &batch).unwrap();
        assert_eq!(ids.len(), 1500);
        assert_eq!((ids[0], ids[1499]), (1, 2999));
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 2));
    }
}
