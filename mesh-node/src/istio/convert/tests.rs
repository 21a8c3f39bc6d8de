//! Every field of the conversion and its errors; the authorizations' semantics decided by the
//! policy engine itself.

use std::net::IpAddr;

use prost::Message as _;

use super::*;
use crate::{
    identity::Identity,
    istio::proto::{
        security::{self as sec, string_match::MatchType},
        workload as wl,
    },
    policy::{ConnInfo, PolicyDocument, PolicyStore},
};

const ROOT: &str = "istio-system";

/// A change to a message, for tables of cases.
type Change<T> = fn(&mut T);

fn cx() -> Context<'static> {
    Context {
        node: "node-a",
        trust_domain: "cluster.local",
        root_namespace: ROOT,
    }
}

fn octets(ip: &str) -> Vec<u8> {
    match ip.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn xds_workload(name: &str, ns: &str, ips: &[&str]) -> wl::Workload {
    wl::Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.to_owned(),
        namespace: ns.to_owned(),
        addresses: ips.iter().map(|ip| octets(ip)).collect(),
        node: "node-a".to_owned(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        ..wl::Workload::default()
    }
}

fn encode_workload(w: wl::Workload) -> Vec<u8> {
    wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    }
    .encode_to_vec()
}

fn encode_service(s: wl::Service) -> Vec<u8> {
    wl::Address {
        r#type: Some(wl::address::Type::Service(s)),
    }
    .encode_to_vec()
}

fn convert_workload(w: wl::Workload) -> MeshWorkload {
    match address(&encode_workload(w), &cx()) {
        Ok(Address::Workload(w)) => *w,
        other => panic!("expected a workload, got {other:?}"),
    }
}

fn workload_error(w: wl::Workload) -> ConvertError {
    match address(&encode_workload(w), &cx()) {
        Err(e) => e,
        Ok(other) => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn workload_fields() {
    let mut w = xds_workload("web-1", "shop", &["10.1.0.5", "fd00::5"]);
    w.service_account = "web".to_owned();
    w.canonical_name = "web".to_owned();
    w.workload_name = "web".to_owned();
    w.canonical_revision = "v2".to_owned();
    w.cluster_id = "east".to_owned();
    w.network = "net1".to_owned();
    w.locality = Some(wl::Locality {
        region: "eu".to_owned(),
        zone: "eu-1a".to_owned(),
        subzone: "rack4".to_owned(),
    });
    w.authorization_policies = vec!["shop/only-frontend".to_owned()];
    w.services.insert(
        "shop/web.shop.svc.cluster.local".to_owned(),
        wl::PortList {
            ports: vec![
                wl::Port {
                    service_port: 80,
                    target_port: 8080,
                },
                wl::Port {
                    service_port: 443,
                    target_port: 0,
                },
            ],
        },
    );
    let m = convert_workload(w.clone());
    let labels: Vec<(&str, &str)> = m
        .workload
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            (CANONICAL_NAME_LABEL, "web"),
            (CANONICAL_REVISION_LABEL, "v2"),
            (CLUSTER_LABEL, "east"),
            (SUBZONE_LABEL, "rack4"),
            (NETWORK_LABEL, "net1"),
            (REGION_LABEL, "eu"),
            (ZONE_LABEL, "eu-1a"),
            ("xds.mesh.io/authorization.shop/only-frontend", "true"),
            (NAMESPACE_LABEL, "shop"),
            (WORKLOAD_NAME_LABEL, "web"),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    assert_eq!(m.workload.name, "web-1");
    assert_eq!(m.workload.namespace, "shop");
    assert_eq!(m.workload.service_account, "web");
    assert_eq!(
        m.workload.ips,
        vec![
            "10.1.0.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    assert_eq!(m.workload.node, "node-a");
    assert_eq!(m.workload.netns, None);
    assert!(m.workload.enrolled, "on this node, HBONE, pod network");
    assert!(m.healthy);
    assert_eq!(m.zone.as_deref(), Some("eu-1a"));
    assert_eq!(m.foreign_trust_domain, None);
    assert_eq!(
        m.services["shop/web.shop.svc.cluster.local"],
        [(80, 8080)].into(),
        "only ports that differ"
    );

    // Defaults and the enrollment conditions.
    let mut bare = xds_workload("b", "shop", &["10.1.0.6"]);
    bare.status = wl::WorkloadStatus::Unhealthy as i32;
    bare.trust_domain = "cluster.local".to_owned();
    let m = convert_workload(bare.clone());
    assert_eq!(m.workload.service_account, "default");
    assert_eq!(m.workload.labels.len(), 1, "only the namespace label");
    assert!(!m.healthy);
    assert_eq!(m.zone, None);
    assert_eq!(m.foreign_trust_domain, None, "the mesh's own");
    bare.trust_domain = "other.example".to_owned();
    assert_eq!(
        convert_workload(bare.clone())
            .foreign_trust_domain
            .as_deref(),
        Some("other.example"),
        "kept, noted"
    );
    // A workload of another node is in the mesh too (its peers tunnel to it).
    let mut remote = xds_workload("x", "shop", &["10.1.0.7"]);
    remote.node = "node-b".to_owned();
    assert!(convert_workload(remote).workload.enrolled, "another node");
    for (change, why) in [
        (
            (|w: &mut wl::Workload| w.tunnel_protocol = wl::TunnelProtocol::None as i32)
                as fn(&mut wl::Workload),
            "no HBONE",
        ),
        (
            |w: &mut wl::Workload| w.network_mode = wl::NetworkMode::HostNetwork as i32,
            "host network",
        ),
    ] {
        let mut w = xds_workload("x", "shop", &["10.1.0.7"]);
        change(&mut w);
        assert!(!convert_workload(w).workload.enrolled, "{why}");
    }
}

#[test]
fn workload_errors_name_their_field() {
    let mut w = xds_workload("x", "shop", &["10.1.0.7"]);
    w.addresses.push(vec![1, 2, 3, 4, 5]);
    assert_eq!(
        workload_error(w),
        ConvertError::AddressLength {
            field: "workload.addresses[1]".to_owned(),
            len: 5
        }
    );
    let cases: [(Change<wl::Workload>, &str); 8] = [
        (|w| w.name.clear(), "workload.name"),
        (
            |w| "Bad/Ns".clone_into(&mut w.namespace),
            "workload.namespace",
        ),
        (
            |w| "a/b".clone_into(&mut w.service_account),
            "workload.service_account",
        ),
        (|w| w.tunnel_protocol = 7, "workload.tunnel_protocol"),
        (|w| w.network_mode = 9, "workload.network_mode"),
        (|w| w.status = 5, "workload.status"),
        (
            |w| w.authorization_policies = vec!["no-slash".to_owned()],
            "workload.authorization_policies[0]",
        ),
        (
            |w| {
                w.services.insert(
                    "shop/s".to_owned(),
                    wl::PortList {
                        ports: vec![wl::Port {
                            service_port: 80,
                            target_port: 70_000,
                        }],
                    },
                );
            },
            "workload.services[shop/s].ports[0].target_port",
        ),
    ];
    for (change, field) in cases {
        let mut w = xds_workload("x", "shop", &["10.1.0.7"]);
        change(&mut w);
        let e = workload_error(w);
        assert!(
            e.to_string().contains(&format!("`{field}`")),
            "{field}: {e}"
        );
    }
    assert!(matches!(
        address(b"\xff\xff", &cx()),
        Err(ConvertError::Decode { .. })
    ));
    assert_eq!(
        address(&wl::Address { r#type: None }.encode_to_vec(), &cx()),
        Err(ConvertError::Missing {
            field: "type".to_owned()
        })
    );
}

#[test]
fn hostname_only_workloads_and_headless_services_are_skipped() {
    let mut w = xds_workload("ext", "shop", &[]);
    w.hostname = "db.example.com".to_owned();
    assert!(matches!(
        address(&encode_workload(w), &cx()),
        Ok(Address::Skipped(_))
    ));
    let headless = wl::Service {
        name: "h".to_owned(),
        namespace: "shop".to_owned(),
        hostname: "h.shop.svc.cluster.local".to_owned(),
        ports: vec![wl::Port {
            service_port: 80,
            target_port: 0,
        }],
        ..wl::Service::default()
    };
    assert!(matches!(
        address(&encode_service(headless), &cx()),
        Ok(Address::Skipped(_))
    ));
}

fn xds_service() -> wl::Service {
    wl::Service {
        name: "web".to_owned(),
        namespace: "shop".to_owned(),
        hostname: "web.shop.svc.cluster.local".to_owned(),
        addresses: vec![
            wl::NetworkAddress {
                network: String::new(),
                address: octets("10.96.0.10"),
            },
            wl::NetworkAddress {
                network: String::new(),
                address: octets("fd00:96::10"),
            },
        ],
        ports: vec![
            wl::Port {
                service_port: 80,
                target_port: 8080,
            },
            wl::Port {
                service_port: 443,
                target_port: 0,
            },
        ],
        ..wl::Service::default()
    }
}

fn convert_service(s: wl::Service) -> Result<MeshService, ConvertError> {
    match address(&encode_service(s), &cx())? {
        Address::Service(s) => Ok(*s),
        other => panic!("expected a service, got {other:?}"),
    }
}

#[test]
fn service_fields_and_endpoints() {
    let s = convert_service(xds_service()).unwrap();
    assert_eq!(s.key, "shop/web.shop.svc.cluster.local");
    assert_eq!(s.service.name, "web");
    assert_eq!(s.service.namespace, "shop");
    assert_eq!(
        s.service.addresses,
        vec![
            "10.96.0.10".parse::<IpAddr>().unwrap(),
            "fd00:96::10".parse().unwrap()
        ]
    );
    assert_eq!(
        s.service.ports,
        vec![
            ServicePort {
                name: None,
                port: 80,
                target_port: Some(8080)
            },
            ServicePort {
                name: None,
                port: 443,
                target_port: None
            }
        ],
        "target 0 is the same port"
    );
    assert_eq!(s.service.load_balancing, Locality::Any);

    let mut a = xds_workload("web-1", "shop", &["10.1.0.5"]);
    a.locality = Some(wl::Locality {
        zone: "z1".to_owned(),
        ..wl::Locality::default()
    });
    a.services.insert(
        s.key.clone(),
        wl::PortList {
            ports: vec![wl::Port {
                service_port: 80,
                target_port: 9090,
            }],
        },
    );
    let mut b = xds_workload("web-2", "shop", &["10.1.0.6"]);
    b.node = "node-b".to_owned();
    b.status = wl::WorkloadStatus::Unhealthy as i32;
    b.services.insert(s.key.clone(), wl::PortList::default());
    let other = xds_workload("db", "shop", &["10.1.0.9"]);
    let (a, b, other) = (
        convert_workload(a),
        convert_workload(b),
        convert_workload(other),
    );
    let services = services_with_endpoints([&s], &[&a, &b, &other]);
    let endpoints = &services[0].endpoints;
    assert_eq!(endpoints.len(), 2, "only the workloads naming the service");
    assert_eq!(endpoints[0].address, "10.1.0.5".parse::<IpAddr>().unwrap());
    assert!(endpoints[0].ready);
    assert_eq!(endpoints[0].node.as_deref(), Some("node-a"));
    assert_eq!(endpoints[0].zone.as_deref(), Some("z1"));
    assert_eq!(
        endpoints[0].ports,
        [(80, 9090)].into(),
        "the workload's port"
    );
    assert!(!endpoints[1].ready, "unhealthy");
    assert_eq!(endpoints[1].node.as_deref(), Some("node-b"));
    assert!(endpoints[1].ports.is_empty());
}

#[test]
fn service_errors_name_their_field() {
    let cases: [(Change<wl::Service>, &str); 7] = [
        (|s| s.name.clear(), "service.name"),
        (|s| s.hostname.clear(), "service.hostname"),
        (
            |s| s.addresses[1].address = vec![1; 3],
            "service.addresses[1].address",
        ),
        (
            |s| s.ports[0].service_port = 0,
            "service.ports[0].service_port",
        ),
        (
            |s| s.ports[1].target_port = 65_536,
            "service.ports[1].target_port",
        ),
        (
            |s| s.ports[1].service_port = 80,
            "service.ports[1].service_port",
        ),
        (
            |s| {
                s.load_balancing = Some(wl::LoadBalancing {
                    routing_preference: vec![42],
                    ..wl::LoadBalancing::default()
                });
            },
            "service.load_balancing.routing_preference[0]",
        ),
    ];
    for (change, field) in cases {
        let mut s = xds_service();
        change(&mut s);
        let e = convert_service(s).unwrap_err();
        assert!(
            e.to_string().contains(&format!("`{field}`")),
            "{field}: {e}"
        );
    }
}

#[test]
fn load_balancing_to_locality() {
    use wl::load_balancing::{Mode, Scope};
    for (prefs, mode, want) in [
        (vec![Scope::Node], Mode::Strict, Locality::NodeOnly),
        (vec![Scope::Node], Mode::Failover, Locality::PreferNode),
        (
            vec![Scope::Zone, Scope::Node],
            Mode::Strict,
            Locality::PreferNode,
        ),
        (
            vec![Scope::Region, Scope::Zone],
            Mode::Failover,
            Locality::PreferZone,
        ),
        (
            vec![Scope::Subzone],
            Mode::UnspecifiedMode,
            Locality::PreferZone,
        ),
        (vec![Scope::Network], Mode::Failover, Locality::Any),
        (vec![], Mode::Strict, Locality::Any),
    ] {
        let mut s = xds_service();
        s.load_balancing = Some(wl::LoadBalancing {
            routing_preference: prefs.iter().map(|p| *p as i32).collect(),
            mode: mode as i32,
            health_policy: 0,
        });
        assert_eq!(
            convert_service(s).unwrap().service.load_balancing,
            want,
            "{prefs:?} {mode:?}"
        );
    }
}

// --- Authorizations, decided by the policy engine ---

fn exact(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Exact(s.to_owned())),
    }
}
fn prefix(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Prefix(s.to_owned())),
    }
}
fn suffix(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Suffix(s.to_owned())),
    }
}
fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}
fn cidr(ip: &str, length: u32) -> sec::Address {
    sec::Address {
        address: octets(ip),
        length,
    }
}
fn clause(matches: Vec<sec::Match>) -> sec::Clause {
    sec::Clause { matches }
}

fn auth(
    scope: sec::Scope,
    action: sec::Action,
    rules: Vec<Vec<sec::Clause>>,
) -> sec::Authorization {
    sec::Authorization {
        name: "p".to_owned(),
        namespace: "shop".to_owned(),
        scope: scope as i32,
        action: action as i32,
        rules: rules
            .into_iter()
            .map(|clauses| sec::Rule { clauses })
            .collect(),
    }
}

fn store_of(auths: &[sec::Authorization]) -> PolicyStore {
    let docs: Vec<PolicyDocument> = auths
        .iter()
        .map(|a| authorization(&a.encode_to_vec(), ROOT).expect("converts"))
        .collect();
    PolicyStore::new(ROOT, &docs).expect("the converted documents form a store")
}

fn target(ns: &str, policies: &[&str]) -> Workload {
    // Distinct names: a store caches what applies by workload name.
    let name = format!("dst-{}", policies.join("-").replace('/', "."));
    let mut w = xds_workload(&name, ns, &["10.9.0.1"]);
    w.authorization_policies = policies.iter().map(|p| (*p).to_owned()).collect();
    convert_workload(w).workload
}

/// A connection from `src` (`ns/sa`, or `""` for plaintext) at `ip` to the target at
/// `dst_ip:port`.
fn allowed(
    store: &PolicyStore,
    w: &Workload,
    src: &str,
    ip: &str,
    dst_ip: &str,
    port: u16,
) -> bool {
    let identity = src
        .split_once('/')
        .map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
    store
        .authorize(
            w,
            &ConnInfo {
                src_ip: ip.parse().unwrap(),
                src_identity: identity.as_ref(),
                dst_ip: dst_ip.parse().unwrap(),
                dst_port: port,
            },
        )
        .allowed
}

#[test]
fn clauses_and_matches_combine_exactly() {
    // ALLOW when (namespace `front` AND port 80, OR principal prefix `cluster.local/ns/ops/`)
    //        AND (source in 10.0.0.0/8 but not 10.6.0.0/16)
    //   OR when the destination is 10.9.0.1 on a port other than 22.
    let rule1 = vec![
        clause(vec![
            sec::Match {
                namespaces: vec![exact("front")],
                destination_ports: vec![80],
                ..sec::Match::default()
            },
            sec::Match {
                principals: vec![prefix("cluster.local/ns/ops/")],
                ..sec::Match::default()
            },
        ]),
        clause(vec![sec::Match {
            source_ips: vec![cidr("10.0.0.0", 8)],
            not_source_ips: vec![cidr("10.6.0.0", 16)],
            ..sec::Match::default()
        }]),
    ];
    let rule2 = vec![clause(vec![sec::Match {
        destination_ips: vec![cidr("10.9.0.1", 32)],
        not_destination_ports: vec![22],
        ..sec::Match::default()
    }])];
    let s = store_of(&[auth(
        sec::Scope::Namespace,
        sec::Action::Allow,
        vec![rule1, rule2],
    )]);
    let w = target("shop", &[]);
    let at = |src, ip, dst, port| allowed(&s, &w, src, ip, dst, port);
    assert!(
        at("front/a", "10.1.1.1", "10.9.0.2", 80),
        "rule 1, first match"
    );
    assert!(
        !at("front/a", "10.1.1.1", "10.9.0.2", 81),
        "kinds of a match are AND-ed"
    );
    assert!(
        at("ops/x", "10.1.1.1", "10.9.0.2", 5432),
        "rule 1, second match (OR)"
    );
    assert!(!at("front/a", "10.6.1.1", "10.9.0.2", 80), "not_source_ips");
    assert!(
        !at("front/a", "192.168.0.1", "10.9.0.2", 80),
        "clauses are AND-ed"
    );
    assert!(
        !at("", "10.1.1.1", "10.9.0.2", 80),
        "plaintext has no namespace"
    );
    assert!(
        at("any/one", "192.168.0.1", "10.9.0.1", 443),
        "rule 2 (rules OR-ed)"
    );
    assert!(
        !at("any/one", "192.168.0.1", "10.9.0.1", 22),
        "not_destination_ports"
    );
    assert!(
        at("", "192.168.0.1", "10.9.0.1", 443),
        "rule 2 needs no identity"
    );
}

#[test]
fn string_matches_and_negations() {
    let rule = |m: sec::Match| vec![clause(vec![m])];
    let s = store_of(&[auth(
        sec::Scope::Namespace,
        sec::Action::Allow,
        vec![
            rule(sec::Match {
                namespaces: vec![exact("a"), prefix("team-"), suffix("-prod")],
                not_namespaces: vec![exact("team-blocked")],
                ..sec::Match::default()
            }),
            rule(sec::Match {
                principals: vec![presence()],
                destination_ports: vec![9000],
                ..sec::Match::default()
            }),
            rule(sec::Match {
                not_principals: vec![suffix("/sa/bad")],
                destination_ports: vec![9001],
                ..sec::Match::default()
            }),
        ],
    )]);
    let w = target("shop", &[]);
    let at = |src, port| allowed(&s, &w, src, "10.1.1.1", "10.9.0.1", port);
    assert!(at("a/x", 1), "exact");
    assert!(!at("ab/x", 1), "exact is not a prefix");
    assert!(at("team-blue/x", 1), "prefix");
    assert!(at("shop-prod/x", 1), "suffix");
    assert!(!at("team-blocked/x", 1), "not_namespaces");
    assert!(!at("other/x", 1));
    assert!(at("other/x", 9000), "presence: any identity");
    assert!(!at("", 9000), "presence: plaintext has none");
    assert!(at("other/x", 9001), "not_principals");
    assert!(at("", 9001), "a not_ kind matches what has no value");
    assert!(!at("other/bad", 9001), "not_principals excludes");
}

#[test]
fn empty_rules_clauses_and_matches() {
    let w = target("shop", &[]);
    let decide = |rules: Vec<Vec<sec::Clause>>, action| {
        let s = store_of(&[auth(sec::Scope::Namespace, action, rules)]);
        allowed(&s, &w, "x/y", "10.1.1.1", "10.9.0.1", 80)
    };
    assert!(
        !decide(vec![], sec::Action::Allow),
        "no rules: the ALLOW matches nothing"
    );
    assert!(
        decide(vec![vec![]], sec::Action::Allow),
        "a rule without clauses matches all"
    );
    assert!(
        decide(vec![vec![clause(vec![])]], sec::Action::Allow),
        "a clause without matches holds"
    );
    assert!(
        !decide(
            vec![vec![clause(vec![sec::Match::default()])]],
            sec::Action::Allow
        ),
        "an empty match never matches (as in ztunnel)"
    );
    assert!(
        !decide(vec![vec![]], sec::Action::Deny),
        "a DENY rule without clauses denies all"
    );
    assert!(
        decide(vec![], sec::Action::Deny),
        "a DENY without rules denies nothing"
    );
}

#[test]
fn scopes() {
    let deny_all = |scope, namespace: &str| {
        let mut a = auth(scope, sec::Action::Deny, vec![vec![]]);
        namespace.clone_into(&mut a.namespace);
        a
    };
    let conn = |s: &PolicyStore, w: &Workload| allowed(s, w, "x/y", "10.1.1.1", "10.9.0.1", 80);
    let shop = target("shop", &[]);
    let other = target("other", &[]);
    let root = target(ROOT, &[]);

    let global = store_of(&[deny_all(sec::Scope::Global, ROOT)]);
    assert!(!conn(&global, &shop) && !conn(&global, &other) && !conn(&global, &root));

    let namespace = store_of(&[deny_all(sec::Scope::Namespace, "shop")]);
    assert!(!conn(&namespace, &shop));
    assert!(conn(&namespace, &other), "another namespace");

    let in_root = store_of(&[deny_all(sec::Scope::Namespace, ROOT)]);
    assert!(!conn(&in_root, &root));
    assert!(
        conn(&in_root, &shop),
        "a NAMESPACE policy in the root namespace is not global"
    );

    let selected = store_of(&[deny_all(sec::Scope::WorkloadSelector, "shop")]);
    assert!(!conn(&selected, &target("shop", &["shop/p"])), "listed");
    assert!(conn(&selected, &shop), "not listed");
    assert!(
        conn(&selected, &target("shop", &["shop/q"])),
        "another policy listed"
    );
    assert!(
        !conn(&selected, &target("other", &["shop/p"])),
        "exactly the workloads listing it"
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn what_cannot_be_converted_exactly_is_an_error() {
    let with_match = |m: sec::Match| {
        auth(
            sec::Scope::Namespace,
            sec::Action::Allow,
            vec![vec![clause(vec![m])]],
        )
    };
    let cases: Vec<(sec::Authorization, &str)> = vec![
        (
            with_match(sec::Match {
                namespaces: vec![exact("a*")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].namespaces[0]",
        ),
        (
            with_match(sec::Match {
                principals: vec![exact("")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].principals[0]",
        ),
        (
            with_match(sec::Match {
                not_namespaces: vec![suffix("x*")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].not_namespaces[0]",
        ),
        (
            with_match(sec::Match {
                namespaces: vec![prefix("")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].namespaces[0]",
        ),
        (
            with_match(sec::Match {
                principals: vec![sec::StringMatch { match_type: None }],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].principals[0].match_type",
        ),
        (
            with_match(sec::Match {
                destination_ports: vec![0],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].destination_ports[0]",
        ),
        (
            with_match(sec::Match {
                not_destination_ports: vec![65_536],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].not_destination_ports[0]",
        ),
        (
            with_match(sec::Match {
                source_ips: vec![cidr("10.0.0.0", 33)],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].source_ips[0].length",
        ),
        (
            with_match(sec::Match {
                destination_ips: vec![sec::Address {
                    address: vec![10, 0, 0],
                    length: 8,
                }],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].destination_ips[0].address",
        ),
        (
            sec::Authorization {
                scope: 3,
                ..auth(sec::Scope::Global, sec::Action::Allow, vec![])
            },
            "scope",
        ),
        (
            sec::Authorization {
                action: 2,
                ..auth(sec::Scope::Global, sec::Action::Allow, vec![])
            },
            "action",
        ),
        (
            sec::Authorization {
                name: String::new(),
                ..auth(sec::Scope::Global, sec::Action::Allow, vec![])
            },
            "name",
        ),
    ];
    for (a, field) in cases {
        let e = authorization(&a.encode_to_vec(), ROOT).unwrap_err();
        assert!(
            e.to_string().contains(&format!("`{field}`")),
            "{field}: {e}"
        );
    }

    // 33 clauses of two matches each: 2^33 rules in normal form.
    let wide = clause(vec![
        sec::Match {
            destination_ports: vec![1],
            ..sec::Match::default()
        },
        sec::Match {
            destination_ports: vec![2],
            ..sec::Match::default()
        },
    ]);
    let a = auth(
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![vec![wide.clone(); 33]],
    );
    assert!(matches!(
        authorization(&a.encode_to_vec(), ROOT),
        Err(ConvertError::Inexact { .. })
    ));
    // Ten such clauses (1024 rules) are still exact.
    let a = auth(
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![vec![wide; 10]],
    );
    assert_eq!(
        authorization(&a.encode_to_vec(), ROOT)
            .unwrap()
            .spec
            .rules
            .map(|r| r.len()),
        Some(1024)
    );
}

#[test]
fn unknown_fields_are_detected() {
    let a = auth(sec::Scope::Namespace, sec::Action::Allow, vec![vec![]]);
    let mut bytes = a.encode_to_vec();
    assert!(authorization(&bytes, ROOT).is_ok());
    // Field 6 (`dry_run` in newer istiod), varint 1: silently dropped by prost.
    bytes.extend_from_slice(&[6 << 3, 1]);
    assert_eq!(
        authorization(&bytes, ROOT),
        Err(ConvertError::UnknownFields {
            received: bytes.len(),
            understood: bytes.len() - 2
        })
    );
    // An unknown field inside a match is found too.
    let mut m = sec::Match {
        destination_ports: vec![80],
        ..sec::Match::default()
    }
    .encode_to_vec();
    m.extend_from_slice(&[11 << 3 | 2, 0]);
    let clause_bytes = [&[2 << 3 | 2, u8::try_from(m.len()).unwrap()][..], &m].concat();
    let rule_bytes = [
        &[1 << 3 | 2, u8::try_from(clause_bytes.len()).unwrap()][..],
        &clause_bytes,
    ]
    .concat();
    let mut nested = auth(sec::Scope::Namespace, sec::Action::Allow, vec![]).encode_to_vec();
    nested.extend_from_slice(&[5 << 3 | 2, u8::try_from(rule_bytes.len()).unwrap()]);
    nested.extend_from_slice(&rule_bytes);
    assert!(
        sec::Authorization::decode(&nested[..]).unwrap().rules[0].clauses[0].matches[0]
            .destination_ports
            == [80],
        "the test message decodes"
    );
    assert!(matches!(
        authorization(&nested, ROOT),
        Err(ConvertError::UnknownFields { .. })
    ));
}

#[test]
fn strictest_of_its_kind_on_its_scope() {
    let shop = target("shop", &[]);
    let other = target("other", &[]);
    let listed = target("shop", &["shop/p"]);
    let conn = |s: &PolicyStore, w: &Workload| allowed(s, w, "x/y", "10.1.1.1", "10.9.0.1", 80);
    let store = |doc: PolicyDocument| PolicyStore::new(ROOT, &[doc]).expect("a valid stand-in");

    // An ALLOW that cannot be converted allows nothing on its scope.
    let mut bad_allow = auth(sec::Scope::Namespace, sec::Action::Allow, vec![vec![]]);
    bad_allow.rules[0].clauses = vec![clause(vec![sec::Match {
        destination_ports: vec![0],
        ..sec::Match::default()
    }])];
    let bytes = bad_allow.encode_to_vec();
    assert!(authorization(&bytes, ROOT).is_err());
    let s = store(strictest_authorization(&bytes, "shop/p", ROOT));
    assert!(!conn(&s, &shop), "its namespace: nothing allowed");
    assert!(conn(&s, &other), "other namespaces unaffected");

    // A DENY denies everything on its scope.
    let mut bad_deny = bad_allow.clone();
    bad_deny.action = sec::Action::Deny as i32;
    bad_deny.scope = sec::Scope::WorkloadSelector as i32;
    let s = store(strictest_authorization(
        &bad_deny.encode_to_vec(),
        "shop/p",
        ROOT,
    ));
    assert!(!conn(&s, &listed), "the selected workload");
    assert!(conn(&s, &shop), "only the selected workloads");

    // An unknown action: denied; an unknown scope: the namespace.
    let mut unknown = bad_allow.clone();
    unknown.action = 9;
    unknown.scope = 9;
    let s = store(strictest_authorization(
        &unknown.encode_to_vec(),
        "shop/p",
        ROOT,
    ));
    assert!(!conn(&s, &shop) && conn(&s, &other));

    // Nothing decodes: DENY on the namespace of the resource name.
    let s = store(strictest_authorization(b"\xff\xff\xff", "shop/p", ROOT));
    assert!(!conn(&s, &shop) && conn(&s, &other));
    let s = store(strictest_authorization(b"\xff\xff\xff", "garbage", ROOT));
    assert!(
        !conn(&s, &shop) && !conn(&s, &other),
        "no namespace: mesh-wide"
    );
}

#[test]
fn document_names_say_where_they_come_from() {
    let a = auth(sec::Scope::WorkloadSelector, sec::Action::Allow, vec![]);
    let doc = authorization(&a.encode_to_vec(), ROOT).unwrap();
    assert_eq!(doc.metadata.namespace, ROOT);
    assert_eq!(doc.metadata.name, "shop.p");
    let a = auth(sec::Scope::Namespace, sec::Action::Allow, vec![]);
    let doc = authorization(&a.encode_to_vec(), ROOT).unwrap();
    assert_eq!(
        (doc.metadata.namespace.as_str(), doc.metadata.name.as_str()),
        ("shop", "p")
    );
}
