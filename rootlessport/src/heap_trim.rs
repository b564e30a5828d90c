//! Giving freed heap back once the helper is idle. Every relayed TCP connection holds
//! about 2.3 KB of heap (its task and two I/O registrations); when they end, glibc keeps
//! the freed memory (the heap is fragmented, so its top is not trimmed), and a helper
//! that once held 1,000 connections stays 2.2 MB bigger for the rest of its life
//! (measured: docs/performance-analysis.md); a control `list` of thousands of ports
//! leaves megabytes the same way. Once no connection or control request is live and
//! none has started for [`QUIET`], the helper asks glibc to return the free pages
//! (`malloc_trim`).
//! Not a podman behaviour: its Go helper leaves this to Go's scavenger.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// How long the helper must have had no live and no new activity (a TCP connection or a
/// control request) before it trims.
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// Live activity helper-wide (TCP connections and control requests), and a wake-up
/// when it falls to none.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    live: AtomicUsize,
    /// Activities started so far: a trim waits until it stops moving.
    started: AtomicU64,
    /// Fired when `live` falls to zero (a permit is kept if nobody waits yet).
    drained: Notify,
}

impl Idle {
    /// Count a connection or request as live until the returned guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

/// A live connection or request (see [`Idle::busy`]).
pub(crate) struct Busy(Arc<Idle>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drained.notify_one();
        }
    }
}

/// Run for the helper's life: each time the activity has drained and stayed so for
/// `quiet`, give the freed heap back.
pub(crate) async fn trim_when_idle(idle: Arc<Idle>, quiet: Duration) {
    loop {
        idle.drained.notified().await;
        loop {
            let seen = idle.started.load(Ordering::Relaxed);
            tokio::time::sleep(quiet).await;
            if idle.live.load(Ordering::Acquire) > 0 {
                // Busy again: the next drain wakes us.
                break;
            }
            if idle.started.load(Ordering::Relaxed) == seen {
                give_back_freed_heap();
                break;
            }
        }
    }
}

/// Return free heap pages to the kernel (glibc only; other C libraries: nothing).
pub(crate) fn give_back_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and locks each arena while it works, so it
    // may run on any thread while others allocate.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trim happens only after the last connection ended and none started for the
    /// quiet time; a connection during the wait postpones it.
    #[test]
    fn idle_counts_and_drains() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let idle = Arc::new(Idle::default());
            let a = idle.busy();
            let b = idle.busy();
            drop(a);
            assert_eq!(idle.live.load(Ordering::Acquire), 1);
            // Not drained: no permit yet.
            let early =
                tokio::time::timeout(Duration::from_millis(10), idle.drained.notified()).await;
            assert!(early.is_err(), "woken with a connection still live");
            drop(b);
            assert_eq!(idle.live.load(Ordering::Acquire), 0);
            // Drained before anyone waited: the permit is kept.
            let woke =
                tokio::time::timeout(Duration::from_millis(10), idle.drained.notified()).await;
            assert!(woke.is_ok(), "the drain was lost");
            assert_eq!(idle.started.load(Ordering::Relaxed), 2);
        });
    }
}
