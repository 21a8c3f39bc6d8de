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

mod authorization;

#[test]
fn network_gateways_become_networks_with_the_gateway_workloads_identity() {
    let mut remote = xds_workload("echo-1", "shop", &["10.2.0.5"]);
    remote.network = "west".to_owned();
    remote.network_gateway = Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(
            wl::NetworkAddress {
                network: "west".to_owned(),
                address: octets("192.0.2.7"),
            },
        )),
        hbone_mtls_port: 15008,
    });
    let remote = convert_workload(remote);
    assert_eq!(
        remote.network_gateway,
        Some("192.0.2.7:15008".parse().unwrap())
    );
    assert_eq!(remote.workload.network, "west");
    let mut gateway = xds_workload("ew-1", "istio-gw", &["192.0.2.7"]);
    gateway.network = "west".to_owned();
    gateway.service_account = "ew".to_owned();
    let gateway = convert_workload(gateway);

    let found = networks(&[&remote, &gateway], &[]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "west");
    assert_eq!(
        found[0].gateways[0].identity("cluster.local").to_string(),
        "spiffe://cluster.local/ns/istio-gw/sa/ew"
    );
    // Without the gateway's workload: Istio's default east-west gateway identity.
    let found = networks(&[&remote], &[]);
    assert_eq!(
        found[0].gateways[0].identity("cluster.local").to_string(),
        "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"
    );
    // A network the file lists is the file's.
    let file = [Network {
        name: "west".to_owned(),
        gateways: vec![NetworkGateway {
            address: "198.51.100.1:15008".parse().unwrap(),
            namespace: "a".to_owned(),
            service_account: "b".to_owned(),
            trust_domain: None,
        }],
    }];
    assert_eq!(networks(&[&remote], &file), file);
    // A gateway by hostname is not resolved; a bad address is an error naming the field.
    let mut by_name = xds_workload("echo-2", "shop", &["10.2.0.6"]);
    by_name.network_gateway = Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Hostname(
            wl::NamespacedHostname::default(),
        )),
        hbone_mtls_port: 15008,
    });
    assert_eq!(convert_workload(by_name.clone()).network_gateway, None);
    by_name.network_gateway = Some(wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(
            wl::NetworkAddress {
                network: String::new(),
                address: vec![1, 2, 3],
            },
        )),
        hbone_mtls_port: 0,
    });
    assert!(
        workload_error(by_name)
            .to_string()
            .contains("workload.network_gateway.address.address"),
    );
}
