//! Upgrades and restarts: a new daemon takes over from a running one without a single refused
//! or reset new connection, and the old one drains its open connections.

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Testbed,
    helpers::{connects, curl, echo_servers, peer_authentication, two_daemons, two_nodes, within},
    open_fds, rss_bytes,
};

mesh_tests::binaries!(APP, DUT, BENCH);

fn up() -> Testbed {
    two_nodes(&["a1"], &["b1"])
}

/// Replaces `old` by a new daemon with the same configuration: start the new one, wait until
/// it is ready, then SIGTERM the old one and wait for it to exit.
fn upgrade(bed: &Testbed, old: &mut Daemon) -> Daemon {
    let new = old
        .restart(bed)
        .expect("new daemon starts beside the old one");
    assert!(
        old.stop().expect("old daemon stops").success(),
        "old daemon exits cleanly"
    );
    new
}

#[test]
fn upgrading_both_daemons_refuses_no_new_connection() {
    mesh_tests::skip_unless_namespaced!();
    let bed = up();
    let _server = bed
        .pod("b1")
        .spawn_server(&[BENCH, "serve", "[::]:9000"])
        .expect("server");
    let enrolled = ["a1", "b1"];
    let (mut a, mut b) = two_daemons(&bed, DUT, &enrolled);

    // A steady stream of new connections (connect, exchange a byte, close) for 8 s, over HBONE.
    let target = bed.pod("b1").addr(false, 9000).to_string();
    let mut churn = bed
        .pod("a1")
        .spawn(&[BENCH, "churn", &target, "8"])
        .expect("churn");
    std::thread::sleep(Duration::from_secs(1));
    let a2 = upgrade(&bed, &mut a);
    std::thread::sleep(Duration::from_millis(500));
    let b2 = upgrade(&bed, &mut b);
    let status = churn.wait(Duration::from_secs(30)).expect("churn ends");
    assert!(status.success(), "{}", churn.stderr());
    let report: serde_json::Value = serde_json::from_str(churn.stdout().trim()).expect("JSON");
    eprintln!("through two upgrades: {report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() > 100, "{report}");
    // Both new daemons carried traffic after taking over.
    assert!(
        !a2.captured("outbound").is_empty(),
        "new node-a daemon took connections"
    );
    assert!(
        !b2.captured("inbound").is_empty(),
        "new node-b daemon took connections"
    );
}

#[test]
fn an_old_daemon_drains_its_open_connections() {
    mesh_tests::skip_unless_namespaced!();
    let bed = up();
    let _echo = echo_servers(&bed, APP, &["b1"], 7000);
    let mut a = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon a");
    let target = bed.pod("b1").addr(false, 7000).to_string();
    // A connection that lives 4 s, opened before the upgrade.
    let mut long = bed
        .pod("a1")
        .spawn(&[APP, "trickle", &target, "4"])
        .expect("trickle");
    a.wait_for_records("connection captured", 1, Duration::from_secs(5))
        .expect("captured");
    let started = std::time::Instant::now();
    let _new = upgrade(&bed, &mut a);
    let drained_in = started.elapsed();
    let status = long.wait(Duration::from_secs(10)).expect("trickle ends");
    assert!(
        status.success(),
        "the open connection finished intact: {}",
        long.stderr()
    );
    assert!(
        drained_in >= Duration::from_secs(2),
        "the old daemon waited for it ({drained_in:?})"
    );
    assert_eq!(
        a.records("all connections finished").len(),
        1,
        "drained, not cut"
    );
}

#[test]
fn connection_churn_leaves_descriptors_and_memory_at_baseline() {
    mesh_tests::skip_unless_namespaced!();
    let bed = up();
    let _server = bed
        .pod("b1")
        .spawn_server(&[BENCH, "serve", "[::]:9000"])
        .expect("server");
    let enrolled = ["a1", "b1"];
    let (mut a, mut b) = two_daemons(&bed, DUT, &enrolled);
    let target = bed.pod("b1").addr(false, 9000).to_string();
    // Warm up (pooled connection, certificates, allocator), then take the baseline.
    let warm = bed
        .pod("a1")
        .exec(&[BENCH, "churn", &target, "1"])
        .expect("warm-up");
    assert!(warm.status.success());
    std::thread::sleep(Duration::from_secs(1));
    let pids = [a.proc().pid(), b.proc().pid()];
    let before: Vec<(usize, u64)> = pids.iter().map(|p| (open_fds(*p), rss_bytes(*p))).collect();

    // Four clients making new connections for 15 s through both daemons.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            bed.pod("a1")
                .spawn(&[BENCH, "churn", &target, "15"])
                .expect("churn")
        })
        .collect();
    let mut total = 0;
    for mut c in clients {
        assert!(
            c.wait(Duration::from_mins(1))
                .expect("churn ends")
                .success()
        );
        let report: serde_json::Value = serde_json::from_str(c.stdout().trim()).expect("JSON");
        assert_eq!(report["failed"], 0, "{report}");
        total += report["ok"].as_u64().unwrap();
    }
    eprintln!("{total} connections churned through two daemons");
    assert!(total > 5_000, "{total}");

    let settled = |pid: u32, (fd0, rss0): (usize, u64)| {
        open_fds(pid) <= fd0 + 2 && rss_bytes(pid) <= rss0 + rss0 / 10 + 1_048_576
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !pids.iter().zip(&before).all(|(p, b)| settled(*p, *b))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(250));
    }
    for (pid, (fd0, rss0)) in pids.iter().zip(&before) {
        eprintln!(
            "daemon {pid}: fds {fd0} → {}, RSS {rss0} → {}",
            open_fds(*pid),
            rss_bytes(*pid)
        );
        assert!(
            settled(*pid, (*fd0, *rss0)),
            "daemon {pid} did not return to baseline"
        );
    }
    assert!(a.proc().is_running() && b.proc().is_running());
}

#[test]
fn running_out_of_file_descriptors_is_graceful() {
    mesh_tests::skip_unless_namespaced!();
    let bed = up();
    let _server = bed
        .pod("b1")
        .spawn_server(&[BENCH, "serve", "[::]:9000"])
        .expect("server");
    let mut a = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon a");
    let pid = a.proc().pid();
    let target = bed.pod("b1").addr(false, 9000).to_string();
    // Leave the daemon a few descriptors only (soft limit; raising the hard one back would need
    // CAP_SYS_RESOURCE).
    let limit = open_fds(pid) + 6;
    let original_soft: String = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .expect("the daemon's open-file limit");
    let out = std::process::Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={limit}:")])
        .output()
        .expect("prlimit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cpu = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<u64> = stat
            .rsplit_once(')')
            .map(|(_, r)| {
                r.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    };
    let cpu_before = cpu(pid);
    // 20 idle connections: the daemon runs out of descriptors part way.
    let mut idle = bed
        .pod("a1")
        .spawn(&[BENCH, "idle", &target, "20"])
        .expect("idle");
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu(pid) - cpu_before;
    assert!(
        ticks < 100,
        "the accept loop must not spin: {ticks} ticks in 2 s"
    );
    assert!(a.proc().is_running(), "the daemon survived");
    assert!(
        !a.records("accept failed").is_empty()
            || !a
                .records("file descriptor budget reached; refusing the connection")
                .is_empty(),
        "the exhaustion is logged"
    );
    drop(idle.stop(Duration::from_secs(1)));
    // With the limit back up, it serves again.
    let out = std::process::Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={original_soft}:")])
        .output()
        .expect("prlimit");
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(500));
    let out = bed
        .pod("a1")
        .exec(&[BENCH, "connrate", &target, "1"])
        .expect("client");
    assert!(out.status.success(), "serves again: {}", out.stderr);
}

/// Logged when a changed workload cannot be enrolled again.
const FAILED: &str = "enrollment failed; its previous enrollment stays in force; will retry";
/// Logged when the audit restores a pod's kernel state.
const RESTORED: &str = "kernel state of an enrolled pod was missing; restored";

/// A `PeerAuthentication` STRICT for `pod` (selector `app: <pod>`), as a `policies:` item.
fn strict_for(pod: &str) -> String {
    peer_authentication(
        "default",
        &format!("{pod}-strict"),
        &format!("{{app: {pod}}}"),
        "STRICT",
    )
}

/// Whether plaintext from `from` (outside the mesh) to `to`'s echo on port 7000 gets through.
fn plaintext_reaches(bed: &Testbed, from: &str, to: &str) -> bool {
    connects(bed, APP, from, to, 7000)
}

/// The status code and body of `node`'s readiness endpoint (`200 ...` or `503 ...`).
fn readiness(bed: &Testbed, node: &str) -> String {
    curl(
        bed,
        node,
        Duration::from_secs(2),
        &[
            "-w",
            "%{http_code} ",
            "-o",
            "/dev/stdout",
            "http://127.0.0.1:15021/healthz/ready",
        ],
    )
    .stdout
}

/// Issue 13, item 3: changing a workload's `netns` to a path that does not exist removed the
/// old enrollment first, then failed, leaving the pod open under STRICT; and the retry timer
/// fired in bursts.
#[test]
fn a_failed_re_enrollment_keeps_the_pod_captured() {
    mesh_tests::skip_unless_namespaced!();
    let bed = up();
    let _echo = echo_servers(&bed, APP, &["a1"], 7000);
    let settings = mesh_tests::mesh::NodeSettings {
        policies: strict_for("a1"),
        ..Default::default()
    };
    let daemon = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &["a1"], &settings)
        .expect("daemon");
    assert!(
        !plaintext_reaches(&bed, "b1", "a1"),
        "STRICT refuses plaintext"
    );

    // The workload's netns moves to a path that does not exist: the new enrollment fails.
    let config = daemon.config().to_owned();
    let good = std::fs::read_to_string(&config).expect("config");
    let netns = bed.pod("a1").netns_path();
    let netns = netns.to_str().expect("UTF-8");
    assert!(good.contains(netns));
    let bad = good.replace(netns, &format!("{netns}-gone"));
    daemon
        .reload_with(&bad, Duration::from_secs(5))
        .expect("reloaded");
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        assert!(
            !plaintext_reaches(&bed, "b1", "a1"),
            "the previous enrollment stays in force: STRICT still refuses plaintext"
        );
    }
    daemon
        .wait_for_records(FAILED, 1, Duration::from_secs(5))
        .expect("the re-enrollment failed");
    assert!(
        readiness(&bed, "node-a").starts_with("503"),
        "not ready while the enrollment fails: {}",
        readiness(&bed, "node-a")
    );
    // Retries come every few seconds, not in a burst.
    let before = daemon.records(FAILED).len();
    std::thread::sleep(Duration::from_secs(6));
    let retries = daemon.records(FAILED).len() - before;
    assert!((1..=2).contains(&retries), "{retries} retries in 6 s");

    // Back to the real netns: enrolled again, still captured, ready.
    daemon
        .reload_with(&good, Duration::from_secs(5))
        .expect("reloaded");
    assert!(
        within(Duration::from_secs(5), || readiness(&bed, "node-a")
            .starts_with("200"))
        .is_some(),
        "ready again: {}",
        readiness(&bed, "node-a")
    );
    assert!(!plaintext_reaches(&bed, "b1", "a1"), "still captured");
}

/// Issue 13, item 5: a second daemon for the same node (an upgrade's new pod), stopped again (a
/// rollback), left the survivor's inbound plaintext unreachable while its readiness said 200.
#[test]
fn a_rolled_back_upgrade_leaves_the_survivor_serving_inbound_plaintext() {
    mesh_tests::skip_unless_namespaced!();
    let bed = up();
    let _echo = echo_servers(&bed, APP, &["a1"], 7000);
    let survivor = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1"]).expect("daemon");
    assert!(
        plaintext_reaches(&bed, "b1", "a1"),
        "PERMISSIVE: plaintext is proxied"
    );
    // An upgrade's new daemon starts beside it, serves, then is stopped again (a rollback).
    // (The two daemons' 15006 listeners share a SO_REUSEPORT group: the kernel spreads new
    // connections over both.)
    let mut successor = survivor.restart(&bed).expect("successor");
    for _ in 0..4 {
        assert!(plaintext_reaches(&bed, "b1", "a1"), "served while both run");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        survivor.records(RESTORED).is_empty(),
        "the survivor leaves the successor's kernel state alone while it runs"
    );
    assert!(successor.stop().expect("stop").success());
    assert!(
        within(Duration::from_secs(2), || plaintext_reaches(
            &bed, "b1", "a1"
        ))
        .is_some(),
        "the survivor serves inbound plaintext again within 2 s"
    );
    let ok = (0..8)
        .filter(|_| plaintext_reaches(&bed, "b1", "a1"))
        .count();
    assert_eq!(ok, 8, "8 of 8 connections after the rollback");
    let restored: Vec<String> = survivor
        .records(RESTORED)
        .iter()
        .filter_map(|r| r["state"].as_str().map(str::to_owned))
        .collect();
    assert!(
        restored.iter().any(|s| s == "inbound listener"),
        "the survivor restored the inbound listener: {restored:?}"
    );
    assert!(
        readiness(&bed, "node-a").starts_with("200"),
        "ready: {}",
        readiness(&bed, "node-a")
    );
}
