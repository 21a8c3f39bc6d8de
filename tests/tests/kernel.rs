//! The whole kernel pipeline: the object `mesh-node` embeds (built from `mesh-ebpf` source) is
//! loaded into the running kernel, its `cgroup/connect4` and `cgroup/connect6` programs are
//! attached to a testbed's cgroup, unmodified clients in pods make real connections, and the
//! programs' per-CPU counters show exactly what they saw.

use std::time::Duration;

use mesh_common::{Counter, DAEMON_MARK, NetnsInfo};
use mesh_node::redirect::{CounterSnapshot, Programs, netns_cookie};
use mesh_tests::{Testbed, Topology, namespaced_test_can_run};

const APP: &str = env!("CARGO_BIN_EXE_mesh-testapp");

fn delta(before: CounterSnapshot, after: CounterSnapshot) -> [u64; 3] {
    [
        Counter::ConnectEnrolled,
        Counter::ConnectNotEnrolled,
        Counter::ConnectMarked,
    ]
    .map(|c| after.get(c) - before.get(c))
}

fn counters(programs: &Programs) -> CounterSnapshot {
    programs.counters().expect("read counters")
}

#[test]
fn connect_programs_classify_real_connections_by_netns_and_mark() {
    if !namespaced_test_can_run() {
        return;
    }
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1"]),
    )
    .expect("testbed");
    let mut servers = Vec::new();
    for pod in ["a1", "a2", "b1"] {
        let mut server = bed
            .pod(pod)
            .spawn(&[APP, "echo", "[::]:7000"])
            .expect("spawn");
        server
            .wait_for_output("listening", Duration::from_secs(5))
            .expect("echo server up");
        servers.push(server);
    }

    let mut programs = Programs::load(DAEMON_MARK).expect("load the embedded object");
    let names: Vec<&str> = programs.program_names().collect();
    assert!(
        names.contains(&"connect4") && names.contains(&"connect6"),
        "{names:?}"
    );
    programs
        .attach_connect(bed.cgroup())
        .expect("attach to the testbed cgroup");
    let a1 = bed.pod("a1");
    let cookie = netns_cookie(&a1.netns_path()).expect("netns cookie of a1");
    assert_ne!(cookie, 0);
    programs
        .enroll_netns(
            cookie,
            NetnsInfo {
                workload_id: 1,
                flags: 0,
            },
        )
        .expect("enroll a1");

    let client = |from: &str, to: std::net::SocketAddr| {
        bed.pod(from)
            .exec(&[APP, "client", &to.to_string(), "4096"])
            .expect("client runs")
            .ok()
            .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
    };

    // Enrolled pod, IPv4 (connect4) and IPv6 (connect6), same node and across nodes.
    let before = counters(&programs);
    client("a1", bed.pod("a2").addr(false, 7000));
    client("a1", bed.pod("b1").addr(true, 7000));
    assert_eq!(
        delta(before, counters(&programs)),
        [2, 0, 0],
        "enrolled a1: two connects"
    );

    // A pod whose netns is not enrolled, in the same cgroup tree.
    let before = counters(&programs);
    client("a2", bed.pod("a1").addr(false, 7000));
    client("b1", bed.pod("a1").addr(true, 7000));
    assert_eq!(
        delta(before, counters(&programs)),
        [0, 2, 0],
        "not enrolled: two connects"
    );

    // A socket carrying the daemon's mark, from the enrolled pod (python3's socket module is
    // as unmodified a client as it gets).
    let target = bed.pod("a2").addr(false, 7000);
    let script = format!(
        "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, 36, {DAEMON_MARK}); \
         s.connect(('{}', {})); s.close()",
        target.ip(),
        target.port()
    );
    let before = counters(&programs);
    let out = a1.exec(&["python3", "-c", &script]).expect("python3");
    assert!(out.status.success(), "marked connect: {}", out.stderr);
    assert_eq!(
        delta(before, counters(&programs)),
        [0, 0, 1],
        "marked socket"
    );

    // A process outside the testbed cgroup (this test) is not seen at all.
    let before = counters(&programs);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let _conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    assert_eq!(
        delta(before, counters(&programs)),
        [0, 0, 0],
        "outside the test cgroup"
    );

    // Unenrolled, a1 counts as any other pod.
    programs.unenroll_netns(cookie).expect("unenroll");
    let before = counters(&programs);
    client("a1", bed.pod("a2").addr(false, 7000));
    assert_eq!(
        delta(before, counters(&programs)),
        [0, 1, 0],
        "a1 after unenroll"
    );

    // Dropping the object detaches the programs: nothing counts any more.
    drop(programs);
    client("a1", bed.pod("a2").addr(false, 7000));
}
