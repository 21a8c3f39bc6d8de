//! The testbed itself: wiring, placement of processes, and teardown on drop, on panic and
//! after an owner died without unwinding.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    Testbed, Topology,
    helpers::{client, echo_servers, two_by_two},
};

mesh_tests::binaries!(APP);

#[test]
fn pods_reach_each_other_within_and_across_nodes_over_ipv4_and_ipv6() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2", "b1"], 7000);
    for v6 in [false, true] {
        for to in ["a2", "b1"] {
            let target = bed.pod(to).addr(v6, 7000);
            let report = client(&bed, APP, "a1", target, 300_000);
            assert_eq!(report["intact"], true, "{report}");
            assert_eq!(report["received"], 300_000, "{report}");
            assert_eq!(report["peer"], target.to_string(), "{report}");
            let local: std::net::SocketAddr = report["local"].as_str().unwrap().parse().unwrap();
            assert_eq!(
                local.ip(),
                bed.pod("a1").addr(v6, 0).ip(),
                "source is the pod IP"
            );
        }
    }
    // Nodes reach each other over the shared link.
    let node_b = bed.node("node-b");
    let mut node_server = node_b.spawn(&[APP, "echo", "[::]:7001"]).expect("spawn");
    node_server
        .wait_for_output("listening", Duration::from_secs(5))
        .expect("node server up");
    for addr in [
        format!("{}:7001", node_b.ipv4()),
        format!("[{}]:7001", node_b.ipv6()),
    ] {
        let out = bed
            .node("node-a")
            .exec(&[APP, "client", &addr, "1000"])
            .expect("client");
        assert!(out.status.success(), "node-a -> {addr}: {}", out.stderr);
    }
}

#[test]
fn processes_run_inside_their_pod_netns_and_cgroup() {
    mesh_tests::skip_unless_namespaced!();
    let bed = Testbed::up(&Topology::new().node("n1", &["p1", "p2"])).expect("testbed");
    let pod = bed.pod("p2");
    let proc = pod.spawn(&["sleep", "30"]).expect("spawn");
    let pid = proc.pid();
    let netns_of = |p: &Path| std::fs::metadata(p).expect("stat netns").ino();
    assert_eq!(
        netns_of(&PathBuf::from(format!("/proc/{pid}/ns/net"))),
        netns_of(&pod.netns_path()),
        "process is in the pod's netns"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let rel = pod
        .cgroup()
        .to_string_lossy()
        .split(bed.id())
        .nth(1)
        .map(|rest| format!("{}{rest}", bed.id()))
        .expect("pod cgroup below the testbed's");
    assert!(
        cgroup
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&rel)),
        "process is in the pod's cgroup {rel}: {cgroup}"
    );
    let out = pod
        .exec(&["ip", "-o", "addr", "show", "dev", "eth0"])
        .expect("ip");
    assert!(
        out.stdout.contains(&pod.ipv4().to_string()),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&pod.ipv6().to_string()),
        "{}",
        out.stdout
    );
}

/// Everything a testbed made, to check it is gone afterwards.
struct Footprint {
    netns: Vec<String>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    tmp: PathBuf,
    pids: Vec<u32>,
}

fn footprint_with_processes(bed: &Testbed) -> (Footprint, Vec<mesh_tests::Proc>) {
    let mut procs = Vec::new();
    for pod in bed.pods() {
        procs.push(pod.spawn(&["sleep", "60"]).expect("spawn"));
    }
    procs.push(bed.nodes()[0].spawn(&["sleep", "60"]).expect("spawn"));
    let bpffs = bed.bpffs_dir().expect("bpffs").to_path_buf();
    std::fs::create_dir(bpffs.join("pins")).expect("mkdir in bpffs");
    let footprint = Footprint {
        netns: bed.netns_names(),
        cgroup: bed.cgroup().to_path_buf(),
        bpffs,
        tmp: bed.tmp_dir().to_path_buf(),
        pids: procs.iter().map(mesh_tests::Proc::pid).collect(),
    };
    for name in &footprint.netns {
        assert!(Path::new("/run/netns").join(name).exists(), "{name} exists");
    }
    (footprint, procs)
}

fn assert_gone(f: &Footprint) {
    for name in &f.netns {
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "netns {name} left behind"
        );
    }
    assert!(
        !f.cgroup.exists(),
        "cgroup {} left behind",
        f.cgroup.display()
    );
    assert!(
        !f.bpffs.exists(),
        "bpffs dir {} left behind",
        f.bpffs.display()
    );
    assert!(!f.tmp.exists(), "tmp dir {} left behind", f.tmp.display());
    for pid in &f.pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let zombie_or_gone = status.is_empty() || status.contains("State:\tZ");
        assert!(zombie_or_gone, "process {pid} still running");
    }
}

#[test]
fn drop_removes_namespaces_cgroups_pins_and_processes() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let (footprint, procs) = footprint_with_processes(&bed);
    // The testbed goes first while the test still holds process handles: teardown must not
    // depend on them.
    drop(bed);
    assert_gone(&footprint);
    drop(procs);
}

#[test]
fn a_panic_mid_test_leaves_nothing_behind() {
    mesh_tests::skip_unless_namespaced!();
    let footprint = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let bed = two_by_two();
        let (f, _procs) = footprint_with_processes(&bed);
        *footprint.lock().unwrap() = Some(f);
        panic!("deliberate panic in the middle of a namespaced test");
    });
    assert!(result.is_err(), "the closure panicked");
    let footprint = footprint
        .lock()
        .unwrap()
        .take()
        .expect("footprint recorded");
    assert_gone(&footprint);
}

#[test]
fn leftovers_of_a_dead_owner_are_swept() {
    mesh_tests::skip_unless_namespaced!();
    // A pid that is certainly dead: a child we already reaped.
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let name = format!("mt-{dead_pid}-0-stale");
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .expect("ip");
    assert!(status.success());
    let cgroup_root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("cgroup2");
    let stale_cgroup = cgroup_root.join(format!("mt-{dead_pid}-0"));
    std::fs::create_dir_all(stale_cgroup.join("node-x/pod-y")).expect("mkdir cgroup");

    let bed = Testbed::up(&Topology::new().node("n1", &["p1"])).expect("testbed");
    assert!(
        !Path::new("/run/netns").join(&name).exists(),
        "stale netns swept"
    );
    assert!(!stale_cgroup.exists(), "stale cgroup swept");
    drop(bed);
}
