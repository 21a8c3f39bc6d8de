//! Admission of connections against the limits: every unit of work a peer or an application
//! can make the daemon hold — an HBONE connection from its TCP accept on (TLS and HTTP/2
//! handshakes included), each HBONE stream, each plaintext connection, each captured outbound
//! connection — is counted while it lives:
//!
//! - in total (`proxy.maxConnections`) and per workload of this node
//!   (`proxy.maxConnectionsPerWorkload`);
//! - per source address, for the connections a peer opens to this node's pods (HBONE and
//!   plaintext, `proxy.maxConnectionsPerSource`);
//! - in file descriptors (see `descriptors`): each listener (HBONE, inbound plaintext,
//!   outbound) may take at most half of the budget, so that exhausting one leaves room for the
//!   others, and one source at most half of a listener's share, so that one peer cannot take a
//!   listener from the others.
//!
//! Beyond a limit the connection is refused, counted in `mesh_connection_errors_total` with
//! the limit as reason, and logged (rate-limited).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use tracing::warn;

use super::descriptors::Descriptors;
use crate::{metrics::Metrics, workload::Workload};

/// What is being admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// A TCP connection on 15008, from its accept (handshakes included) to its close.
    HboneConnection,
    /// A CONNECT stream on an HBONE connection (its upstream socket).
    HboneStream,
    /// A plaintext connection captured into 15006 (its socket and the upstream one).
    Inbound,
    /// A connection captured on 15001 (its socket and the upstream one).
    Outbound,
}

impl Unit {
    /// The listener, as in metrics and logs.
    #[must_use]
    pub fn listener(self) -> &'static str {
        match self {
            Unit::HboneConnection | Unit::HboneStream => "hbone",
            Unit::Inbound => "inbound",
            Unit::Outbound => "outbound",
        }
    }

    /// Index of the listener's share of the descriptor budget.
    fn share(self) -> usize {
        match self {
            Unit::HboneConnection | Unit::HboneStream => 0,
            Unit::Inbound => 1,
            Unit::Outbound => 2,
        }
    }

    /// Descriptors it holds (a pooled outbound HBONE connection is shared by up to 100 streams:
    /// counting one per outbound connection errs on the safe side).
    fn descriptors(self) -> usize {
        match self {
            Unit::HboneConnection | Unit::HboneStream => 1,
            Unit::Inbound | Unit::Outbound => 2,
        }
    }

    /// Whether it counts against `maxConnectionsPerSource` (a connection a peer opened).
    fn per_source(self) -> bool {
        matches!(self, Unit::HboneConnection | Unit::Inbound)
    }

    /// Whether it is a proxied connection (what draining waits for).
    fn proxied(self) -> bool {
        self != Unit::HboneConnection
    }
}

/// The configured limits.
#[derive(Clone, Copy, Debug)]
pub struct MaxConnections {
    pub total: usize,
    pub per_workload: usize,
    pub per_source: usize,
}

/// What is admitted now.
#[derive(Default)]
struct Usage {
    total: usize,
    /// Connections per source address (`Unit::per_source`).
    sources: HashMap<IpAddr, usize>,
    /// Descriptors per listener share.
    shares: [usize; 3],
    /// Descriptors per (listener share, source address).
    source_shares: HashMap<(usize, IpAddr), usize>,
}

/// The limits and what counts against them.
pub struct Limits {
    max: MaxConnections,
    usage: Mutex<Usage>,
    proxied: AtomicUsize,
    descriptors: Descriptors,
    metrics: Arc<Metrics>,
}

/// Counts an admitted unit while alive.
pub struct Active {
    limits: Arc<Limits>,
    unit: Unit,
    workload: Arc<AtomicUsize>,
    source: Option<IpAddr>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.limits.release(self);
    }
}

/// Two descriptors of a pipe charged against the budget while it exists.
pub struct PipeCharge(Arc<Limits>);

impl Drop for PipeCharge {
    fn drop(&mut self) {
        self.0.descriptors.release(2);
    }
}

/// `::ffff:a.b.c.d` counts as `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Limits {
    #[must_use]
    pub fn new(max: MaxConnections, descriptors: Descriptors, metrics: Arc<Metrics>) -> Self {
        Self {
            max,
            usage: Mutex::default(),
            proxied: AtomicUsize::new(0),
            descriptors,
            metrics,
        }
    }

    /// The descriptor budget.
    #[must_use]
    pub fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    /// Proxied connections open now.
    #[must_use]
    pub fn proxied(&self) -> usize {
        self.proxied.load(Ordering::Relaxed)
    }

    /// Admits `unit` of `workload` (of this node; `count` is its counter) from `source`, or
    /// refuses it: then it is counted and logged, and `None` says to refuse the connection.
    pub fn admit(
        self: &Arc<Self>,
        unit: Unit,
        workload: &Workload,
        count: &Arc<AtomicUsize>,
        source: Option<IpAddr>,
    ) -> Option<Active> {
        let source = source.map(canonical);
        let refused = {
            let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
            let refused = self.check(&usage, unit, count, source);
            if refused.is_none() {
                usage.total += 1;
                count.fetch_add(1, Ordering::Relaxed);
                usage.shares[unit.share()] += unit.descriptors();
                if let Some(source) = source {
                    *usage
                        .source_shares
                        .entry((unit.share(), source))
                        .or_default() += unit.descriptors();
                    if unit.per_source() {
                        *usage.sources.entry(source).or_default() += 1;
                    }
                }
                if unit.proxied() {
                    self.proxied.fetch_add(1, Ordering::Relaxed);
                }
            }
            refused
        };
        let Some(reason) = refused else {
            return Some(Active {
                limits: Arc::clone(self),
                unit,
                workload: Arc::clone(count),
                source,
            });
        };
        let listener = unit.listener();
        if let Some(suppressed) = self.metrics.error(listener, reason) {
            let budget = self.descriptors.budget();
            let message = if reason.starts_with("fd_") {
                "file descriptor budget reached; refusing the connection"
            } else {
                "connection limit reached; refusing the connection"
            };
            warn!(
                listener,
                workload = %workload.uid(),
                client = source.map(|s| s.to_string()).unwrap_or_default(),
                reason,
                max_total = self.max.total,
                max_per_workload = self.max.per_workload,
                max_per_source = self.max.per_source,
                fd_limit = budget.limit,
                fd_available = budget.available,
                fd_charged = self.descriptors.charged(),
                suppressed,
                "{message}"
            );
        }
        None
    }

    /// Which limit refuses `unit`, if any (charging the descriptors when none does).
    fn check(
        &self,
        usage: &Usage,
        unit: Unit,
        count: &AtomicUsize,
        source: Option<IpAddr>,
    ) -> Option<&'static str> {
        if usage.total >= self.max.total {
            return Some("limit_total");
        }
        if count.load(Ordering::Relaxed) >= self.max.per_workload {
            return Some("limit_workload");
        }
        if unit.per_source()
            && let Some(source) = source
            && usage.sources.get(&source).copied().unwrap_or(0) >= self.max.per_source
        {
            return Some("limit_source");
        }
        let needed = unit.descriptors();
        let mut share = self.descriptors.budget().available / 2;
        // Out of budget: perhaps the limit was raised since the last refresh.
        if usage.shares[unit.share()] + needed > share && self.descriptors.reread_limit() {
            share = self.descriptors.budget().available / 2;
        }
        if usage.shares[unit.share()] + needed > share {
            return Some("fd_budget");
        }
        if let Some(source) = source {
            let used = usage
                .source_shares
                .get(&(unit.share(), source))
                .copied()
                .unwrap_or(0);
            if used + needed > share / 2 {
                return Some("fd_budget_source");
            }
        }
        if !self.descriptors.try_charge(needed) {
            return Some("fd_budget");
        }
        None
    }

    fn release(&self, active: &Active) {
        let unit = active.unit;
        let mut usage = self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        usage.total -= 1;
        active.workload.fetch_sub(1, Ordering::Relaxed);
        usage.shares[unit.share()] -= unit.descriptors();
        if let Some(source) = active.source {
            decrement(
                &mut usage.source_shares,
                &(unit.share(), source),
                unit.descriptors(),
            );
            if unit.per_source() {
                decrement(&mut usage.sources, &source, 1);
            }
        }
        drop(usage);
        self.descriptors.release(unit.descriptors());
        if unit.proxied() {
            self.proxied.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Charges a pipe (two descriptors) if the budget has room; without one, the copy goes
    /// through user space.
    #[must_use]
    pub fn charge_pipe(self: &Arc<Self>) -> Option<PipeCharge> {
        self.descriptors
            .try_charge(2)
            .then(|| PipeCharge(Arc::clone(self)))
    }
}

/// Subtracts `n` from a counter, dropping it at zero (the maps stay as small as what is open).
fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K, n: usize) {
    if let Some(count) = map.get_mut(key) {
        *count = count.saturating_sub(n);
        if *count == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
