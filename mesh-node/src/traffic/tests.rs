use super::*;

fn set(yaml: &str) -> Result<TrafficSet, TrafficError> {
    let docs: Vec<TrafficDocument> = serde_yaml_ng::from_str(yaml).expect("documents parse");
    TrafficSet::new(&docs)
}

#[test]
fn short_hosts_are_service_hostnames() {
    assert_eq!(hostname("echo", "shop"), "echo.shop.svc.cluster.local");
    assert_eq!(hostname("echo.web", "shop"), "echo.web.svc.cluster.local");
    assert_eq!(
        hostname("echo.web.svc", "shop"),
        "echo.web.svc.cluster.local"
    );
    assert_eq!(
        hostname("echo.web.svc.cluster.local", "shop"),
        "echo.web.svc.cluster.local"
    );
}

#[test]
fn a_tcp_route_on_a_service_splits_by_weight() {
    let s = set("- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {name: canary, namespace: shop}\n  spec:\n    parentRefs: [{group: '', kind: Service, name: echo, port: 80}]\n    rules:\n    - backendRefs:\n      - {name: echo-v1, port: 80, weight: 90}\n      - {name: echo-v2, namespace: other, port: 8080, weight: 10}\n").unwrap();
    let route = s.route("echo.shop.svc.cluster.local").expect("route");
    assert_eq!(&*route.origin, "TCPRoute shop/canary");
    assert_eq!(route.rules[0].port, Some(80));
    let b = &route.rules[0].backends;
    assert_eq!(
        (
            b[0].host.as_str(),
            b[0].weight,
            b[1].host.as_str(),
            b[1].port
        ),
        (
            "echo-v1.shop.svc.cluster.local",
            90,
            "echo-v2.other.svc.cluster.local",
            Some(8080)
        )
    );
}

#[test]
fn a_tcp_route_of_a_gateway_is_noted_not_applied() {
    let s = set("- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {name: gw}\n  spec:\n    parentRefs: [{name: my-gateway}]\n    rules: [{backendRefs: [{name: a, port: 80}]}]\n").unwrap();
    assert!(s.route("my-gateway.default.svc.cluster.local").is_none());
    assert!(s.notes()[0].1.contains("no parentRef of kind Service"));
}

#[test]
fn virtual_service_tcp_routes_with_subsets_and_the_l7_parts_noted() {
    let s = set("- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata: {name: echo, namespace: shop}\n  spec:\n    hosts: [echo]\n    http: [{route: [{destination: {host: echo}}]}]\n    tcp:\n    - match: [{port: 80, sourceNamespace: web}]\n      route:\n      - {destination: {host: echo, subset: v1}, weight: 75}\n      - {destination: {host: echo, subset: v2}, weight: 25}\n    - route: [{destination: {host: echo, subset: v1}}]\n").unwrap();
    let route = s.route("echo.shop.svc.cluster.local").expect("route");
    assert_eq!(route.rules.len(), 2);
    assert_eq!(route.rules[0].port, Some(80));
    assert_eq!(
        route.rules[0].matches[0].source_namespace.as_deref(),
        Some("web")
    );
    assert_eq!(route.rules[0].backends[1].subset.as_deref(), Some("v2"));
    assert_eq!(
        route.rules[1].backends[0].weight, 100,
        "a single destination takes all"
    );
    assert_eq!(s.notes().len(), 1);
    assert!(s.notes()[0].1.contains("http"), "{:?}", s.notes());
}

#[test]
fn a_virtual_service_bound_to_gateways_only_is_not_applied() {
    let s = set("- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata: {name: echo}\n  spec:\n    hosts: [echo]\n    gateways: [ingress]\n    tcp: [{route: [{destination: {host: echo}}]}]\n").unwrap();
    assert!(s.route("echo.default.svc.cluster.local").is_none());
}

#[test]
fn destination_rule_policy_with_istio_defaults_and_subset_overrides() {
    let s = set("- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: echo, namespace: shop}\n  spec:\n    host: echo.shop.svc.cluster.local\n    trafficPolicy:\n      connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms}, http: {http2MaxRequests: 5}}\n      loadBalancer: {simple: LEAST_REQUEST}\n      outlierDetection: {consecutive5xxErrors: 3}\n    subsets:\n    - {name: v1, labels: {version: v1}}\n    - name: v2\n      labels: {version: v2}\n      trafficPolicy: {loadBalancer: {simple: RANDOM}}\n").unwrap();
    let rule = s.rule("echo.shop.svc.cluster.local").expect("rule");
    assert_eq!(rule.policy.max_connections, Some(10));
    assert_eq!(
        rule.policy.connect_timeout,
        Some(Duration::from_millis(250))
    );
    assert_eq!(rule.policy.balance, Balance::LeastRequest);
    let o = rule.policy.outlier.unwrap();
    assert_eq!(
        (
            o.consecutive_errors,
            o.base_ejection,
            o.max_ejection_percent
        ),
        (3, Duration::from_secs(30), 10)
    );
    assert_eq!(rule.subsets[0].policy, rule.policy);
    assert_eq!(rule.subsets[1].policy.balance, Balance::Random);
    assert_eq!(rule.subsets[1].policy.max_connections, Some(10));
    assert!(s.notes()[0].1.contains("connectionPool.http"));
}

#[test]
fn fault_injection_shares_are_fractions() {
    let s = set("- apiVersion: mesh.io/v1alpha1\n  kind: FaultInjection\n  metadata: {name: chaos, namespace: shop}\n  spec:\n    targetRefs: [{kind: Service, name: echo}]\n    sources: [{serviceAccount: client}]\n    abort: {percentage: 10}\n    delay: {percentage: 50, fixedDelay: 200ms}\n").unwrap();
    let f = &s.faults("echo.shop.svc.cluster.local")[0];
    assert!((f.abort - 0.1).abs() < 1e-9);
    assert_eq!(f.delay, Some((0.5, Duration::from_millis(200))));
    assert_eq!(f.sources[0].service_account.as_deref(), Some("client"));
}

#[test]
fn errors_name_the_document_and_field() {
    let cases = [
        (
            "- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: d}\n  spec: {hosts: [a]}\n",
            "spec.hosts",
        ),
        (
            "- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: d}\n  spec: {trafficPolicy: {}}\n",
            "spec.host",
        ),
        (
            "- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {name: r}\n  spec:\n    parentRefs: [{group: '', kind: Service, name: a}]\n    rules: [{backendRefs: [{name: b}]}]\n",
            "spec.rules[0].backendRefs[0].port",
        ),
        (
            "- apiVersion: mesh.io/v1alpha1\n  kind: FaultInjection\n  metadata: {name: f}\n  spec:\n    targetRefs: [{kind: Service, name: a}]\n    abort: {percentage: 120}\n",
            "spec.abort.percentage",
        ),
        (
            "- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata: {name: v}\n  spec: {hosts: [a], tcp: [{route: []}]}\n",
            "spec.tcp[0].route",
        ),
        (
            "- apiVersion: security.istio.io/v1\n  kind: VirtualService\n  metadata: {name: v}\n  spec: {hosts: [a]}\n",
            "apiVersion",
        ),
    ];
    for (yaml, field) in cases {
        let e = set(yaml).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    let twice = "- apiVersion: mesh.io/v1alpha1\n  kind: FaultInjection\n  metadata: {name: f}\n  spec: {targetRefs: [{kind: Service, name: a}], abort: {percentage: 1}}\n";
    let e = set(&format!("{twice}{twice}")).unwrap_err();
    assert_eq!((e.index, e.field.as_str()), (1, "metadata.name"));
}

#[test]
fn one_route_per_service_settled_by_kind_then_name() {
    let vs = "- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata: {name: a-vs}\n  spec: {hosts: [echo], tcp: [{route: [{destination: {host: v1}}]}]}\n";
    let route = "- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {name: z-route}\n  spec:\n    parentRefs: [{group: '', kind: Service, name: echo}]\n    rules: [{backendRefs: [{name: v2, port: 80}]}]\n";
    for text in [format!("{vs}{route}"), format!("{route}{vs}")] {
        let s = set(&text).unwrap();
        let r = s.route("echo.default.svc.cluster.local").unwrap();
        assert_eq!(&*r.origin, "TCPRoute default/z-route");
        assert!(
            s.notes()
                .iter()
                .any(|(d, _)| d == "VirtualService default/a-vs")
        );
    }
}
