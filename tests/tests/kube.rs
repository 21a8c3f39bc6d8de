//! The Kubernetes state source against an API server stand-in that speaks the real list/watch
//! protocol over HTTP (resource versions, bookmarks, watch timeouts, 410 Gone), reached
//! through a kubeconfig from both testbed nodes: namespace opt-in and pod opt-out by label,
//! pods found by their kubelet-style cgroups, identities from service accounts, policies and
//! services applied through the API, readiness only after the initial sync, and an API server
//! restart with a compacted history.

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Proc, Testbed, Topology,
    apiserver::{ApiServer, made_up_uid},
    helpers::{echo_servers, readiness, wait_until},
};
use serde_json::{Value, json};

mesh_tests::binaries!(APP, DUT);
const NS: &str = "shop";
const LABEL: &str = "mesh.io/dataplane-mode";
const VIP: &str = "198.19.255.10";

fn pod_uid(i: u64) -> String {
    made_up_uid(0x4b00 + i)
}

/// The kubelet's cgroup for a pod's container: cgroupfs layout on node-a, systemd on node-b.
fn kubelet_cgroup(node: &str, uid: &str) -> String {
    if node == "node-a" {
        format!("kubepods/besteffort/pod{uid}/pause")
    } else {
        let u = uid.replace('-', "_");
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-0123.scope"
        )
    }
}

fn pod_object(bed: &Testbed, name: &str, uid: &str, extra_labels: &Value) -> Value {
    let pod = bed.pod(name);
    let mut labels = json!({"app": name});
    if let (Some(l), Some(extra)) = (labels.as_object_mut(), extra_labels.as_object()) {
        l.extend(extra.clone());
    }
    json!({
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": labels},
        "spec": {"nodeName": pod.node(), "serviceAccountName": name,
                 "containers": [{"name": "app", "image": "mesh-testapp"}]},
        "status": {"phase": "Running", "podIP": pod.ipv4().to_string(),
                   "podIPs": [{"ip": pod.ipv4().to_string()}, {"ip": pod.ipv6().to_string()}]}
    })
}

fn namespace(labels: &Value) -> Value {
    json!({"kind": "Namespace", "metadata": {"name": NS, "labels": labels}})
}

fn deny_a1() -> Value {
    json!({
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-a1", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "b1"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/a1"]}}]}]}
    })
}

fn config(bed: &Testbed, node: &str, ca: &Path, kubeconfig: &Path) -> String {
    format!(
        "node: {node}\nlog:\n  format: json\n  filter: info,mesh_node=debug\n\
         redirect:\n  cgroup: {cgroup}\n  bpffs: {bpffs}\nproxy:\n  connectTimeoutMs: 3000\n\
         identity:\n  trustDomain: cluster.local\n  caCertFile: {ca}/ca-cert.pem\n  caKeyFile: {ca}/ca-key.pem\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {kubeconfig}\n  rescanIntervalMs: 500\n",
        cgroup = bed.node(node).cgroup().display(),
        bpffs = bed.bpffs_dir().expect("bpffs").join(node).display(),
        ca = ca.display(),
        kubeconfig = kubeconfig.display(),
    )
}

fn connects(bed: &Testbed, from: &str, target: &str) -> bool {
    bed.pod(from)
        .exec_timeout(&[APP, "send", target, "kube probe"], Duration::from_secs(5))
        .expect("client runs")
        .status
        .success()
}

fn b1_addr(bed: &Testbed) -> String {
    bed.pod("b1").addr(false, 7000).to_string()
}

/// Access-log records of `daemon` matching `f`.
fn access(daemon: &Daemon, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| f(r))
        .collect()
}

fn enrolled_count(daemon: &Daemon, uid: &str) -> (usize, usize) {
    let count = |msg| {
        daemon
            .records(msg)
            .iter()
            .filter(|r| r["workload"] == uid)
            .count()
    };
    (count("pod enrolled"), count("pod unenrolled"))
}

/// Testbed, API server and daemons of the test.
struct Fixture {
    bed: Testbed,
    api: ApiServer,
    daemons: Vec<Daemon>,
    uids: Vec<String>,
    /// Pause processes (a1, a2, b1, b2), then echo servers.
    procs: Vec<Proc>,
}

#[test]
fn kubernetes_source_drives_the_mesh() {
    mesh_tests::skip_unless_namespaced!();
    let mut fx = start();
    sync_then_enroll(&mut fx);
    sandbox_restart(&mut fx);
    policies_and_outage(&mut fx);
    services(&fx);
    unlabel(&fx);
}

/// Testbed with kubelet-style pods, a seeded API server (stopped), and daemons started
/// before it is reachable.
fn start() -> Fixture {
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1", "b2"]),
    )
    .expect("testbed");
    // Pods: a pause process each in its kubelet-style cgroup; echo servers on 7000.
    let pods = ["a1", "a2", "b1", "b2"];
    let uids: Vec<String> = (0..4).map(pod_uid).collect();
    let mut procs: Vec<Proc> = Vec::new();
    for (name, uid) in pods.iter().zip(&uids) {
        let pod = bed.pod(name);
        procs.push(
            pod.spawn_in_cgroup(&kubelet_cgroup(pod.node(), uid), &["sleep", "600"])
                .expect("pause"),
        );
    }
    procs.extend(echo_servers(&bed, APP, &["a2", "b1", "b2"], 7000));

    // The API server (on node-a's link address), seeded, then stopped: the daemons start
    // before it is reachable.
    let api_addr = std::net::SocketAddr::new(bed.node("node-a").ipv4().into(), 6443);
    let mut api = ApiServer::start_in(
        &bed.node("node-a").netns_path(),
        api_addr,
        Duration::from_secs(3),
        Duration::from_millis(500),
    )
    .expect("api server");
    api.set_served("PeerAuthentication", false).unwrap();
    api.apply(namespace(&json!({}))).unwrap();
    for (node, zone) in [("node-a", "zone-a"), ("node-b", "zone-b")] {
        api.apply(json!({"kind": "Node", "metadata": {"name": node,
            "labels": {"topology.kubernetes.io/zone": zone}}}))
            .unwrap();
    }
    for (name, uid) in pods.iter().zip(&uids) {
        api.apply(pod_object(&bed, name, uid, &json!({}))).unwrap();
    }
    api.stop();

    let kubeconfig = bed.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let ca = mesh_tests::mesh::ca_dir(&bed, Path::new(DUT)).expect("ca");
    let mut daemons = Vec::new();
    for node in ["node-a", "node-b"] {
        let file = bed.tmp_dir().join(format!("{node}.yaml"));
        std::fs::write(&file, config(&bed, node, &ca, &kubeconfig)).unwrap();
        daemons.push(Daemon::start_with(&bed, node, Path::new(DUT), &file).expect("daemon"));
    }
    Fixture {
        bed,
        api,
        daemons,
        uids,
        procs,
    }
}

/// Readiness waits for the initial sync; labelling the namespace enrolls its pods; a pod
/// label takes one out.
fn sync_then_enroll(fx: &mut Fixture) {
    let Fixture {
        bed,
        api,
        daemons,
        uids,
        ..
    } = fx;
    let (bed, a, b) = (&*bed, &daemons[0], &daemons[1]);

    // Not ready before the initial sync; ready after it, with nothing enrolled.
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = readiness(bed, "node-a");
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("initial sync"), "{body}");
    api.start().expect("api server back");
    for node in ["node-a", "node-b"] {
        wait_until("ready after sync", Duration::from_secs(15), || {
            readiness(bed, node).0 == "200"
        });
    }
    assert!(readiness(bed, "node-b").1.contains("0 workloads enrolled"));
    assert!(
        connects(bed, "a1", &b1_addr(bed)),
        "direct before enrollment"
    );
    assert!(access(b, |_| true).is_empty(), "nothing captured yet");

    // Labelling the namespace enrolls its pods on both nodes; traffic goes over mTLS with the
    // service accounts' identities.
    api.apply(namespace(&json!({LABEL: "ambient"}))).unwrap();
    for (daemon, pods) in [(a, ["a1", "a2"]), (b, ["b1", "b2"])] {
        for pod in pods {
            let uid = format!("{NS}/{pod}");
            wait_until(&format!("{uid} enrolled"), Duration::from_secs(10), || {
                enrolled_count(daemon, &uid).0 == 1
            });
        }
    }
    assert!(connects(bed, "a1", &b1_addr(bed)));
    let hbone_in = |b: &Daemon| {
        access(b, |r| {
            r["direction"] == "inbound"
                && r["path"] == "hbone"
                && r["src_identity"] == "spiffe://cluster.local/ns/shop/sa/a1"
                && r["dst_workload"] == "shop/b1"
        })
        .len()
    };
    wait_until("inbound HBONE record", Duration::from_secs(5), || {
        hbone_in(b) == 1
    });

    // A pod labelled out leaves the mesh.
    api.apply(pod_object(bed, "b2", &uids[3], &json!({LABEL: "none"})))
        .unwrap();
    wait_until("b2 opted out", Duration::from_secs(10), || {
        enrolled_count(b, "shop/b2").1 == 1
    });
}

/// The pod's sandbox process goes away (the pod is out until one is back) and a new one
/// starts: the pod is enrolled again without any API change, and served.
fn sandbox_restart(fx: &mut Fixture) {
    fx.procs[2]
        .stop(Duration::from_secs(1))
        .expect("pause stops");
    let b = &fx.daemons[1];
    wait_until("b1 out without a sandbox", Duration::from_secs(10), || {
        enrolled_count(b, "shop/b1") == (1, 1)
    });
    let pod = fx.bed.pod("b1");
    let pause = pod
        .spawn_in_cgroup(&kubelet_cgroup(pod.node(), &fx.uids[2]), &["sleep", "600"])
        .expect("new pause");
    fx.procs.push(pause);
    let b = &fx.daemons[1];
    wait_until(
        "b1 back with its new sandbox",
        Duration::from_secs(10),
        || enrolled_count(b, "shop/b1") == (2, 1),
    );
    let before = access(b, |r| r["dst_workload"] == "shop/b1").len();
    assert!(connects(&fx.bed, "a1", &b1_addr(&fx.bed)));
    wait_until("served again", Duration::from_secs(5), || {
        access(b, |r| {
            r["dst_workload"] == "shop/b1" && r["path"] == "hbone"
        })
        .len()
            > before
    });
}

/// Policies through the API, and an API server outage with a compacted history.
fn policies_and_outage(fx: &mut Fixture) {
    let Fixture { bed, api, .. } = fx;
    let bed = &*bed;
    // A policy applied through the API takes effect, and its removal too.
    api.apply(deny_a1()).unwrap();
    wait_until("deny applied", Duration::from_secs(10), || {
        !connects(bed, "a1", &b1_addr(bed))
    });
    api.delete("AuthorizationPolicy", NS, "deny-a1").unwrap();
    wait_until("deny removed", Duration::from_secs(10), || {
        connects(bed, "a1", &b1_addr(bed))
    });
    // An ALLOW with a typo (no webhook rejected it) is enforced as a deny-all for what it
    // selects: left out, it would leave b1 with no ALLOW at all, which allows everything.
    api.apply(json!({
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-typo", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "b1"}}, "action": "ALLOW",
                 "rulez": [{"from": [{"source": {"namespaces": ["elsewhere"]}}]}]}
    }))
    .unwrap();
    wait_until(
        "an unreadable ALLOW fails closed",
        Duration::from_secs(10),
        || !connects(bed, "a1", &b1_addr(bed)),
    );
    api.delete("AuthorizationPolicy", NS, "allow-typo").unwrap();
    wait_until("unreadable policy removed", Duration::from_secs(10), || {
        connects(bed, "a1", &b1_addr(bed))
    });

    // API server down: the known state stays in force. Changes made meanwhile, with the
    // history compacted (watches get 410 Gone), arrive through a relist once it is back.
    let lists_before = api
        .counts()
        .lists
        .load(std::sync::atomic::Ordering::Relaxed);
    api.stop();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        connects(bed, "a1", &b1_addr(bed)),
        "serving while the API is down"
    );
    assert_eq!(readiness(bed, "node-b").0, "200");
    api.apply(deny_a1()).unwrap();
    api.compact();
    api.start().expect("api server restarted");
    wait_until(
        "deny applied after the restart",
        Duration::from_secs(20),
        || !connects(bed, "a1", &b1_addr(bed)),
    );
    let counts = api.counts();
    assert!(
        counts.gone.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "a watch got 410"
    );
    assert!(
        counts.lists.load(std::sync::atomic::Ordering::Relaxed) > lists_before,
        "relisted"
    );
    api.delete("AuthorizationPolicy", NS, "deny-a1").unwrap();
    wait_until("deny removed again", Duration::from_secs(10), || {
        connects(bed, "a1", &b1_addr(bed))
    });
}

/// A service address load-balances per connection across its ready endpoints.
fn services(fx: &Fixture) {
    let (bed, api, a) = (&fx.bed, &fx.api, &fx.daemons[0]);
    // A service address load-balances per connection across its ready endpoints.
    api.apply(json!({
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {"clusterIP": VIP, "clusterIPs": [VIP],
                 "ports": [{"name": "tcp", "port": 80, "targetPort": "echo", "protocol": "TCP"}]}
    }))
    .unwrap();
    let slice = |b2_ready: bool| {
        let endpoint = |pod: &str, ready: bool| {
            let p = bed.pod(pod);
            json!({"addresses": [p.ipv4().to_string()], "conditions": {"ready": ready},
                   "nodeName": p.node(), "zone": if p.node() == "node-a" {"zone-a"} else {"zone-b"},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}})
        };
        json!({
            "kind": "EndpointSlice",
            "metadata": {"name": "echo-1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "port": 7000, "protocol": "TCP"}],
            "endpoints": [endpoint("a2", true), endpoint("b1", true), endpoint("b2", b2_ready)]
        })
    };
    api.apply(slice(true)).unwrap();
    let vip = format!("{VIP}:80");
    wait_until("service reachable", Duration::from_secs(10), || {
        connects(bed, "a1", &vip)
    });
    let via_service = |a: &Daemon| {
        let mut by_pod = std::collections::BTreeMap::<String, usize>::new();
        for r in access(a, |r| r["dst_service"] == "echo.shop.svc.cluster.local") {
            let dst = r["dst_addr"].as_str().unwrap_or_default().to_owned();
            let pod = ["a2", "b1", "b2"]
                .into_iter()
                .find(|p| dst == bed.pod(p).addr(false, 7000).to_string())
                .unwrap_or("other");
            *by_pod.entry(pod.to_owned()).or_default() += 1;
        }
        by_pod
    };
    let before = via_service(a);
    for _ in 0..9 {
        assert!(connects(bed, "a1", &vip));
    }
    wait_until("9 service records", Duration::from_secs(5), || {
        via_service(a).values().sum::<usize>() >= before.values().sum::<usize>() + 9
    });
    let after = via_service(a);
    for pod in ["a2", "b1", "b2"] {
        let n = after.get(pod).copied().unwrap_or(0) - before.get(pod).copied().unwrap_or(0);
        assert_eq!(
            n, 3,
            "round robin across the 3 endpoints: {after:?} (before {before:?})"
        );
    }
    // None of the nine went elsewhere (the probes that waited for the endpoints were refused
    // with the service address as destination: those are in `before`).
    assert_eq!(
        after.get("other"),
        before.get("other"),
        "{after:?} (before {before:?})"
    );
    // An endpoint that is not ready takes no connection.
    api.apply(slice(false)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = via_service(a);
    for _ in 0..6 {
        assert!(connects(bed, "a1", &vip));
    }
    wait_until("6 more service records", Duration::from_secs(5), || {
        via_service(a).values().sum::<usize>() >= before.values().sum::<usize>() + 6
    });
    let after = via_service(a);
    assert_eq!(
        after.get("b2"),
        before.get("b2"),
        "not-ready b2 skipped: {after:?}"
    );
}

/// Removing the label unenrolls every pod; traffic is direct again.
fn unlabel(fx: &Fixture) {
    let (bed, api, a, b) = (&fx.bed, &fx.api, &fx.daemons[0], &fx.daemons[1]);
    // Removing the label unenrolls every pod; traffic is direct again.
    // (b1 was unenrolled once already, when its sandbox went away: count from here.)
    let pods = [(a, "a1"), (a, "a2"), (b, "b1")];
    let before: Vec<usize> = pods
        .iter()
        .map(|(daemon, pod)| enrolled_count(daemon, &format!("{NS}/{pod}")).1)
        .collect();
    api.apply(namespace(&json!({}))).unwrap();
    for ((daemon, pod), before) in pods.iter().zip(before) {
        let uid = format!("{NS}/{pod}");
        wait_until(
            &format!("{uid} unenrolled"),
            Duration::from_secs(10),
            || enrolled_count(daemon, &uid).1 > before,
        );
    }
    let inbound_before = access(b, |r| r["direction"] == "inbound").len();
    assert!(connects(bed, "a1", &b1_addr(bed)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        access(b, |r| r["direction"] == "inbound").len(),
        inbound_before
    );

    // The watches were restarted (3 s cap) and carried bookmarks; the token was always sent.
    let counts = api.counts();
    assert!(counts.bookmarks.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert!(counts.watches.load(std::sync::atomic::Ordering::Relaxed) > 12);
    assert_eq!(
        counts
            .unauthorized
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
