use super::*;

fn workload(name: &str, ip: &str, node: &str, app: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: "shop".into(),
        service_account: "default".into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ips: vec![ip.parse().unwrap()],
        node: node.into(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    }
}

fn plain(
    services: &[Service],
    workloads: &[Workload],
    node: &str,
    zone: Option<&str>,
) -> ServiceTable {
    ServiceTable::build(
        services,
        workloads,
        &TrafficSet::default(),
        &Registry::default(),
        (node, zone),
        "",
    )
}

fn service(yaml: &str) -> Service {
    serde_yaml_ng::from_str(yaml).expect("service")
}

#[test]
fn selector_endpoints_round_robin_on_target_port() {
    let workloads = [
        workload("web-1", "198.18.1.2", "a", "web"),
        workload("web-2", "198.18.2.2", "b", "web"),
        workload("db-1", "198.18.2.3", "b", "db"),
    ];
    let s = service(
        "{name: web, namespace: shop, addresses: [198.19.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}",
    );
    let table = plain(&[s], &workloads, "a", None);
    let b = table
        .lookup("198.19.0.10:80".parse().unwrap())
        .expect("vip");
    assert_eq!(b.service.hostname.as_ref(), "web.shop.svc.cluster.local");
    let picks: Vec<_> = (0..4).map(|_| b.pick().unwrap().to_string()).collect();
    assert_eq!(
        picks,
        [
            "198.18.1.2:8080",
            "198.18.2.2:8080",
            "198.18.1.2:8080",
            "198.18.2.2:8080"
        ]
    );
    assert!(table.lookup("198.19.0.10:81".parse().unwrap()).is_none());
}

#[test]
fn explicit_endpoints_honour_readiness_ports_and_family() {
    let s = service(
        "name: api\naddresses: [198.19.0.11, 'fd6d:ffff::11']\nports: [{port: 443, targetPort: 8443}]\nendpoints:\n- {address: 198.18.1.5}\n- {address: 198.18.1.6, ready: false}\n- {address: 198.18.1.7, ports: {443: 9443}}\n- {address: 'fd6d::5'}\n",
    );
    let table = plain(&[s], &[], "a", None);
    let v4 = table.lookup("198.19.0.11:443".parse().unwrap()).unwrap();
    let mut seen: Vec<_> = (0..2).map(|_| v4.pick().unwrap().to_string()).collect();
    seen.sort();
    assert_eq!(seen, ["198.18.1.5:8443", "198.18.1.7:9443"]);
    let v6 = table
        .lookup("[fd6d:ffff::11]:443".parse().unwrap())
        .unwrap();
    assert_eq!(v6.len(), 1);
    assert_eq!(v6.pick().unwrap().to_string(), "[fd6d::5]:8443");
}

#[test]
fn locality_preferences() {
    let endpoints = "endpoints:\n- {address: 198.18.1.5, node: a, zone: z1}\n- {address: 198.18.2.5, node: b, zone: z1}\n- {address: 198.18.3.5, node: c, zone: z2}\n";
    let picks = |mode: &str, node: &str, zone: Option<&str>| {
        let s = service(&format!(
            "name: s\naddresses: [198.19.0.12]\nports: [{{port: 80}}]\nloadBalancing: {mode}\n{endpoints}"
        ));
        let table = plain(&[s], &[], node, zone);
        let b = table.lookup("198.19.0.12:80".parse().unwrap()).unwrap();
        let mut all: Vec<String> = (0..b.len())
            .map(|_| b.pick().unwrap().ip().to_string())
            .collect();
        all.sort();
        all
    };
    assert_eq!(picks("any", "a", Some("z1")).len(), 3);
    assert_eq!(
        picks("preferZone", "c", Some("z1")),
        ["198.18.1.5", "198.18.2.5"]
    );
    assert_eq!(picks("preferZone", "c", None).len(), 3);
    assert_eq!(picks("preferNode", "b", Some("z1")), ["198.18.2.5"]);
    assert_eq!(picks("preferNode", "d", Some("z2")), ["198.18.3.5"]);
    assert_eq!(picks("preferNode", "d", Some("z9")).len(), 3);
    assert_eq!(picks("nodeOnly", "c", None), ["198.18.3.5"]);
    assert!(picks("nodeOnly", "d", None).is_empty());
}

#[test]
fn the_local_network_is_preferred_and_other_networks_take_over_when_none_is_ready() {
    let mut remote = workload("web-west", "198.18.9.2", "west-node", "web");
    remote.network = "west".into();
    let mut here = workload("web-here", "198.18.1.2", "a", "web");
    here.network = "east".into();
    let unnamed = workload("web-unnamed", "198.18.1.3", "b", "web");
    let table_for = |workloads: &[Workload], network: &str| {
        let s = service(
            "{name: web, namespace: shop, addresses: [198.19.0.10], ports: [{port: 80}], selector: {app: web}}",
        );
        ServiceTable::build(
            &[s],
            workloads,
            &TrafficSet::default(),
            &Registry::default(),
            ("a", None),
            network,
        )
    };
    let endpoints = |table: &ServiceTable| {
        let b = table.lookup("198.19.0.10:80".parse().unwrap()).unwrap();
        let mut all: Vec<String> = (0..b.len())
            .map(|_| b.pick().unwrap().ip().to_string())
            .collect();
        all.sort();
        all
    };
    // This node is on `east`: its own network's endpoints (named, or naming none) only.
    let all = [remote.clone(), here.clone(), unnamed.clone()];
    assert_eq!(
        endpoints(&table_for(&all, "east")),
        ["198.18.1.2", "198.18.1.3"]
    );
    // No local endpoint: the other network's.
    assert_eq!(
        endpoints(&table_for(std::slice::from_ref(&remote), "east")),
        ["198.18.9.2"]
    );
    // Seen from `west`, the roles swap: `here` is remote, and the unnamed one is local.
    assert_eq!(
        endpoints(&table_for(&[here, remote], "west")),
        ["198.18.9.2"]
    );
}

#[test]
fn no_ready_endpoint_picks_nothing() {
    let s =
        service("{name: s, addresses: [198.19.0.13], ports: [{port: 80}], selector: {app: none}}");
    let table = plain(&[s], &[], "a", None);
    let b = table.lookup("198.19.0.13:80".parse().unwrap()).unwrap();
    assert!(b.pick().is_none());
}

fn versioned(name: &str, ip: &str, version: &str) -> Workload {
    let mut w = workload(name, ip, "b", "echo");
    w.labels.insert("version".into(), version.into());
    w
}

fn documents(yaml: &str) -> TrafficSet {
    let docs: Vec<crate::traffic::TrafficDocument> =
        serde_yaml_ng::from_str(yaml).expect("documents");
    TrafficSet::new(&docs).expect("valid documents")
}

/// `echo` (the front, 198.19.1.1:80) and its two versions as services of their own.
fn canary_services() -> Vec<Service> {
    vec![
        service(
            "{name: echo, namespace: shop, addresses: [198.19.1.1], ports: [{port: 80}], selector: {app: echo}}",
        ),
        service(
            "{name: echo-v1, namespace: shop, addresses: [198.19.1.2], ports: [{port: 80}], selector: {version: v1}}",
        ),
        service(
            "{name: echo-v2, namespace: shop, addresses: [198.19.1.3], ports: [{port: 80}], selector: {version: v2}}",
        ),
    ]
}

fn canary_workloads() -> Vec<Workload> {
    let mut client = workload("client", "198.18.9.9", "a", "client");
    client.service_account = "client".into();
    vec![
        versioned("echo-1", "198.18.1.2", "v1"),
        versioned("echo-2", "198.18.1.3", "v2"),
        client,
    ]
}

fn split_route(v1: u32, v2: u32) -> String {
    format!(
        "- apiVersion: gateway.networking.k8s.io/v1alpha2\n  kind: TCPRoute\n  metadata: {{name: canary, namespace: shop}}\n  spec:\n    parentRefs: [{{group: '', kind: Service, name: echo, port: 80}}]\n    rules:\n    - backendRefs:\n      - {{name: echo-v1, port: 80, weight: {v1}}}\n      - {{name: echo-v2, port: 80, weight: {v2}}}\n"
    )
}

/// The client of [`canary_workloads`] as the source of a connection.
fn client_source<'a>(workloads: &'a [Workload], identity: &'a Identity) -> Source<'a> {
    Source {
        workload: &workloads[2],
        identity,
        ip: workloads[2].ips[0],
    }
}

/// Plans `n` connections from the client to `dst`; the destination each went to.
fn destinations(table: &ServiceTable, workloads: &[Workload], n: usize) -> Vec<String> {
    let client = &workloads[2];
    let identity = Identity::new("cluster.local", "shop", "client");
    let source = Source {
        workload: client,
        identity: &identity,
        ip: client.ips[0],
    };
    let dst: SocketAddr = "198.19.1.1:80".parse().unwrap();
    let backends = table.lookup(dst).expect("front service");
    (0..n)
        .map(|_| {
            let plan = backends.plan(&source, dst, Instant::now()).expect("plan");
            plan.cluster.name.to_string()
        })
        .collect()
}

#[test]
fn a_route_splits_by_weight_and_weight_zero_drains() {
    let (services, workloads) = (canary_services(), canary_workloads());
    let registry = Registry::default();
    let table = ServiceTable::build(
        &services,
        &workloads,
        &documents(&split_route(90, 10)),
        &registry,
        ("a", None),
        "",
    );
    let n = 4000;
    let v2 = destinations(&table, &workloads, n)
        .iter()
        .filter(|d| *d == "echo-v2.shop.svc.cluster.local")
        .count();
    // Binomial(4000, 0.1): mean 400, standard deviation 19; 5 deviations either side.
    assert!((305..=495).contains(&v2), "{v2} of {n} to v2");

    let drained = ServiceTable::build(
        &services,
        &workloads,
        &documents(&split_route(0, 100)),
        &registry,
        ("a", None),
        "",
    );
    let all = destinations(&drained, &workloads, 200);
    assert!(
        all.iter().all(|d| d == "echo-v2.shop.svc.cluster.local"),
        "weight 0 takes no new connection"
    );
    let none = ServiceTable::build(
        &services,
        &workloads,
        &documents(&split_route(0, 0)),
        &registry,
        ("a", None),
        "",
    );
    let dst: SocketAddr = "198.19.1.1:80".parse().unwrap();
    let identity = Identity::new("cluster.local", "shop", "client");
    let source = client_source(&workloads, &identity);
    assert_eq!(
        none.lookup(dst)
            .unwrap()
            .plan(&source, dst, Instant::now())
            .unwrap_err(),
        Refusal::NoBackend
    );
}

#[test]
fn virtual_service_subsets_select_by_label() {
    let (services, workloads) = (canary_services(), canary_workloads());
    let traffic = documents(
        "- apiVersion: networking.istio.io/v1\n  kind: VirtualService\n  metadata: {name: echo, namespace: shop}\n  spec:\n    hosts: [echo]\n    tcp:\n    - route: [{destination: {host: echo, subset: v2}}]\n- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: echo, namespace: shop}\n  spec:\n    host: echo\n    subsets:\n    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n",
    );
    let table = ServiceTable::build(
        &services,
        &workloads,
        &traffic,
        &Registry::default(),
        ("a", None),
        "",
    );
    let dst: SocketAddr = "198.19.1.1:80".parse().unwrap();
    let identity = Identity::new("cluster.local", "shop", "client");
    let source = client_source(&workloads, &identity);
    let plan = table
        .lookup(dst)
        .unwrap()
        .plan(&source, dst, Instant::now())
        .unwrap();
    assert_eq!(&*plan.cluster.name, "echo.shop.svc.cluster.local/v2");
    assert_eq!(
        plan.cluster.addresses().collect::<Vec<_>>(),
        ["198.18.1.3:80".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(plan.route.as_deref(), Some("VirtualService shop/echo"));
}

#[test]
fn pool_limits_and_rate_limits_refuse_the_excess() {
    let mut services = canary_services();
    services[0].connection_rate_limit = Some(crate::traffic::RateLimit {
        connections_per_second: 1,
        burst: Some(3),
        per_source: true,
    });
    let workloads = canary_workloads();
    let pool = documents(
        "- apiVersion: networking.istio.io/v1\n  kind: DestinationRule\n  metadata: {name: v1, namespace: shop}\n  spec:\n    host: echo-v1\n    trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}}}\n",
    );
    let registry = Registry::default();
    let table = ServiceTable::build(&services, &workloads, &pool, &registry, ("a", None), "");
    let v1: SocketAddr = "198.19.1.2:80".parse().unwrap();
    let identity = Identity::new("cluster.local", "shop", "client");
    let source = client_source(&workloads, &identity);
    let now = Instant::now();
    let backends = table.lookup(v1).unwrap();
    let first = backends.plan(&source, v1, now).expect("1 of 2");
    let second = backends.plan(&source, v1, now).expect("2 of 2");
    assert_eq!(
        backends.plan(&source, v1, now).unwrap_err(),
        Refusal::PoolFull("echo-v1.shop.svc.cluster.local".into())
    );
    drop(first);
    // The pool is counted across state changes.
    let rebuilt = ServiceTable::build(&services, &workloads, &pool, &registry, ("a", None), "");
    let third = rebuilt
        .lookup(v1)
        .unwrap()
        .plan(&source, v1, now)
        .expect("freed");
    assert!(rebuilt.lookup(v1).unwrap().plan(&source, v1, now).is_err());
    drop((second, third));

    // The front service: a burst of 3, then 1 a second, per source identity.
    let front: SocketAddr = "198.19.1.1:80".parse().unwrap();
    let backends = table.lookup(front).unwrap();
    let admitted = |at: Instant, identity: &Identity| {
        let source = client_source(&workloads, identity);
        (0..10)
            .filter(|_| backends.plan(&source, front, at).is_ok())
            .count()
    };
    assert_eq!(admitted(now, &identity), 3);
    let other = Identity::new("cluster.local", "shop", "other");
    assert_eq!(admitted(now, &other), 3, "a bucket per source");
    assert_eq!(admitted(now + Duration::from_millis(500), &identity), 0);
    assert_eq!(admitted(now + Duration::from_millis(1100), &identity), 1);
    assert_eq!(
        backends
            .plan(&source, front, now + Duration::from_millis(1200))
            .unwrap_err(),
        Refusal::RateLimited
    );
}

#[test]
fn faults_apply_to_their_sources_only() {
    let (services, workloads) = (canary_services(), canary_workloads());
    let faults = documents(
        "- apiVersion: mesh.io/v1alpha1\n  kind: FaultInjection\n  metadata: {name: chaos, namespace: shop}\n  spec:\n    targetRefs: [{kind: Service, name: echo}]\n    sources: [{serviceAccount: client}]\n    abort: {percentage: 100}\n- apiVersion: mesh.io/v1alpha1\n  kind: FaultInjection\n  metadata: {name: slow, namespace: shop}\n  spec:\n    targetRefs: [{kind: Service, name: echo-v1}]\n    delay: {percentage: 100, fixedDelay: 200ms}\n",
    );
    let table = ServiceTable::build(
        &services,
        &workloads,
        &faults,
        &Registry::default(),
        ("a", None),
        "",
    );
    let identity = Identity::new("cluster.local", "shop", "client");
    let front: SocketAddr = "198.19.1.1:80".parse().unwrap();
    let mut source = client_source(&workloads, &identity);
    assert_eq!(
        table
            .lookup(front)
            .unwrap()
            .plan(&source, front, Instant::now())
            .unwrap_err(),
        Refusal::Fault("FaultInjection shop/chaos".into())
    );
    let v1: SocketAddr = "198.19.1.2:80".parse().unwrap();
    let delayed = table
        .lookup(v1)
        .unwrap()
        .plan(&source, v1, Instant::now())
        .unwrap();
    assert_eq!(
        delayed.delay,
        Some((
            Duration::from_millis(200),
            "FaultInjection shop/slow".into()
        ))
    );
    // Another service account is not a source of the abort.
    source.workload = &workloads[0];
    assert!(
        table
            .lookup(front)
            .unwrap()
            .plan(&source, front, Instant::now())
            .is_ok()
    );
}

#[test]
fn validation_names_the_field() {
    let dup = [
        service("{name: a, addresses: [198.19.0.1], ports: [{port: 80}]}"),
        service("{name: b, addresses: [198.19.0.1], ports: [{port: 80}]}"),
    ];
    let (field, reason) = validate_services(&dup).unwrap_err();
    assert_eq!(field, "services[1].addresses[0]");
    assert!(reason.contains("default/a"), "{reason}");
    let no_port = [service("{name: a, addresses: [198.19.0.1], ports: []}")];
    assert_eq!(
        validate_services(&no_port).unwrap_err().0,
        "services[0].ports"
    );
    let zero = [service(
        "{name: a, addresses: [198.19.0.1], ports: [{port: 80, targetPort: 0}]}",
    )];
    assert_eq!(
        validate_services(&zero).unwrap_err().0,
        "services[0].ports[0]"
    );
}
