//! Hostile and broken peers, and limits: each bad connection ends alone, is logged and counted,
//! the daemon keeps serving, and its file descriptors and memory return to where they were.

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Testbed, Topology, mesh::NodeSettings, namespaced_test_can_run, open_fds, rss_bytes,
};

const APP: &str = env!("CARGO_BIN_EXE_mesh-testapp");
const BENCH: &str = env!("CARGO_BIN_EXE_mesh-bench");
const DUT: &str = env!("CARGO_BIN_EXE_mesh-node-dut");
const HOSTILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/hostile.py");

fn hostile(bed: &Testbed, pod: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = vec!["python3", HOSTILE];
    cmd.extend_from_slice(args);
    let out = bed.pod(pod).exec(&cmd).expect("python3 runs");
    assert!(out.status.success(), "{args:?}: {}", out.stderr);
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

fn works(bed: &Testbed, from: &str, target: &str) -> bool {
    bed.pod(from)
        .exec(&[APP, "client", target, "10000"])
        .expect("client")
        .status
        .success()
}

/// A certificate for b1's identity from the testbed CA: (CA cert, cert, key) paths.
fn b1_credentials(bed: &Testbed, ca: &Path) -> (String, String, String) {
    let (cert, key) = (
        bed.tmp_dir().join("b1-cert.pem"),
        bed.tmp_dir().join("b1-key.pem"),
    );
    let out = std::process::Command::new(DUT)
        .args(["ca", "issue", "--ca-dir"])
        .arg(ca)
        .args([
            "--identity",
            "spiffe://cluster.local/ns/default/sa/b1",
            "--cert",
        ])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("ca issue");
    assert!(out.status.success());
    (
        ca.join("ca-cert.pem").to_string_lossy().into_owned(),
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

#[test]
fn hostile_peers_end_only_their_own_connection_and_leave_nothing_behind() {
    if !namespaced_test_can_run() {
        return;
    }
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1"]),
    )
    .expect("testbed");
    let _apps: Vec<_> = ["a2", "b1"]
        .iter()
        .map(|pod| {
            bed.pod(pod)
                .spawn_server(&[APP, "echo", "[::]:7000"])
                .expect("echo")
        })
        .collect();
    let settings = NodeSettings {
        handshake_timeout_ms: 1000,
        ..NodeSettings::default()
    };
    let mut a = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &["a2"], &settings)
        .expect("daemon");
    let pid = a.proc().pid();
    let a2_app = bed.pod("a2").addr(false, 7000).to_string();
    let b1_app = bed.pod("b1").addr(false, 7000).to_string();
    let a2_ip = bed.pod("a2").ipv4().to_string();
    assert!(works(&bed, "b1", &a2_app) && works(&bed, "a2", &b1_app));
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (open_fds(pid), rss_bytes(pid));

    // 15008: random bytes, a TLS handshake that never finishes.
    assert_eq!(
        hostile(&bed, "b1", &["garbage", &a2_ip, "15008", "20"])["garbage"],
        20
    );
    let stalled = hostile(&bed, "b1", &["stall", &a2_ip, "15008", "10", "2.5"]);
    assert_eq!(
        stalled["closed_by_server"], 10,
        "handshake timeout closes them: {stalled}"
    );
    // 15008 with a valid certificate: 300 streams that never read; an oversized header.
    let (ca_s, cert_s, key_s) = b1_credentials(&bed, a.ca());
    let flood = hostile(
        &bed,
        "b1",
        &[
            "streams", &a2_ip, "15008", &a2_app, "300", &ca_s, &cert_s, &key_s,
        ],
    );
    assert!(
        flood["accepted"].as_u64().unwrap() <= 200,
        "at most 200 concurrent streams: {flood}"
    );
    let big = hostile(
        &bed,
        "b1",
        &[
            "bigheader",
            &a2_ip,
            "15008",
            &a2_app,
            &ca_s,
            &cert_s,
            &key_s,
        ],
    );
    assert_ne!(big["outcome"], "status 200", "{big}");
    // 15006 and 15001: random bytes from peers that then vanish (reset) mid-stream.
    assert_eq!(
        hostile(&bed, "b1", &["garbage", &a2_ip, "7000", "20"])["garbage"],
        20
    );
    let b1_ip = bed.pod("b1").ipv4().to_string();
    assert_eq!(
        hostile(&bed, "a2", &["garbage", &b1_ip, "7000", "20"])["garbage"],
        20
    );

    // The daemon is alive and serving, logged and counted what it refused.
    assert!(a.proc().is_running(), "the daemon survived");
    assert!(
        works(&bed, "b1", &a2_app) && works(&bed, "a2", &b1_app),
        "and still serves"
    );
    assert_eq!(a.records("HBONE TLS handshake rejected").len(), 20);
    assert_eq!(a.records("HBONE TLS handshake timed out").len(), 10);

    // File descriptors and memory return to baseline.
    // (The daemon gives freed memory back every few seconds.)
    let settled = || open_fds(pid) <= fds0 + 2 && rss_bytes(pid) <= rss0 + rss0 / 10 + 1_048_576;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !settled() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        open_fds(pid) <= fds0 + 2,
        "fds {} → {}",
        fds0,
        open_fds(pid)
    );
    let rss1 = rss_bytes(pid);
    eprintln!("RSS {rss0} → {rss1}, fds {fds0} → {}", open_fds(pid));
    assert!(
        rss1 <= rss0 + rss0 / 2 + 4 * 1_048_576,
        "RSS {rss0} → {rss1}"
    );
}

#[test]
fn connection_limits_refuse_with_a_log_line_and_recover() {
    if !namespaced_test_can_run() {
        return;
    }
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1"])
            .node("node-b", &["b1"]),
    )
    .expect("testbed");
    let _server = bed
        .pod("b1")
        .spawn_server(&[BENCH, "serve", "[::]:9000"])
        .expect("server");
    let settings = NodeSettings {
        max_connections_per_workload: 20,
        ..NodeSettings::default()
    };
    let a = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &["a1"], &settings)
        .expect("daemon");
    let target = bed.pod("b1").addr(false, 9000).to_string();
    let mut idle = bed
        .pod("a1")
        .spawn(&[BENCH, "idle", &target, "20"])
        .expect("idle");
    idle.wait_for_output("\"open\":20", Duration::from_secs(10))
        .expect("20 open");
    std::thread::sleep(Duration::from_millis(300));
    let out = bed
        .pod("a1")
        .exec(&[BENCH, "connrate", &target, "1"])
        .expect("client");
    assert!(!out.status.success(), "the 21st connection is refused");
    let refusals = a.records("connection limit reached; refusing the connection");
    assert!(!refusals.is_empty());
    assert_eq!(refusals[0]["reason"], "limit_workload");
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    let out = bed
        .pod("a1")
        .exec(&[BENCH, "connrate", &target, "1"])
        .expect("client");
    assert!(
        out.status.success(),
        "connections work again once below the limit: {}",
        out.stderr
    );
}
