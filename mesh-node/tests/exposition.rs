//! The metrics exposition, in process: every `PromQL` expression of the Grafana dashboard refers
//! only to metrics the daemon exports, and the exposition carries Istio's metric names.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use mesh_node::{
    identity::{CA_CERT_FILE, CA_KEY_FILE, CertManager, LocalCa},
    metrics::{
        ConnRecord, DecisionLabels, Direction, Endpoint, Metrics, NodeCollector, Path, RoleLabels,
        Security,
    },
    tls,
};

fn metrics(test: &str) -> (Arc<Metrics>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("mesh-exposition-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCa::init(&dir, "cluster.local").expect("ca init");
    let ca = LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
    let certs = CertManager::new(Arc::new(ca), Duration::from_mins(1), tls::provider());
    let metrics = Metrics::new(NodeCollector {
        bpffs: dir.join("no-bpffs"),
        certs,
    });
    // Families appear in the exposition once they have a sample: record one of everything.
    let record = ConnRecord::open(
        &metrics,
        (Direction::Outbound, Path::Hbone),
        Endpoint::default(),
        Endpoint::default(),
        Security::MutualTls,
    );
    record.connected();
    record.received.add(10);
    record.close("completed");
    metrics
        .tls_handshake_seconds
        .get_or_create(&RoleLabels { role: "client" })
        .observe(0.001);
    metrics
        .policy_decisions
        .get_or_create(&DecisionLabels {
            result: "allow",
            policy: "default/p".to_owned(),
        })
        .inc();
    metrics.traffic(
        "web.shop.svc.cluster.local",
        "split",
        "web-v2.shop.svc.cluster.local",
    );
    (metrics, dir)
}

/// Sample names the exposition can contain, from its `# TYPE` lines.
fn exported(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn istio_standard_metrics_are_exported() {
    let (metrics, dir) = metrics("istio");
    let names = exported(&metrics.encode());
    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "mesh_connection_setup_seconds_bucket",
        "mesh_tls_handshake_seconds_bucket",
        "mesh_connection_duration_seconds_bucket",
        "mesh_policy_decisions_total",
        "mesh_traffic_decisions_total",
        "mesh_certificate_expiry_timestamp_seconds",
        "mesh_enrolled_workloads",
        "mesh_open_connections",
        "mesh_ebpf_program_runs_total",
        "mesh_ebpf_program_run_seconds_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            names.contains(name),
            "{name} missing from {names:?}\n{}",
            metrics.encode()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_dashboard_expression_uses_exported_metrics() {
    let (metrics, dir) = metrics("dashboard");
    let names = exported(&metrics.encode());
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/mesh-node-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let tokens = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            for token in tokens.filter(|t| {
                ["istio_", "mesh_", "process_"]
                    .iter()
                    .any(|p| t.starts_with(p))
            }) {
                assert!(
                    names.contains(token),
                    "panel {:?}: {token} is not exported\n{expr}",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} metric references checked");
    let _ = std::fs::remove_dir_all(dir);
}
