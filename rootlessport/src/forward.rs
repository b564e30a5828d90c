//! The forwarder's life: listeners made in the engine's netns, then one thread that
//! enters the container's netns and serves every port from an event loop. Sockets keep
//! the netns they were made in, so the listeners stay on the host side while every
//! connection to the container is made directly inside it: no second process, no fd
//! passing, no thread per port. Ports added through the control socket are bound by
//! one more thread left behind in the engine's netns ([`crate::listen::Binder`]) and
//! then served exactly as the config's ([`serve_ports`]): every TCP port by the one
//! accept hub ([`crate::tcp::AcceptHub`]), every UDP port by a task of its own; each
//! port can be stopped on its own (`remove`).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use slirp_config::PortMapping;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Runtime;

use crate::config::{plan_ports, Transport};
use crate::control::PortStatus;
use crate::counters::{PortCounters, Published};
use crate::listen::{nofile_limit, registering_failed, Binder, Bound};
use crate::reload::server::ReloadSocket;
use crate::source_ip::{merged_ranges, SourceIp};
use crate::state::{register, Entry, Serving, Shared, UdpPort};
use crate::tcp::{AcceptHub, AddFailed, HubCommand, HubSet, PortRecord};
use crate::Error;

/// podman's idle timeout for UDP flows.
pub(crate) const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(90);

/// Everything the event loop needs.
pub(crate) struct Forwarder {
    pub(crate) bound: Vec<Bound>,
    /// The accept hub's epoll set, holding every TCP listener of `bound` already, its
    /// position in `bound` as the event's data ([`crate::listen::bind_all`]).
    pub(crate) hub_set: HubSet,
    /// The container's network namespace, opened before we go anywhere.
    pub(crate) netns: OwnedFd,
    pub(crate) netns_path: String,
    pub(crate) child_ip: Option<IpAddr>,
    pub(crate) exit_fd: OwnedFd,
    pub(crate) reload: Option<ReloadSocket>,
    pub(crate) udp_idle: Duration,
    /// Bytes moved per splice call at most (and the pipe size asked for).
    pub(crate) pipe_size: usize,
    /// Keep client source addresses (see [`crate::source_ip`]).
    pub(crate) preserve_source: bool,
    /// The caller exits right after [`Forwarder::run`]: skip closing sockets one by one.
    pub(crate) exit_after: bool,
    /// podman's container ID: names the routing state this helper owns in the netns.
    pub(crate) container_id: String,
    /// SIGTERM and SIGINT, caught since [`crate::helper::Helper::bind`] began.
    pub(crate) stop: StopSignals,
    /// The event loop ([`build_runtime`]); last, so that it is dropped after
    /// everything registered with it.
    pub(crate) rt: Runtime,
}

/// Why the helper stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// ExitFD reached EOF: the container is gone.
    ExitFd,
    /// SIGTERM or SIGINT.
    Signal,
}

impl Forwarder {
    /// Enter the container netns on this thread, serve every port, call `ready` once all
    /// are being served, and return when ExitFD reads EOF (or on SIGTERM/SIGINT). The
    /// listeners are closed on return.
    pub(crate) fn run(self, ready: impl FnOnce() -> Result<(), Error>) -> Result<Stopped, Error> {
        // Started here, so that it stays in the engine's netns for good.
        let binder = Binder::spawn()?;
        nix::sched::setns(self.netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
            |e| Error::Netns {
                path: self.netns_path.clone(),
                source: e.into(),
            },
        )?;
        let source = if self.preserve_source {
            let kept = may_keep_addresses().and_then(|()| {
                SourceIp::setup(
                    &self.container_id,
                    self.child_ip,
                    merged_ranges(
                        self.bound
                            .iter()
                            .filter(|b| b.spec.transport == Transport::Udp)
                            .map(|b| b.spec.child_port),
                    ),
                )
            });
            match kept {
                Ok(s) => Some(s),
                Err(why) => {
                    tracing::warn!(
                        "client addresses are not kept (the container sees the helper's): {why}"
                    );
                    None
                }
            }
        } else {
            None
        };
        let nofile = nofile_limit();
        let udp_bound = crate::flow_budget::flow_bound(nofile);
        tracing::debug!("open-file limit {nofile}: at most {udp_bound} UDP flows helper-wide");
        let shared = Shared::new(self.child_ip, self.udp_idle, source, udp_bound);
        let (hub_tx, hub_rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(
            shared
                .with_pipe_size(self.pipe_size)
                .with_binder(binder)
                .with_hub(hub_tx),
        );
        let keep = shared.clone();
        let self_exit = self.exit_after;
        let Forwarder {
            rt,
            bound,
            hub_set,
            exit_fd,
            reload,
            stop,
            ..
        } = self;
        let result = rt.block_on(async move {
            // First: a signal that came while starting is seen as soon as ready.
            let stop = stop.arrived()?;
            tokio::pin!(stop);
            tokio::spawn(AcceptHub::new(hub_set, shared.clone(), hub_rx).run());
            serve_ports(bound, &shared, Batch::Startup).await?;
            tokio::spawn(crate::heap_trim::trim_when_idle(
                shared.idle.clone(),
                crate::heap_trim::QUIET,
            ));
            let reload_guard = match reload {
                Some(r) => {
                    let r = Arc::new(r);
                    tokio::spawn(crate::reload::server::serve(&r, shared.clone()));
                    Some(r)
                }
                None => None,
            };
            let exit = wait_eof(exit_fd);
            ready()?;
            // The start-up heap (config, plans, bound sockets' list) is free by now, and
            // with thousands of ports it is megabytes: give it back once.
            crate::heap_trim::give_back_freed_heap();
            let stopped = tokio::select! {
                _ = exit => Stopped::ExitFd,
                () = &mut stop => Stopped::Signal,
            };
            // The serving task holds the socket too: remove the file explicitly.
            if let Some(r) = reload_guard {
                r.remove();
            }
            Ok(stopped)
        });
        // The reply routing goes first (from this thread, inside the container netns):
        // nothing may be left in the netns, whatever happens next.
        drop(keep.take_source_ip());
        if self_exit {
            // The process ends now: the kernel closes every socket at once, which is
            // much faster than deregistering and closing thousands one by one.
            std::mem::forget(rt);
        } else {
            // Dropping the runtime drops every task: listeners and connections close.
            drop(rt);
        }
        result
    }
}

/// Readiness events taken from the kernel per turn of the event loop (tokio's default
/// is 1,024). The buffer for them lives as long as the helper (12 bytes an event), and
/// tokio's run queue, which never shrinks, grows to hold the tasks that one turn wakes:
/// 1,024 events (a thousand connections released at once) left it at 1,024 entries
/// for good (docs/performance-analysis.md section 12). A burst of more events than
/// this takes more turns, each one `epoll_wait` call.
const EVENTS_PER_TICK: usize = 128;

/// The event loop: on the calling thread alone for `threads` <= 1, else a pool of
/// `threads` workers, each entering `netns` (opened from `netns_path`) as it starts;
/// the caller enters it before serving. Built before the listeners are bound, so that
/// the accept hub's epoll set joins the event loop while it is empty (see [`HubSet`]).
///
/// # Errors
///
/// [`Error::Netns`] when a thread cannot enter `netns`, [`Error::Io`] (`starting the
/// event loop`) when `threads` threads cannot be started (both checked first, see
/// [`try_pool_threads`]), or when the runtime or a duplicate of the netns fd cannot be
/// made.
pub(crate) fn build_runtime(
    threads: usize,
    netns: &OwnedFd,
    netns_path: &str,
) -> Result<Runtime, Error> {
    let started = |source| Error::Io {
        what: "starting the event loop",
        source,
    };
    if threads <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .max_io_events_per_tick(EVENTS_PER_TICK)
            .enable_io()
            .enable_time()
            .build()
            .map_err(started);
    }
    try_pool_threads(threads, netns, netns_path)?;
    let ns = netns.try_clone().map_err(|source| Error::Io {
        what: "duplicating the netns fd",
        source,
    })?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .max_blocking_threads(1)
        .on_thread_start(move || {
            // Every worker enters the container netns too (a thread proved it can).
            if nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                std::process::abort();
            }
        })
        .max_io_events_per_tick(EVENTS_PER_TICK)
        .enable_io()
        .enable_time()
        .build()
        .map_err(started)
}

/// Prove, before tokio starts a pool of `threads` workers, that this many threads can
/// run at once and that each can enter `netns`: `threads` short-lived threads, all alive
/// together, each entering the netns. A worker that could not enter it would have to
/// abort the process; and tokio panics when it cannot start a worker, then waits
/// forever for the ones it started while unwinding (tokio 1.x's `BlockingPool` drop), so
/// the helper would hang before ready and podman with it. Here both are one error line.
/// (Another process of the user could still take the last thread slots between this
/// check and the pool's start.)
fn try_pool_threads(threads: usize, netns: &OwnedFd, netns_path: &str) -> Result<(), Error> {
    let spawn_failed = |source| Error::Io {
        what: "starting the event loop",
        source,
    };
    // Held while the probes start: each waits on it once it has entered the netns, so
    // all of them are alive at once until every spawn was tried.
    let gate = std::sync::RwLock::new(());
    let held = gate
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::thread::scope(|scope| {
        let mut probes = Vec::with_capacity(threads);
        let mut failed = None;
        for _ in 0..threads {
            let probe = std::thread::Builder::new()
                .name("rootlessport-probe".to_owned())
                .stack_size(64 * 1024)
                .spawn_scoped(scope, || {
                    let entered =
                        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
                    drop(gate.read());
                    entered
                });
            match probe {
                Ok(p) => probes.push(p),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(held);
        let mut outcome = failed.map_or(Ok(()), |e| Err(spawn_failed(e)));
        for p in probes {
            let entered = p.join().unwrap_or(Err(nix::errno::Errno::EINVAL));
            if let (Ok(()), Err(e)) = (&outcome, entered) {
                outcome = Err(Error::Netns {
                    path: netns_path.to_owned(),
                    source: e.into(),
                });
            }
        }
        outcome
    })
}

/// A listener registered with the event loop (UDP) or about to be (TCP: in the hub).
enum Registered {
    Tcp(std::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

/// Which ports [`serve_ports`] serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// The config's: their TCP listeners are in the hub's set already, each at its
    /// position in the batch, and nobody asks for their statuses.
    Startup,
    /// Added through the control socket: the hub puts them in its set.
    Added,
}

/// Serve `bound` (listening sockets made in the engine's netns) and list them, all or
/// none: every TCP listener goes into the accept hub, every UDP socket gets a task of
/// its own. The same for the ports of the config and those added later. Call it inside
/// the runtime, with the hub running. Returns the statuses of an [`Batch::Added`]
/// batch (none for the start-up's).
async fn serve_ports(
    mut bound: Vec<Bound>,
    shared: &Arc<Shared>,
    batch: Batch,
) -> Result<Vec<PortStatus>, Error> {
    let io_err = |source| Error::Io {
        what: "registering a listener",
        source,
    };
    // Every UDP socket is registered before anything is served: the one step here
    // that can fail on its own. They are taken out of the batch where they are; the
    // TCP ones stay in its buffer, in order, uncopied (a copy of a batch of 10,000,
    // grown as it was filled, was ~2 MB of fresh heap and ~4 ms of the start-up).
    let ports = bound.len();
    let seen = std::cell::Cell::new(0);
    let mut udp = Vec::new();
    for b in bound.extract_if(.., |b| {
        seen.set(seen.get() + 1);
        b.spec.transport == Transport::Udp
    }) {
        let sock = tokio::net::UdpSocket::from_std(b.sock.into())
            .map_err(|e| registering_failed(&b.spec, e))?;
        udp.push((
            seen.get() - 1,
            b.spec,
            b.published_at,
            Registered::Udp(sock),
        ));
    }
    let mut udp = udp.into_iter().peekable();
    let mut tcp = bound
        .into_iter()
        .map(|b| (b.spec, b.published_at, Registered::Tcp(b.sock.into())));
    // The batch again, in its order: position `i` is UDP's next one or TCP's next.
    let registered = (0..ports).map_while(|i| match udp.next_if(|u| u.0 == i) {
        Some((_, spec, published_at, sock)) => Some((spec, published_at, sock)),
        None => tcp.next(),
    });
    let first_id = shared.new_ids(ports);
    let startup = batch == Batch::Startup;
    // Start-up: one slot per port of the batch, where `bind_all` put its listener
    // (`None` for a UDP port's). Added: the TCP ports' records alone.
    let mut records = Vec::with_capacity(if startup { ports } else { 0 });
    let mut entries = Vec::with_capacity(ports);
    let mut served = Vec::new();
    // Added: each port's spec, to name one the hub could not take as a bind failure
    // names it.
    let mut given = Vec::new();
    let mut udp_tasks = Vec::new();
    for (id, (spec, published_at, sock)) in (first_id..).zip(registered) {
        let serving = match sock {
            Registered::Tcp(listener) => {
                records.push(Some(PortRecord::new(
                    listener,
                    id,
                    spec.child_port,
                    spec.family,
                )));
                Serving::Tcp(None)
            }
            Registered::Udp(sock) => {
                if startup {
                    records.push(None);
                }
                let counters = Arc::new(PortCounters::default());
                let task = tokio::spawn(crate::udp::serve(
                    sock,
                    id,
                    spec.child_port,
                    spec.family,
                    shared.clone(),
                    counters.clone(),
                ));
                udp_tasks.push(task.abort_handle());
                Serving::Udp(Box::new(UdpPort { task, counters }))
            }
        };
        let entry = Entry {
            port: Published {
                host_ip: spec.parent_addr,
                host_port: spec.parent_port,
                container_port: spec.child_port,
                protocol: spec.protocol,
                published_at,
            },
            id,
            serving,
        };
        if !startup {
            served.push(entry.status());
            given.push(spec);
        }
        entries.push(entry);
    }
    // The hub's answer: `None` if it is gone, `Some(Err)` if it could not be asked.
    let answer = if startup {
        let adopt = |done| HubCommand::Adopt {
            slots: records,
            entries,
            done,
        };
        let answer = shared.ask_hub(adopt).await;
        answer.map(|asked| asked.map(|done| done.map_err(io_err)))
    } else {
        let add = |done| HubCommand::Add {
            records: records.into_iter().flatten().collect(),
            entries,
            done,
        };
        // Named as the port whose listener the hub could not take.
        let named = |failed: AddFailed| match given.get(failed.id.wrapping_sub(first_id) as usize) {
            Some(spec) => registering_failed(spec, failed.source),
            None => io_err(failed.source),
        };
        let answer = shared.ask_hub(add).await;
        answer.map(|asked| asked.map(|done| done.map_err(named)))
    };
    let added = match answer {
        Some(Ok(done)) => done,
        Some(Err(e)) => Err(io_err(e)),
        None => Err(io_err(io::Error::other("no accept hub"))),
    };
    if let Err(e) = added {
        // Nothing is listed: the UDP ports of the batch stop again.
        for t in udp_tasks {
            t.abort();
        }
        return Err(e);
    }
    Ok(served)
}

/// The control socket's `add`: `mappings` checked as at start-up, bound in the
/// engine's netns (all or none), the UDP gates of client-address keeping extended
/// before any new port is served, then served as the config's ports are.
async fn add_ports(
    shared: &Arc<Shared>,
    mappings: &[PortMapping],
) -> Result<Vec<PortStatus>, String> {
    let specs = plan_ports(mappings).map_err(|e| e.to_string())?;
    let binder = shared
        .binder()
        .ok_or("this helper cannot add ports (it runs without its listener thread)")?;
    let _one_at_a_time = shared.changes.lock().await;
    let bound = binder.bind(specs).await.map_err(|e| e.to_string())?;
    let udp: Vec<u16> = bound
        .iter()
        .filter(|b| b.spec.transport == Transport::Udp)
        .map(|b| b.spec.child_port)
        .collect();
    if !udp.is_empty() {
        shared.update_udp_gates(&udp);
    }
    let served = serve_ports(bound, shared, Batch::Added).await;
    if served.is_err() && !udp.is_empty() {
        shared.update_udp_gates(&[]);
    }
    let served = served.map_err(|e| e.to_string())?;
    tracing::info!(ports = served.len(), "ports added");
    Ok(served)
}

/// The control socket's `remove`: `mappings` checked as at start-up, each port must be
/// published (all or none); each port's listener is closed when this returns (TCP: by
/// the accept hub; UDP: its task stopped and awaited, its flows with it); with
/// `close`, its live TCP connections are reset. The UDP gates follow.
async fn remove_ports(
    shared: &Arc<Shared>,
    mappings: &[PortMapping],
    close: bool,
) -> Result<Vec<PortStatus>, String> {
    let specs = plan_ports(mappings).map_err(|e| e.to_string())?;
    let _one_at_a_time = shared.changes.lock().await;
    let ids = shared.find_published(&specs)?;
    // The TCP listeners first: no connection is accepted (nor a port's state made)
    // once the hub has answered, so the counters taken below are final but for the
    // live connections.
    let closed = shared
        .ask_hub(|done| HubCommand::Remove {
            ids: ids.clone(),
            done,
        })
        .await;
    if let Some(Err(e)) = closed {
        return Err(e.to_string());
    }
    let removed = shared.unpublish(&ids);
    let mut udp = false;
    for e in &removed {
        match &e.serving {
            Serving::Tcp(Some(state)) if close => state.close.close(),
            Serving::Tcp(_) => {}
            Serving::Udp(u) => {
                udp = true;
                u.task.abort();
            }
        }
    }
    let mut statuses = Vec::with_capacity(removed.len());
    for mut e in removed {
        if let Serving::Udp(u) = &mut e.serving {
            // Cancelled: the task's future (its socket, its flows) is dropped by now.
            let _ = (&mut u.task).await;
        }
        statuses.push(e.status());
    }
    if udp {
        shared.update_udp_gates(&[]);
    }
    tracing::info!(ports = statuses.len(), close, "ports removed");
    Ok(statuses)
}

impl crate::control::Ports for Arc<Shared> {
    fn list(&self) -> Vec<PortStatus> {
        self.port_statuses()
    }

    async fn add(&self, mappings: &[PortMapping]) -> Result<Vec<PortStatus>, String> {
        add_ports(self, mappings).await
    }

    async fn remove(
        &self,
        mappings: &[PortMapping],
        close: bool,
    ) -> Result<Vec<PortStatus>, String> {
        remove_ports(self, mappings, close).await
    }
}

/// SIGTERM and SIGINT, caught from [`Helper::bind`](crate::helper::Helper::bind) on:
/// a handler (signal-hook's) sends a byte on a socket pair whose other end the event
/// loop watches once it runs. The handler runs in whichever thread the kernel picks, so
/// a signal sent to one thread (`tgkill`) counts too, and no thread's signal mask
/// changes. A signal that comes while the helper starts is kept: the helper finishes
/// starting, then stops at once and removes what it made (the reload socket, the
/// source-IP state), instead of dying with them left behind. The handlers are
/// unregistered on drop; signal-hook leaves its handler installed, so a later SIGTERM
/// or SIGINT is ignored (as tokio's handlers left them).
///
/// Made before any listener, so that its three fds never compete with connections for
/// the last free fds. Not tokio's signal handling: that keeps a 22 KB table (a watch
/// channel for each of the 33 signal numbers) for the process's life
/// (docs/performance-analysis.md section 12).
pub(crate) struct StopSignals {
    handlers: Handlers,
    /// The socket pair's read end, for the event loop to watch.
    woken: OwnedFd,
}

/// signal-hook's registrations of [`StopSignals`], undone on drop.
struct Handlers(Vec<signal_hook::SigId>);

impl Drop for Handlers {
    fn drop(&mut self) {
        for id in self.0.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

impl StopSignals {
    /// Install the handlers.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] (`installing signal handlers`) when the socket pair cannot be made
    /// or a handler cannot be installed.
    pub(crate) fn catch() -> Result<Self, Error> {
        let (read, write) = std::os::unix::net::UnixStream::pair().map_err(installing)?;
        read.set_nonblocking(true).map_err(installing)?;
        let mut handlers = Handlers(Vec::with_capacity(2));
        for signal in [libc::SIGTERM, libc::SIGINT] {
            // Each handler owns its copy of the write end (closed when unregistered).
            let write = write.try_clone().map_err(installing)?;
            let id = signal_hook::low_level::pipe::register(signal, write).map_err(installing)?;
            handlers.0.push(id);
        }
        Ok(StopSignals {
            handlers,
            woken: OwnedFd::from(read),
        })
    }

    /// A future that resolves once SIGTERM or SIGINT has arrived since
    /// [`StopSignals::catch`]; the handlers stay installed while it lives. Inside the
    /// event loop.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] (`installing signal handlers`) when the event loop cannot watch the
    /// socket.
    fn arrived(self) -> Result<impl std::future::Future<Output = ()>, Error> {
        let StopSignals { handlers, woken } = self;
        let woken = register(woken).map_err(|e| installing(e.into()))?;
        Ok(async move {
            let _installed = handlers;
            let mut bytes = [0u8; 16];
            match read_ready(&woken, &mut bytes).await {
                Some(n) if n > 0 => {}
                // Cannot be read or watched: stop on the exit pipe alone.
                _ => std::future::pending().await,
            }
        })
    }
}

/// The error of [`StopSignals`].
fn installing(source: io::Error) -> Error {
    Error::Io {
        what: "installing signal handlers",
        source,
    }
}

/// One read from `afd` (non-blocking) once it is readable: `Some` of the bytes read
/// (0 at EOF), `None` when it can no longer be watched or read.
async fn read_ready(afd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> Option<usize> {
    loop {
        let mut guard = afd.readable().await.ok()?;
        match nix::unistd::read(afd.get_ref().as_fd(), buf) {
            Ok(n) => return Some(n),
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// Wait until `fd` (a pipe's read end) reads EOF; data is read and ignored.
async fn wait_eof(fd: OwnedFd) {
    let afd = match register(fd) {
        Ok(afd) => afd,
        Err(e) => {
            // Not pollable: wait for EOF with blocking reads on a thread instead.
            let (fd, _) = e.into_parts();
            let _ = tokio::task::spawn_blocking(move || {
                let mut buf = [0u8; 512];
                loop {
                    match nix::unistd::read(fd.as_fd(), &mut buf) {
                        Ok(0) => return,
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => return,
                    }
                }
            })
            .await;
            return;
        }
    };
    set_nonblocking(afd.get_ref());
    let mut buf = [0u8; 512];
    // Data is read and dropped; EOF or an error ends the wait.
    while let Some(1..) = read_ready(&afd, &mut buf).await {}
}

/// Make `fd` non-blocking, if it lets us (a pipe does).
fn set_nonblocking(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(flags) = fcntl(fd, FcntlArg::F_GETFL) {
        let _ = fcntl(
            fd,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
        );
    }
}

/// Whether this helper may set up keeping client addresses: that takes `CAP_NET_ADMIN`
/// in the user namespace owning the container's netns, which an engine's helper has
/// (in its own user namespace) and a helper run by an unprivileged user by hand has
/// not. Asked up front so that such a helper says so in one line instead of learning
/// it from a failed netlink request; when the answer is not known (no `/proc`), it is
/// tried, and a failure falls back all the same.
fn may_keep_addresses() -> Result<(), String> {
    use caps::{CapSet, Capability};
    match caps::has_cap(None, CapSet::Effective, Capability::CAP_NET_ADMIN) {
        Ok(false) => Err("no CAP_NET_ADMIN (needed for its routing rules)".to_owned()),
        Ok(true) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "capabilities unknown: trying to keep client addresses");
            Ok(())
        }
    }
}
