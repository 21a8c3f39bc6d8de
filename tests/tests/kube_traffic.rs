//! Traffic management from the Kubernetes source, against the API server stand-in: the daemon
//! is ready while the `TCPRoute` and `FaultInjection` kinds are not served (CRDs not
//! installed); a `TCPRoute` served once its CRD is there splits a service's connections; a
//! Service's rate-limit annotations limit its connections (a malformed one is reported and
//! ignored); a `TCPRoute` that no longer validates is reported with its name and field and
//! its last good version stays in force.

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Proc, Testbed, Topology,
    apiserver::{ApiServer, made_up_uid},
    helpers::{curl, echo_servers, wait_until},
};
use serde_json::{Value, json};

mesh_tests::binaries!(APP, DUT);
const NS: &str = "shop";
/// Service addresses: `echo` (b1 and b2), `echo-v2` (b2 only), `limited` (b1), `sloppy` (b1).
const ECHO: &str = "198.19.255.20";
const ECHO_V2: &str = "198.19.255.21";
const LIMITED: &str = "198.19.255.22";
const SLOPPY: &str = "198.19.255.23";

fn config(bed: &Testbed, ca: &Path, kubeconfig: &Path) -> String {
    format!(
        "node: node-a\nlog:\n  format: json\n  filter: info,mesh_node=debug\n\
         redirect:\n  cgroup: {cgroup}\n  bpffs: {bpffs}\nproxy:\n  connectTimeoutMs: 3000\n\
         identity:\n  trustDomain: cluster.local\n  caCertFile: {ca}/ca-cert.pem\n  caKeyFile: {ca}/ca-key.pem\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {kubeconfig}\n  rescanIntervalMs: 500\n",
        cgroup = bed.node("node-a").cgroup().display(),
        bpffs = bed.bpffs_dir().expect("bpffs").join("node-a").display(),
        ca = ca.display(),
        kubeconfig = kubeconfig.display(),
    )
}

/// A Service in `shop` at `vip`:80 with the `EndpointSlice` of `pods` (port 7000).
fn service(
    api: &ApiServer,
    bed: &Testbed,
    name: &str,
    vip: &str,
    pods: &[&str],
    annotations: &Value,
) {
    api.apply(json!({
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {"clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"name": "tcp", "port": 80, "targetPort": 7000, "protocol": "TCP"}]}
    }))
    .unwrap();
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|pod| {
            let p = bed.pod(pod);
            json!({"addresses": [p.ipv4().to_string()], "conditions": {"ready": true},
                   "nodeName": p.node()})
        })
        .collect();
    api.apply(json!({
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NS,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 7000, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap();
}

/// The `TCPRoute` `canary` bound to `echo`, sending everything to `backend` (as given).
fn canary(backend: &Value) -> Value {
    json!({
        "kind": "TCPRoute",
        "metadata": {"name": "canary", "namespace": NS},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
                 "rules": [{"backendRefs": [backend]}]}
    })
}

fn ready(bed: &Testbed) -> bool {
    let out = curl(
        bed,
        "node-a",
        Duration::from_secs(2),
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15021/healthz/ready",
        ],
    );
    out.stdout.trim() == "200"
}

fn dump(bed: &Testbed) -> Value {
    let out = curl(
        bed,
        "node-a",
        Duration::from_secs(2),
        &["http://127.0.0.1:15000/config_dump"],
    );
    serde_json::from_str(&out.stdout).expect("config dump JSON")
}

/// `count` connections one after another from a1 to `vip`:80: `(ok, failed)`.
fn many(bed: &Testbed, vip: &str, count: u32) -> (u64, u64) {
    let out = bed
        .pod("a1")
        .exec_timeout(
            &[APP, "many", &format!("{vip}:80"), &count.to_string()],
            Duration::from_secs(45),
        )
        .expect("many runs");
    let report: Value = serde_json::from_str(out.stdout.trim()).expect("many reports JSON");
    (
        report["ok"].as_u64().expect("ok"),
        report["failed"].as_u64().expect("failed"),
    )
}

/// The access-log records of connections from a1 to `echo`, by where they went.
fn echo_records(daemon: &Daemon) -> Vec<Value> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| r["dst_service"] == "echo.shop.svc.cluster.local")
        .collect()
}

/// The testbed, the API server and node-a's daemon.
struct Fixture {
    bed: Testbed,
    api: ApiServer,
    daemon: Daemon,
    /// a1's pause process, the echo servers.
    _procs: Vec<Proc>,
}

#[test]
fn kubernetes_traffic_documents_and_rate_limits() {
    mesh_tests::skip_unless_namespaced!();
    let fx = start();
    rate_limits(&fx);
    routes(&fx);
}

/// The cluster without the `TCPRoute` and `FaultInjection` CRDs, and the daemon ready all the
/// same.
fn start() -> Fixture {
    // a1 is the enrolled client on node-a (the only daemon: traffic is managed at the source);
    // b1 and b2, on node-b, are echo servers outside the mesh.
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1"])
            .node("node-b", &["b1", "b2"]),
    )
    .expect("testbed");
    let uid = made_up_uid(0x7a00);
    let a1 = bed.pod("a1");
    let mut procs = vec![
        a1.spawn_in_cgroup(
            &format!("kubepods/besteffort/pod{uid}/pause"),
            &["sleep", "600"],
        )
        .expect("pause"),
    ];
    procs.extend(echo_servers(&bed, APP, &["b1", "b2"], 7000));

    let api_addr = std::net::SocketAddr::new(bed.node("node-a").ipv4().into(), 6443);
    let api = ApiServer::start_in(
        &bed.node("node-a").netns_path(),
        api_addr,
        Duration::from_secs(3),
        Duration::from_millis(500),
    )
    .expect("api server");
    // No Gateway API and no mesh.io CRDs in this cluster (yet).
    api.set_served("TCPRoute", false).unwrap();
    api.set_served("FaultInjection", false).unwrap();
    api.apply(json!({"kind": "Namespace", "metadata": {"name": NS,
        "labels": {"mesh.io/dataplane-mode": "ambient"}}}))
        .unwrap();
    api.apply(json!({"kind": "Node", "metadata": {"name": "node-a"}}))
        .unwrap();
    api.apply(json!({
        "kind": "Pod",
        "metadata": {"name": "a1", "namespace": NS, "uid": uid, "labels": {"app": "a1"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "a1",
                 "containers": [{"name": "app", "image": "mesh-testapp"}]},
        "status": {"phase": "Running", "podIP": a1.ipv4().to_string(),
                   "podIPs": [{"ip": a1.ipv4().to_string()}]}
    }))
    .unwrap();
    service(&api, &bed, "echo", ECHO, &["b1", "b2"], &json!({}));
    service(&api, &bed, "echo-v2", ECHO_V2, &["b2"], &json!({}));
    // One new connection a second, no burst: back-to-back connections are refused.
    service(
        &api,
        &bed,
        "limited",
        LIMITED,
        &["b1"],
        &json!({"mesh.io/connection-rate-limit": "1", "mesh.io/connection-rate-burst": "1",
                "mesh.io/connection-rate-per-source": "true"}),
    );
    service(
        &api,
        &bed,
        "sloppy",
        SLOPPY,
        &["b1"],
        &json!({"mesh.io/connection-rate-limit": "fast"}),
    );

    let kubeconfig = bed.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let ca = mesh_tests::mesh::ca_dir(&bed, Path::new(DUT)).expect("ca");
    let file = bed.tmp_dir().join("node-a.yaml");
    std::fs::write(&file, config(&bed, &ca, &kubeconfig)).unwrap();
    let daemon = Daemon::start_with(&bed, "node-a", Path::new(DUT), &file).expect("daemon");

    // Ready without the two CRDs; each reported once as not served.
    wait_until("ready without the CRDs", Duration::from_secs(15), || {
        ready(&bed)
    });
    let absent =
        daemon.records("the API server does not serve this kind (CRD not installed?); none apply");
    for kind in ["TCPRoute", "FaultInjection"] {
        assert_eq!(
            absent.iter().filter(|r| r["kind"] == kind).count(),
            1,
            "{kind}: {absent:?}"
        );
    }
    wait_until("a1 enrolled", Duration::from_secs(10), || {
        daemon
            .records("pod enrolled")
            .iter()
            .any(|r| r["workload"] == "shop/a1")
    });
    Fixture {
        bed,
        api,
        daemon,
        _procs: procs,
    }
}

/// The rate limit from the annotations is in the state and in force; a malformed annotation
/// is reported with the service and the annotation, and that service is not limited.
fn rate_limits(fx: &Fixture) {
    let (bed, daemon) = (&fx.bed, &fx.daemon);
    let services = dump(bed)["state"]["services"].clone();
    let by_name = |name: &str| {
        services
            .as_array()
            .expect("services")
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no service {name}: {services:#}"))
    };
    assert_eq!(
        by_name("limited")["connectionRateLimit"],
        json!({"connectionsPerSecond": 1, "burst": 1, "perSource": true})
    );
    assert!(by_name("sloppy").get("connectionRateLimit").is_none());
    let ignored = daemon.records("ignored a connection rate-limit annotation");
    assert!(
        ignored.iter().any(|r| r["service"] == "sloppy"
            && r["namespace"] == NS
            && r["annotation"] == "mesh.io/connection-rate-limit"
            && r["value"] == "fast"),
        "{ignored:?}"
    );
    assert_eq!(ignored.len(), 1, "once, not on every rebuild: {ignored:?}");
    let (ok, failed) = many(bed, LIMITED, 5);
    assert!(
        ok >= 1 && failed >= 2,
        "rate limited: {ok} ok, {failed} refused"
    );
    let (ok, failed) = many(bed, SLOPPY, 5);
    assert_eq!((ok, failed), (5, 0), "not limited");
}

/// A `TCPRoute` once its CRD is installed; an update of it that does not validate.
fn routes(fx: &Fixture) {
    let (bed, api, daemon) = (&fx.bed, &fx.api, &fx.daemon);
    // The TCPRoute CRD is installed: the daemon picks the kind up (after its retry backoff)
    // and the route sends every connection to echo to echo-v2 (b2).
    api.set_served("TCPRoute", true).unwrap();
    api.apply(canary(&json!({"name": "echo-v2", "port": 80})))
        .unwrap();
    let b2 = bed.pod("b2").addr(false, 7000).to_string();
    wait_until("the route in force", Duration::from_secs(45), || {
        let before = echo_records(daemon).len();
        let _ = many(bed, ECHO, 1);
        wait_until("the record", Duration::from_secs(5), || {
            echo_records(daemon).len() > before
        });
        echo_records(daemon)
            .last()
            .is_some_and(|r| r["route"] == "TCPRoute shop/canary" && r["dst_addr"] == b2)
    });

    // An update that does not validate (a backend without its port) is reported with its
    // name and field; the last good version stays: still every connection to b2.
    api.apply(canary(&json!({"name": "echo"}))).unwrap();
    wait_until("the bad update reported", Duration::from_secs(10), || {
        daemon
            .records(
                "rejected traffic object; its last good version stays in force, or, \
                 without one, it is not applied",
            )
            .iter()
            .any(|r| {
                r["kind"] == "TCPRoute"
                    && r["namespace"] == NS
                    && r["name"] == "canary"
                    && r["field"] == "spec.rules[0].backendRefs[0].port"
            })
    });
    let before = echo_records(daemon).len();
    let (ok, failed) = many(bed, ECHO, 6);
    assert_eq!((ok, failed), (6, 0));
    wait_until("6 records", Duration::from_secs(5), || {
        echo_records(daemon).len() >= before + 6
    });
    let records = echo_records(daemon);
    for r in &records[before..] {
        assert_eq!(r["dst_addr"], b2, "the last good route: {r}");
        assert_eq!(r["route"], "TCPRoute shop/canary", "{r}");
        assert_eq!(r["backend"], "echo-v2.shop.svc.cluster.local", "{r}");
    }
    assert!(
        ready(bed),
        "a rejected document does not make the daemon unready"
    );
}
