//! mesh-node driven only by istiod (the `istio:` mode) against the istiod stand-in
//! (`mesh_tests::istiod`: istiod's CA and delta xDS over gRPC with TLS): two nodes with no
//! Kubernetes source and no CA key, enrolled from xDS, carrying HBONE with the identities the
//! CA issued; a policy added and removed through xDS; a NACK for a malformed resource while
//! the rest applies; istiod restarted and unreachable; a CA outage while certificates are
//! valid; certificate rotation; a root rotation.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_node::istio::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch, string_match},
    workload::{PortList, Workload},
};
use mesh_tests::{
    Daemon, Proc, Testbed, Topology,
    helpers::{echo_servers, readiness, wait_until},
    istiod::{CaRecord, Istiod, IstiodOptions, malformed_any, service, workload},
};
use serde_json::Value;

mesh_tests::binaries!(APP, DUT);
const NS: &str = "shop";
const VIP: &str = "198.19.255.30";
/// Short-lived certificates: renewed every 10 s, so rotations happen within the test.
const CERT_LIFETIME_SECS: u64 = 20;

fn config(bed: &Testbed, node: &str, istiod: &Istiod, root: &Path, token: &Path) -> String {
    format!(
        "node: {node}\nlog:\n  format: json\n  filter: info,mesh_node=debug\n\
         redirect:\n  cgroup: {cgroup}\n  bpffs: {bpffs}\nproxy:\n  connectTimeoutMs: 3000\n\
         identity:\n  trustDomain: cluster.local\n  caCertFile: /nonexistent/ca-cert.pem\n\
         \x20 caKeyFile: /nonexistent/ca-key.pem\n  certLifetimeSeconds: {CERT_LIFETIME_SECS}\n\
         istio:\n  enabled: true\n  address: {url}\n  rootCertFile: {root}\n  tokenFile: {token}\n\
         \x20 clusterId: Kubernetes\n  podName: mesh-node-{node}\n  podNamespace: istio-system\n\
         \x20 rescanIntervalMs: 500\n",
        cgroup = bed.node(node).cgroup().display(),
        bpffs = bed.bpffs_dir().expect("bpffs").join(node).display(),
        url = istiod.url(),
        root = root.display(),
        token = token.display(),
    )
}

fn connects(bed: &Testbed, from: &str, target: &str) -> bool {
    bed.pod(from)
        .exec_timeout(
            &[APP, "send", target, "istio probe"],
            Duration::from_secs(5),
        )
        .expect("client runs")
        .status
        .success()
}

fn addr(bed: &Testbed, pod: &str) -> String {
    bed.pod(pod).addr(false, 7000).to_string()
}

/// Access-log records of `daemon` matching `f`.
fn access(daemon: &Daemon, f: impl Fn(&Value) -> bool) -> Vec<Value> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| f(r))
        .collect()
}

fn identity(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/{sa}")
}

/// HBONE records at `daemon` from `src` to `dst`.
fn hbone_in(daemon: &Daemon, src: &str, dst: &str) -> usize {
    access(daemon, |r| {
        r["direction"] == "inbound"
            && r["path"] == "hbone"
            && r["src_identity"] == identity(src).as_str()
            && r["dst_workload"] == format!("{NS}/{dst}").as_str()
    })
    .len()
}

/// A pod of the testbed as istiod describes it, an endpoint of `echo` when `in_service`.
fn pod_workload(bed: &Testbed, name: &str, in_service: bool) -> Workload {
    let pod = bed.pod(name);
    let ips: [IpAddr; 2] = [pod.ipv4().into(), pod.ipv6().into()];
    let mut w = workload(name, NS, name, pod.node(), &ips);
    if in_service {
        w.services.insert(
            format!("{NS}/echo.{NS}.svc.cluster.local"),
            PortList::default(),
        );
    }
    w
}

/// DENY from `principal` at the workloads that name `shop/<name>` (`WORKLOAD_SELECTOR`).
fn deny_from(name: &str, principal: &str) -> Authorization {
    Authorization {
        name: name.to_owned(),
        namespace: NS.to_owned(),
        scope: Scope::WorkloadSelector.into(),
        action: Action::Deny.into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch {
                        match_type: Some(string_match::MatchType::Exact(principal.to_owned())),
                    }],
                    ..Match::default()
                }],
            }],
        }],
    }
}

struct Fixture {
    bed: Testbed,
    istiod: Istiod,
    daemons: Vec<Daemon>,
    root: PathBuf,
    _procs: Vec<Proc>,
}

#[test]
fn istiod_drives_the_mesh() {
    mesh_tests::skip_unless_namespaced!();
    let mut fx = start();
    first_push_enrolls(&mut fx);
    policy_through_xds(&fx);
    nack_keeps_the_rest(&fx);
    istiod_away(&mut fx);
    ca_outage_and_rotation(&fx);
    root_rotation(&fx);
}

/// Testbed, the stand-in (stopped, scripted) and both daemons started before it is reachable.
fn start() -> Fixture {
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1", "b2"]),
    )
    .expect("testbed");
    // A process in every pod (the daemon finds a pod's netns by its addresses), echo servers.
    let mut procs = vec![bed.pod("a1").spawn(&["sleep", "600"]).expect("a1 sleeper")];
    procs.extend(echo_servers(&bed, APP, &["a2", "b1", "b2"], 7000));

    let istiod_addr = std::net::SocketAddr::new(bed.node("node-a").ipv4().into(), 15012);
    let mut istiod = Istiod::start(
        Some(&bed.node("node-a").netns_path()),
        istiod_addr,
        IstiodOptions::default(),
    )
    .expect("istiod stand-in");
    for (pod, in_service) in [("a1", false), ("a2", false), ("b1", true), ("b2", true)] {
        istiod.set_workload(pod_workload(&bed, pod, in_service));
    }
    let vip: IpAddr = VIP.parse().unwrap();
    istiod.set_service(service("echo", NS, &[vip], &[(80, 7000)]));
    istiod.stop();

    let root = bed.tmp_dir().join("istio-root.pem");
    istiod.write_root(&root).expect("root file");
    let mut daemons = Vec::new();
    for node in ["node-a", "node-b"] {
        let token = bed.tmp_dir().join(format!("{node}.token"));
        istiod.write_token(node, &token).expect("token");
        let file = bed.tmp_dir().join(format!("{node}.yaml"));
        std::fs::write(&file, config(&bed, node, &istiod, &root, &token)).unwrap();
        daemons.push(Daemon::start_with(&bed, node, Path::new(DUT), &file).expect("daemon"));
    }
    Fixture {
        bed,
        istiod,
        daemons,
        root,
        _procs: procs,
    }
}

/// Not ready before istiod's first push; then this node's workloads are enrolled, each node
/// asked the CA only for its own pods' identities, and traffic runs over HBONE with them.
fn first_push_enrolls(fx: &mut Fixture) {
    let Fixture {
        bed,
        istiod,
        daemons,
        ..
    } = fx;
    std::thread::sleep(Duration::from_millis(700));
    let (code, body) = readiness(bed, "node-a");
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("istiod"), "{body}");

    istiod.restart().expect("istiod back");
    istiod
        .wait_streams(2, Duration::from_secs(20))
        .expect("both daemons subscribe");
    let subscribed_to_both = |s: &mesh_tests::istiod::StreamInfo| {
        [ADDRESS_TYPE, AUTHORIZATION_TYPE]
            .iter()
            .all(|t| s.subscribed.iter().any(|x| x == t))
    };
    wait_until("both kinds subscribed", Duration::from_secs(10), || {
        istiod
            .streams()
            .iter()
            .filter(|s| s.open && subscribed_to_both(s))
            .count()
            >= 2
    });
    for s in istiod.streams().iter().filter(|s| s.open) {
        let node = &s.token_node;
        assert_eq!(
            s.node_id,
            format!("ztunnel~0.0.0.0~mesh-node-{node}.istio-system~istio-system.svc.cluster.local")
        );
        assert!(s.subscribed.iter().any(|t| t == ADDRESS_TYPE), "{s:?}");
        assert!(
            s.subscribed.iter().any(|t| t == AUTHORIZATION_TYPE),
            "{s:?}"
        );
        let meta = s.metadata.as_ref().expect("node metadata");
        let text = |k: &str| match meta.fields.get(k).and_then(|v| v.kind.clone()) {
            Some(prost_types::value::Kind::StringValue(s)) => s,
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text("NODE_NAME"), *node);
        assert_eq!(text("CLUSTER_ID"), "Kubernetes");
        assert_eq!(text("NAMESPACE"), "istio-system");
    }
    for node in ["node-a", "node-b"] {
        wait_until("ready after istiod's push", Duration::from_secs(20), || {
            readiness(bed, node).0 == "200"
        });
    }
    istiod
        .wait_ack(ADDRESS_TYPE, Duration::from_secs(10))
        .expect("addresses ACKed");
    // Each node asked for its own pods' identities only, and got them.
    for (node, pods) in [("node-a", ["a1", "a2"]), ("node-b", ["b1", "b2"])] {
        for pod in pods {
            istiod
                .wait_ca_record(0, Duration::from_secs(10), |r: &CaRecord| {
                    r.issued()
                        && r.node.as_deref() == Some(node)
                        && r.identity.as_deref() == Some(identity(pod).as_str())
                })
                .expect("certificate issued");
        }
    }
    assert!(
        istiod.ca_records().iter().all(CaRecord::issued),
        "a refused request: {:?}",
        istiod.ca_records()
    );

    let (a, b) = (&daemons[0], &daemons[1]);
    wait_until("a1 reaches b1", Duration::from_secs(10), || {
        connects(bed, "a1", &addr(bed, "b1"))
    });
    assert!(
        hbone_in(b, "a1", "b1") >= 1,
        "HBONE with the issued identity"
    );
    assert!(connects(bed, "b2", &addr(bed, "a2")));
    assert!(hbone_in(a, "b2", "a2") >= 1);
    // The service from xDS, with its endpoints from the workloads' `services`.
    let target = format!("{VIP}:80");
    for _ in 0..4 {
        assert!(connects(bed, "a1", &target), "a1 → echo service");
    }
    assert!(
        hbone_in(b, "a1", "b1") + hbone_in(b, "a1", "b2") >= 5,
        "service connections reached the endpoints over HBONE"
    );
}

/// A DENY bound to b1 through xDS refuses a1 and nobody else; removed, a1 gets through.
fn policy_through_xds(fx: &Fixture) {
    let Fixture { bed, istiod, .. } = fx;
    istiod.set_authorization(&deny_from("deny-a1", "cluster.local/ns/shop/sa/a1"));
    let mut b1 = pod_workload(bed, "b1", true);
    b1.authorization_policies = vec![format!("{NS}/deny-a1")];
    istiod.set_workload(b1);
    wait_until("the DENY applies", Duration::from_secs(10), || {
        !connects(bed, "a1", &addr(bed, "b1"))
    });
    assert!(connects(bed, "a2", &addr(bed, "b1")), "a2 is not denied");
    assert!(connects(bed, "a1", &addr(bed, "b2")), "b2 is not bound");
    istiod
        .wait_ack(AUTHORIZATION_TYPE, Duration::from_secs(10))
        .expect("authorization ACKed");

    istiod.remove_resource(AUTHORIZATION_TYPE, &format!("{NS}/deny-a1"));
    wait_until("the DENY is gone", Duration::from_secs(10), || {
        connects(bed, "a1", &addr(bed, "b1"))
    });
}

/// A resource that does not decode is refused (NACK) by name; what else changes still applies.
fn nack_keeps_the_rest(fx: &Fixture) {
    let Fixture { bed, istiod, .. } = fx;
    istiod.set_resource(ADDRESS_TYPE, "shop/garbage", malformed_any(ADDRESS_TYPE));
    let nack = istiod
        .wait_nack(ADDRESS_TYPE, Duration::from_secs(10))
        .expect("the malformed resource is NACKed");
    let message = nack.error.unwrap_or_default();
    assert!(message.contains("shop/garbage"), "{message}");
    // Traffic is unaffected, and a later good change applies: a DENY on b2 this time.
    assert!(connects(bed, "a1", &addr(bed, "b1")));
    istiod.set_authorization(&deny_from("deny-a1-b2", "cluster.local/ns/shop/sa/a1"));
    let mut b2 = pod_workload(bed, "b2", true);
    b2.authorization_policies = vec![format!("{NS}/deny-a1-b2")];
    istiod.set_workload(b2);
    wait_until("a later DENY applies", Duration::from_secs(10), || {
        !connects(bed, "a1", &addr(bed, "b2"))
    });
    istiod.remove_resource(ADDRESS_TYPE, "shop/garbage");
    istiod.remove_resource(AUTHORIZATION_TYPE, &format!("{NS}/deny-a1-b2"));
    istiod.set_workload(pod_workload(bed, "b2", true));
    wait_until("the DENY on b2 is gone", Duration::from_secs(10), || {
        connects(bed, "a1", &addr(bed, "b2"))
    });
}

/// istiod down: traffic and readiness stay; back: the daemons resubscribe and changes apply.
fn istiod_away(fx: &mut Fixture) {
    let Fixture { bed, istiod, .. } = fx;
    istiod.stop();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        connects(bed, "a1", &addr(bed, "b1")),
        "traffic while istiod is away"
    );
    assert!(connects(bed, "b1", &addr(bed, "a2")));
    assert_eq!(readiness(bed, "node-b").0, "200", "still ready");
    let before = istiod.streams().len();
    istiod.restart().expect("istiod back");
    wait_until("both daemons resubscribe", Duration::from_secs(40), || {
        istiod
            .streams()
            .iter()
            .skip(before)
            .filter(|s| s.open && !s.node_id.is_empty())
            .count()
            >= 2
    });
    // The state they knew was offered back, so istiod need not resend it.
    for s in istiod.streams().iter().skip(before) {
        let known = s
            .initial_versions
            .get(ADDRESS_TYPE)
            .map_or(0, std::collections::HashMap::len);
        assert!(known >= 4, "initial versions of {s:?}");
    }
    istiod.set_authorization(&deny_from("deny-a1", "cluster.local/ns/shop/sa/a1"));
    let mut b1 = pod_workload(bed, "b1", true);
    b1.authorization_policies = vec![format!("{NS}/deny-a1")];
    istiod.set_workload(b1);
    wait_until(
        "a DENY after the restart applies",
        Duration::from_secs(10),
        || !connects(bed, "a1", &addr(bed, "b1")),
    );
    istiod.remove_resource(AUTHORIZATION_TYPE, &format!("{NS}/deny-a1"));
    istiod.set_workload(pod_workload(bed, "b1", true));
    wait_until("and goes again", Duration::from_secs(10), || {
        connects(bed, "a1", &addr(bed, "b1"))
    });
}

/// With the CA down, renewals fail and the valid certificates keep serving; back, the
/// certificates are renewed (rotation), and traffic never stopped.
fn ca_outage_and_rotation(fx: &Fixture) {
    let Fixture { bed, istiod, .. } = fx;
    let seen = istiod.ca_records().len();
    istiod.set_ca_available(false);
    wait_until(
        "a renewal meets the outage",
        Duration::from_secs(15),
        || istiod.ca_records().iter().skip(seen).any(|r| !r.issued()),
    );
    assert!(
        connects(bed, "a1", &addr(bed, "b1")),
        "valid certificates keep serving"
    );
    assert!(connects(bed, "b2", &addr(bed, "a2")));
    istiod.set_ca_available(true);
    let after = istiod.ca_records().len();
    for pod in ["a1", "b1"] {
        istiod
            .wait_ca_record(after, Duration::from_secs(40), |r| {
                r.issued() && r.identity.as_deref() == Some(identity(pod).as_str())
            })
            .expect("renewed after the outage");
    }
    assert!(
        connects(bed, "a1", &addr(bed, "b1")),
        "with the renewed certificates"
    );
}

/// A new root signs; the root file lists both. While one node holds certificates of the new
/// root and the other of the old, traffic runs both ways; then both renew under the new root.
fn root_rotation(fx: &Fixture) {
    let Fixture {
        bed, istiod, root, ..
    } = fx;
    istiod.rotate_root().expect("rotate");
    istiod.write_roots(root).expect("both roots");
    let after = istiod.ca_records().len();
    // The first renewal under the new root, whichever node it is.
    let first = istiod
        .wait_ca_record(after, Duration::from_secs(30), CaRecord::issued)
        .expect("a certificate of the new root");
    let _ = first;
    // The root file is read again at most once a second: allow for that.
    for (from, to) in [("a1", "b1"), ("b1", "a2"), ("a2", "b2"), ("b2", "a2")] {
        wait_until(
            &format!("{from} → {to} mid-rotation"),
            Duration::from_secs(5),
            || connects(bed, from, &addr(bed, to)),
        );
    }
    for pod in ["a1", "a2", "b1", "b2"] {
        istiod
            .wait_ca_record(after, Duration::from_secs(40), |r| {
                r.issued() && r.identity.as_deref() == Some(identity(pod).as_str())
            })
            .expect("every identity renewed under the new root");
    }
    for (from, to) in [("a1", "b1"), ("b1", "a2")] {
        assert!(
            connects(bed, from, &addr(bed, to)),
            "{from} → {to} after the rotation"
        );
    }
}
