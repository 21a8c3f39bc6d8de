//! The cluster learns a VM from an Istio `WorkloadEntry`, against the API server stand-in:
//! node-a's daemon runs the Kubernetes source; the VM (a standalone host) runs its own daemon
//! in file mode, enrolling its own netns. The entry becomes a workload (reached over HBONE with
//! the entry's identity) and, selected by a Service's selector, a service endpoint whose port
//! comes from the entry's `ports`; deleting the entry takes the endpoint away.

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Proc, Testbed, Topology,
    apiserver::{ApiServer, made_up_uid},
    helpers::wait_until,
    mesh::{TRUST_DOMAIN, ca_dir},
};
use serde_json::{Value, json};

mesh_tests::binaries!(APP, DUT);
const NS: &str = "shop";
const VM: &str = "vm-1";
const VIP: &str = "198.19.255.30";
/// The VM application's port (the entry's `ports.http`).
const VM_PORT: u16 = 8080;

/// node-a's configuration: the Kubernetes source.
fn node_config(bed: &Testbed, ca: &Path, kubeconfig: &Path) -> String {
    format!(
        "node: node-a\nlog:\n  format: json\n  filter: info,mesh_node=debug\n\
         redirect:\n  cgroup: {cgroup}\n  bpffs: {bpffs}\nproxy:\n  connectTimeoutMs: 3000\n\
         identity:\n  trustDomain: {TRUST_DOMAIN}\n  caCertFile: {ca}/ca-cert.pem\n  caKeyFile: {ca}/ca-key.pem\n\
         kubernetes:\n  enabled: true\n  kubeconfig: {kubeconfig}\n  rescanIntervalMs: 500\n",
        cgroup = bed.node("node-a").cgroup().display(),
        bpffs = bed.bpffs_dir().expect("bpffs").join("node-a").display(),
        ca = ca.display(),
        kubeconfig = kubeconfig.display(),
    )
}

/// The VM's configuration: file mode, its own workload entry enrolling its own netns, and a1.
fn vm_config(bed: &Testbed, ca: &Path) -> String {
    let (vm, a1) = (bed.host(VM), bed.pod("a1"));
    format!(
        "node: {VM}\nlog:\n  format: json\n  filter: info,mesh_node=debug\n\
         redirect:\n  cgroup: {cgroup}\n  bpffs: {bpffs}\nproxy:\n  connectTimeoutMs: 3000\n\
         identity:\n  trustDomain: {TRUST_DOMAIN}\n  caCertFile: {ca}/ca-cert.pem\n  caKeyFile: {ca}/ca-key.pem\n\
         workloads:\n\
         - {{name: {VM}, namespace: {NS}, serviceAccount: legacy, labels: {{app: legacy}}, ips: [{vm4}], node: {VM}, netns: /proc/self/ns/net, enrolled: true}}\n\
         - {{name: a1, namespace: {NS}, serviceAccount: a1, ips: [{a4}], node: node-a, enrolled: true}}\n",
        cgroup = vm.app_cgroup().display(),
        bpffs = bed.bpffs_dir().expect("bpffs").join(VM).display(),
        ca = ca.display(),
        vm4 = vm.ipv4(),
        a4 = a1.ipv4(),
    )
}

fn workload_entry(bed: &Testbed) -> Value {
    json!({
        "kind": "WorkloadEntry",
        "metadata": {"name": VM, "namespace": NS, "uid": made_up_uid(0x5e00)},
        "spec": {"address": bed.host(VM).ipv4().to_string(), "labels": {"app": "legacy"},
                 "serviceAccount": "legacy", "ports": {"http": VM_PORT},
                 "locality": "region-1/zone-vm"}
    })
}

fn a1_sends(bed: &Testbed, target: &str) -> bool {
    bed.pod("a1")
        .exec_timeout(&[APP, "send", target, "vm probe"], Duration::from_secs(5))
        .expect("client runs")
        .status
        .success()
}

fn access(daemon: &Daemon, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| f(r))
        .collect()
}

#[test]
fn a_workload_entry_is_a_workload_and_a_service_endpoint() {
    mesh_tests::skip_unless_namespaced!();
    let bed = Testbed::up(&Topology::new().node("node-a", &["a1"]).host(VM)).expect("testbed");
    let uid = made_up_uid(0x5e01);
    let a1 = bed.pod("a1");
    let mut procs: Vec<Proc> = vec![
        a1.spawn_in_cgroup(
            &format!("kubepods/besteffort/pod{uid}/pause"),
            &["sleep", "600"],
        )
        .expect("pause"),
        bed.host(VM)
            .spawn_app_server(&[APP, "echo", &format!("[::]:{VM_PORT}")])
            .expect("VM application"),
    ];

    let api_addr = std::net::SocketAddr::new(bed.node("node-a").ipv4().into(), 6443);
    let api = ApiServer::start_in(
        &bed.node("node-a").netns_path(),
        api_addr,
        Duration::from_secs(3),
        Duration::from_millis(500),
    )
    .expect("api server");
    api.apply(json!({"kind": "Namespace",
        "metadata": {"name": NS, "labels": {"mesh.io/dataplane-mode": "ambient"}}}))
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
    // The Service's targetPort is not the VM's: the entry's `ports` maps `http` to 8080.
    api.apply(json!({
        "kind": "Service",
        "metadata": {"name": "legacy", "namespace": NS},
        "spec": {"clusterIP": VIP, "clusterIPs": [VIP], "selector": {"app": "legacy"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 9999, "protocol": "TCP"}]}
    }))
    .unwrap();
    api.apply(workload_entry(&bed)).unwrap();

    let kubeconfig = bed.tmp_dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let ca = ca_dir(&bed, Path::new(DUT)).expect("ca");
    let node_file = bed.tmp_dir().join("node-a.yaml");
    std::fs::write(&node_file, node_config(&bed, &ca, &kubeconfig)).unwrap();
    let vm_file = bed.tmp_dir().join("vm-1.yaml");
    std::fs::write(&vm_file, vm_config(&bed, &ca)).unwrap();
    let vm = Daemon::start_with(&bed, VM, Path::new(DUT), &vm_file).expect("VM daemon");
    let a = Daemon::start_with(&bed, "node-a", Path::new(DUT), &node_file).expect("node-a");
    wait_until("a1 enrolled", Duration::from_secs(15), || {
        a.records("pod enrolled")
            .iter()
            .any(|r| r["workload"] == "shop/a1")
    });

    // The entry's workload, reached directly: HBONE with the entry's identity.
    let legacy = format!("spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/legacy");
    let a1_id = format!("spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/a1");
    let direct = bed.host(VM).addr(false, VM_PORT).to_string();
    wait_until("a1 -> VM", Duration::from_secs(10), || {
        a1_sends(&bed, &direct)
    });
    let out = access(&a, |r| {
        r["direction"] == "outbound" && r["dst_workload"] == "shop/vm-1"
    });
    assert!(
        !out.is_empty()
            && out
                .iter()
                .all(|r| r["path"] == "hbone" && r["dst_identity"] == legacy.as_str()),
        "{out:?}"
    );

    // The Service selects the entry: its address leads to the VM on the entry's port.
    let vip = format!("{VIP}:80");
    wait_until("a1 -> the service", Duration::from_secs(10), || {
        a1_sends(&bed, &vip)
    });
    let via_service = access(&a, |r| r["dst_service"] == "legacy.shop.svc.cluster.local");
    assert!(
        via_service.iter().any(|r| r["dst_workload"] == "shop/vm-1"
            && r["dst_addr"] == direct.as_str()
            && r["path"] == "hbone"),
        "{via_service:?}"
    );
    let at_vm = access(&vm, |r| {
        r["direction"] == "inbound"
            && r["src_identity"] == a1_id.as_str()
            && r["dst_identity"] == legacy.as_str()
    });
    assert!(at_vm.len() >= 2, "the VM admitted a1 twice: {at_vm:?}");

    // Without the entry the service has no endpoint left.
    assert!(api.delete("WorkloadEntry", NS, VM).unwrap());
    wait_until(
        "no endpoint without the entry",
        Duration::from_secs(10),
        || !a1_sends(&bed, &vip),
    );
    api.apply(workload_entry(&bed)).unwrap();
    wait_until("the entry back", Duration::from_secs(10), || {
        a1_sends(&bed, &vip)
    });
    procs.clear();
}
