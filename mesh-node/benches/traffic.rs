//! Traffic management per connection: the decision a new connection to a service address pays
//! (service lookup, plan, endpoint pick, then the lease and the pool slot dropped) for a
//! service split 90/10 by a `TCPRoute` across two backend services and behind a connection
//! rate limit (high enough never to refuse, so every plan takes a token), against a baseline
//! measured in the same run: the same service with no traffic document. A third variant adds
//! the `split` counter the outbound proxy records for each routed connection. The variants run
//! interleaved in rounds (the order rotating per round) so that the machine's noise falls on
//! all of them; the added cost is the per-round difference, with its spread. Run by
//! `cargo xtask bench`; prints one JSON object, then a summary.

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_node::{
    identity::{CA_CERT_FILE, CA_KEY_FILE, CertManager, Identity, LocalCa},
    metrics::{Metrics, NodeCollector},
    state::{
        Service, ServiceTable,
        service::{Plan, Source},
    },
    tls,
    traffic::{RateLimit, TrafficDocument, TrafficSet, runtime::Registry},
    workload::Workload,
};

/// The front service's address and port.
const FRONT: &str = "198.19.1.1:80";
/// What the added cost of a split plus a rate-limit check should stay within.
const TARGET_ADDED_NS: f64 = 1000.0;

/// `web` (the front) and its two versions as services of their own, three endpoints each.
fn services() -> Vec<Service> {
    let yaml = "
- {name: web, namespace: shop, addresses: [198.19.1.1], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{address: 198.18.1.2}, {address: 198.18.1.3}, {address: 198.18.1.4}]}
- {name: web-v1, namespace: shop, addresses: [198.19.1.2], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{address: 198.18.2.2}, {address: 198.18.2.3}, {address: 198.18.2.4}]}
- {name: web-v2, namespace: shop, addresses: [198.19.1.3], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{address: 198.18.3.2}, {address: 198.18.3.3}, {address: 198.18.3.4}]}
";
    serde_yaml_ng::from_str(yaml).expect("services parse")
}

fn split_route() -> TrafficSet {
    let yaml = "- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {name: canary, namespace: shop}\n  spec:\n    parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n    rules:\n    - backendRefs:\n      - {name: web-v1, port: 80, weight: 90}\n      - {name: web-v2, port: 80, weight: 10}\n";
    let docs: Vec<TrafficDocument> = serde_yaml_ng::from_str(yaml).expect("documents parse");
    TrafficSet::new(&docs).expect("valid documents")
}

/// Daemon metrics, for the `split` counter (a throwaway CA for the certificate manager they
/// hold).
fn metrics() -> (Arc<Metrics>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("mesh-bench-traffic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCa::init(&dir, "cluster.local").expect("ca init");
    let ca = LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
    let certs = CertManager::new(Arc::new(ca), Duration::from_mins(1), tls::provider());
    let metrics = Metrics::new(NodeCollector {
        bpffs: dir.join("no-bpffs"),
        certs,
    });
    (metrics, dir)
}

/// One new connection's traffic decision, as the outbound proxy makes it; with `metrics`, the
/// `split` counter too. Returns the chosen endpoint.
fn connection(
    table: &ServiceTable,
    source: &Source<'_>,
    dst: SocketAddr,
    metrics: Option<&Metrics>,
) -> SocketAddr {
    let now = Instant::now();
    let backends = table.lookup(dst).expect("a service address");
    let plan: Plan = backends.plan(source, dst, now).expect("admitted");
    if let Some(metrics) = metrics
        && plan.route.is_some()
    {
        metrics.traffic(&backends.service.hostname, "split", &plan.cluster.name);
    }
    let mut events = Vec::new();
    let lease = plan
        .cluster
        .pick(&[], now, &mut events)
        .expect("an endpoint");
    let addr = lease.addr;
    drop(lease);
    drop(plan);
    addr
}

/// Nanoseconds per connection over one batch of `batch` connections.
fn batch_ns(
    table: &ServiceTable,
    source: &Source<'_>,
    dst: SocketAddr,
    metrics: Option<&Metrics>,
    batch: usize,
) -> f64 {
    let start = Instant::now();
    for _ in 0..batch {
        black_box(connection(
            black_box(table),
            source,
            black_box(dst),
            metrics,
        ));
    }
    #[expect(clippy::cast_precision_loss, reason = "timing statistics")]
    let per = start.elapsed().as_nanos() as f64 / batch as f64;
    per
}

/// Median, min and max.
fn stats(samples: &[f64]) -> (f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// `within` when the whole spread of the added cost is under the target, `over` when all of
/// it is at or above, else `inconclusive`.
fn verdict(min: f64, max: f64) -> &'static str {
    if max < TARGET_ADDED_NS {
        "within"
    } else if min >= TARGET_ADDED_NS {
        "over"
    } else {
        "inconclusive"
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, batch) = if quick { (21, 2_000) } else { (101, 10_000) };
    let client = Workload {
        name: "client-abc".to_owned(),
        namespace: "shop".to_owned(),
        service_account: "client".to_owned(),
        labels: [("app".to_owned(), "client".to_owned())].into(),
        ips: vec!["198.18.9.9".parse().unwrap()],
        node: "n1".to_owned(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    };
    let identity = Identity::new("cluster.local", "shop", "client");
    let source = Source {
        workload: &client,
        identity: &identity,
        ip: client.ips[0],
    };
    let dst: SocketAddr = FRONT.parse().unwrap();

    let plain_services = services();
    let plain_registry = Registry::default();
    let plain = ServiceTable::build(
        &plain_services,
        &[],
        &TrafficSet::default(),
        &plain_registry,
        ("n1", None),
        "",
    );
    let mut managed_services = services();
    managed_services[0].connection_rate_limit = Some(RateLimit {
        connections_per_second: 1_000_000_000,
        burst: None,
        per_source: false,
    });
    let managed_registry = Registry::default();
    let managed = ServiceTable::build(
        &managed_services,
        &[],
        &split_route(),
        &managed_registry,
        ("n1", None),
        "",
    );
    let (metrics, dir) = metrics();

    // What each variant decides: the plain service its own endpoints, the managed one a split.
    let front = plain.lookup(dst).expect("front");
    assert!(!front.managed());
    let split = managed.lookup(dst).expect("front");
    assert!(split.managed());
    let to_v2 = (0..10_000)
        .filter(|_| {
            let decided = split.plan(&source, dst, Instant::now()).expect("admitted");
            &*decided.cluster.name == "web-v2.shop.svc.cluster.local"
        })
        .count();
    assert!((800..=1200).contains(&to_v2), "{to_v2} of 10,000 to v2");
    assert_eq!(connection(&plain, &source, dst, None).port(), 8080);

    let variants: [(&ServiceTable, Option<&Metrics>); 3] =
        [(&plain, None), (&managed, None), (&managed, Some(&metrics))];
    let mut samples = [
        Vec::with_capacity(rounds),
        Vec::with_capacity(rounds),
        Vec::with_capacity(rounds),
    ];
    // Warm-up round, not counted.
    for (table, metrics) in variants {
        batch_ns(table, &source, dst, metrics, batch);
    }
    for round in 0..rounds {
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let (table, metrics) = variants[v];
            samples[v].push(batch_ns(table, &source, dst, metrics, batch));
        }
    }
    let _ = std::fs::remove_dir_all(dir);

    let [plain_ns, managed_ns, counted_ns] = &samples;
    let added: Vec<f64> = managed_ns
        .iter()
        .zip(plain_ns)
        .map(|(b, a)| b - a)
        .collect();
    let added_counted: Vec<f64> = counted_ns
        .iter()
        .zip(plain_ns)
        .map(|(c, a)| c - a)
        .collect();
    let (base_median, base_min, base_max) = stats(plain_ns);
    let (median, min, max) = stats(managed_ns);
    let (counted_median, counted_min, counted_max) = stats(counted_ns);
    let (added_median, added_min, added_max) = stats(&added);
    let (ac_median, ac_min, ac_max) = stats(&added_counted);
    let added_verdict = verdict(added_min, added_max);
    let counted_verdict = verdict(ac_min, ac_max);
    println!(
        "{{\"scenario\":\"traffic_decision\",\"endpoints\":3,\"split\":\"90/10\",\"rounds\":{rounds},\"batch\":{batch},\
         \"median_ns\":{median:.1},\"min_ns\":{min:.1},\"max_ns\":{max:.1},\
         \"baseline_median_ns\":{base_median:.1},\"baseline_min_ns\":{base_min:.1},\"baseline_max_ns\":{base_max:.1},\
         \"ratio\":{:.3},\
         \"added_median_ns\":{added_median:.1},\"added_min_ns\":{added_min:.1},\"added_max_ns\":{added_max:.1},\"added_verdict\":\"{added_verdict}\",\
         \"counted_median_ns\":{counted_median:.1},\"counted_min_ns\":{counted_min:.1},\"counted_max_ns\":{counted_max:.1},\
         \"counted_added_median_ns\":{ac_median:.1},\"counted_added_min_ns\":{ac_min:.1},\"counted_added_max_ns\":{ac_max:.1},\"counted_added_verdict\":\"{counted_verdict}\",\
         \"target_added_ns\":{TARGET_ADDED_NS}}}",
        median / base_median,
    );
    println!(
        "per connection, median (min–max) over {rounds} interleaved rounds of {batch}:\n  \
         plain service, 3 endpoints:               {base_median:.0} ns ({base_min:.0}–{base_max:.0})\n  \
         90/10 split + rate limit:                 {median:.0} ns ({min:.0}–{max:.0})\n  \
         90/10 split + rate limit + split counter: {counted_median:.0} ns ({counted_min:.0}–{counted_max:.0})\n  \
         added by split + rate limit:              {added_median:+.0} ns ({added_min:+.0}–{added_max:+.0}): {added_verdict} (target < {TARGET_ADDED_NS} ns)\n  \
         added with the split counter:             {ac_median:+.0} ns ({ac_min:+.0}–{ac_max:+.0}): {counted_verdict} (target < {TARGET_ADDED_NS} ns)"
    );
}
