//! The run-time side of traffic management, kept across state changes so that a reload does
//! not forget which endpoints are ejected, how many connections a pool holds, or how many
//! tokens a bucket has left: the [`Registry`] hands out one [`Health`] per endpoint address,
//! one pool counter per destination and one [`TokenBucket`] per rate-limited service, and the
//! service table (rebuilt per state change) holds them in its [`Cluster`]s.
//!
//! Per connection this costs a few atomic operations and, with outlier detection, one
//! uncontended lock per endpoint looked at; no map is searched.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Balance, L4Policy, RateLimit};

/// What is known of one endpoint's health, shared by every destination it is part of.
#[derive(Debug)]
pub struct Health {
    /// Connections open to it from this node.
    open: AtomicUsize,
    outlier: Mutex<OutlierState>,
}

#[derive(Debug)]
struct OutlierState {
    consecutive: u32,
    ejected_until: Option<Instant>,
    /// Times ejected (the multiplier of the ejection time).
    times: u32,
    /// Since when it has been up (for lowering `times`).
    healthy_since: Instant,
}

impl Health {
    fn new() -> Self {
        Self {
            open: AtomicUsize::new(0),
            outlier: Mutex::new(OutlierState {
                consecutive: 0,
                ejected_until: None,
                times: 0,
                healthy_since: Instant::now(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OutlierState> {
        self.outlier.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections open to the endpoint from this node.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// State that outlives one service table.
#[derive(Debug, Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<SocketAddr, Arc<Health>>>,
    pools: Mutex<HashMap<Arc<str>, Arc<AtomicUsize>>>,
    buckets: Mutex<HashMap<Arc<str>, Arc<Limiter>>>,
}

impl Registry {
    /// The health of the endpoint at `addr`.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<Health> {
        let mut map = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(addr).or_insert_with(|| Arc::new(Health::new())))
    }

    /// The open-connection counter of the destination `name`.
    pub fn pool(&self, name: &Arc<str>) -> Arc<AtomicUsize> {
        let mut map = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(Arc::clone(name)).or_default())
    }

    /// The rate limiter of the service `host` with `limit` (a changed limit starts a new
    /// bucket, full).
    pub fn limiter(&self, host: &Arc<str>, limit: &RateLimit) -> Arc<Limiter> {
        let mut map = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(host) {
            Some(l) if l.limit == *limit => Arc::clone(l),
            _ => {
                let l = Arc::new(Limiter::new(limit.clone()));
                map.insert(Arc::clone(host), Arc::clone(&l));
                l
            }
        }
    }

    /// Forgets what no table holds any more (after a new table is in place). Entries still
    /// in use by open connections are kept.
    pub fn sweep(&self) {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, h| Arc::strong_count(h) > 1);
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, p| Arc::strong_count(p) > 1 || p.load(Ordering::Relaxed) > 0);
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, b| Arc::strong_count(b) > 1);
    }
}

/// One destination connections are balanced across: a service's endpoints for a port, or a
/// subset of them, with its L4 policy.
#[derive(Debug)]
pub struct Cluster {
    /// The service hostname, with `/subset` for a subset.
    pub name: Arc<str>,
    /// The service hostname.
    pub host: Arc<str>,
    pub policy: L4Policy,
    endpoints: Vec<(SocketAddr, Arc<Health>)>,
    pool: Arc<AtomicUsize>,
    next: AtomicUsize,
}

/// An endpoint chosen for a connection; dropping it ends the connection's share of the
/// endpoint's and the pool's counts.
#[derive(Debug)]
pub struct Lease {
    pub addr: SocketAddr,
    health: Arc<Health>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.health.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's place in a destination's pool (`maxConnections`).
#[derive(Debug)]
pub struct PoolSlot(Arc<AtomicUsize>);

impl Drop for PoolSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What changed in an endpoint's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthEvent {
    /// Ejected for this long after this many consecutive failures.
    Ejected {
        addr: SocketAddr,
        failures: u32,
        duration: Duration,
    },
    /// Back from an ejection.
    Returned { addr: SocketAddr },
}

impl Cluster {
    /// A destination of `endpoints` (in a stable order) with `policy`; `registry` keeps their
    /// health and the pool count across tables.
    #[must_use]
    pub fn new(
        name: Arc<str>,
        host: Arc<str>,
        policy: L4Policy,
        endpoints: &[SocketAddr],
        registry: &Registry,
    ) -> Self {
        Self {
            pool: registry.pool(&name),
            endpoints: endpoints
                .iter()
                .map(|a| (*a, registry.endpoint(*a)))
                .collect(),
            name,
            host,
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// How many endpoints connections are spread across.
    #[must_use]
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoint addresses.
    pub fn addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().map(|(a, _)| *a)
    }

    /// Takes a place in the pool, unless `maxConnections` are open.
    #[must_use]
    pub fn reserve(&self) -> Option<PoolSlot> {
        let max = self.policy.max_connections.map(|m| m as usize);
        self.pool
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match max {
                Some(max) if n >= max => None,
                _ => Some(n + 1),
            })
            .ok()
            .map(|_| PoolSlot(Arc::clone(&self.pool)))
    }

    /// The endpoint for the next connection by the balancing rule, skipping endpoints already
    /// `tried` and ejected ones (unless only ejected ones are left). Ejections that ended are
    /// noted in `events`.
    pub fn pick(
        &self,
        tried: &[SocketAddr],
        now: Instant,
        events: &mut Vec<HealthEvent>,
    ) -> Option<Lease> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = match self.policy.balance {
            Balance::Random => fastrand::usize(..n),
            Balance::RoundRobin | Balance::LeastRequest => {
                self.next.fetch_add(1, Ordering::Relaxed) % n
            }
        };
        let outlier = self.policy.outlier.is_some();
        let mut chosen: Option<usize> = None;
        let mut fallback: Option<usize> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let (addr, health) = &self.endpoints[i];
            if tried.contains(addr) {
                continue;
            }
            if outlier && ejected(health, *addr, now, events) {
                fallback.get_or_insert(i);
                continue;
            }
            match (self.policy.balance, chosen) {
                (Balance::LeastRequest, Some(c)) => {
                    if health.open() < self.endpoints[c].1.open() {
                        chosen = Some(i);
                    }
                }
                (Balance::LeastRequest, None) => chosen = Some(i),
                (_, _) => {
                    chosen = Some(i);
                    break;
                }
            }
        }
        let (addr, health) = &self.endpoints[chosen.or(fallback)?];
        health.open.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            addr: *addr,
            health: Arc::clone(health),
        })
    }

    /// A connect to `lease`'s endpoint failed (refused, timed out, HBONE 503): with outlier
    /// detection, counts it and ejects the endpoint at the threshold, within
    /// `maxEjectionPercent`.
    pub fn failed(&self, lease: &Lease, now: Instant) -> Option<HealthEvent> {
        let outlier = self.policy.outlier?;
        let failures = {
            let mut state = lease.health.state();
            if state.ejected_until.is_some() {
                return None;
            }
            state.consecutive += 1;
            if state.consecutive < outlier.consecutive_errors {
                return None;
            }
            state.consecutive
        };
        // Count the others outside the endpoint's own lock (one lock at a time).
        let ejected_now = self
            .endpoints
            .iter()
            .filter(|(_, h)| h.state().ejected_until.is_some_and(|t| t > now))
            .count();
        let n = self.endpoints.len();
        if ejected_now * 100 >= n * outlier.max_ejection_percent as usize {
            return None;
        }
        let mut state = lease.health.state();
        state.times += 1;
        let duration = outlier.base_ejection * state.times;
        state.ejected_until = Some(now + duration);
        state.consecutive = 0;
        Some(HealthEvent::Ejected {
            addr: lease.addr,
            failures,
            duration,
        })
    }

    /// A connect to `lease`'s endpoint succeeded.
    pub fn succeeded(&self, lease: &Lease, now: Instant) {
        let Some(outlier) = self.policy.outlier else {
            return;
        };
        let mut state = lease.health.state();
        state.consecutive = 0;
        if state.times > 0 && now.duration_since(state.healthy_since) >= outlier.interval {
            state.times -= 1;
            state.healthy_since = now;
        }
    }
}

/// Whether the endpoint is ejected at `now`; an ejection that ended is cleared and noted.
fn ejected(health: &Health, addr: SocketAddr, now: Instant, events: &mut Vec<HealthEvent>) -> bool {
    let mut state = health.state();
    match state.ejected_until {
        Some(until) if until > now => true,
        Some(_) => {
            state.ejected_until = None;
            state.healthy_since = now;
            events.push(HealthEvent::Returned { addr });
            false
        }
        None => false,
    }
}

/// A token bucket of new connections.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    #[must_use]
    pub fn new(rate: f64, capacity: f64) -> Self {
        Self {
            rate,
            capacity,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.capacity);
        *last = now.max(*last);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now` (it says nothing a new bucket would not).
    fn full(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 + now.saturating_duration_since(state.1).as_secs_f64() * self.rate >= self.capacity
    }
}

/// A service's connection rate limit: one bucket, or one per source identity.
#[derive(Debug)]
pub struct Limiter {
    limit: RateLimit,
    shared: TokenBucket,
    per_source: Mutex<HashMap<String, TokenBucket>>,
}

/// Per-source buckets kept at most; past it, full ones are forgotten.
const MAX_SOURCES: usize = 4096;

impl Limiter {
    fn new(limit: RateLimit) -> Self {
        Self {
            shared: TokenBucket::new(f64::from(limit.connections_per_second), limit.capacity()),
            limit,
            per_source: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a new connection from `source` (its identity, asked for only with per-source
    /// buckets) may go ahead at `now`.
    pub fn admit(&self, source: impl FnOnce() -> String, now: Instant) -> bool {
        if !self.limit.per_source {
            return self.shared.take(now);
        }
        let source = source();
        let mut map = self
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = map.get(&source) {
            return bucket.take(now);
        }
        if map.len() >= MAX_SOURCES {
            map.retain(|_, b| !b.full(now));
            if map.len() >= MAX_SOURCES {
                // Every source is busy: the new one shares a bucket rather than grow the map.
                return self.shared.take(now);
            }
        }
        let bucket = TokenBucket::new(
            f64::from(self.limit.connections_per_second),
            self.limit.capacity(),
        );
        let admitted = bucket.take(now);
        map.insert(source, bucket);
        admitted
    }

    /// Whether each source has its own bucket.
    #[must_use]
    pub fn per_source(&self) -> bool {
        self.limit.per_source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::Outlier;

    fn cluster(policy: L4Policy, n: u8, registry: &Registry) -> Cluster {
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|i| SocketAddr::from(([198, 18, 0, i], 80)))
            .collect();
        Cluster::new("s".into(), "s".into(), policy, &addrs, registry)
    }

    #[test]
    fn round_robin_skips_what_was_tried() {
        let registry = Registry::default();
        let c = cluster(L4Policy::default(), 3, &registry);
        let now = Instant::now();
        let mut ev = Vec::new();
        let a = c.pick(&[], now, &mut ev).unwrap().addr;
        let b = c.pick(&[], now, &mut ev).unwrap().addr;
        assert_ne!(a, b);
        let tried: Vec<SocketAddr> = c.addresses().take(2).collect();
        for _ in 0..5 {
            let third = c.pick(&tried, now, &mut ev).unwrap().addr;
            assert!(!tried.contains(&third));
        }
        let all: Vec<SocketAddr> = c.addresses().collect();
        assert!(c.pick(&all, now, &mut ev).is_none());
    }

    #[test]
    fn least_request_takes_the_least_loaded() {
        let registry = Registry::default();
        let policy = L4Policy {
            balance: Balance::LeastRequest,
            ..L4Policy::default()
        };
        let c = cluster(policy, 3, &registry);
        let now = Instant::now();
        let mut ev = Vec::new();
        let mut held: Vec<Lease> = (0..3).map(|_| c.pick(&[], now, &mut ev).unwrap()).collect();
        let mut addrs: Vec<_> = held.iter().map(|l| l.addr).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), 3, "one each");
        let busy = held.remove(0);
        drop(held);
        for _ in 0..4 {
            assert_ne!(c.pick(&[], now, &mut ev).unwrap().addr, busy.addr);
        }
    }

    #[test]
    fn ejection_after_consecutive_failures_within_the_percentage_then_return() {
        let registry = Registry::default();
        let policy = L4Policy {
            outlier: Some(Outlier {
                consecutive_errors: 2,
                base_ejection: Duration::from_secs(10),
                max_ejection_percent: 30,
                interval: Duration::from_secs(1),
            }),
            ..L4Policy::default()
        };
        let c = cluster(policy, 3, &registry);
        let now = Instant::now();
        let mut ev = Vec::new();
        let first = c.pick(&[], now, &mut ev).unwrap();
        assert_eq!(c.failed(&first, now), None);
        let Some(HealthEvent::Ejected { duration, .. }) = c.failed(&first, now) else {
            panic!("ejected at the second failure");
        };
        assert_eq!(duration, Duration::from_secs(10));
        for _ in 0..6 {
            assert_ne!(c.pick(&[], now, &mut ev).unwrap().addr, first.addr);
        }
        // A second one would be past 30 % (one of three is out already): it stays.
        let second = c.pick(&[first.addr], now, &mut ev).unwrap();
        assert_eq!(c.failed(&second, now), None);
        assert_eq!(c.failed(&second, now), None);
        // Back after the ejection time; the next ejection lasts twice as long.
        let later = now + Duration::from_secs(11);
        let seen: Vec<_> = (0..3)
            .map(|_| c.pick(&[], later, &mut ev).unwrap().addr)
            .collect();
        assert!(seen.contains(&first.addr));
        assert_eq!(ev, [HealthEvent::Returned { addr: first.addr }]);
        c.failed(&first, later);
        let Some(HealthEvent::Ejected { duration, .. }) = c.failed(&first, later) else {
            panic!("ejected again");
        };
        assert_eq!(duration, Duration::from_secs(20));
    }

    #[test]
    fn the_pool_admits_max_connections() {
        let registry = Registry::default();
        let policy = L4Policy {
            max_connections: Some(2),
            ..L4Policy::default()
        };
        let c = cluster(policy, 1, &registry);
        let a = c.reserve().unwrap();
        let _b = c.reserve().unwrap();
        assert!(c.reserve().is_none());
        drop(a);
        assert!(c.reserve().is_some());
    }

    #[test]
    fn token_buckets_refill_at_their_rate() {
        let bucket = TokenBucket::new(10.0, 3.0);
        let now = Instant::now();
        assert_eq!((0..5).filter(|_| bucket.take(now)).count(), 3);
        assert!(!bucket.take(now + Duration::from_millis(50)));
        assert!(bucket.take(now + Duration::from_millis(150)));
        let limiter = Limiter::new(RateLimit {
            connections_per_second: 1,
            burst: Some(1),
            per_source: true,
        });
        assert!(limiter.admit(|| "a".into(), now));
        assert!(!limiter.admit(|| "a".into(), now));
        assert!(limiter.admit(|| "b".into(), now));
    }
}
