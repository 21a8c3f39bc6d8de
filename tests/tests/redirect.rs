//! Redirection end to end: real kernel programs, a real daemon, unmodified clients, IPv4 and
//! IPv6.

use std::{net::SocketAddr, path::Path, time::Duration};

use mesh_tests::{Daemon, Testbed, Topology, namespaced_test_can_run};

const APP: &str = env!("CARGO_BIN_EXE_mesh-testapp");
const DUT: &str = env!("CARGO_BIN_EXE_mesh-node-dut");
const PORT: u16 = 7000;

fn topology() -> Topology {
    Topology::new()
        .node("node-a", &["a1", "a2"])
        .node("node-b", &["b1", "b2"])
}

/// Starts echo servers on `[::]:7000` in the named pods.
fn echo_servers(bed: &Testbed, pods: &[&str]) -> Vec<mesh_tests::Proc> {
    pods.iter()
        .map(|pod| {
            let mut server = bed
                .pod(pod)
                .spawn(&[APP, "echo", &format!("[::]:{PORT}")])
                .expect("spawn");
            server
                .wait_for_output("listening", Duration::from_secs(5))
                .expect("echo server up");
            server
        })
        .collect()
}

/// Runs the test client in `from` against `to`; returns its JSON report, panicking on failure.
fn client(bed: &Testbed, from: &str, to: SocketAddr, bytes: u64) -> serde_json::Value {
    let out = bed
        .pod(from)
        .exec(&[APP, "client", &to.to_string(), &bytes.to_string()])
        .expect("client runs")
        .ok()
        .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
    serde_json::from_str(out.stdout.trim()).expect("client prints JSON")
}

fn assert_intact(report: &serde_json::Value, dialled: SocketAddr, bytes: u64) {
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["received"], bytes, "{report}");
    assert_eq!(
        report["peer"],
        dialled.to_string(),
        "getpeername shows the dialled peer: {report}"
    );
}

fn up() -> Testbed {
    Testbed::up(&topology()).expect("testbed")
}

#[test]
fn outbound_connections_of_an_enrolled_pod_pass_through_the_daemon() {
    if !namespaced_test_can_run() {
        return;
    }
    let bed = up();
    let _servers = echo_servers(&bed, &["a2", "b1"]);
    let daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon");

    let targets = [
        bed.pod("b1").addr(false, PORT),
        bed.pod("b1").addr(true, PORT),
        bed.pod("a2").addr(false, PORT),
        bed.pod("a2").addr(true, PORT),
    ];
    for target in targets {
        let report = client(&bed, "a1", target, 200_000);
        assert_intact(&report, target, 200_000);
    }
    let captured = daemon.captured("outbound");
    let dsts: Vec<String> = captured
        .iter()
        .map(|r| r["orig_dst"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        dsts,
        targets.map(|t| t.to_string()),
        "exact original destinations, in order"
    );
    for record in &captured {
        assert_eq!(record["src_workload"], "default/a1", "{record}");
    }
}
