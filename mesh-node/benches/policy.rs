//! Policy evaluation at scale: the per-connection decision time with 10,000 authorization
//! policies in force, against a baseline measured in the same run (a store holding only the
//! policies that apply to the workload), plus the cost of the first decision after a change
//! (when the workload's applicable set is computed). Run by `cargo xtask bench`; prints one
//! JSON object.

use std::{hint::black_box, time::Instant};

use mesh_node::{
    identity::Identity,
    policy::{ConnInfo, PolicyDocument, PolicyStore},
    workload::Workload,
};

const NAMESPACES: usize = 500;
const PER_NAMESPACE: usize = 20;

fn policy(ns: &str, name: &str, app: &str, action: &str, sa: &str, port: u16) -> String {
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: {name}\n    namespace: {ns}\n  spec:\n    selector:\n      matchLabels: {{app: {app}}}\n    action: {action}\n    rules:\n    - from:\n      - source:\n          principals: [cluster.local/ns/{ns}/sa/{sa}, \"cluster.local/ns/ops/*\"]\n          ipBlocks: [10.{}.0.0/16]\n      to:\n      - operation:\n          ports: [\"{port}\"]\n",
        port % 250
    )
}

fn documents(total_namespaces: usize) -> Vec<PolicyDocument> {
    let mut yaml = String::new();
    for n in 0..total_namespaces {
        let ns = format!("ns-{n}");
        for p in 0..PER_NAMESPACE {
            let action = if p % 5 == 0 { "DENY" } else { "ALLOW" };
            #[expect(clippy::cast_possible_truncation, reason = "small test ports")]
            let port = 8000 + p as u16;
            yaml.push_str(&policy(
                &ns,
                &format!("p-{p}"),
                &format!("svc-{}", p % 10),
                action,
                &format!("client-{p}"),
                port,
            ));
        }
    }
    serde_yaml_ng::from_str(&yaml).expect("generated policies parse")
}

/// Median, min and max nanoseconds per decision over `batches` batches of `batch` decisions.
fn measure(
    store: &PolicyStore,
    workload: &Workload,
    conns: &[ConnInfo<'_>],
    batches: usize,
    batch: usize,
) -> (f64, f64, f64) {
    let mut per_decision = Vec::with_capacity(batches);
    for _ in 0..batches {
        let start = Instant::now();
        for i in 0..batch {
            black_box(store.authorize(workload, &conns[i % conns.len()]));
        }
        #[expect(clippy::cast_precision_loss, reason = "timing statistics")]
        per_decision.push(start.elapsed().as_nanos() as f64 / batch as f64);
    }
    per_decision.sort_by(f64::total_cmp);
    (
        per_decision[per_decision.len() / 2],
        per_decision[0],
        per_decision[per_decision.len() - 1],
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (batches, batch) = if quick { (21, 2_000) } else { (101, 10_000) };
    let workload = Workload {
        name: "svc-3-abc".to_owned(),
        namespace: "ns-7".to_owned(),
        service_account: "svc-3".to_owned(),
        labels: [("app".to_owned(), "svc-3".to_owned())].into(),
        ips: vec!["10.7.0.9".parse().unwrap()],
        node: "n1".to_owned(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    };
    let allowed_client = Identity::new("cluster.local", "ns-7", "client-3");
    let other_client = Identity::new("cluster.local", "ns-9", "client-1");
    let conns = [
        ConnInfo {
            src_ip: "10.3.1.2".parse().unwrap(),
            src_identity: Some(&allowed_client),
            dst_ip: "10.7.0.9".parse().unwrap(),
            dst_port: 8003,
            trust_aliases: &[],
        },
        ConnInfo {
            src_ip: "10.9.1.2".parse().unwrap(),
            src_identity: Some(&other_client),
            dst_ip: "10.7.0.9".parse().unwrap(),
            dst_port: 8003,
            trust_aliases: &[],
        },
        ConnInfo {
            src_ip: "10.3.1.2".parse().unwrap(),
            src_identity: None,
            dst_ip: "10.7.0.9".parse().unwrap(),
            dst_port: 9999,
            trust_aliases: &[],
        },
    ];

    let all = documents(NAMESPACES);
    assert_eq!(all.len(), NAMESPACES * PER_NAMESPACE);
    let started = Instant::now();
    let big = PolicyStore::new("istio-system", &all).expect("valid");
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let applicable = big.applicable(&workload);
    let first_decision_us = started.elapsed().as_secs_f64() * 1e6;
    drop(applicable);
    // Baseline: only the policies of the workload's namespace that select it.
    let own: Vec<PolicyDocument> =
        all.iter()
            .filter(|d| {
                d.metadata.namespace == "ns-7"
                    && d.spec.selector.as_ref().is_some_and(|s| {
                        s.match_labels.get("app").map(String::as_str) == Some("svc-3")
                    })
            })
            .cloned()
            .collect();
    let small = PolicyStore::new("istio-system", &own).expect("valid");
    // Same answers from both.
    for c in &conns {
        assert_eq!(big.authorize(&workload, c), small.authorize(&workload, c));
    }
    let (base_median, base_min, base_max) = measure(&small, &workload, &conns, batches, batch);
    let (median, min, max) = measure(&big, &workload, &conns, batches, batch);
    println!(
        "{{\"scenario\":\"policy_decision\",\"policies\":{},\"applicable\":{},\"median_ns\":{median:.1},\"min_ns\":{min:.1},\"max_ns\":{max:.1},\"baseline_median_ns\":{base_median:.1},\"baseline_min_ns\":{base_min:.1},\"baseline_max_ns\":{base_max:.1},\"ratio\":{:.3},\"compile_ms\":{compile_ms:.1},\"first_decision_us\":{first_decision_us:.1},\"target_median_ns\":2000}}",
        all.len(),
        own.len(),
        median / base_median,
    );
}
