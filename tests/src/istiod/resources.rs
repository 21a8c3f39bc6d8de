//! Builders of the resources the stand-in serves, as istiod fills them in.

use mesh_node::istio::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    security::Authorization,
    workload::{
        Address, NetworkAddress, Port, Service, TunnelProtocol, Workload, WorkloadType, address,
    },
};
use prost::Message as _;
use prost_types::Any;

/// `Address{workload}` as an `Any`.
#[must_use]
pub fn workload_any(workload: Workload) -> Any {
    address_any(address::Type::Workload(workload))
}

/// `Address{service}` as an `Any`.
#[must_use]
pub fn service_any(service: Service) -> Any {
    address_any(address::Type::Service(service))
}

fn address_any(t: address::Type) -> Any {
    Any {
        type_url: ADDRESS_TYPE.to_owned(),
        value: Address { r#type: Some(t) }.encode_to_vec(),
    }
}

/// An `Authorization` as an `Any`.
#[must_use]
pub fn authorization_any(policy: &Authorization) -> Any {
    Any {
        type_url: AUTHORIZATION_TYPE.to_owned(),
        value: policy.encode_to_vec(),
    }
}

/// An `Any` of `type_url` whose bytes do not decode (a truncated length-delimited field), which
/// a client must NACK.
#[must_use]
pub fn malformed_any(type_url: &str) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: vec![0x0a, 0x7f, 0x01],
    }
}

/// A meshed pod as istiod describes it: HBONE, healthy, on `node`, with identity
/// `spiffe://<mesh trust domain>/ns/<namespace>/sa/<service_account>`, uid
/// `Kubernetes//Pod/<namespace>/<name>`.
#[must_use]
pub fn workload(
    name: &str,
    namespace: &str,
    service_account: &str,
    node: &str,
    addresses: &[std::net::IpAddr],
) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{namespace}/{name}"),
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        addresses: addresses.iter().copied().map(ip_bytes).collect(),
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: service_account.to_owned(),
        node: node.to_owned(),
        workload_name: name.to_owned(),
        canonical_name: name.to_owned(),
        workload_type: WorkloadType::Pod.into(),
        cluster_id: "Kubernetes".to_owned(),
        ..Workload::default()
    }
}

/// A service as istiod describes it: hostname `<name>.<namespace>.svc.cluster.local`, the
/// given virtual IPs (none: headless) and `(service port, target port)` pairs.
#[must_use]
pub fn service(
    name: &str,
    namespace: &str,
    vips: &[std::net::IpAddr],
    ports: &[(u32, u32)],
) -> Service {
    Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        addresses: vips
            .iter()
            .map(|ip| NetworkAddress {
                network: String::new(),
                address: ip_bytes(*ip),
            })
            .collect(),
        ports: ports
            .iter()
            .map(|&(service_port, target_port)| Port {
                service_port,
                target_port,
            })
            .collect(),
        ..Service::default()
    }
}

fn ip_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
