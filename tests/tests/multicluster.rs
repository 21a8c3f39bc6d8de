//! Two clusters on two networks, joined only through east-west gateways (Istio's
//! multi-network mesh and its "double HBONE"): cluster 1 (`net1`: `c1-node` with the pods
//! `client` and `local-echo`, gateway `c1-gw`) and cluster 2 (`net2`: `c2-node` with the pod
//! `echo`, gateway `c2-gw`). The pod ranges of the two clusters' nodes do not route to each
//! other; the gateways listen on their node addresses, which both clusters reach. Each cluster
//! has a CA of its own and every daemon trusts both roots (`identity.trustBundleFiles`), in the
//! one trust domain `cluster.local`. Each cluster's daemons list their own pods, the other
//! cluster's pods as workloads of its network, the same services, and the other network's
//! gateway (`networks:`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    Daemon, Proc, Testbed, Topology,
    helpers::{echo_servers, within},
    mesh::{NAMESPACE, NodeSettings, TRUST_DOMAIN, ca_init, counter, pod_workload},
};

mesh_tests::binaries!(APP, DUT);

/// Port of the echo servers in the pods.
const PORT: u16 = 7000;
/// Port of every service.
const SVC_PORT: u16 = 8080;
/// Service `echo`: its one endpoint is the pod `echo`, in cluster 2.
const REMOTE_VIP: &str = "198.19.255.40";
/// Service `both`: endpoints `local-echo` (cluster 1) and `echo` (cluster 2).
const BOTH_VIP: &str = "198.19.255.41";
/// Service `local`: its one endpoint is `local-echo`, in cluster 1.
const LOCAL_VIP: &str = "198.19.255.42";
/// The identity of the east-west gateways (the role's defaults).
const GATEWAY_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway";

/// One cluster of the testbed.
struct Cluster {
    network: &'static str,
    node: &'static str,
    gateway: &'static str,
    pods: &'static [&'static str],
}

const C1: Cluster = Cluster {
    network: "net1",
    node: "c1-node",
    gateway: "c1-gw",
    pods: &["client", "local-echo"],
};

const C2: Cluster = Cluster {
    network: "net2",
    node: "c2-node",
    gateway: "c2-gw",
    pods: &["echo"],
};

/// The running two-cluster mesh.
struct Mesh {
    bed: Testbed,
    servers: Vec<Proc>,
    cas: [PathBuf; 2],
    c1: Daemon,
    c1_gw: Daemon,
    c2: Daemon,
    c2_gw: Daemon,
}

fn identity(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{sa}")
}

/// The services every daemon knows; `local_ready`: whether `local-echo` is a ready endpoint
/// of `both`.
fn services(bed: &Testbed, local_ready: bool) -> String {
    let local = bed.pod("local-echo").ipv4();
    let remote = bed.pod("echo").ipv4();
    let ports = format!("[{{port: {SVC_PORT}, targetPort: {PORT}}}]");
    format!(
        "- name: echo\n  namespace: {NAMESPACE}\n  addresses: [{REMOTE_VIP}]\n  ports: {ports}\n  selector: {{app: echo}}\n\
         - name: both\n  namespace: {NAMESPACE}\n  addresses: [{BOTH_VIP}]\n  ports: {ports}\n  \
         endpoints: [{{address: {local}, ready: {local_ready}}}, {{address: {remote}}}]\n\
         - name: local\n  namespace: {NAMESPACE}\n  addresses: [{LOCAL_VIP}]\n  ports: {ports}\n  selector: {{app: local-echo}}\n"
    )
}

/// The settings of the daemons of `own` (the other cluster is `other`; `cas` are both
/// clusters' CA directories, `own`'s first).
fn settings(bed: &Testbed, own: &Cluster, other: &Cluster, cas: [&Path; 2]) -> NodeSettings {
    let gateway = bed.node(other.gateway).ipv4();
    NodeSettings {
        pods: Some(own.pods.iter().map(|p| (*p).to_owned()).collect()),
        workloads: other
            .pods
            .iter()
            .map(|p| pod_workload(bed.pod(p), other.network, true))
            .collect(),
        network: own.network.to_owned(),
        networks: format!(
            "- name: {}\n  gateways:\n  - address: {gateway}:15008\n",
            other.network
        ),
        identity: format!("trustBundleFiles: [{}/ca-cert.pem]", cas[1].display()),
        ca: Some(cas[0].to_owned()),
        services: services(bed, true),
        ..NodeSettings::default()
    }
}

/// The gateway role on `cluster.gateway`, listening on its node address.
fn gateway_settings(bed: &Testbed, mut settings: NodeSettings, cluster: &Cluster) -> NodeSettings {
    settings.gateway = format!(
        "enabled: true\nlisten: {}:15008",
        bed.node(cluster.gateway).ipv4()
    );
    settings
}

impl Mesh {
    /// Builds the testbed, cuts the routes between the clusters' pod ranges, starts the echo
    /// servers, checks that cluster 2's pod cannot be reached without the mesh, then starts
    /// both clusters' daemons and gateways.
    fn up() -> Self {
        let bed = Testbed::up(
            &Topology::new()
                .node(C1.node, C1.pods)
                .node(C1.gateway, &[])
                .node(C2.node, C2.pods)
                .node(C2.gateway, &[]),
        )
        .expect("testbed");
        bed.isolate(&[C1.node], &[C2.node]).expect("isolate");
        let servers = echo_servers(&bed, APP, &["local-echo", "echo"], PORT);

        // Without the mesh, cluster 2's pod is out of reach (both address families); cluster
        // 1's own pod is not.
        assert!(send(
            &bed,
            "client",
            &bed.pod("local-echo").addr(false, PORT).to_string(),
            "x"
        ));
        for v6 in [false, true] {
            let target = bed.pod("echo").addr(v6, PORT).to_string();
            assert!(!send(&bed, "client", &target, "x"), "{target} routed");
            let from_node = bed
                .node(C1.node)
                .exec(&[APP, "send", &target, "x"])
                .expect("runs");
            assert!(!from_node.status.success(), "{target} routed from the node");
        }

        let cas = ["ca1", "ca2"].map(|name| {
            let dir = bed.tmp_dir().join(name);
            ca_init(Path::new(DUT), &dir).expect("ca init");
            dir
        });
        let c1 = settings(&bed, &C1, &C2, [&cas[0], &cas[1]]);
        let c2 = settings(&bed, &C2, &C1, [&cas[1], &cas[0]]);
        let start = |node: &str, enrolled: &[&str], settings: &NodeSettings| {
            Daemon::start_with_settings(&bed, node, Path::new(DUT), enrolled, settings)
                .unwrap_or_else(|e| panic!("daemon on {node}: {e:#}"))
        };
        let gateway = |cluster: &Cluster, settings: &NodeSettings| {
            let settings = gateway_settings(&bed, settings.clone(), cluster);
            Daemon::start_gateway(
                &bed,
                cluster.gateway,
                Path::new(DUT),
                cluster.pods,
                &settings,
            )
            .unwrap_or_else(|e| panic!("gateway {}: {e:#}", cluster.gateway))
        };
        let c2_gw = gateway(&C2, &c2);
        let c1_gw = gateway(&C1, &c1);
        let c2_node = start(C2.node, C2.pods, &c2);
        let c1_node = start(C1.node, C1.pods, &c1);
        Self {
            servers,
            cas,
            c1: c1_node,
            c1_gw,
            c2: c2_node,
            c2_gw,
            bed,
        }
    }

    /// How many connections the echo server of `pod` (`local-echo` or `echo`) answered.
    fn echoed(&self, pod: &str) -> usize {
        let index = ["local-echo", "echo"]
            .iter()
            .position(|p| *p == pod)
            .expect("a pod with an echo server");
        self.servers[index]
            .stdout()
            .lines()
            .filter(|l| l.starts_with("echoed "))
            .count()
    }

    /// Asserts that the echo server of `pod` answered exactly `count` connections: waits (3 s
    /// at most) for the count (a server prints after its client saw the echo), then a little
    /// longer for any connection too many.
    fn expect_echoed(&self, pod: &str, count: usize, what: &str) {
        let reached = within(Duration::from_secs(3), || self.echoed(pod) >= count);
        std::thread::sleep(Duration::from_millis(200));
        let got = self.echoed(pod);
        assert!(
            reached.is_some() && got == count,
            "{what}: {pod} answered {got} connections, expected {count}"
        );
    }

    /// The settings cluster 1's node daemon runs with.
    fn c1_settings(&self) -> NodeSettings {
        settings(&self.bed, &C1, &C2, [&self.cas[0], &self.cas[1]])
    }
}

/// Whether `mesh-testapp send` in `pod` to `target` got `text` back intact (10 s at most).
fn send(bed: &Testbed, pod: &str, target: &str, text: &str) -> bool {
    bed.pod(pod)
        .exec_timeout(&[APP, "send", target, text], Duration::from_secs(10))
        .expect("client runs")
        .status
        .success()
}

fn vip(address: &str) -> String {
    format!("{address}:{SVC_PORT}")
}

/// The `connection complete` records of `daemon` for the service `name`, once there are at
/// least `count` (5 s at most: a record is written when its connection ends).
fn wait_service_records(daemon: &Daemon, name: &str, count: usize) -> Vec<serde_json::Value> {
    within(Duration::from_secs(5), || {
        service_records(daemon, name).len() >= count
    });
    service_records(daemon, name)
}

/// `connection complete` records of `daemon` for the service `name`.
fn service_records(daemon: &Daemon, name: &str) -> Vec<serde_json::Value> {
    let host = format!("{name}.{NAMESPACE}.svc.cluster.local");
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| r["dst_service"] == host.as_str())
        .collect()
}

/// A packet capture (tcpdump) running while traffic flows.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i iface` through `spawn` (in a node's netns, or on the link), writing
    /// to a file named `name` in the testbed's directory.
    fn start(bed: &Testbed, name: &str, iface: &str, spawn: impl Fn(&[&str]) -> Proc) -> Self {
        let file = bed.tmp_dir().join(format!("{name}.pcap"));
        let file_str = file.to_str().unwrap();
        let mut proc = spawn(&[
            "tcpdump",
            "-i",
            iface,
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-w",
            file_str,
            "tcp",
        ]);
        proc.wait_for_output(&format!("listening on {iface}"), Duration::from_secs(5))
            .expect("tcpdump up");
        Self { proc, file }
    }

    /// Stops the capture.
    fn stop(mut self) -> Pcap {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(nix::sys::signal::Signal::SIGINT);
        self.proc
            .wait(Duration::from_secs(5))
            .expect("tcpdump exits");
        let bytes = std::fs::read(&self.file).expect("capture file");
        Pcap {
            file: self.file,
            bytes,
        }
    }
}

/// A finished capture.
struct Pcap {
    file: PathBuf,
    bytes: Vec<u8>,
}

impl Pcap {
    /// The packets that match the tcpdump `filter` (a pcap file: 24 bytes when none).
    fn select(&self, filter: &str) -> Vec<u8> {
        let out = self.file.with_extension("selected.pcap");
        let run = std::process::Command::new("tcpdump")
            .arg("-r")
            .arg(&self.file)
            .arg("-w")
            .arg(&out)
            .arg(filter)
            .output()
            .expect("tcpdump -r");
        assert!(run.status.success(), "{run:?}");
        std::fs::read(&out).expect("selected packets")
    }
}

/// Size of a pcap file's header: a capture of no packet.
const PCAP_HEADER: usize = 24;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn rand_hex() -> String {
    let mut bytes = [0u8; 12];
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut bytes).unwrap();
    bytes.iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// A TLS record header: handshake (`0x16`) or application data (`0x17`), version 3.x.
fn has_tls(pcap: &[u8], content_type: u8) -> bool {
    contains(pcap, &[content_type, 0x03, 0x03]) || contains(pcap, &[content_type, 0x03, 0x01])
}

#[test]
fn a_pod_reaches_another_clusters_service_through_its_gateway_encrypted_end_to_end() {
    mesh_tests::skip_unless_namespaced!();
    let mut mesh = Mesh::up();
    crosses_encrypted(&mesh);
    logs_name_the_network_and_the_gateway(&mesh);
    // The other way: cluster 2's pod reaches cluster 1's service through c1-gw.
    assert!(
        send(&mesh.bed, "echo", &vip(LOCAL_VIP), "the other way"),
        "echo -> local-echo (cluster 1) through c1-gw"
    );
    mesh.expect_echoed("local-echo", 2, "the probe of `up` and this one");
    let hops = wait_service_records(&mesh.c1_gw, "local", 1);
    assert_eq!(hops.len(), 1, "{hops:#?}");
    assert_eq!(hops[0]["src_identity"], identity("echo"), "{}", hops[0]);
    deny_at_the_destination(&mut mesh);
}

/// (a) The client reaches cluster 2's service through c2-gw, bytes intact; (b) neither the
/// gateway's netns nor the link carries them in clear.
fn crosses_encrypted(mesh: &Mesh) {
    let bed = &mesh.bed;
    let gw = bed.node(C2.gateway);
    let echo_ip = bed.pod("echo").ipv4();
    let marker = format!("MARKER-{}", rand_hex());
    let at_gateway = Capture::start(bed, "c2-gw", "eth0", |argv| {
        gw.spawn(argv).expect("tcpdump")
    });
    let c1_port = bed.node(C1.node).link_port();
    let on_link = Capture::start(bed, "link", &c1_port, |argv| {
        bed.spawn_on_link(argv).expect("tcpdump")
    });
    assert!(
        send(bed, "client", &vip(REMOTE_VIP), &marker),
        "client -> echo (cluster 2) through c2-gw"
    );
    let report = bed
        .pod("client")
        .exec_timeout(
            &[APP, "client", &vip(REMOTE_VIP), "1048576"],
            Duration::from_secs(20),
        )
        .expect("client runs")
        .ok()
        .unwrap_or_else(|e| panic!("1 MiB through the gateway: {e}"));
    let report: serde_json::Value = serde_json::from_str(report.stdout.trim()).expect("JSON");
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["received"], 1_048_576, "{report}");
    mesh.expect_echoed("echo", 2, "both connections reached echo");

    // (b) Neither the gateway's netns nor the link ever carries the marker in clear: the outer
    // leg (client pod -> c2-gw:15008) and the leg the gateway forwards (c2-gw -> echo:15008)
    // are both TLS.
    let gateway_pcap = at_gateway.stop();
    let link_pcap = on_link.stop();
    for (what, pcap) in [
        ("c2-gw", &gateway_pcap.bytes),
        ("the link", &link_pcap.bytes),
    ] {
        assert!(pcap.len() > 200, "the capture in {what} saw the traffic");
        assert!(
            !contains(pcap, marker.as_bytes()),
            "the marker in clear in {what}"
        );
    }
    let outer = gateway_pcap.select(&format!("dst host {} and dst port 15008", gw.ipv4()));
    let forwarded = gateway_pcap.select(&format!("dst host {echo_ip} and dst port 15008"));
    for (leg, pcap) in [("outer", &outer), ("forwarded", &forwarded)] {
        assert!(has_tls(pcap, 0x16), "{leg} leg: a TLS handshake");
        assert!(has_tls(pcap, 0x17), "{leg} leg: TLS application data");
        assert!(!contains(pcap, marker.as_bytes()), "{leg} leg in clear");
    }
    let direct = link_pcap.select(&format!("host {echo_ip}"));
    assert!(
        direct.len() <= PCAP_HEADER,
        "no packet between cluster 1's node and cluster 2's pod on the link"
    );

    // Addressed by its IP, the other network's pod stays out of reach: refused, not passed
    // through.
    for v6 in [false, true] {
        let target = bed.pod("echo").addr(v6, PORT).to_string();
        assert!(!send(bed, "client", &target, "x"), "{target} directly");
    }
    mesh.expect_echoed("echo", 2, "nothing reached echo directly");
    mesh.c1
        .wait_for_records("connection complete", 4, Duration::from_secs(5))
        .expect("records");
    let refused: Vec<_> = mesh
        .c1
        .records("connection complete")
        .into_iter()
        .filter(|r| r["response_flags"] == "NR")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    for r in &refused {
        assert_eq!(r["network"], C2.network, "{r}");
        assert_eq!(r["gateway"], "", "no gateway was dialled: {r}");
    }
}

/// (e) The access logs name the network and the gateway hop at each step of the two
/// connections of [`crosses_encrypted`].
fn logs_name_the_network_and_the_gateway(mesh: &Mesh) {
    let outbound = wait_service_records(&mesh.c1, "echo", 2);
    assert_eq!(outbound.len(), 2, "{outbound:#?}");
    for r in &outbound {
        assert_eq!(r["direction"], "outbound", "{r}");
        assert_eq!(r["path"], "double-hbone", "{r}");
        assert_eq!(r["network"], C2.network, "{r}");
        assert_eq!(r["gateway"], gateway_address(&mesh.bed), "{r}");
        assert_eq!(r["gateway_identity"], GATEWAY_IDENTITY, "{r}");
        assert_eq!(r["dst_workload"], "default/echo", "{r}");
    }
    let hops = wait_service_records(&mesh.c2_gw, "echo", 2);
    assert_eq!(hops.len(), 2, "{hops:#?}");
    for r in &hops {
        assert_eq!(r["path"], "gateway", "{r}");
        assert_eq!(r["network"], C2.network, "{r}");
        assert_eq!(r["src_identity"], identity("client"), "{r}");
        assert_eq!(r["dst_workload"], "default/echo", "{r}");
        // A clean end on both sides is a clean end at the gateway too.
        assert_eq!(r["reason"], "completed", "{r}");
    }
    let durations = |node: &str, direction: &str, path: &str| {
        counter(
            &mesh.bed,
            node,
            &format!(
                "mesh_connection_duration_seconds_count{{direction=\"{direction}\",path=\"{path}\"}}"
            ),
        )
        .expect("metrics")
    };
    assert_eq!(durations(C2.gateway, "inbound", "gateway"), 2);
    assert!(durations(C1.node, "outbound", "double-hbone") >= 2);
    let inbound = mesh.c2.captured("inbound");
    assert_eq!(inbound.len(), 2, "{inbound:#?}");
    for r in &inbound {
        assert_eq!(
            r["peer_identity"],
            identity("client"),
            "the client's identity reaches the destination through the gateway: {r}"
        );
    }
}

/// (c) A DENY at the destination holds through the gateway: the inner connection is end to
/// end, the destination sees the client's identity and refuses it.
fn deny_at_the_destination(mesh: &mut Mesh) {
    let bed = &mesh.bed;
    let policy = format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    \
         name: deny-client\n    namespace: {NAMESPACE}\n  spec:\n    selector:\n      \
         matchLabels: {{app: echo}}\n    action: DENY\n    rules:\n    - from:\n      - source:\n          \
         principals: [\"{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/client\"]\n"
    );
    let c2_settings = NodeSettings {
        policies: policy,
        ..settings(bed, &C2, &C1, [&mesh.cas[1], &mesh.cas[0]])
    };
    mesh.c2
        .reload_settings(bed, &c2_settings, Duration::from_secs(5))
        .expect("the policy applied");
    assert!(
        !send(bed, "client", &vip(REMOTE_VIP), "denied"),
        "denied at the destination"
    );
    mesh.expect_echoed("echo", 2, "nothing reached echo");
    mesh.c2
        .wait_for_records("connection denied by policy", 1, Duration::from_secs(5))
        .expect("the destination logs the denial");
    let denied = mesh.c2.records("connection denied by policy");
    assert_eq!(denied[0]["peer_identity"], identity("client"), "{denied:?}");
    let inbound = wait_service_records(&mesh.c2, "echo", 3);
    let last = inbound.last().expect("the destination's record");
    assert_eq!(last["response_flags"], "DENY", "{last}");
    assert_eq!(last["src_identity"], identity("client"), "{last}");
    let outbound = wait_service_records(&mesh.c1, "echo", 3);
    let last = outbound.last().expect("the client side's record");
    assert!(
        last["reason"].as_str().is_some_and(|r| r.contains("401")),
        "the destination's 401 came back through the gateway: {last}"
    );
}

#[test]
fn a_service_fails_over_to_the_other_cluster_and_back() {
    mesh_tests::skip_unless_namespaced!();
    let mut mesh = Mesh::up();
    let bed = &mesh.bed;
    // The probe of `up`.
    mesh.expect_echoed("local-echo", 1, "before the mesh");

    // (d) Local endpoint ready: `both` stays in cluster 1.
    for _ in 0..3 {
        assert!(send(bed, "client", &vip(BOTH_VIP), "local first"));
    }
    mesh.expect_echoed("local-echo", 4, "the local endpoint while it is ready");
    mesh.expect_echoed(
        "echo",
        0,
        "the remote endpoint while the local one is ready",
    );

    // Local endpoint not ready: failover to cluster 2 through c2-gw.
    let mut c1 = mesh.c1_settings();
    c1.services = services(bed, false);
    mesh.c1
        .reload_settings(bed, &c1, Duration::from_secs(5))
        .expect("reload");
    for _ in 0..2 {
        assert!(send(bed, "client", &vip(BOTH_VIP), "failed over"));
    }
    mesh.expect_echoed("local-echo", 4, "the local endpoint while it is not ready");
    mesh.expect_echoed(
        "echo",
        2,
        "the remote endpoint while the local one is not ready",
    );
    let crossed: Vec<_> = wait_service_records(&mesh.c1, "both", 5)
        .into_iter()
        .filter(|r| r["path"] == "double-hbone")
        .collect();
    assert_eq!(crossed.len(), 2, "{crossed:#?}");
    for r in &crossed {
        assert_eq!(r["gateway"], gateway_address(bed), "{r}");
        assert_eq!(r["dst_workload"], "default/echo", "{r}");
    }

    // Cluster 2's gateway down, the local endpoint ready again: back to cluster 1.
    mesh.c2_gw.kill().expect("kill c2-gw");
    let c1 = mesh.c1_settings();
    mesh.c1
        .reload_settings(bed, &c1, Duration::from_secs(5))
        .expect("reload");
    for _ in 0..2 {
        assert!(send(bed, "client", &vip(BOTH_VIP), "back home"));
    }
    mesh.expect_echoed("local-echo", 6, "the local endpoint ready again");

    // The remote-only service fails closed: the client is refused, nothing reaches anything.
    let inbound = mesh.c2.captured("inbound").len();
    assert!(!send(bed, "client", &vip(REMOTE_VIP), "nowhere"));
    mesh.expect_echoed("echo", 2, "nothing reached echo");
    mesh.expect_echoed("local-echo", 6, "nothing reached local-echo");
    assert_eq!(mesh.c2.captured("inbound").len(), inbound);
    let failed = wait_service_records(&mesh.c1, "echo", 1);
    let last = failed.last().expect("a record of the failed connection");
    assert_eq!(last["response_flags"], "UF", "{last}");
    assert_eq!(last["gateway"], gateway_address(bed), "{last}");
}

/// c2-gw's HBONE address.
fn gateway_address(bed: &Testbed) -> String {
    format!("{}:15008", bed.node(C2.gateway).ipv4())
}
