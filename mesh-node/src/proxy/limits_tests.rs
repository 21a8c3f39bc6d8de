//! Admission against the connection limits and the descriptor budget.

use std::{
    net::IpAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use super::{Limits, MaxConnections, Unit};
use crate::{
    identity::{CA_CERT_FILE, CA_KEY_FILE, CertManager, LocalCa},
    metrics::{ErrorLabels, Metrics, NodeCollector},
    proxy::descriptors::Descriptors,
    workload::Workload,
};

fn metrics(test: &str) -> Arc<Metrics> {
    let dir = std::env::temp_dir().join(format!("mesh-limits-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCa::init(&dir, "cluster.local").expect("ca init");
    let ca = LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
    let certs = CertManager::new(Arc::new(ca), Duration::from_mins(1), crate::tls::provider());
    let metrics = Metrics::new(NodeCollector {
        bpffs: dir.join("no-bpffs"),
        certs,
    });
    let _ = std::fs::remove_dir_all(&dir);
    metrics
}

fn workload() -> Workload {
    serde_yaml_ng::from_str("{name: a1, node: n, ips: [198.18.1.2]}").expect("workload")
}

fn refusals(metrics: &Metrics, listener: &'static str, reason: &'static str) -> u64 {
    metrics
        .connection_errors
        .get_or_create(&ErrorLabels { listener, reason })
        .get()
}

#[expect(clippy::unnecessary_wraps, reason = "`admit` takes an optional source")]
fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().expect("ip"))
}

#[test]
fn hbone_connections_count_per_source_and_come_back_when_closed() {
    let metrics = metrics("source");
    let limits = Arc::new(Limits::new(
        MaxConnections {
            total: 100,
            per_workload: 100,
            per_source: 3,
        },
        Descriptors::fixed(100_000, 0),
        Arc::clone(&metrics),
    ));
    let (w, count) = (workload(), Arc::new(AtomicUsize::new(0)));
    let held: Vec<_> = (0..3)
        .map(|_| {
            limits
                .admit(Unit::HboneConnection, &w, &count, ip("198.18.2.2"))
                .expect("within the per-source limit")
        })
        .collect();
    assert!(
        limits
            .admit(Unit::HboneConnection, &w, &count, ip("198.18.2.2"))
            .is_none(),
        "the fourth from the same source is refused"
    );
    assert!(
        limits
            .admit(Unit::HboneConnection, &w, &count, ip("::ffff:198.18.2.2"))
            .is_none(),
        "an IPv4-mapped address is the same source"
    );
    assert_eq!(refusals(&metrics, "hbone", "limit_source"), 2);
    let other = limits.admit(Unit::HboneConnection, &w, &count, ip("198.18.2.3"));
    assert!(other.is_some(), "another source is not affected");
    let stream = limits.admit(Unit::HboneStream, &w, &count, ip("198.18.2.2"));
    assert!(
        stream.is_some(),
        "streams are not connections of their source"
    );
    assert_eq!(
        limits.proxied(),
        1,
        "only the stream is a proxied connection"
    );
    drop(held);
    assert!(
        limits
            .admit(Unit::HboneConnection, &w, &count, ip("198.18.2.2"))
            .is_some(),
        "admitted again once its connections closed"
    );
}

#[test]
fn total_and_workload_limits_count_every_unit() {
    let metrics = metrics("total");
    let limits = Arc::new(Limits::new(
        MaxConnections {
            total: 3,
            per_workload: 2,
            per_source: 100,
        },
        Descriptors::fixed(100_000, 0),
        Arc::clone(&metrics),
    ));
    let w = workload();
    let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let _a1 = limits.admit(Unit::HboneConnection, &w, &a, ip("198.18.2.2"));
    let _a2 = limits.admit(Unit::Outbound, &w, &a, None);
    assert!(
        limits
            .admit(Unit::Inbound, &w, &a, ip("198.18.2.9"))
            .is_none()
    );
    assert_eq!(refusals(&metrics, "inbound", "limit_workload"), 1);
    let _b1 = limits.admit(Unit::Inbound, &w, &b, ip("198.18.2.9"));
    assert!(limits.admit(Unit::Outbound, &w, &b, None).is_none());
    assert_eq!(refusals(&metrics, "outbound", "limit_total"), 1);
}

#[test]
fn one_listener_or_source_cannot_take_the_whole_descriptor_budget() {
    let metrics = metrics("fds");
    // 400 descriptors, 64 reserved, 136 in use otherwise: 200 for connections, 100 per
    // listener, 50 per source and listener.
    let limits = Arc::new(Limits::new(
        MaxConnections {
            total: 100_000,
            per_workload: 100_000,
            per_source: 100_000,
        },
        Descriptors::fixed(400, 136),
        Arc::clone(&metrics),
    ));
    let (w, count) = (workload(), Arc::new(AtomicUsize::new(0)));
    let attacker: Vec<_> =
        std::iter::from_fn(|| limits.admit(Unit::HboneConnection, &w, &count, ip("198.18.2.2")))
            .take(1000)
            .collect();
    assert_eq!(
        attacker.len(),
        50,
        "one source: half of the listener's share"
    );
    assert_eq!(refusals(&metrics, "hbone", "fd_budget_source"), 1);
    let second: Vec<_> =
        std::iter::from_fn(|| limits.admit(Unit::HboneConnection, &w, &count, ip("198.18.2.3")))
            .take(1000)
            .collect();
    assert_eq!(second.len(), 50);
    assert!(
        limits
            .admit(Unit::HboneConnection, &w, &count, ip("198.18.2.4"))
            .is_none(),
        "the HBONE share is used up"
    );
    // The second source's 51st, and this one: the listener's share is the limit now.
    assert_eq!(refusals(&metrics, "hbone", "fd_budget"), 2);
    let plaintext = limits.admit(Unit::Inbound, &w, &count, ip("198.18.2.2"));
    assert!(
        plaintext.is_some(),
        "the other listeners keep their share, even for the same source"
    );
    let outbound = limits.admit(Unit::Outbound, &w, &count, None);
    assert!(outbound.is_some());
    assert_eq!(limits.descriptors().charged(), 104);
    let pipe = limits.charge_pipe();
    assert!(pipe.is_some(), "a pipe within the budget");
    drop((attacker, second, plaintext, outbound, pipe));
    assert_eq!(limits.descriptors().charged(), 0, "everything given back");
    assert!(
        limits
            .admit(Unit::HboneConnection, &w, &count, ip("198.18.2.4"))
            .is_some(),
        "and HBONE admitted again"
    );
}
