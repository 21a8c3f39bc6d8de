//! A VM as a workload: a standalone host (a netns of its own on the nodes' link) runs its own
//! `mesh-node` in file mode, enrolling its own network namespace as the workload `vm-1`
//! (namespace `default`, service account `legacy`), beside a two-node cluster whose file
//! lists the VM's workload entry. All three daemons share the testbed's CA.
//!
//! Checked: VM → pod and pod → VM over HBONE with both identities in the access logs and the
//! metrics, VM → service and service → VM (each side's services load-balanced to the other), STRICT peer authentication at the VM (a plaintext client outside the mesh is
//! refused, a meshed pod gets through), the daemon's own endpoints in the VM's netns (metrics
//! 15020, readiness 15021) still reachable under STRICT (not swallowed by the inbound capture),
//! authorization on the VM's principal at a pod (DENY it, ALLOW only it), and the workload's
//! `netns` as `/proc/self/ns/net` and as the `/run/netns/<name>` path of the same namespace.

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Proc, Testbed, Topology,
    helpers::{echo_servers, peer_authentication, wait_until},
    mesh::{NodeSettings, TRUST_DOMAIN, ca_dir, config_yaml},
};

mesh_tests::binaries!(APP, DUT);

const VM: &str = "vm-1";
/// The VM application's port.
const VM_PORT: u16 = 8080;
/// The pods' application port.
const POD_PORT: u16 = 7000;
/// The address of the service in front of b1, and of the one in front of the VM.
const B1_VIP: &str = "198.19.255.40";
const VM_VIP: &str = "198.19.255.41";

/// The cluster's services as every daemon lists them: `b1` and the VM behind virtual
/// addresses, port 80.
fn services() -> String {
    format!(
        "- name: b1\n  namespace: default\n  addresses: [{B1_VIP}]\n  ports: [{{port: 80, targetPort: {POD_PORT}}}]\n  selector: {{app: b1}}\n\
         - name: legacy\n  namespace: default\n  addresses: [{VM_VIP}]\n  ports: [{{port: 80, targetPort: {VM_PORT}}}]\n  selector: {{app: {VM}}}\n"
    )
}

fn identity(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

/// The VM's workload entry (a `workloads:` item), as both the cluster and the VM list it.
fn vm_entry(bed: &Testbed, netns: &Path) -> String {
    let vm = bed.host(VM);
    format!(
        "- name: {VM}\n  namespace: default\n  serviceAccount: legacy\n  labels: {{app: {VM}}}\n  \
         ips: [{}, \"{}\"]\n  node: {VM}\n  netns: {}\n  enrolled: true\n",
        vm.ipv4(),
        vm.ipv6(),
        netns.display()
    )
}

/// An `AuthorizationPolicy` for `b1` as a `policies:` item.
fn authz_b1(name: &str, action: &str, principal: &str) -> String {
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: {name}\n    namespace: default\n  spec:\n    selector:\n      matchLabels: {{app: b1}}\n    action: {action}\n    rules:\n    - from:\n      - source:\n          principals: [{principal}]\n"
    )
}

/// `app send` from inside the VM (its application cgroup) to `to`.
fn vm_sends(bed: &Testbed, to: std::net::SocketAddr) -> bool {
    bed.host(VM)
        .exec_app(&[APP, "send", &to.to_string(), "probe"])
        .expect("client runs")
        .status
        .success()
}

/// `app send` from `pod` to the VM's application.
fn pod_sends_to_vm(bed: &Testbed, pod: &str, v6: bool) -> bool {
    let to = bed.host(VM).addr(v6, VM_PORT).to_string();
    bed.pod(pod)
        .exec(&[APP, "send", &to, "probe"])
        .expect("client runs")
        .status
        .success()
}

fn pod_sends(bed: &Testbed, from: &str, to: &str) -> bool {
    let to = bed.pod(to).addr(false, POD_PORT).to_string();
    bed.pod(from)
        .exec(&[APP, "send", &to, "probe"])
        .expect("client runs")
        .status
        .success()
}

/// `connection complete` records of `daemon` with `direction`, `src_identity` and
/// `dst_identity`.
fn completed(daemon: &Daemon, direction: &str, src: &str, dst: &str) -> Vec<serde_json::Value> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| {
            r["direction"] == direction && r["src_identity"] == src && r["dst_identity"] == dst
        })
        .collect()
}

/// The metrics text of the daemon in the VM.
fn vm_metrics(bed: &Testbed) -> String {
    bed.host(VM)
        .exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:15020/metrics",
        ])
        .expect("curl runs")
        .stdout
}

/// Rewrites `daemon`'s file with `policies` and `workloads` and waits until it reloaded.
fn reconfigure(
    bed: &Testbed,
    daemon: &Daemon,
    node: &str,
    settings: &NodeSettings,
    enrolled: &[&str],
) {
    let ca = ca_dir(bed, Path::new(DUT)).expect("ca");
    let text = config_yaml(bed, node, &ca, settings, enrolled).expect("config");
    daemon
        .reload_with(&text, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{node} reloads: {e:#}"));
}

struct Mesh {
    bed: Testbed,
    a: Daemon,
    b: Daemon,
    vm: Daemon,
    vm_settings: NodeSettings,
    b_settings: NodeSettings,
    _servers: Vec<Proc>,
}

/// node-a (`a1` enrolled, `a2` outside the mesh), node-b (`b1` enrolled) and the VM, each with
/// its daemon; echo servers on the pods' 7000 and the VM's 8080.
fn mesh() -> Mesh {
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1"])
            .host(VM),
    )
    .expect("testbed");
    let mut servers = echo_servers(&bed, APP, &["a1", "a2", "b1"], POD_PORT);
    servers.push(
        bed.host(VM)
            .spawn_app_server(&[APP, "echo", &format!("[::]:{VM_PORT}")])
            .expect("VM application"),
    );
    let cluster = NodeSettings {
        workloads: vm_entry(&bed, Path::new("/proc/self/ns/net")),
        services: services(),
        ..NodeSettings::default()
    };
    let enrolled = ["a1", "b1"];
    let dut = Path::new(DUT);
    let a = Daemon::start_with_settings(&bed, "node-a", dut, &enrolled, &cluster).expect("node-a");
    let b = Daemon::start_with_settings(&bed, "node-b", dut, &enrolled, &cluster).expect("node-b");
    let vm = Daemon::start_with_settings(&bed, VM, dut, &enrolled, &cluster).expect("VM daemon");
    Mesh {
        bed,
        a,
        b,
        vm,
        vm_settings: cluster.clone(),
        b_settings: cluster,
        _servers: servers,
    }
}

#[test]
fn a_vm_joins_the_mesh_with_its_own_daemon() {
    mesh_tests::skip_unless_namespaced!();
    let mut m = mesh();
    both_ways(&m);
    strict_at_the_vm(&mut m);
    authorization_of_the_vm(&mut m);
    named_netns(&mut m);
}

/// VM → pods and pods → VM over HBONE, with both identities in the logs and metrics.
fn both_ways(m: &Mesh) {
    let bed = &m.bed;
    let (legacy, a1, b1) = (identity("legacy"), identity("a1"), identity("b1"));

    // VM → pods on both nodes, over HBONE, as `legacy`.
    for to in ["a1", "b1"] {
        for v6 in [false, true] {
            assert!(
                vm_sends(bed, bed.pod(to).addr(v6, POD_PORT)),
                "VM -> {to} (v6 {v6})"
            );
        }
    }
    let out = completed(&m.vm, "outbound", &legacy, &a1);
    assert_eq!(out.len(), 2, "the VM's daemon carried VM -> a1: {out:?}");
    assert!(
        out.iter()
            .all(|r| r["path"] == "hbone" && r["security"] == "mutual_tls"),
        "{out:?}"
    );
    let inbound = completed(&m.a, "inbound", &legacy, &a1);
    assert_eq!(
        inbound.len(),
        2,
        "node-a saw the VM's identity: {inbound:?}"
    );
    assert_eq!(completed(&m.b, "inbound", &legacy, &b1).len(), 2);

    // Pods → VM, over HBONE, to `legacy`.
    for from in ["a1", "b1"] {
        for v6 in [false, true] {
            assert!(pod_sends_to_vm(bed, from, v6), "{from} -> VM (v6 {v6})");
        }
    }
    let to_vm = completed(&m.vm, "inbound", &a1, &legacy);
    assert_eq!(to_vm.len(), 2, "the VM's daemon admitted a1: {to_vm:?}");
    assert!(to_vm.iter().all(|r| r["path"] == "hbone"), "{to_vm:?}");
    assert_eq!(completed(&m.vm, "inbound", &b1, &legacy).len(), 2);
    assert_eq!(completed(&m.a, "outbound", &a1, &legacy).len(), 2);
    let metrics = vm_metrics(bed);
    for (src, dst) in [(&legacy, &a1), (&a1, &legacy)] {
        let labels = format!("source_principal=\"{src}\"");
        let dst_labels = format!("destination_principal=\"{dst}\"");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                    && l.contains(&labels)
                    && l.contains(&dst_labels)),
            "the VM's metrics name {src} -> {dst}:\n{metrics}"
        );
    }

    // Services both ways: the VM dials b1's service address, a1 the VM's; each is carried
    // over HBONE to the endpoint with both identities.
    let to_b1: std::net::SocketAddr = format!("{B1_VIP}:80").parse().expect("address");
    assert!(vm_sends(bed, to_b1), "VM -> the b1 service");
    let via_service = |daemon: &Daemon, host: &str, src: &str, dst: &str| {
        completed(daemon, "outbound", src, dst)
            .into_iter()
            .filter(|r| r["dst_service"] == host && r["path"] == "hbone")
            .count()
    };
    assert_eq!(
        via_service(&m.vm, "b1.default.svc.cluster.local", &legacy, &b1),
        1,
        "the VM's daemon load-balanced the service to b1 over HBONE"
    );
    let to_vm = bed
        .pod("a1")
        .exec(&[APP, "send", &format!("{VM_VIP}:80"), "probe"]);
    assert!(
        to_vm.expect("client runs").status.success(),
        "a1 -> the VM's service"
    );
    assert_eq!(
        via_service(&m.a, "legacy.default.svc.cluster.local", &a1, &legacy),
        1,
        "node-a load-balanced the VM's service to the VM over HBONE"
    );
}

/// STRICT at the VM refuses plaintext from outside the mesh; the daemon's own endpoints stay
/// reachable.
fn strict_at_the_vm(m: &mut Mesh) {
    let bed = &m.bed;
    // A client outside the mesh (a2, not enrolled) reaches the VM in plaintext, captured by
    // the VM's inbound listener...
    assert!(pod_sends_to_vm(bed, "a2", false), "plaintext before STRICT");
    let plain =
        m.vm.records("connection complete")
            .into_iter()
            .filter(|r| r["direction"] == "inbound" && r["path"] == "plaintext")
            .count();
    assert_eq!(plain, 1, "captured by the VM's inbound listener");

    // ...until the VM requires mTLS. A meshed pod still gets through.
    m.vm_settings.policies = peer_authentication("default", "vm-strict", "{app: vm-1}", "STRICT");
    reconfigure(bed, &m.vm, VM, &m.vm_settings, &["a1", "b1"]);
    assert!(
        !pod_sends_to_vm(bed, "a2", false),
        "plaintext refused under STRICT"
    );
    assert!(
        !pod_sends_to_vm(bed, "a2", true),
        "plaintext refused under STRICT (IPv6)"
    );
    assert!(
        pod_sends_to_vm(bed, "a1", false),
        "a meshed pod gets through"
    );
    assert!(
        pod_sends_to_vm(bed, "b1", true),
        "a meshed pod gets through (IPv6)"
    );

    // The daemon's own endpoints in the VM's netns are its own, not the workload's: reachable
    // from outside the mesh under STRICT, and never captured.
    let vm_ip = bed.host(VM).ipv4();
    let captured_before = m.vm.captured("inbound").len();
    for url in [
        format!("http://{vm_ip}:15020/metrics"),
        format!("http://{vm_ip}:15021/healthz/ready"),
    ] {
        let out = bed
            .node("node-a")
            .exec(&[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ])
            .expect("curl runs");
        assert_eq!(out.stdout.trim(), "200", "{url}: {}", out.stderr);
    }
    assert_eq!(
        m.vm.captured("inbound").len(),
        captured_before,
        "the daemon's endpoints were not captured"
    );
}

/// Authorization on the VM's principal at b1: DENY it, then ALLOW only it.
fn authorization_of_the_vm(m: &mut Mesh) {
    let bed = &m.bed;
    let principal = format!("{TRUST_DOMAIN}/ns/default/sa/legacy");
    m.b_settings.policies = authz_b1("no-vm", "DENY", &principal);
    reconfigure(bed, &m.b, "node-b", &m.b_settings, &["a1", "b1"]);
    assert!(
        !vm_sends(bed, bed.pod("b1").addr(false, POD_PORT)),
        "the VM is denied at b1"
    );
    assert!(pod_sends(bed, "a1", "b1"), "a1 is not");
    let denied = m.b.records("connection denied by policy");
    assert!(
        denied.iter().any(|r| r["policy"] == "default/no-vm"),
        "denied by the DENY policy: {denied:?}"
    );
    m.b_settings.policies = authz_b1("only-vm", "ALLOW", &principal);
    reconfigure(bed, &m.b, "node-b", &m.b_settings, &["a1", "b1"]);
    assert!(
        vm_sends(bed, bed.pod("b1").addr(false, POD_PORT)),
        "only the VM is allowed at b1"
    );
    assert!(!pod_sends(bed, "a1", "b1"), "a1 is no longer allowed");
}

/// The VM's netns named by its `/run/netns` path: the same namespace, enrolled again in place;
/// traffic both ways still flows, STRICT still holds.
fn named_netns(m: &mut Mesh) {
    let bed = &m.bed;
    let named = bed.host(VM).netns_path();
    m.vm_settings.workloads = vm_entry(bed, &named);
    reconfigure(bed, &m.vm, VM, &m.vm_settings, &["a1", "b1"]);
    wait_until("the VM reaches a1 again", Duration::from_secs(5), || {
        vm_sends(bed, bed.pod("a1").addr(false, POD_PORT))
    });
    assert!(
        pod_sends_to_vm(bed, "a1", false),
        "a1 -> VM after re-enrollment"
    );
    assert!(
        !pod_sends_to_vm(bed, "a2", false),
        "still STRICT after re-enrollment"
    );
    assert!(
        m.vm.proc().is_running(),
        "the VM's daemon is still running:\n{}",
        m.vm.proc().stderr()
    );
}
