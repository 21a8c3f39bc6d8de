//! The ADS flow against an in-process ADS server on loopback (plaintext gRPC): subscription,
//! ACK, NACK with the rest applied and the last good version kept, removal, reconnection
//! with the initial versions and the state kept, pending until both kinds responded.

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status as GrpcStatus, Streaming, transport::Channel};

use super::*;
use crate::{
    identity::Identity,
    istio::proto::{
        discovery::{
            Resource,
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
        },
        security as sec, workload as wl,
    },
    policy::ConnInfo,
    traffic::TrafficSet,
};

const WAIT: Duration = Duration::from_secs(10);

/// One stream the server accepted: what the client sends, and where to put responses.
struct Call {
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<DeltaDiscoveryResponse, GrpcStatus>>,
}

struct Ads {
    calls: mpsc::UnboundedSender<Call>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream =
        tokio_stream::wrappers::ReceiverStream<Result<DeltaDiscoveryResponse, GrpcStatus>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, GrpcStatus> {
        let (responses, rx) = mpsc::channel(16);
        let _ = self.calls.send(Call {
            requests: request.into_inner(),
            responses,
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// An ADS server on a loopback port: its URL and the streams it accepts.
async fn server() -> (String, mpsc::UnboundedReceiver<Call>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (incoming_tx, incoming) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(s, _)| s);
            if incoming_tx.send(accepted).await.is_err() {
                break;
            }
        }
    });
    let (calls, calls_rx) = mpsc::unbounded_channel();
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        AggregatedDiscoveryServiceServer::new(Ads { calls }),
        tokio_stream::wrappers::ReceiverStream::new(incoming),
    ));
    (url, calls_rx)
}

async fn next_call(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    tokio::time::timeout(WAIT, calls.recv())
        .await
        .expect("the client opens a stream")
        .expect("server running")
}

async fn next_request(call: &mut Call) -> DeltaDiscoveryRequest {
    tokio::time::timeout(WAIT, call.requests.next())
        .await
        .expect("the client sends a request in time")
        .expect("the request stream is open")
        .expect("a valid request")
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<MeshState>>,
    what: &str,
    check: impl Fn(&MeshState) -> bool,
) -> Arc<MeshState> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = Arc::clone(&rx.borrow_and_update());
        if check(&state) {
            return state;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; last state: {state:#?}");
        }
    }
}

fn octets(ip: &str) -> Vec<u8> {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        version: version.to_owned(),
        resource: Some(prost_types::Any {
            type_url: type_url.to_owned(),
            value,
        }),
        name: name.to_owned(),
        aliases: Vec::new(),
        ttl: None,
    }
}

fn workload(name: &str, ip: &str, version: &str, services: &[&str]) -> Resource {
    let w = wl::Workload {
        uid: format!("Kubernetes//Pod/shop/{name}"),
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        addresses: vec![octets(ip)],
        node: "node-a".to_owned(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        services: services
            .iter()
            .map(|s| ((*s).to_owned(), wl::PortList::default()))
            .collect(),
        ..wl::Workload::default()
    };
    let bytes = wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec();
    resource(
        &format!("Kubernetes//Pod/shop/{name}"),
        version,
        ADDRESS_TYPE,
        bytes,
    )
}

fn bad_workload(name: &str, version: &str) -> Resource {
    let w = wl::Workload {
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        addresses: vec![vec![10, 0, 0]],
        ..wl::Workload::default()
    };
    let bytes = wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec();
    resource(
        &format!("Kubernetes//Pod/shop/{name}"),
        version,
        ADDRESS_TYPE,
        bytes,
    )
}

fn service(name: &str, ip: &str) -> Resource {
    let s = wl::Service {
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        hostname: format!("{name}.shop.svc.cluster.local"),
        addresses: vec![wl::NetworkAddress {
            network: String::new(),
            address: octets(ip),
        }],
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 8080,
        }],
        ..wl::Service::default()
    };
    let bytes = wl::Address {
        r#type: Some(wl::address::Type::Service(s)),
    }
    .encode_to_vec();
    resource(
        &format!("shop/{name}.shop.svc.cluster.local"),
        "v1",
        ADDRESS_TYPE,
        bytes,
    )
}

/// A DENY of `port` on namespace `shop`; port 0 does not convert.
fn deny_port(name: &str, version: &str, port: u32) -> Resource {
    let a = sec::Authorization {
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![port],
                    ..sec::Match::default()
                }],
            }],
        }],
    };
    resource(
        &format!("shop/{name}"),
        version,
        AUTHORIZATION_TYPE,
        a.encode_to_vec(),
    )
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: String::new(),
        resources,
        type_url: type_url.to_owned(),
        nonce: nonce.to_owned(),
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn names(state: &MeshState) -> Vec<String> {
    state.workloads.iter().map(Workload::uid).collect()
}

fn port_allowed(state: &MeshState, name: &str, port: u16) -> bool {
    let w = state
        .workloads
        .iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("{name} in the state"));
    let id = Identity::new("cluster.local", "front", "web");
    state
        .policies
        .authorize(
            w,
            &ConnInfo {
                src_ip: "10.0.9.9".parse().unwrap(),
                src_identity: Some(&id),
                dst_ip: w.ips[0],
                dst_port: port,
                trust_aliases: &[],
            },
        )
        .allowed
}

struct FakeProc(PathBuf);

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `/proc` with one namespace (pid 100) holding 10.1.0.1.
fn fake_proc() -> FakeProc {
    let dir = std::env::temp_dir().join(format!("mesh-istio-xds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let p = dir.join("100");
    std::fs::create_dir_all(p.join("ns")).unwrap();
    std::fs::create_dir_all(p.join("net")).unwrap();
    std::fs::write(p.join("ns/net"), "").unwrap();
    std::fs::write(
        p.join("net/fib_trie"),
        "Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.1.0.1\n        /32 host LOCAL\n",
    )
    .unwrap();
    FakeProc(dir)
}

fn file_state() -> MeshState {
    let vm = Workload {
        name: "vm-1".to_owned(),
        namespace: "legacy".to_owned(),
        service_account: "default".to_owned(),
        labels: std::collections::BTreeMap::new(),
        ips: vec!["192.168.1.10".parse().unwrap()],
        node: "vm-host".to_owned(),
        netns: None,
        enrolled: false,
        network: String::new(),
        trust_domain: None,
    };
    MeshState {
        workloads: vec![vm],
        services: Vec::new(),
        policies: Arc::new(PolicyStore::default()),
        traffic: Arc::new(TrafficSet::default()),
        networks: Vec::new(),
        zone: None,
        pending: None,
    }
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: each step starts from the state the one before left"
)]
async fn ads_flow() {
    let proc = fake_proc();
    let (url, mut calls) = server().await;
    let config = IstioConfig {
        cluster_id: "east".to_owned(),
        pod_name: "mesh-node-x".to_owned(),
        pod_namespace: "istio-system".to_owned(),
        proc_root: proc.0.clone(),
        rescan_interval_ms: 100,
        ..IstioConfig::default()
    };
    let settings = XdsSettings {
        config,
        node: "node-a".to_owned(),
        trust_domain: "cluster.local".to_owned(),
        root_namespace: "istio-system".to_owned(),
        zone: Some("z1".to_owned()),
        cgroup: None,
    };
    let (_file_tx, file_rx) = watch::channel(Arc::new(file_state()));
    let (tx, mut rx) = watch::channel(Arc::new(file_state()));
    let connect = move || {
        Channel::from_shared(url.clone())
            .map(|c| AggregatedDiscoveryServiceClient::new(c.connect_lazy()))
    };
    let source = tokio::spawn(run(connect, settings, file_rx, tx));

    // The subscription: both kinds, wildcard, the node and its metadata.
    let mut call = next_call(&mut calls).await;
    let mut first = [next_request(&mut call).await, next_request(&mut call).await];
    first.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    assert_eq!(first[0].type_url, AUTHORIZATION_TYPE);
    assert_eq!(first[1].type_url, ADDRESS_TYPE);
    for r in &first {
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert!(r.initial_resource_versions.is_empty(), "nothing held yet");
        let node = r.node.as_ref().expect("the node");
        assert_eq!(
            node.id,
            "ztunnel~0.0.0.0~mesh-node-x.istio-system~istio-system.svc.cluster.local"
        );
        let meta = &node.metadata.as_ref().expect("metadata").fields;
        let text = |k: &str| match meta.get(k).and_then(|v| v.kind.as_ref()) {
            Some(ValueKind::StringValue(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(text("NAMESPACE"), "istio-system");
        assert_eq!(text("NODE_NAME"), "node-a");
        assert_eq!(text("CLUSTER_ID"), "east");
        assert_eq!(text("NAME"), "mesh-node-x");
    }
    wait_for(&mut rx, "the pending state", |s| s.pending.is_some()).await;

    // Addresses: two good, one bad. NACKed naming the bad one; the rest applies; still
    // pending (no authorizations yet).
    let svc_key = "shop/web.shop.svc.cluster.local";
    call.responses
        .send(Ok(response(
            ADDRESS_TYPE,
            "n1",
            vec![
                workload("web-1", "10.1.0.1", "v1", &[svc_key]),
                workload("web-2", "10.1.0.2", "v1", &[]),
                bad_workload("broken", "v1"),
                service("web", "10.96.0.1"),
            ],
            &[],
        )))
        .await
        .unwrap();
    let nack = next_request(&mut call).await;
    assert_eq!(nack.response_nonce, "n1");
    assert_eq!(nack.type_url, ADDRESS_TYPE);
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("Kubernetes//Pod/shop/broken"),
        "{}",
        detail.message
    );
    assert!(
        detail.message.contains("workload.addresses[0]"),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("web-1"), "{}", detail.message);
    let state = wait_for(&mut rx, "the addresses applied", |s| {
        names(s).contains(&"shop/web-1".to_owned())
    })
    .await;
    assert!(state.pending.is_some(), "authorizations not received yet");

    // Authorizations: ACK, and the state is complete.
    call.responses
        .send(Ok(response(
            AUTHORIZATION_TYPE,
            "n2",
            vec![deny_port("deny-22", "v1", 22)],
            &[],
        )))
        .await
        .unwrap();
    let ack = next_request(&mut call).await;
    assert_eq!(
        (ack.response_nonce.as_str(), ack.type_url.as_str()),
        ("n2", AUTHORIZATION_TYPE)
    );
    assert_eq!(ack.error_detail, None, "an ACK");
    let state = wait_for(&mut rx, "a complete state", |s| s.pending.is_none()).await;
    assert_eq!(
        names(&state),
        ["legacy/vm-1", "shop/web-1", "shop/web-2"],
        "istiod's and the file's workloads; not the broken one"
    );
    let web1 = state.workloads.iter().find(|w| w.name == "web-1").unwrap();
    assert!(web1.enrolled);
    assert_eq!(
        web1.netns,
        Some(proc.0.join("100/ns/net")),
        "found by its address"
    );
    let web2 = state.workloads.iter().find(|w| w.name == "web-2").unwrap();
    assert!(!web2.enrolled, "no network namespace holds its address");
    assert_eq!(state.services.len(), 1);
    assert_eq!(state.services[0].endpoints.len(), 1);
    assert_eq!(
        state.services[0].endpoints[0].address,
        "10.1.0.1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(state.zone.as_deref(), Some("z1"));
    assert!(!port_allowed(&state, "web-1", 22) && port_allowed(&state, "web-1", 80));

    // A bad version of a good resource: NACKed, its last good version kept, the rest applied.
    call.responses
        .send(Ok(response(
            ADDRESS_TYPE,
            "n3",
            vec![
                bad_workload("web-2", "v2"),
                workload("web-3", "10.1.0.3", "v1", &[]),
            ],
            &[],
        )))
        .await
        .unwrap();
    let nack = next_request(&mut call).await;
    assert!(
        nack.error_detail
            .expect("a NACK")
            .message
            .contains("shop/web-2")
    );
    let state = wait_for(&mut rx, "web-3", |s| {
        names(s).contains(&"shop/web-3".to_owned())
    })
    .await;
    let web2 = state.workloads.iter().find(|w| w.name == "web-2").unwrap();
    assert_eq!(
        web2.ips,
        vec!["10.1.0.2".parse::<IpAddr>().unwrap()],
        "the last good version"
    );

    // A bad version of a good policy keeps it; a new bad ALLOW allows nothing on its scope.
    call.responses
        .send(Ok(response(
            AUTHORIZATION_TYPE,
            "n4",
            vec![deny_port("deny-22", "v2", 0), {
                let mut r = deny_port("allow-bad", "v1", 0);
                let mut a =
                    sec::Authorization::decode(&r.resource.as_ref().unwrap().value[..]).unwrap();
                a.action = sec::Action::Allow as i32;
                r.resource.as_mut().unwrap().value = a.encode_to_vec();
                r
            }],
            &[],
        )))
        .await
        .unwrap();
    let nack = next_request(&mut call).await;
    let message = nack.error_detail.expect("a NACK").message;
    assert!(
        message.contains("shop/deny-22") && message.contains("shop/allow-bad"),
        "{message}"
    );
    assert!(message.contains("destination_ports[0]"), "{message}");
    let state = wait_for(&mut rx, "the strictest ALLOW", |s| {
        s.policies.authorization_policies() == 2
    })
    .await;
    assert!(
        !port_allowed(&state, "web-1", 80),
        "the bad ALLOW allows nothing"
    );
    let deny = state
        .policies
        .documents()
        .iter()
        .find(|d| d.metadata.name == "deny-22")
        .expect("the last good DENY");
    assert_eq!(
        serde_json::to_value(deny).unwrap()["spec"]["rules"][0]["when"][0]["values"][0],
        "22"
    );

    // Removal.
    call.responses
        .send(Ok(response(
            AUTHORIZATION_TYPE,
            "n5",
            vec![],
            &["shop/allow-bad"],
        )))
        .await
        .unwrap();
    assert_eq!(next_request(&mut call).await.error_detail, None);
    call.responses
        .send(Ok(response(
            ADDRESS_TYPE,
            "n6",
            vec![],
            &["Kubernetes//Pod/shop/web-3"],
        )))
        .await
        .unwrap();
    assert_eq!(next_request(&mut call).await.error_detail, None);
    let state = wait_for(&mut rx, "the removals", |s| {
        !names(s).contains(&"shop/web-3".to_owned()) && s.policies.authorization_policies() == 1
    })
    .await;
    assert!(port_allowed(&state, "web-1", 80) && !port_allowed(&state, "web-1", 22));

    // istiod goes away: the state stays; the new stream names the versions held (not the
    // resources that never converted).
    let published = rx.borrow().clone();
    drop(call);
    let mut call = next_call(&mut calls).await;
    let mut again = [next_request(&mut call).await, next_request(&mut call).await];
    again.sort_by(|a, b| a.type_url.cmp(&b.type_url));
    assert_eq!(
        again[0].initial_resource_versions,
        [("shop/deny-22".to_owned(), "v1".to_owned())].into()
    );
    assert_eq!(
        again[1].initial_resource_versions,
        [
            ("Kubernetes//Pod/shop/web-1".to_owned(), "v1".to_owned()),
            ("Kubernetes//Pod/shop/web-2".to_owned(), "v1".to_owned()),
            (svc_key.to_owned(), "v1".to_owned()),
        ]
        .into()
    );
    assert!(
        Arc::ptr_eq(&published, &rx.borrow()),
        "nothing published meanwhile"
    );
    assert!(rx.borrow().pending.is_none(), "still complete");

    // The new stream's changes apply on top of the state kept.
    call.responses
        .send(Ok(response(
            ADDRESS_TYPE,
            "m1",
            vec![],
            &["Kubernetes//Pod/shop/web-2"],
        )))
        .await
        .unwrap();
    assert_eq!(next_request(&mut call).await.response_nonce, "m1");
    let state = wait_for(&mut rx, "web-2 removed", |s| {
        !names(s).contains(&"shop/web-2".to_owned())
    })
    .await;
    assert_eq!(names(&state), ["legacy/vm-1", "shop/web-1"]);

    // A WORKLOAD_SELECTOR policy applies once istiod lists it in the workload, even though the
    // policies themselves did not change with that update.
    let mut selector = deny_port("deny-all", "v1", 80);
    let mut a = sec::Authorization::decode(&selector.resource.as_ref().unwrap().value[..]).unwrap();
    a.scope = sec::Scope::WorkloadSelector as i32;
    a.rules = vec![sec::Rule::default()];
    selector.resource.as_mut().unwrap().value = a.encode_to_vec();
    call.responses
        .send(Ok(response(AUTHORIZATION_TYPE, "m2", vec![selector], &[])))
        .await
        .unwrap();
    assert_eq!(next_request(&mut call).await.error_detail, None);
    let state = wait_for(&mut rx, "the selector policy", |s| {
        s.policies.authorization_policies() == 2
    })
    .await;
    assert!(port_allowed(&state, "web-1", 80), "not selected yet");
    let mut listed = workload("web-1", "10.1.0.1", "v2", &[svc_key]);
    let mut address = wl::Address::decode(&listed.resource.as_ref().unwrap().value[..]).unwrap();
    if let Some(wl::address::Type::Workload(w)) = &mut address.r#type {
        w.authorization_policies = vec!["shop/deny-all".to_owned()];
    }
    listed.resource.as_mut().unwrap().value = address.encode_to_vec();
    call.responses
        .send(Ok(response(ADDRESS_TYPE, "m3", vec![listed], &[])))
        .await
        .unwrap();
    assert_eq!(next_request(&mut call).await.error_detail, None);
    let state = wait_for(&mut rx, "web-1 selected", |s| {
        s.workloads
            .iter()
            .any(|w| w.labels.keys().any(|k| k.ends_with("shop/deny-all")))
    })
    .await;
    assert!(!port_allowed(&state, "web-1", 80), "selected: denied");
    source.abort();
}

#[tokio::test]
async fn unreachable_istiod_keeps_retrying_and_pending() {
    let (tx, mut rx) = watch::channel(Arc::new(file_state()));
    let (_file_tx, file_rx) = watch::channel(Arc::new(file_state()));
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let connect = move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Channel::from_shared(url.clone())
            .map(|c| AggregatedDiscoveryServiceClient::new(c.connect_lazy()))
    };
    let settings = XdsSettings {
        config: IstioConfig {
            proc_root: std::env::temp_dir().join("mesh-istio-xds-none"),
            ..IstioConfig::default()
        },
        node: "node-a".to_owned(),
        trust_domain: "cluster.local".to_owned(),
        root_namespace: "istio-system".to_owned(),
        zone: None,
        cgroup: None,
    };
    let source = tokio::spawn(run(connect, settings, file_rx, tx));
    let state = wait_for(&mut rx, "pending", |s| s.pending.is_some()).await;
    assert_eq!(
        names(&state),
        ["legacy/vm-1"],
        "the file's state, marked pending"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let n = attempts.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (2..=4).contains(&n),
        "backoff from 200 ms: {n} attempts in 0.7 s"
    );
    assert!(rx.borrow().pending.is_some());
    source.abort();
}

#[tokio::test]
async fn malformed_responses_are_nacked_and_change_nothing_else() {
    let (tx, _rx) = watch::channel(Arc::new(file_state()));
    let (_file_tx, file_rx) = watch::channel(Arc::new(file_state()));
    let settings = XdsSettings {
        config: IstioConfig::default(),
        node: "node-a".to_owned(),
        trust_domain: "cluster.local".to_owned(),
        root_namespace: "istio-system".to_owned(),
        zone: None,
        cgroup: None,
    };
    let mut source = Source::new(settings, file_rx, tx);

    let answer = source.apply(response("type.googleapis.com/other", "x1", vec![], &[]));
    assert_eq!(answer.response_nonce, "x1");
    assert!(
        answer
            .error_detail
            .expect("a NACK")
            .message
            .contains("unknown type")
    );
    assert!(source.synced.is_empty(), "an unknown type syncs nothing");

    let mut wrong_type = workload("web-1", "10.1.0.1", "v1", &[]);
    wrong_type.resource.as_mut().unwrap().type_url = AUTHORIZATION_TYPE.to_owned();
    let mut empty = workload("web-2", "10.1.0.2", "v1", &[]);
    empty.resource = None;
    let mut unnamed = workload("web-3", "10.1.0.3", "v1", &[]);
    unnamed.name.clear();
    let answer = source.apply(response(
        ADDRESS_TYPE,
        "x2",
        vec![
            wrong_type,
            empty,
            unnamed,
            workload("web-4", "10.1.0.4", "v1", &[]),
        ],
        &[],
    ));
    let message = answer.error_detail.expect("a NACK").message;
    for expected in [
        "Kubernetes//Pod/shop/web-1: type",
        "Kubernetes//Pod/shop/web-2: no resource",
        "a resource without a name",
    ] {
        assert!(message.contains(expected), "{expected}: {message}");
    }
    assert_eq!(
        source.addresses.keys().collect::<Vec<_>>(),
        ["Kubernetes//Pod/shop/web-4"],
        "only the good resource applied"
    );
    assert!(source.synced.contains(ADDRESS_TYPE));
}
