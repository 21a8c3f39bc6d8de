//! Rate-limited warnings: a hostile peer can make the daemon refuse thousands of connections a
//! second, and one log line for each would flood the node's disk (and hide everything else).
//! Each kind of event (a listener and a reason, as in `mesh_connection_errors_total`) is logged
//! at most once per [`INTERVAL`]; the next line says how many were not logged in between. The
//! counter still counts every one.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// At most one line per kind of event in this long.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Remembers when each kind of event was last logged.
pub struct Throttle {
    interval: Duration,
    kinds: Mutex<HashMap<(&'static str, &'static str), Kind>>,
}

struct Kind {
    logged: Instant,
    suppressed: u64,
}

impl Throttle {
    /// A throttle letting one line per kind through every `interval`.
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: Mutex::default(),
        }
    }

    /// Whether an event of this kind may be logged now: `Some(n)`, where `n` events of the kind
    /// were not logged since the last line, or `None` (it is counted as suppressed). The keys
    /// are static names, so the table stays as small as the set of reasons.
    pub fn allow(&self, listener: &'static str, reason: &'static str) -> Option<u64> {
        self.allow_at(listener, reason, Instant::now())
    }

    fn allow_at(&self, listener: &'static str, reason: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        match kinds.get_mut(&(listener, reason)) {
            Some(kind) if now.duration_since(kind.logged) < self.interval => {
                kind.suppressed += 1;
                None
            }
            Some(kind) => {
                kind.logged = now;
                Some(std::mem::take(&mut kind.suppressed))
            }
            None => {
                kinds.insert(
                    (listener, reason),
                    Kind {
                        logged: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

static WARNINGS: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(INTERVAL));

/// [`Throttle::allow`] on the process-wide throttle of connection warnings.
pub fn allow(listener: &'static str, reason: &'static str) -> Option<u64> {
    WARNINGS.allow(listener, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_with_the_count_of_the_others() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(
            throttle.allow_at("hbone", "a", t0),
            Some(0),
            "the first is logged"
        );
        for ms in [1, 2, 3] {
            assert_eq!(
                throttle.allow_at("hbone", "a", t0 + Duration::from_millis(ms)),
                None
            );
        }
        assert_eq!(
            throttle.allow_at("hbone", "b", t0),
            Some(0),
            "another reason has its own budget"
        );
        assert_eq!(
            throttle.allow_at("inbound", "a", t0),
            Some(0),
            "and so has another listener"
        );
        assert_eq!(
            throttle.allow_at("hbone", "a", t0 + Duration::from_secs(10)),
            Some(3),
            "after the interval: logged, with the three suppressed meanwhile"
        );
        assert_eq!(
            throttle.allow_at("hbone", "a", t0 + Duration::from_secs(11)),
            None
        );
        assert_eq!(
            throttle.allow_at("hbone", "a", t0 + Duration::from_secs(25)),
            Some(1)
        );
    }
}
