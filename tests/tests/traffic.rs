//! L4 traffic management at the source node, from the file source: a weighted split moved at
//! run time without breaking open connections, failover and outlier ejection around a dead
//! endpoint, the pool and rate limits, and injected aborts and delays, each checked against
//! where connections went (the access log), what the client saw and the
//! `mesh_traffic_decisions` counters.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{
    Daemon, Testbed,
    helpers::{echo_servers, two_nodes, within},
    mesh::{NodeSettings, counter},
};

mesh_tests::binaries!(APP, DUT);

const HOST: &str = "echo.default.svc.cluster.local";

/// What `mesh-testapp many` reports.
struct Many {
    ok: u64,
    failed: u64,
    /// Each connection's time, in order.
    ms: Vec<f64>,
}

/// `count` connections one after another from `pod` to `vip`.
fn many(bed: &Testbed, pod: &str, vip: SocketAddr, count: u32) -> Many {
    let out = bed
        .pod(pod)
        .exec_timeout(
            &[APP, "many", &vip.to_string(), &count.to_string()],
            Duration::from_mins(3),
        )
        .expect("many runs")
        .ok()
        .expect("many succeeds");
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    Many {
        ok: report["ok"].as_u64().expect("ok"),
        failed: report["failed"].as_u64().expect("failed"),
        ms: report["ms"]
            .as_array()
            .expect("ms")
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect(),
    }
}

/// `n·p ± 5` standard deviations: outside it a correct sampler lands less than once in a
/// million runs.
fn binomial_bounds(n: u64, p: f64) -> (u64, u64) {
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "bounds of a count"
    )]
    let bounds = (
        (mean - 5.0 * sd).max(0.0).floor() as u64,
        (mean + 5.0 * sd).ceil() as u64,
    );
    bounds
}

/// A traffic decision counter of node-a's daemon for the front service.
fn decisions(bed: &Testbed, service: &str, decision: &str, target: &str) -> u64 {
    counter(
        bed,
        "node-a",
        &format!(
            "mesh_traffic_decisions_total{{destination_service=\"{service}\",decision=\"{decision}\",target=\"{target}\"}}"
        ),
    )
    .expect("metrics")
}

/// Outbound access-log records of `daemon` for connections to `service`.
fn records_of(daemon: &Daemon, service: &str) -> Vec<serde_json::Value> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| r["direction"] == "outbound" && r["dst_service"] == service)
        .collect()
}

/// Waits until `daemon` logged `n` outbound records for `service`; returns them.
fn wait_for_service_records(daemon: &Daemon, service: &str, n: usize) -> Vec<serde_json::Value> {
    within(Duration::from_secs(20), || {
        records_of(daemon, service).len() >= n
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of {n} records for {service}",
            records_of(daemon, service).len()
        )
    });
    records_of(daemon, service)
}

/// A record's `duration_ms` (a number, or a string of one).
fn duration_ms(record: &serde_json::Value) -> u64 {
    let field = &record["duration_ms"];
    field
        .as_u64()
        .or_else(|| field.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("duration_ms in {record}"))
}

fn service(name: &str, vip: &str, selector: &str, extra: &str) -> String {
    format!(
        "- name: {name}\n  addresses: [{vip}]\n  ports: [{{port: 80, targetPort: 7000}}]\n  selector: {{app: {selector}}}\n{extra}"
    )
}

/// Starts daemons on both nodes with `services` and `traffic`, all pods enrolled.
fn daemons(bed: &Testbed, services: String, traffic: String) -> (Daemon, Daemon) {
    let enrolled: Vec<&str> = bed.pods().map(mesh_tests::Pod::name).collect();
    let settings = NodeSettings {
        services,
        traffic,
        ..NodeSettings::default()
    };
    let a = Daemon::start_with_settings(bed, "node-a", Path::new(DUT), &enrolled, &settings)
        .expect("daemon a");
    let b = Daemon::start_with_settings(bed, "node-b", Path::new(DUT), &enrolled, &settings)
        .expect("daemon b");
    (a, b)
}

fn reload(daemon: &Daemon, from: &str, to: &str) {
    let text = std::fs::read_to_string(daemon.config()).expect("config");
    assert!(text.contains(from), "{from:?} in the configuration");
    daemon
        .reload_with(&text.replace(from, to), Duration::from_secs(10))
        .expect("reloaded");
}

const SPLIT_VIP: &str = "198.19.255.30";

fn split_route(v1: u32, v2: u32) -> String {
    format!(
        "- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {{name: canary}}\n  spec:\n    parentRefs: [{{group: '', kind: Service, name: echo, port: 80}}]\n    rules:\n    - backendRefs:\n      - {{name: echo-v1, port: 80, weight: {v1}}}\n      - {{name: echo-v2, port: 80, weight: {v2}}}\n"
    )
}

#[test]
fn a_weighted_split_lands_within_bounds_and_moves_at_run_time() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1"], &["b1", "b2"]);
    let _servers = echo_servers(&bed, APP, &["b1", "b2"], 7000);
    let services = [
        service("echo", SPLIT_VIP, "b1", ""),
        service("echo-v1", "198.19.255.31", "b1", ""),
        service("echo-v2", "198.19.255.32", "b2", ""),
    ]
    .concat();
    let (a, _b) = daemons(&bed, services, split_route(90, 10));
    let vip: SocketAddr = format!("{SPLIT_VIP}:80").parse().unwrap();

    let n = 1000;
    let run = many(&bed, "a1", vip, n);
    assert_eq!((run.ok, run.failed), (1000, 0), "every connection echoed");
    let records = wait_for_service_records(&a, HOST, 1000);
    let to = |records: &[serde_json::Value], pod: &str| {
        records
            .iter()
            .filter(|r| r["dst_workload"] == format!("default/{pod}"))
            .count() as u64
    };
    let (v1, v2) = (to(&records, "b1"), to(&records, "b2"));
    assert_eq!(v1 + v2, 1000);
    let (low, high) = binomial_bounds(1000, 0.1);
    assert!(
        (low..=high).contains(&v2),
        "{v2} of 1000 to v2, not within [{low}, {high}]"
    );
    assert!(
        records
            .iter()
            .all(|r| r["route"] == "TCPRoute default/canary"),
        "the access log names the route"
    );
    assert_eq!(
        decisions(&bed, HOST, "split", "echo-v2.default.svc.cluster.local"),
        v2
    );
    assert_eq!(
        decisions(&bed, HOST, "split", "echo-v1.default.svc.cluster.local"),
        v1
    );

    // Connections open across the change (mostly on v1) stay open; new ones all go to v2.
    let mut held = bed
        .pod("a1")
        .spawn(&[APP, "hold", &vip.to_string(), "10", "6"])
        .expect("hold");
    held.wait_for_output("\"ok\"", Duration::from_secs(10))
        .expect("held connections open");
    assert!(
        held.stdout().contains("{\"ok\":10,\"failed\":0}"),
        "{}",
        held.stdout()
    );
    reload(&a, "weight: 90", "weight: 0");
    reload(&a, "weight: 10", "weight: 100");
    let moved = many(&bed, "a1", vip, 100);
    assert_eq!((moved.ok, moved.failed), (100, 0));
    held.wait_for_output("still_ok", Duration::from_secs(15))
        .expect("held connections checked");
    assert!(
        held.stdout().contains("{\"still_ok\":10}"),
        "open connections survive the change: {}",
        held.stdout()
    );
    let after = wait_for_service_records(&a, HOST, 1110);
    let moved_records: Vec<serde_json::Value> = after[1000..]
        .iter()
        .filter(|r| duration_ms(r) < 3000)
        .cloned()
        .collect();
    assert_eq!(moved_records.len(), 100, "the 100 new connections");
    assert_eq!(
        to(&moved_records, "b2"),
        100,
        "weight 0 takes no new connection"
    );
}

#[test]
fn a_dead_endpoint_is_failed_over_ejected_and_returns() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1"], &["b1", "b2", "b3"]);
    let _servers = echo_servers(&bed, APP, &["b1", "b2"], 7000);
    let endpoints = ["b1", "b2", "b3"]
        .iter()
        .map(|p| format!("{{address: {}}}", bed.pod(p).ipv4()))
        .collect::<Vec<_>>()
        .join(", ");
    let services = format!(
        "- name: echo\n  addresses: [198.19.255.40]\n  ports: [{{port: 80, targetPort: 7000}}]\n  endpoints: [{endpoints}]\n"
    );
    let rule = "- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: echo}\n  spec:\n    host: echo\n    trafficPolicy:\n      outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 2s, maxEjectionPercent: 34}\n";
    let (a, _b) = daemons(&bed, services, rule.to_owned());
    let vip: SocketAddr = "198.19.255.40:80".parse().unwrap();

    let run = many(&bed, "a1", vip, 300);
    assert_eq!(
        (run.ok, run.failed),
        (300, 0),
        "no client sees the dead endpoint"
    );
    let records = wait_for_service_records(&a, HOST, 300);
    assert!(
        records.iter().all(|r| r["dst_workload"] != "default/b3"),
        "no connection was carried to the dead endpoint"
    );
    let retried = records
        .iter()
        .filter(|r| r["attempts"].as_u64() == Some(2))
        .count() as u64;
    assert!(retried >= 1, "failovers are in the access log");
    assert_eq!(decisions(&bed, HOST, "retry", HOST), retried);
    let ejected = decisions(&bed, HOST, "ejected", HOST);
    assert!(ejected >= 1, "the dead endpoint was ejected");
    // Two failures eject it; while ejected it is not tried: far fewer retries than the 100
    // connections round robin would have sent it.
    assert!(
        retried <= 2 * ejected + 2,
        "{retried} retries for {ejected} ejections"
    );

    // It comes back: once it answers and its ejection ended, connections reach it again.
    let _b3 = echo_servers(&bed, APP, &["b3"], 7000);
    let back = within(Duration::from_secs(40), || {
        let run = many(&bed, "a1", vip, 6);
        assert_eq!(run.failed, 0);
        records_of(&a, HOST)
            .iter()
            .any(|r| r["dst_workload"] == "default/b3")
    });
    assert!(back.is_some(), "the endpoint returned");
    assert!(decisions(&bed, HOST, "returned", HOST) >= 1);
}

#[test]
fn pool_and_rate_limits_admit_exactly_their_share() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1"], &["b1"]);
    let _servers = echo_servers(&bed, APP, &["b1"], 7000);
    let services = [
        service("echo", "198.19.255.50", "b1", ""),
        service(
            "limited",
            "198.19.255.51",
            "b1",
            "  connectionRateLimit: {connectionsPerSecond: 1, burst: 10}\n",
        ),
    ]
    .concat();
    let rule = "- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: echo}\n  spec:\n    host: echo\n    trafficPolicy: {connectionPool: {tcp: {maxConnections: 3}}}\n";
    let (a, _b) = daemons(&bed, services, rule.to_owned());

    // The pool: 3 open at once, the 4th and 5th refused; freed slots are taken again.
    let pooled: SocketAddr = "198.19.255.50:80".parse().unwrap();
    let mut held = bed
        .pod("a1")
        .spawn(&[APP, "hold", &pooled.to_string(), "5", "2"])
        .expect("hold");
    held.wait_for_output("still_ok", Duration::from_secs(20))
        .expect("hold finishes");
    let out = held.stdout();
    assert!(out.contains("{\"ok\":3,\"failed\":2}"), "{out}");
    assert!(out.contains("{\"still_ok\":3}"), "{out}");
    assert_eq!(decisions(&bed, HOST, "pool_limit", HOST), 2);
    let limit_hits = || decisions(&bed, HOST, "pool_limit", HOST);
    assert!(
        within(Duration::from_secs(5), || {
            let run = many(&bed, "a1", pooled, 3);
            run.ok == 3
        })
        .is_some(),
        "slots are freed when connections close"
    );
    assert!(limit_hits() >= 2);

    // The rate limit: a burst of 10, then 1 a second.
    let limited: SocketAddr = "198.19.255.51:80".parse().unwrap();
    let host = "limited.default.svc.cluster.local";
    let started = Instant::now();
    let run = many(&bed, "a1", limited, 30);
    let elapsed = started.elapsed();
    let refill = elapsed.as_secs() + 1;
    assert!(
        run.ok >= 10 && run.ok <= 10 + refill,
        "{} admitted in {elapsed:?}",
        run.ok
    );
    assert_eq!(run.ok + run.failed, 30);
    assert_eq!(decisions(&bed, host, "rate_limit", ""), run.failed);
    let refused = wait_for_service_records(&a, host, 30)
        .iter()
        .filter(|r| r["response_flags"] == "RL")
        .count() as u64;
    assert_eq!(refused, run.failed, "the access log shows each refusal");
    let quiet = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let again = many(&bed, "a1", limited, 10);
    let gap = quiet.elapsed() + elapsed;
    assert!(
        again.ok >= 2 && again.ok <= gap.as_secs() + 1,
        "{} admitted after {gap:?}",
        again.ok
    );
    assert_eq!(
        decisions(&bed, host, "rate_limit", ""),
        run.failed + again.failed
    );
}

#[test]
fn injected_aborts_and_delays_hit_their_share() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1"], &["b1"]);
    let _servers = echo_servers(&bed, APP, &["b1"], 7000);
    let fault = "- apiVersion: mesh.io/v1alpha1\n  kind: FaultInjection\n  metadata: {name: chaos}\n  spec:\n    targetRefs: [{kind: Service, name: echo}]\n    abort: {percentage: 30}\n";
    let (a, _b) = daemons(
        &bed,
        service("echo", "198.19.255.60", "b1", ""),
        fault.to_owned(),
    );
    let vip: SocketAddr = "198.19.255.60:80".parse().unwrap();

    let run = many(&bed, "a1", vip, 300);
    let (low, high) = binomial_bounds(300, 0.3);
    assert!(
        (low..=high).contains(&run.failed),
        "{} of 300 aborted, not within [{low}, {high}]",
        run.failed
    );
    assert_eq!(
        decisions(&bed, HOST, "fault_abort", "FaultInjection default/chaos"),
        run.failed
    );
    let records = wait_for_service_records(&a, HOST, 300);
    let aborted = records
        .iter()
        .filter(|r| {
            r["response_flags"] == "FI" && r["fault"] == "abort FaultInjection default/chaos"
        })
        .count() as u64;
    assert_eq!(aborted, run.failed, "the access log shows each abort");

    let delay_ms = 400.0;
    reload(
        &a,
        "abort: {percentage: 30}",
        "delay: {percentage: 50, fixedDelay: 400ms}",
    );
    let run = many(&bed, "a1", vip, 40);
    assert_eq!(
        (run.ok, run.failed),
        (40, 0),
        "delays do not fail connections"
    );
    let delayed = decisions(&bed, HOST, "fault_delay", "FaultInjection default/chaos");
    let (low, high) = binomial_bounds(40, 0.5);
    assert!(
        (low..=high).contains(&delayed),
        "{delayed} of 40 delayed, not within [{low}, {high}]"
    );
    // The `delayed` slowest connections took the delay, and not much more.
    let mut ms = run.ms.clone();
    ms.sort_by(f64::total_cmp);
    let slowest = &ms[ms.len() - usize::try_from(delayed).unwrap()..];
    assert!(
        slowest
            .iter()
            .all(|t| *t >= delay_ms && *t < delay_ms + 1500.0),
        "delayed connections took {slowest:?} ms"
    );
    let records = wait_for_service_records(&a, HOST, 340);
    let noted = records
        .iter()
        .filter(|r| {
            r["fault"]
                .as_str()
                .is_some_and(|f| f.starts_with("delay 400ms"))
        })
        .count() as u64;
    assert_eq!(noted, delayed, "the access log names each injected delay");
}
