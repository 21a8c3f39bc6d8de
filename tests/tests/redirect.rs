//! Redirection end to end: real kernel programs, a real daemon, unmodified clients, IPv4 and
//! IPv6.

use std::{net::SocketAddr, path::Path, time::Duration};

use mesh_tests::{
    Daemon, Testbed,
    helpers::{client, echo_servers, two_by_two, two_daemons},
};

mesh_tests::binaries!(APP, DUT);
const PORT: u16 = 7000;

fn assert_intact(report: &serde_json::Value, dialled: SocketAddr, bytes: u64) {
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["received"], bytes, "{report}");
    assert_eq!(
        report["peer"],
        dialled.to_string(),
        "getpeername shows the dialled peer: {report}"
    );
}

#[test]
fn outbound_connections_of_an_enrolled_pod_pass_through_the_daemon() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2", "b1"], PORT);
    let daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon");

    let targets = [
        bed.pod("b1").addr(false, PORT),
        bed.pod("b1").addr(true, PORT),
        bed.pod("a2").addr(false, PORT),
        bed.pod("a2").addr(true, PORT),
    ];
    for target in targets {
        let report = client(&bed, APP, "a1", target, 200_000);
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

    // The kernel side agrees: four captures, four destinations handed over, and at least one
    // getpeername per client answered with the dialled address.
    let mut daemon = daemon;
    assert!(
        daemon.stop().expect("stop").success(),
        "clean exit on SIGTERM"
    );
    let counters = &daemon.records("kernel counters at shutdown")[0]["counters"];
    let counters = counters.as_str().expect("counters");
    for expected in [
        "(\"connect_captured\", 4)",
        "(\"orig_dst_recorded\", 4)",
        "(\"orig_dst_missing\", 0)",
        "(\"connect_failed\", 0)",
    ] {
        assert!(counters.contains(expected), "{expected} in {counters}");
    }
}

#[test]
fn inbound_connections_to_an_enrolled_pod_are_captured_on_15006() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["b1"], PORT);
    let daemon = Daemon::start(&bed, "node-b", Path::new(DUT), &["b1"]).expect("daemon");
    for v6 in [false, true] {
        let target = bed.pod("b1").addr(v6, PORT);
        let report = client(&bed, APP, "a1", target, 100_000);
        assert_intact(&report, target, 100_000);
    }
    let captured = daemon.captured("inbound");
    assert_eq!(captured.len(), 2, "{captured:?}");
    for (record, v6) in captured.iter().zip([false, true]) {
        assert_eq!(record["dst_workload"], "default/b1", "{record}");
        assert_eq!(
            record["orig_dst"],
            bed.pod("b1").addr(v6, PORT).to_string(),
            "{record}"
        );
        let client: SocketAddr = record["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            client.ip(),
            bed.pod("a1").addr(v6, 0).ip(),
            "the client's own address"
        );
    }
}

#[test]
fn traffic_of_other_pods_and_of_the_node_is_untouched_and_paths_are_chosen_without_loops() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2", "b1", "b2"], PORT);
    // Every node sees the same workload list; each enrolls its own pods.
    let enrolled = ["a1", "a2", "b1"];
    let (a, b) = two_daemons(&bed, DUT, &enrolled);

    // A pod that is not enrolled, to a pod that is not enrolled: no daemon sees it.
    let target = bed.pod("b2").addr(false, PORT);
    let b_in = b.records("connection captured").len();
    assert_intact(&client(&bed, APP, "b2", target, 1000), target, 1000);
    assert_eq!(
        b.records("connection captured").len(),
        b_in,
        "b2 -> b2 is nobody's business"
    );
    let before = (a.captured("outbound").len(), b.captured("outbound").len());
    let out = bed
        .node("node-a")
        .exec(&[APP, "client", &target.to_string(), "1000"])
        .expect("node client");
    assert!(out.status.success(), "node-a -> b2: {}", out.stderr);
    assert_eq!(
        (a.captured("outbound").len(), b.captured("outbound").len()),
        before,
        "the node's own connection is not captured"
    );

    // b1 is enrolled on node-b, a2 on node-a: b1 -> a2 is captured once outbound on node-b and
    // carried over HBONE to node-a's daemon; the daemons' own sockets (marked) are never
    // captured again.
    let a_in = a.captured("inbound").len();
    let b_out = b.captured("outbound").len();
    let target = bed.pod("a2").addr(true, PORT);
    assert_intact(&client(&bed, APP, "b1", target, 50_000), target, 50_000);
    // Both enrolled on node-a: a1 -> a2 takes the same-node path (one outbound capture, no
    // TLS, no second capture at a2).
    let target = bed.pod("a2").addr(false, PORT);
    assert_intact(&client(&bed, APP, "a1", target, 50_000), target, 50_000);
    // Destination b2 is not in the mesh: passthrough.
    let target = bed.pod("b2").addr(false, PORT);
    assert_intact(&client(&bed, APP, "a1", target, 50_000), target, 50_000);

    std::thread::sleep(Duration::from_millis(200));
    let b_outbound = b.captured("outbound");
    assert_eq!(b_outbound.len() - b_out, 1, "node-b outbound");
    assert_eq!(
        b_outbound[b_out]["path"], "hbone",
        "{:?}",
        b_outbound[b_out]
    );
    assert_eq!(b.captured("inbound").len(), 0, "nothing came in to b1");
    let a_inbound = a.captured("inbound");
    assert_eq!(
        a_inbound.len() - a_in,
        1,
        "node-a inbound: b1->a2 over HBONE only"
    );
    assert_eq!(a_inbound[a_in]["path"], "hbone");
    assert_eq!(
        a_inbound[a_in]["peer_identity"],
        "spiffe://cluster.local/ns/default/sa/b1"
    );
    let outbound_a: Vec<String> = a
        .captured("outbound")
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["src_workload"].as_str().unwrap(),
                r["orig_dst"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        outbound_a,
        [
            format!("default/a1 {} same-node", bed.pod("a2").addr(false, PORT)),
            format!("default/a1 {} passthrough", bed.pod("b2").addr(false, PORT)),
        ],
        "node-a outbound captures and their paths"
    );
}

/// `bpftool -j <args>` parsed.
fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool runs");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.trim_ascii().is_empty() {
        // `bpftool cgroup show` prints nothing at all when nothing is attached.
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

fn map_entries(bed: &Testbed, node: &str, map: &str) -> usize {
    let pin = bed.bpffs_dir().unwrap().join(node).join("maps").join(map);
    bpftool(&["map", "dump", "pinned", pin.to_str().unwrap()])
        .as_array()
        .map_or(0, Vec::len)
}

/// Programs attached to a cgroup, by name.
fn cgroup_programs(cgroup: &Path) -> Vec<String> {
    bpftool(&["cgroup", "show", cgroup.to_str().unwrap()])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `sk_lookup` links attached to the netns of `pod`.
fn netns_links(bed: &Testbed, pod: &str) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(bed.pod(pod).netns_path()).unwrap().ino();
    bpftool(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["type"] == "netns" && l["netns_ino"] == ino)
        .count()
}

fn listening_ports(bed: &Testbed, pod: &str) -> String {
    bed.pod(pod)
        .exec(&["ss", "-Hltn"])
        .expect("ss")
        .ok()
        .expect("ss ok")
        .stdout
}

#[test]
fn unenrolling_at_run_time_restores_direct_connectivity_and_leaves_nothing() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["b1"], PORT);
    let target = bed.pod("b1").addr(false, PORT);
    let mut daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon");
    assert_intact(&client(&bed, APP, "a1", target, 1000), target, 1000);
    assert_eq!(daemon.captured("outbound").len(), 1);
    assert!(listening_ports(&bed, "a1").contains(":15001"));
    assert_eq!(netns_links(&bed, "a1"), 1);
    assert_eq!(map_entries(&bed, "node-a", "MESH_ENROLLED"), 1);
    assert_eq!(
        map_entries(&bed, "node-a", "MESH_NETNS_ADDRS"),
        3,
        "every address of a1's netns: its listed IPv4 and IPv6, and its IPv6 link-local"
    );

    daemon.set_enrolled(&bed, &[]).expect("rewrite config");
    daemon
        .wait_for_records("pod unenrolled", 1, Duration::from_secs(5))
        .expect("unenrolled");
    assert_intact(&client(&bed, APP, "a1", target, 1000), target, 1000);
    assert_eq!(daemon.captured("outbound").len(), 1, "no longer captured");
    let ports = listening_ports(&bed, "a1");
    assert!(
        !ports.contains(":15001") && !ports.contains(":15006"),
        "listeners closed: {ports}"
    );
    assert_eq!(netns_links(&bed, "a1"), 0, "sk_lookup link detached");
    for map in ["MESH_ENROLLED", "MESH_NETNS_ADDRS", "MESH_LISTENERS"] {
        assert_eq!(map_entries(&bed, "node-a", map), 0, "{map} emptied");
    }
    let pins = bed.bpffs_dir().unwrap().join("node-a/netns");
    assert_eq!(
        std::fs::read_dir(pins).unwrap().count(),
        0,
        "no sk_lookup pin left"
    );

    // And enrolling again captures again.
    daemon.set_enrolled(&bed, &["a1"]).expect("rewrite config");
    daemon
        .wait_for_records("pod enrolled", 2, Duration::from_secs(5))
        .expect("re-enrolled");
    assert_intact(&client(&bed, APP, "a1", target, 1000), target, 1000);
    assert_eq!(daemon.captured("outbound").len(), 2);
}

#[test]
fn a_killed_daemon_fails_closed_and_its_successor_adopts_the_pinned_programs() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a1", "b1"], PORT);
    let out_target = bed.pod("b1").addr(false, PORT);
    let mut daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon");
    assert_intact(&client(&bed, APP, "a1", out_target, 1000), out_target, 1000);

    daemon.kill().expect("kill -9");
    // Outbound: refused at once, no hang.
    let started = std::time::Instant::now();
    let out = bed
        .pod("a1")
        .exec(&[APP, "client", &out_target.to_string(), "1000"])
        .expect("client runs");
    assert!(
        !out.status.success(),
        "connection must fail while no daemon runs"
    );
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed in {:?}",
        started.elapsed()
    );
    // Inbound: not delivered around the mesh.
    let in_target = bed.pod("a1").addr(false, PORT);
    let out = bed
        .pod("b1")
        .exec(&[APP, "client", &in_target.to_string(), "1000"])
        .expect("client runs");
    assert!(
        !out.status.success(),
        "inbound must not bypass the mesh: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains("refused"),
        "sk_lookup's drop answers with a reset: {}",
        out.stderr
    );

    // The restarted daemon adopts the pinned state and serves within a second.
    let restarted_at = std::time::Instant::now();
    let daemon = daemon.restart(&bed).expect("restart");
    let mut served = false;
    while restarted_at.elapsed() < Duration::from_secs(1) {
        let out = bed
            .pod("a1")
            .exec(&[APP, "client", &out_target.to_string(), "100"])
            .expect("client");
        if out.status.success() {
            served = true;
            break;
        }
    }
    assert!(
        served,
        "not serving within a second of the restart ({:?})",
        restarted_at.elapsed()
    );
    let ready = &daemon.records("ready")[0];
    assert_eq!(ready["adopted"], true, "{ready}");
    assert_eq!(daemon.records("pod enrolled")[0]["adopted"], true);
    let programs = cgroup_programs(bed.node("node-a").cgroup());
    for name in [
        "connect4",
        "connect6",
        "getpeername4",
        "getpeername6",
        "capture_sockops",
    ] {
        let n = programs.iter().filter(|p| p.as_str() == name).count();
        assert_eq!(n, 1, "{name} attached exactly once: {programs:?}");
    }
    assert_eq!(netns_links(&bed, "a1"), 1, "one sk_lookup link");
    assert_intact(&client(&bed, APP, "a1", out_target, 1000), out_target, 1000);
    assert_intact(&client(&bed, APP, "b1", in_target, 1000), in_target, 1000);
    // The probe that found it serving, and the client above.
    assert_eq!(daemon.captured("outbound").len(), 2);
    assert_eq!(daemon.captured("inbound").len(), 1);
}

#[test]
fn a_broken_config_edit_keeps_the_last_good_state_and_cleanup_uninstalls() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["b1"], PORT);
    let target = bed.pod("b1").addr(true, PORT);
    let mut daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon");

    let good = std::fs::read_to_string(daemon.config()).unwrap();
    let broken = good.replacen("enrolled: true", "enrolled: maybe", 1);
    mesh_tests::mesh::write_atomically(daemon.config(), &broken).unwrap();
    daemon
        .wait_for_records(
            "rejected configuration change; keeping the last good state",
            1,
            Duration::from_secs(5),
        )
        .expect("rejection logged");
    let rejection =
        &daemon.records("rejected configuration change; keeping the last good state")[0];
    let error = rejection["error"].as_str().unwrap();
    assert!(
        error.contains("workloads[0].enrolled") && error.contains("line"),
        "{error}"
    );
    assert_intact(&client(&bed, APP, "a1", target, 1000), target, 1000);
    assert_eq!(daemon.captured("outbound").len(), 1, "a1 is still enrolled");
    assert!(daemon.records("pod unenrolled").is_empty());

    // Uninstall: stop, then `mesh-node cleanup` removes every pin, which detaches everything.
    mesh_tests::mesh::write_atomically(daemon.config(), &good).unwrap();
    assert!(daemon.stop().expect("stop").success());
    let config = daemon.config().to_str().unwrap().to_owned();
    let out = bed
        .node("node-a")
        .exec(&[DUT, "cleanup", "--config", &config])
        .expect("cleanup");
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        !bed.bpffs_dir().unwrap().join("node-a").exists(),
        "{}",
        out.stdout
    );
    assert!(
        cgroup_programs(bed.node("node-a").cgroup()).is_empty(),
        "cgroup programs detached"
    );
    assert_eq!(netns_links(&bed, "a1"), 0, "sk_lookup detached");
    assert_intact(&client(&bed, APP, "a1", target, 1000), target, 1000);
}
