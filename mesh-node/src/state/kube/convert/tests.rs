use super::*;

fn config() -> KubernetesConfig {
    KubernetesConfig::default()
}

fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).expect("pod")
}

fn web_pod(ns: &str, labels: &serde_json::Value) -> Pod {
    pod(serde_json::json!({
        "metadata": {"name": "web-1", "namespace": ns, "uid": "u1", "labels": labels},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": []},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
    }))
}

#[test]
fn namespaces_opt_in_by_label() {
    let ns = |name: &str, labels: serde_json::Value| -> Namespace {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap()
    };
    let all = [
        ns(
            "shop",
            serde_json::json!({"mesh.io/dataplane-mode": "ambient"}),
        ),
        ns(
            "other",
            serde_json::json!({"mesh.io/dataplane-mode": "none"}),
        ),
        ns("plain", serde_json::json!({})),
    ];
    assert_eq!(
        enrolled_namespaces(&all, &config()),
        HashSet::from(["shop".to_owned()])
    );
    let istio = KubernetesConfig {
        enroll_label: "istio.io/dataplane-mode".into(),
        ..config()
    };
    assert!(enrolled_namespaces(&all, &istio).is_empty());
}

#[test]
fn pod_becomes_workload() {
    let enrolled = HashSet::from(["shop".to_owned()]);
    let w = workload(
        &web_pod("shop", &serde_json::json!({"app": "web"})),
        &enrolled,
        &config(),
    )
    .expect("workload");
    assert_eq!(w.uid(), "shop/web-1");
    assert_eq!(w.service_account, "web");
    assert_eq!(w.node, "node-a");
    assert_eq!(w.ips.len(), 2);
    assert!(w.enrolled);
    assert_eq!(w.labels["app"], "web");
    let out = workload(
        &web_pod(
            "shop",
            &serde_json::json!({"mesh.io/dataplane-mode": "none"}),
        ),
        &enrolled,
        &config(),
    )
    .unwrap();
    assert!(!out.enrolled, "pod-level opt-out");
    let elsewhere = workload(
        &web_pod("other", &serde_json::json!({})),
        &enrolled,
        &config(),
    );
    assert!(!elsewhere.unwrap().enrolled);
}

#[test]
fn pods_without_own_address_are_skipped() {
    let enrolled = HashSet::new();
    let pending = pod(serde_json::json!({
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"containers": []},
        "status": {"phase": "Pending"}
    }));
    assert!(workload(&pending, &enrolled, &config()).is_none());
    let host = pod(serde_json::json!({
        "metadata": {"name": "h", "namespace": "shop"},
        "spec": {"nodeName": "n", "hostNetwork": true, "containers": []},
        "status": {"phase": "Running", "podIP": "192.0.2.1"}
    }));
    assert!(workload(&host, &enrolled, &config()).is_none());
    let done = pod(serde_json::json!({
        "metadata": {"name": "d", "namespace": "shop"},
        "spec": {"nodeName": "n", "containers": []},
        "status": {"phase": "Succeeded", "podIP": "10.0.0.9"}
    }));
    assert!(workload(&done, &enrolled, &config()).is_none());
}

fn kube_service(extra: &serde_json::Value) -> KubeService {
    let mut json = serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http-alt"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]
        }
    });
    merge(&mut json, extra);
    serde_json::from_value(json).unwrap()
}

fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
        for (k, v) in b {
            merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
        }
    } else {
        *a = b.clone();
    }
}

fn slice(endpoints: &serde_json::Value) -> EndpointSlice {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

#[test]
fn service_with_slices() {
    let s = slice(&serde_json::json!([
        {"addresses": ["10.0.0.5"], "conditions": {"ready": true}, "nodeName": "node-a", "zone": "z1"},
        {"addresses": ["10.0.1.5"], "conditions": {"ready": false}, "nodeName": "node-b"}
    ]));
    let svc = service(&kube_service(&serde_json::json!({})), &[&s]).expect("service");
    assert_eq!(svc.hostname(), "web.shop.svc.cluster.local");
    assert_eq!(
        svc.addresses,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(svc.ports.len(), 1, "UDP ports are not proxied");
    assert_eq!(svc.ports[0].target_port, None, "named target port");
    assert_eq!(svc.endpoints.len(), 2);
    assert_eq!(
        svc.endpoints[0].ports[&80], 8080,
        "resolved through the slice"
    );
    assert_eq!(svc.endpoints[0].zone.as_deref(), Some("z1"));
    assert!(!svc.endpoints[1].ready);
    assert_eq!(svc.load_balancing, Locality::Any);
    let table = crate::state::ServiceTable::build(
        &[svc],
        &[],
        &crate::traffic::TrafficSet::default(),
        &crate::traffic::runtime::Registry::default(),
        ("node-x", None),
        "",
    );
    let b = table.lookup("10.96.0.10:80".parse().unwrap()).unwrap();
    assert_eq!(b.pick().unwrap().to_string(), "10.0.0.5:8080");
    assert_eq!(b.len(), 1, "the unready endpoint takes no connection");
}

#[test]
fn headless_and_external_services_are_not_proxied() {
    let headless =
        kube_service(&serde_json::json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}));
    assert!(service(&headless, &[]).is_none());
    let external = kube_service(
        &serde_json::json!({"spec": {"type": "ExternalName", "externalName": "example.org"}}),
    );
    assert!(service(&external, &[]).is_none());
}

#[test]
fn locality_from_spec_and_annotation() {
    let local = kube_service(&serde_json::json!({"spec": {"internalTrafficPolicy": "Local"}}));
    assert_eq!(
        service(&local, &[]).unwrap().load_balancing,
        Locality::NodeOnly
    );
    let close = kube_service(&serde_json::json!({"spec": {"trafficDistribution": "PreferClose"}}));
    assert_eq!(
        service(&close, &[]).unwrap().load_balancing,
        Locality::PreferZone
    );
    let node = kube_service(
        &serde_json::json!({"metadata": {"annotations": {ISTIO_TRAFFIC_DISTRIBUTION: "PreferSameNode"}}}),
    );
    assert_eq!(
        service(&node, &[]).unwrap().load_balancing,
        Locality::PreferNode
    );
}

#[test]
fn rate_limit_from_annotations() {
    let annotated = |annotations: serde_json::Value| {
        let svc = kube_service(&serde_json::json!({"metadata": {"annotations": annotations}}));
        let (limit, bad) = rate_limit(&svc);
        assert_eq!(service(&svc, &[]).unwrap().connection_rate_limit, limit);
        let bad: Vec<&str> = bad.iter().map(|b| b.annotation).collect();
        (limit, bad)
    };
    assert_eq!(annotated(serde_json::json!({})), (None, vec![]));
    let limit = |connections_per_second, burst, per_source| {
        Some(RateLimit {
            connections_per_second,
            burst,
            per_source,
        })
    };
    assert_eq!(
        annotated(serde_json::json!({RATE_LIMIT_ANNOTATION: "20"})),
        (limit(20, None, false), vec![])
    );
    assert_eq!(
        annotated(serde_json::json!({RATE_LIMIT_ANNOTATION: "20",
            RATE_BURST_ANNOTATION: "5", RATE_PER_SOURCE_ANNOTATION: "true"})),
        (limit(20, Some(5), true), vec![])
    );
    // A malformed annotation is ignored (a rate limit is no security control): a bad rate
    // leaves no limit, a bad burst or flag its default.
    for rate in ["0", "-3", "ten", "1.5", ""] {
        assert_eq!(
            annotated(serde_json::json!({RATE_LIMIT_ANNOTATION: rate, RATE_BURST_ANNOTATION: "5"})),
            (None, vec![RATE_LIMIT_ANNOTATION]),
            "{rate:?}"
        );
    }
    assert_eq!(
        annotated(serde_json::json!({RATE_LIMIT_ANNOTATION: "20",
            RATE_BURST_ANNOTATION: "0", RATE_PER_SOURCE_ANNOTATION: "yes"})),
        (
            limit(20, None, false),
            vec![RATE_BURST_ANNOTATION, RATE_PER_SOURCE_ANNOTATION]
        )
    );
    assert_eq!(
        annotated(serde_json::json!({RATE_PER_SOURCE_ANNOTATION: "true"})),
        (None, vec![RATE_PER_SOURCE_ANNOTATION]),
        "a flag without a rate"
    );
}

fn traffic_object(api_version: &str, kind: &str, spec: &serde_json::Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": "split", "namespace": "shop", "uid": "u", "resourceVersion": "3",
                     "managedFields": [], "labels": {"app": "echo"}},
        "spec": spec,
        "status": {"parents": []}
    }))
    .unwrap()
}

#[test]
fn traffic_objects_become_documents() {
    let route = traffic_object(
        "gateway.networking.k8s.io/v1alpha2",
        "TCPRoute",
        &serde_json::json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [{"backendRefs": [{"name": "echo-v1", "port": 80, "weight": 90},
                                       {"name": "echo-v2", "port": 80, "weight": 10}]}]
        }),
    );
    let doc = traffic_document(&route, TrafficKind::TcpRoute).expect("document");
    assert_eq!(doc.describe(), "TCPRoute shop/split");
    assert_eq!(doc.api_version, "gateway.networking.k8s.io/v1alpha2");
    assert_eq!(doc.spec.rules.as_ref().unwrap()[0].backend_refs.len(), 2);
    let set = TrafficSet::new(&[doc]).unwrap();
    assert!(set.route("echo.shop.svc.cluster.local").is_some());

    let vs = traffic_object(
        "networking.istio.io/v1",
        "VirtualService",
        &serde_json::json!({"hosts": ["echo"], "tcp": [{"route": [
            {"destination": {"host": "echo", "subset": "v1"}, "weight": 100}]}]}),
    );
    let rule = traffic_object(
        "networking.istio.io/v1",
        "DestinationRule",
        &serde_json::json!({"host": "echo", "subsets": [{"name": "v1", "labels": {"v": "1"}}],
            "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "250ms"}}}}),
    );
    let fault = traffic_object(
        "mesh.io/v1alpha1",
        "FaultInjection",
        &serde_json::json!({"targetRefs": [{"kind": "Service", "name": "echo", "port": 80}],
            "sources": [{"namespace": "shop"}], "abort": {"percentage": 5.0},
            "delay": {"percentage": 10, "fixedDelay": "1s"}}),
    );
    let docs: Vec<TrafficDocument> = [
        (vs, TrafficKind::VirtualService),
        (rule, TrafficKind::DestinationRule),
        (fault, TrafficKind::FaultInjection),
    ]
    .iter()
    .map(|(o, kind)| traffic_document(o, *kind).expect("document"))
    .collect();
    let set = TrafficSet::new(&docs).unwrap();
    let host = "echo.shop.svc.cluster.local";
    assert!(set.route(host).is_some() && set.rule(host).is_some());
    assert_eq!(set.faults(host).len(), 1);
}

#[test]
fn a_bad_traffic_object_is_reported_with_its_field() {
    let reject = |kind: TrafficKind, api_version: &str, spec: serde_json::Value| {
        let obj = traffic_object(api_version, &kind.to_string(), &spec);
        let e = traffic_document(&obj, kind).unwrap_err();
        assert_eq!(e.document, format!("{kind} shop/split"));
        (e.field, e.reason)
    };
    // Does not parse: the top-level field, and serde's message naming the inner one.
    let (field, reason) = reject(
        TrafficKind::TcpRoute,
        "gateway.networking.k8s.io/v1alpha2",
        serde_json::json!({"parentRefs": [{"kind": "Service", "name": "echo"}],
            "rules": [{"backendRefz": []}]}),
    );
    assert_eq!(field, "spec.rules");
    assert!(reason.contains("backendRefz"), "{reason}");
    let (field, reason) = reject(
        TrafficKind::FaultInjection,
        "mesh.io/v1alpha1",
        serde_json::json!({"targetRefs": [{"kind": "Service", "name": "echo"}],
            "delay": {"percentage": 10, "fixedDelay": "1 fortnight"}}),
    );
    assert_eq!(field, "spec.delay");
    assert!(reason.contains("fortnight"), "{reason}");
    // Parses, fails validation: the exact field.
    let (field, _) = reject(
        TrafficKind::TcpRoute,
        "gateway.networking.k8s.io/v1alpha2",
        serde_json::json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
            "rules": [{"backendRefs": [{"name": "echo-v1"}]}]}),
    );
    assert_eq!(field, "spec.rules[0].backendRefs[0].port");
    let (field, _) = reject(
        TrafficKind::DestinationRule,
        "networking.istio.io/v1",
        serde_json::json!({"hosts": ["echo"]}),
    );
    assert_eq!(field, "spec.hosts");
    let (field, _) = reject(
        TrafficKind::VirtualService,
        "networking.istio.io/v2",
        serde_json::json!({"hosts": ["echo"]}),
    );
    assert_eq!(field, "apiVersion");
}

#[test]
fn policy_objects_become_documents() {
    let obj: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-b", "namespace": "shop", "uid": "x", "resourceVersion": "7",
                     "managedFields": [], "annotations": {"istio.io/dry-run": "true"}},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["b"]}}]}]},
        "status": {"validationMessages": []}
    }))
    .unwrap();
    let doc = policy(&obj, "AuthorizationPolicy").expect("document");
    assert_eq!(doc.metadata.name, "deny-b");
    assert_eq!(doc.metadata.namespace, "shop");
    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {"action": "DENY", "rulez": []}
    }))
    .unwrap();
    let err = policy(&bad, "AuthorizationPolicy").unwrap_err();
    assert!(err.contains("rulez"), "{err}");
}

#[test]
fn an_unreadable_policy_object_fails_closed_for_what_it_selects() {
    use crate::{
        policy::{ConnInfo, MtlsMode, PolicyStore},
        workload::Workload,
    };
    let object = |spec: serde_json::Value, kind: &str| -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": kind,
            "metadata": {"name": "broken", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    };
    let workload = |app: &str| Workload {
        labels: [("app".to_owned(), app.to_owned())].into(),
        name: app.to_owned(),
        namespace: "shop".to_owned(),
        service_account: app.to_owned(),
        ips: vec!["198.18.1.2".parse().unwrap()],
        node: "n".to_owned(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    };
    let conn = ConnInfo {
        src_ip: "198.18.2.2".parse().unwrap(),
        src_identity: None,
        dst_ip: "198.18.1.2".parse().unwrap(),
        dst_port: 80,
        trust_aliases: &[],
    };
    // An ALLOW with a typo: left out, it would leave `web` with no ALLOW at all (allow
    // everything).
    let allow = object(
        serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW", "rulez": []}),
        "AuthorizationPolicy",
    );
    assert!(policy(&allow, "AuthorizationPolicy").is_err());
    let store = PolicyStore::new(
        "istio-system",
        &[fail_closed_policy(&allow, Kind::AuthorizationPolicy)],
    )
    .expect("store");
    assert!(
        !store.authorize(&workload("web"), &conn).allowed,
        "selected: denied"
    );
    assert!(
        store.authorize(&workload("db"), &conn).allowed,
        "not selected"
    );
    // Unreadable selector: the whole namespace.
    let no_selector = object(
        serde_json::json!({"selector": {"matchLabels": "app=web"}, "action": "DENY"}),
        "AuthorizationPolicy",
    );
    let store = PolicyStore::new(
        "istio-system",
        &[fail_closed_policy(&no_selector, Kind::AuthorizationPolicy)],
    )
    .expect("store");
    assert!(!store.authorize(&workload("db"), &conn).allowed);
    let peer = object(
        serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICTER"}}),
        "PeerAuthentication",
    );
    assert!(policy(&peer, "PeerAuthentication").is_err());
    let store = PolicyStore::new(
        "istio-system",
        &[fail_closed_policy(&peer, Kind::PeerAuthentication)],
    )
    .expect("store");
    assert_eq!(store.mtls_mode(&workload("web"), 80), MtlsMode::Strict);
    assert_eq!(store.mtls_mode(&workload("db"), 80), MtlsMode::Permissive);
}
