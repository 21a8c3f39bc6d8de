//! The file descriptor budget, and accepting when descriptors run out.
//!
//! Every connection costs descriptors (its socket, its upstream socket, a pipe while bytes are
//! spliced). When the process reaches `RLIMIT_NOFILE`, every `accept`, `connect` and `open`
//! fails: the metrics scrape, readiness probes, the admin API and every other pod's traffic
//! with them. So the connection paths get a budget: the limit, less a reserve kept for the
//! node's endpoints and everything that is not a connection (state sources, certificates,
//! netns sockets), less what the process holds besides connections (`base`, measured every
//! second from `/proc/self/fd`). Connections are charged against it as they are admitted
//! (`limits`), and refused, counted and logged beyond it; they come back when the budget
//! frees up. The soft limit is raised to the hard one at start.
//!
//! Should the process run out anyway, the accept loops do not leave clients waiting in a full
//! queue: a descriptor kept in reserve is let go to accept the connection at the head of the
//! queue and reset it (`fd_exhausted`).

use std::{
    fs::File,
    io,
    net::SocketAddr,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::metrics::{DescriptorLabels, Metrics};

/// Descriptors kept out of the budget, at least: room for the node endpoints' connections
/// (bounded, see `admin`; those open are measured in `base` like everything else) and for
/// whatever opens files now and then.
const MIN_RESERVE: usize = 64;

/// How the budget stands now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// `RLIMIT_NOFILE` (soft).
    pub limit: usize,
    /// Kept for everything that is not a connection.
    pub reserved: usize,
    /// Open descriptors not charged to connections.
    pub base: usize,
    /// Descriptors connections may be charged.
    pub available: usize,
}

/// The budget and what is charged against it.
pub struct Descriptors {
    limit: AtomicUsize,
    base: AtomicUsize,
    charged: AtomicUsize,
    /// A limit that is not read from the process (tests).
    pinned: Option<usize>,
}

impl Descriptors {
    /// Reads the limit and the descriptors open now.
    #[must_use]
    pub fn new() -> Self {
        let descriptors = Self {
            limit: AtomicUsize::new(0),
            base: AtomicUsize::new(0),
            charged: AtomicUsize::new(0),
            pinned: None,
        };
        descriptors.refresh();
        descriptors
    }

    /// A budget of `limit` with `base` descriptors in use (tests; [`Self::refresh`] would
    /// measure the process).
    #[cfg(test)]
    #[must_use]
    pub fn fixed(limit: usize, base: usize) -> Self {
        Self {
            limit: AtomicUsize::new(limit),
            base: AtomicUsize::new(base),
            charged: AtomicUsize::new(0),
            pinned: Some(limit),
        }
    }

    /// Raises the soft `RLIMIT_NOFILE` to the hard limit (the default soft limit, often 1024,
    /// is far below what a node proxy needs; the daemon uses epoll, never `select`).
    pub fn raise_limit() {
        match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    warn!(soft, hard, error = %e, "could not raise the file descriptor limit");
                } else {
                    info!(from = soft, to = hard, "file descriptor limit raised");
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not read the file descriptor limit"),
        }
    }

    /// The budget now.
    #[must_use]
    pub fn budget(&self) -> Budget {
        let limit = self.limit.load(Ordering::Relaxed);
        let base = self.base.load(Ordering::Relaxed);
        let reserved = reserve(limit);
        Budget {
            limit,
            reserved,
            base,
            available: limit.saturating_sub(reserved + base),
        }
    }

    /// Descriptors charged to connections now.
    #[must_use]
    pub fn charged(&self) -> usize {
        self.charged.load(Ordering::Relaxed)
    }

    /// Reads the limit again (it can be changed from outside, `prlimit`) and measures the
    /// descriptors not charged to connections. Returns the budget when the limit changed.
    pub fn refresh(&self) -> Option<Budget> {
        let limit = self.pinned.unwrap_or_else(soft_limit);
        // Less the directory's own descriptor.
        let open = std::fs::read_dir("/proc/self/fd")
            .map_or(0, Iterator::count)
            .saturating_sub(1);
        self.base
            .store(open.saturating_sub(self.charged()), Ordering::Relaxed);
        (self.limit.swap(limit, Ordering::Relaxed) != limit).then(|| self.budget())
    }

    /// Reads the limit again (a system call; the descriptors in use are measured only by
    /// [`Self::refresh`]), so that a raised limit counts before the next refresh. Whether it
    /// changed.
    pub fn reread_limit(&self) -> bool {
        let limit = self.pinned.unwrap_or_else(soft_limit);
        self.limit.swap(limit, Ordering::Relaxed) != limit
    }

    /// Charges `n` descriptors if the budget has room for them.
    pub fn try_charge(&self, n: usize) -> bool {
        let available = self.budget().available;
        self.charged
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |charged| {
                (charged + n <= available).then_some(charged + n)
            })
            .is_ok()
    }

    /// Gives back `n` charged descriptors.
    pub fn release(&self, n: usize) {
        self.charged.fetch_sub(n, Ordering::Relaxed);
    }

    /// Publishes the budget in `mesh_file_descriptors`.
    pub fn export(&self, metrics: &Metrics) {
        let budget = self.budget();
        for (kind, value) in [
            ("limit", budget.limit),
            ("reserved", budget.reserved),
            ("base", budget.base),
            ("connections", self.charged()),
        ] {
            metrics
                .descriptors
                .get_or_create(&DescriptorLabels { kind })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

impl Default for Descriptors {
    fn default() -> Self {
        Self::new()
    }
}

/// The soft `RLIMIT_NOFILE` (unlimited when it cannot be read).
fn soft_limit() -> usize {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(usize::MAX, |(soft, _)| {
        usize::try_from(soft).unwrap_or(usize::MAX)
    })
}

/// The reserve for a limit: a sixteenth of it, at least [`MIN_RESERVE`].
fn reserve(limit: usize) -> usize {
    (limit / 16).max(MIN_RESERVE)
}

/// A descriptor held only to be let go when the process runs out, so that the connection at
/// the head of an accept queue can still be accepted (and reset).
static SPARE: Mutex<Option<File>> = Mutex::new(None);

fn keep_spare() {
    let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
    if spare.is_none() {
        *spare = File::open("/dev/null").ok();
    }
}

/// Accepts the next connection on `listener` (named `name` in logs and metrics). Errors never
/// end the loop: out of descriptors, the connection at the head of the queue is reset at once
/// (clients fail fast instead of waiting in a full queue), counted as `fd_exhausted`; other
/// errors (out of memory) back off for 100 ms instead of spinning. All are logged, rate-limited.
pub async fn accept(
    listener: &TcpListener,
    name: &'static str,
    metrics: Option<&Metrics>,
) -> (TcpStream, SocketAddr) {
    keep_spare();
    loop {
        let e = match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => e,
        };
        let exhausted = is_exhaustion(&e);
        let reason = if exhausted {
            "fd_exhausted"
        } else {
            "accept_error"
        };
        let refused = exhausted && refuse_one(listener);
        let log = match metrics {
            Some(metrics) => metrics.error(name, reason),
            None => crate::throttle::allow(name, reason),
        };
        if let Some(suppressed) = log {
            warn!(listener = name, error = %e, refused, suppressed, "accept failed");
        }
        if !refused {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Lets the spare descriptor go, accepts one queued connection with it and resets it, then
/// takes a spare again. Whether a connection was refused.
fn refuse_one(listener: &TcpListener) -> bool {
    let mut spare = SPARE.lock().unwrap_or_else(PoisonError::into_inner);
    drop(spare.take());
    let refused = match listener.poll_accept(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok((stream, _))) => {
            super::forward::reset(stream);
            true
        }
        Poll::Ready(Err(_)) | Poll::Pending => false,
    };
    *spare = File::open("/dev/null").ok();
    refused
}

/// Whether `e` says the process (or system) is out of descriptors.
#[must_use]
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_scales_with_the_limit() {
        assert_eq!(reserve(256), 64);
        assert_eq!(reserve(1_048_576), 65_536);
    }

    #[test]
    fn charges_stay_within_the_budget() {
        let d = Descriptors::fixed(1000, 36);
        let budget = d.budget();
        assert_eq!(budget.available, 1000 - 64 - 36);
        assert!(d.try_charge(budget.available - 1));
        assert!(d.try_charge(1), "exactly full");
        assert!(!d.try_charge(1), "one more is refused");
        d.release(2);
        assert!(d.try_charge(2), "room again once released");
    }
}
