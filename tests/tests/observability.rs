//! Observability end to end: a real Prometheus server (Debian's `prometheus`) scrapes the
//! daemons of a two-node testbed while traffic flows, and its HTTP query API shows the counters
//! and histograms with the right labels and values; `promtool` accepts the exposition; the admin
//! API, readiness and access log tell the same story.

use std::time::Duration;

use mesh_tests::{
    Daemon, Proc, Testbed,
    helpers::{echo_servers, two_daemons, two_nodes},
};

mesh_tests::binaries!(APP, DUT);
const MIB: u64 = 1 << 20;
const MIB_F: f64 = 1_048_576.0;

/// Accepts exactly `n` (Prometheus returns exact small integers for counts).
fn is(n: f64) -> impl Fn(f64) -> bool {
    move |v| (v - n).abs() < 1e-9
}

/// Runs `curl` in node-a (where Prometheus listens on its loopback); returns the body.
fn curl(bed: &Testbed, node: &str, args: &[&str]) -> String {
    let out = mesh_tests::helpers::curl(bed, node, Duration::from_secs(5), args);
    assert!(out.status.success(), "curl {args:?}: {}", out.stderr);
    out.stdout
}

/// An instant `PromQL` query; returns the value of the single result (None if empty).
fn query(bed: &Testbed, promql: &str) -> Option<f64> {
    let body = curl(
        bed,
        "node-a",
        &[
            "-G",
            "http://127.0.0.1:9090/api/v1/query",
            "--data-urlencode",
            &format!("query={promql}"),
        ],
    );
    let json: serde_json::Value = serde_json::from_str(&body).expect("Prometheus JSON");
    assert_eq!(json["status"], "success", "{promql}: {body}");
    let result = json["data"]["result"].as_array()?.first()?.clone();
    result["value"][1].as_str()?.parse().ok()
}

/// Polls `promql` until `ok` accepts its value (Prometheus scrapes every second).
fn eventually(bed: &Testbed, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = query(bed, promql);
        if let Some(v) = value
            && ok(v)
        {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{promql} = {value:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn prometheus(bed: &Testbed) -> Proc {
    let dir = bed.tmp_dir().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    let targets: Vec<String> = bed
        .nodes()
        .iter()
        .map(|n| {
            format!(
                "      - targets: [\"{}:15020\"]\n        labels: {{node: {}}}\n",
                n.ipv4(),
                n.name()
            )
        })
        .collect();
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mesh-node\n    static_configs:\n{}", targets.concat()),
    )
    .unwrap();
    let mut proc = bed
        .node("node-a")
        .spawn(&[
            "prometheus",
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--web.listen-address=127.0.0.1:9090",
        ])
        .expect("prometheus");
    proc.wait_for_output(
        "Server is ready to receive web requests",
        Duration::from_secs(30),
    )
    .expect("prometheus up");
    proc
}

#[test]
fn prometheus_scrapes_the_mesh_and_sees_the_traffic() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1", "a2"], &["b1"]);
    let _echo = echo_servers(&bed, APP, &["b1"], 7000);
    let enrolled = ["a1", "b1"];
    let (_a, b) = two_daemons(&bed, DUT, &enrolled);
    let _prometheus = prometheus(&bed);

    let target = bed.pod("b1").addr(false, 7000).to_string();
    for _ in 0..3 {
        let out = bed
            .pod("a1")
            .exec(&[APP, "client", &target, &MIB.to_string()])
            .expect("client");
        assert!(out.status.success(), "{}", out.stderr);
    }
    // a2 (not enrolled) talks plaintext to b1: inbound, no mTLS.
    let out = bed
        .pod("a2")
        .exec(&[APP, "client", &target, "1000"])
        .expect("client");
    assert!(out.status.success(), "{}", out.stderr);

    check_prometheus(&bed);
    check_endpoints(&bed, &b);
}

/// The Istio metrics and the mesh's own, as Prometheus stored them.
fn check_prometheus(bed: &Testbed) {
    let mtls = r#"source_workload="a1",source_workload_namespace="default",source_principal="spiffe://cluster.local/ns/default/sa/a1",destination_workload="b1",destination_principal="spiffe://cluster.local/ns/default/sa/b1",connection_security_policy="mutual_tls",request_protocol="tcp",response_flags="-""#;
    for (reporter, node) in [("source", "node-a"), ("destination", "node-b")] {
        let sel = format!(r#"{{reporter="{reporter}",node="{node}",{mtls}}}"#);
        eventually(
            bed,
            &format!("sum(istio_tcp_connections_opened_total{sel})"),
            is(3.0),
        );
        eventually(
            bed,
            &format!("sum(istio_tcp_connections_closed_total{sel})"),
            is(3.0),
        );
        for metric in [
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        ] {
            let bytes = eventually(bed, &format!("sum({metric}{sel})"), |v| {
                v >= 3.0 * 0.97 * MIB_F
            });
            assert!(
                (bytes - 3.0 * MIB_F).abs() <= 0.03 * 3.0 * MIB_F,
                "{reporter} {metric} = {bytes}"
            );
        }
    }
    eventually(
        bed,
        r#"sum(istio_tcp_connections_opened_total{reporter="destination",source_workload="a2",connection_security_policy="none"})"#,
        is(1.0),
    );
    eventually(
        bed,
        r#"sum(mesh_connection_setup_seconds_count{node="node-a",direction="outbound",path="hbone"})"#,
        is(3.0),
    );
    eventually(
        bed,
        r#"sum(mesh_connection_duration_seconds_count{node="node-b",direction="inbound",path="hbone"})"#,
        is(3.0),
    );
    eventually(
        bed,
        r#"sum(mesh_tls_handshake_seconds_count{node="node-b",role="server"})"#,
        |v| v >= 1.0,
    );
    eventually(
        bed,
        r#"sum(mesh_policy_decisions_total{node="node-b",result="allow"})"#,
        is(4.0),
    );
    eventually(bed, r#"mesh_enrolled_workloads{node="node-a"}"#, is(1.0));
    eventually(
        bed,
        r#"mesh_certificate_expiry_timestamp_seconds{node="node-b",identity="spiffe://cluster.local/ns/default/sa/b1"} - time()"#,
        |v| v > 80_000.0,
    );
    eventually(
        bed,
        r#"sum(mesh_ebpf_program_runs_total{node="node-a",program="connect4"})"#,
        |v| v >= 3.0,
    );
    eventually(
        bed,
        r#"sum(mesh_ebpf_events_total{node="node-a",event="connect_captured"})"#,
        is(3.0),
    );
    eventually(
        bed,
        r#"process_resident_memory_bytes{node="node-b"}"#,
        |v| v > 1e6,
    );
}

/// `promtool`, readiness, the admin API and the access log.
fn check_endpoints(bed: &Testbed, b: &Daemon) {
    // promtool accepts the exposition.
    let metrics_url = format!("http://{}:15020/metrics", bed.node("node-b").ipv4());
    let out = bed
        .node("node-a")
        .exec(&[
            "sh",
            "-c",
            &format!("curl -sS {metrics_url} | promtool check metrics"),
        ])
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        out.stdout,
        out.stderr
    );

    // Readiness, admin and access log.
    assert!(
        curl(
            bed,
            "node-b",
            &["-f", "http://127.0.0.1:15021/healthz/ready"]
        )
        .contains("ready")
    );
    let dump: serde_json::Value = serde_json::from_str(&curl(
        bed,
        "node-b",
        &["http://127.0.0.1:15000/config_dump"],
    ))
    .expect("JSON");
    assert_eq!(dump["state"]["enrolled"][0][0], "default/b1", "{dump:#}");
    assert_eq!(
        dump["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/default/sa/b1"
    );
    assert!(
        !dump.to_string().contains("PRIVATE KEY"),
        "no key material in the dump"
    );
    let logging = curl(
        bed,
        "node-b",
        &[
            "-X",
            "POST",
            "http://127.0.0.1:15000/logging?filter=info,mesh_node=trace",
        ],
    );
    assert!(logging.contains("mesh_node=trace"), "{logging}");
    let bad = curl(
        bed,
        "node-b",
        &[
            "-X",
            "POST",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15000/logging?filter=info,%5B",
        ],
    );
    assert_eq!(bad, "400");
    let access: Vec<serde_json::Value> = b
        .records("connection complete")
        .into_iter()
        .filter(|r| r["src_workload"] == "default/a1")
        .collect();
    assert_eq!(access.len(), 3, "{access:?}");
    for record in access {
        assert_eq!(record["bytes_received"], MIB, "{record}");
        assert_eq!(record["bytes_sent"], MIB, "{record}");
        assert_eq!(
            record["src_identity"],
            "spiffe://cluster.local/ns/default/sa/a1"
        );
        assert_eq!(record["reason"], "completed");
    }
}
