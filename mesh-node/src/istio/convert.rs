//! istiod's resources → the mesh's state: `istio.workload.Address` (a workload or a service)
//! → [`Workload`] / [`Service`], `istio.security.Authorization` → an `AuthorizationPolicy`
//! document that the policy engine evaluates exactly as ztunnel evaluates the original.
//!
//! Every error names the field it is about; the caller NACKs the resource with it and keeps
//! the last good version. An Authorization that cannot be converted exactly (a value the
//! engine would read differently, a field this build does not know) is an error too: the
//! caller enforces [`strictest_authorization`] for it until a good version arrives.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use prost::Message as _;

use super::proto::workload::{self as xds, address};
use crate::{
    network::{Network, NetworkGateway},
    state::service::{Locality, Service, ServicePort},
    workload::Workload,
};

mod authorization;

pub use authorization::{MAX_EXPANDED_RULES, authorization, strictest_authorization};

/// Labels the telemetry reads, filled from the workload's fields.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
pub const CLUSTER_LABEL: &str = "topology.istio.io/cluster";
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// The workload's controller name (a Deployment's, ...), as istiod names it.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
/// Synthetic label (value `"true"`) of a workload that a `WORKLOAD_SELECTOR` authorization
/// applies to, followed by the authorization's `namespace/name`: istiod names the policies in
/// the workload (it has evaluated the selectors), the policy selects the label.
pub const POLICY_LABEL_PREFIX: &str = "xds.mesh.io/authorization.";
/// Synthetic label: the workload's namespace (for a `NAMESPACE` authorization in the root
/// namespace, which the engine would otherwise apply mesh-wide).
pub const NAMESPACE_LABEL: &str = "xds.mesh.io/namespace";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("does not decode as {message}: {reason}")]
    Decode {
        message: &'static str,
        reason: String,
    },
    #[error(
        "carries fields this build does not know ({received} bytes received, {understood} \
         understood)"
    )]
    UnknownFields { received: usize, understood: usize },
    #[error("`{field}`: missing")]
    Missing { field: String },
    #[error("`{field}`: {len} bytes is not an IPv4 or IPv6 address")]
    AddressLength { field: String, len: usize },
    #[error("`{field}`: /{length} is not a prefix length of {address}")]
    PrefixLength {
        field: String,
        address: IpAddr,
        length: u32,
    },
    #[error("`{field}`: {value} is not a port (1-65535)")]
    Port { field: String, value: u32 },
    #[error("`{field}`: unknown value {value}")]
    UnknownEnum { field: String, value: i32 },
    #[error("`{field}`: `{value}` {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("`{field}`: cannot be enforced exactly: {reason}")]
    Inexact { field: String, reason: String },
    #[error("`{field}`: rejected by the policy engine: {reason}")]
    Policy { field: String, reason: String },
}

/// What the conversion needs to know about the mesh and this node.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// This node's name (workloads on it are enrolled).
    pub node: &'a str,
    /// The mesh's trust domain.
    pub trust_domain: &'a str,
    pub root_namespace: &'a str,
}

/// An `istio.workload.Address`, converted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Workload(Box<MeshWorkload>),
    Service(Box<MeshService>),
    /// Nothing the node uses (a workload known by hostname only, a headless service).
    Skipped(&'static str),
}

/// A workload with what its services' endpoints are made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshWorkload {
    /// `enrolled` says whether the workload is in the mesh (HBONE, not on the host network);
    /// the source clears it on this node's workloads while their network namespace is not
    /// found.
    pub workload: Workload,
    /// `namespace/hostname` of each service it is an endpoint of → service port → port on
    /// the workload, where that differs.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Status `HEALTHY`.
    pub healthy: bool,
    pub zone: Option<String>,
    /// A trust domain other than the mesh's, if istiod says so (the workload's identity is
    /// in it: peers accept it only when it is one of `identity.trustDomainAliases`).
    pub foreign_trust_domain: Option<String>,
    /// The HBONE address of the east-west gateway in front of the workload's network, when
    /// istiod names one by address (`network_gateway`).
    pub network_gateway: Option<SocketAddr>,
}

/// A service without its endpoints (the workloads naming it provide them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshService {
    pub service: Service,
    /// `namespace/hostname`: what workloads name it by.
    pub key: String,
}

/// Decodes and converts one `istio.workload.Address`.
pub fn address(bytes: &[u8], cx: &Context<'_>) -> Result<Address, ConvertError> {
    let decoded = xds::Address::decode(bytes).map_err(|e| ConvertError::Decode {
        message: "istio.workload.Address",
        reason: e.to_string(),
    })?;
    match decoded.r#type {
        Some(address::Type::Workload(w)) => workload(&w, cx),
        Some(address::Type::Service(s)) => service(&s),
        None => Err(ConvertError::Missing {
            field: "type".to_owned(),
        }),
    }
}

/// 4 or 16 bytes as an address.
fn ip(bytes: &[u8], field: impl FnOnce() -> String) -> Result<IpAddr, ConvertError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(v6));
    }
    Err(ConvertError::AddressLength {
        field: field(),
        len: bytes.len(),
    })
}

fn port(value: u32, field: impl FnOnce() -> String) -> Result<u16, ConvertError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ConvertError::Port {
            field: field(),
            value,
        })
}

fn segment(field: &str, value: &str) -> Result<(), ConvertError> {
    if crate::identity::valid_segment(value) {
        Ok(())
    } else {
        Err(ConvertError::Invalid {
            field: field.to_owned(),
            value: value.to_owned(),
            reason: "is not a SPIFFE path segment",
        })
    }
}

fn known<T>(value: i32, field: &str, parse: impl Fn(i32) -> Option<T>) -> Result<T, ConvertError> {
    parse(value).ok_or_else(|| ConvertError::UnknownEnum {
        field: field.to_owned(),
        value,
    })
}

fn workload(w: &xds::Workload, cx: &Context<'_>) -> Result<Address, ConvertError> {
    let at = |f: &str| format!("workload.{f}");
    if w.addresses.is_empty() {
        return Ok(Address::Skipped(if w.hostname.is_empty() {
            "a workload without addresses"
        } else {
            "a workload known by hostname only"
        }));
    }
    if w.name.is_empty() {
        return Err(ConvertError::Missing { field: at("name") });
    }
    segment(&at("namespace"), &w.namespace)?;
    let service_account = if w.service_account.is_empty() {
        "default".to_owned()
    } else {
        w.service_account.clone()
    };
    segment(&at("service_account"), &service_account)?;
    let ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ip(a, || at(&format!("addresses[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    let tunnel = known(w.tunnel_protocol, &at("tunnel_protocol"), |v| {
        xds::TunnelProtocol::try_from(v).ok()
    })?;
    let network_mode = known(w.network_mode, &at("network_mode"), |v| {
        xds::NetworkMode::try_from(v).ok()
    })?;
    let status = known(w.status, &at("status"), |v| {
        xds::WorkloadStatus::try_from(v).ok()
    })?;
    let mut labels = BTreeMap::new();
    let locality = w.locality.clone().unwrap_or_default();
    for (key, value) in [
        (CANONICAL_NAME_LABEL, &w.canonical_name),
        (CANONICAL_REVISION_LABEL, &w.canonical_revision),
        (REGION_LABEL, &locality.region),
        (ZONE_LABEL, &locality.zone),
        (SUBZONE_LABEL, &locality.subzone),
        (CLUSTER_LABEL, &w.cluster_id),
        (NETWORK_LABEL, &w.network),
        (WORKLOAD_NAME_LABEL, &w.workload_name),
    ] {
        if !value.is_empty() {
            labels.insert(key.to_owned(), value.clone());
        }
    }
    for (i, policy) in w.authorization_policies.iter().enumerate() {
        if policy
            .split_once('/')
            .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
        {
            return Err(ConvertError::Invalid {
                field: at(&format!("authorization_policies[{i}]")),
                value: policy.clone(),
                reason: "is not `namespace/name`",
            });
        }
        labels.insert(format!("{POLICY_LABEL_PREFIX}{policy}"), "true".to_owned());
    }
    labels.insert(NAMESPACE_LABEL.to_owned(), w.namespace.clone());
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let mut ports = BTreeMap::new();
        for (j, p) in list.ports.iter().enumerate() {
            let field = |f: &str| at(&format!("services[{key}].ports[{j}].{f}"));
            let service_port = port(p.service_port, || field("service_port"))?;
            if p.target_port != 0 {
                ports.insert(service_port, port(p.target_port, || field("target_port"))?);
            }
        }
        services.insert(key.clone(), ports);
    }
    let foreign_trust_domain = (!w.trust_domain.is_empty() && w.trust_domain != cx.trust_domain)
        .then(|| w.trust_domain.clone());
    let network_gateway = gateway_address(w.network_gateway.as_ref(), || at("network_gateway"))?;
    Ok(Address::Workload(Box::new(MeshWorkload {
        workload: Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account,
            labels,
            ips,
            node: w.node.clone(),
            netns: None,
            // In the mesh wherever it runs (its peers tunnel to it); captured here only when
            // on this node (the enroller serves this node's workloads).
            enrolled: tunnel == xds::TunnelProtocol::Hbone
                && network_mode != xds::NetworkMode::HostNetwork,
            network: w.network.clone(),
            trust_domain: foreign_trust_domain.clone(),
        },
        services,
        healthy: status == xds::WorkloadStatus::Healthy,
        zone: (!locality.zone.is_empty()).then_some(locality.zone),
        foreign_trust_domain,
        network_gateway,
    })))
}

/// A gateway named by address: its HBONE address (port 15008 when istiod leaves it 0). A
/// gateway named by hostname is not resolved (`None`: the network is reached through the
/// gateways other workloads or the file name).
fn gateway_address(
    gateway: Option<&xds::GatewayAddress>,
    field: impl Fn() -> String,
) -> Result<Option<SocketAddr>, ConvertError> {
    let Some(gateway) = gateway else {
        return Ok(None);
    };
    let Some(xds::gateway_address::Destination::Address(address)) = &gateway.destination else {
        return Ok(None);
    };
    let ip = ip(&address.address, || format!("{}.address.address", field()))?;
    let port = match gateway.hbone_mtls_port {
        0 => crate::hbone::PORT,
        p => port(p, || format!("{}.hbone_mtls_port", field()))?,
    };
    Ok(Some(SocketAddr::new(ip, port)))
}

fn service(s: &xds::Service) -> Result<Address, ConvertError> {
    let at = |f: &str| format!("service.{f}");
    if s.addresses.is_empty() {
        return Ok(Address::Skipped("a headless service"));
    }
    if s.name.is_empty() {
        return Err(ConvertError::Missing { field: at("name") });
    }
    if s.hostname.is_empty() {
        return Err(ConvertError::Missing {
            field: at("hostname"),
        });
    }
    segment(&at("namespace"), &s.namespace)?;
    let mut addresses = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let address = ip(&a.address, || at(&format!("addresses[{i}].address")))?;
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().enumerate() {
        let service_port = port(p.service_port, || at(&format!("ports[{i}].service_port")))?;
        let target_port = match p.target_port {
            0 => None,
            t => Some(port(t, || at(&format!("ports[{i}].target_port")))?),
        };
        if ports.iter().any(|q: &ServicePort| q.port == service_port) {
            return Err(ConvertError::Invalid {
                field: at(&format!("ports[{i}].service_port")),
                value: service_port.to_string(),
                reason: "is listed twice",
            });
        }
        ports.push(ServicePort {
            name: None,
            port: service_port,
            target_port,
        });
    }
    if ports.is_empty() {
        return Ok(Address::Skipped("a service without ports"));
    }
    let load_balancing = match &s.load_balancing {
        Some(lb) => locality(lb)?,
        None => Locality::Any,
    };
    Ok(Address::Service(Box::new(MeshService {
        service: Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            addresses,
            ports,
            selector: None,
            endpoints: Vec::new(),
            load_balancing,
            connection_rate_limit: None,
        },
        key: format!("{}/{}", s.namespace, s.hostname),
    })))
}

/// istiod's routing preference as the node's locality preference: strict on the node alone
/// keeps connections on the node; a node preference prefers it (then the zone); a region,
/// zone or subzone preference prefers the zone.
fn locality(lb: &xds::LoadBalancing) -> Result<Locality, ConvertError> {
    use xds::load_balancing::{Mode, Scope};
    let mode = known(lb.mode, "service.load_balancing.mode", |v| {
        Mode::try_from(v).ok()
    })?;
    let scopes = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, s)| {
            known(
                *s,
                &format!("service.load_balancing.routing_preference[{i}]"),
                |v| Scope::try_from(v).ok(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if mode == Mode::Strict && scopes == [Scope::Node] {
        Locality::NodeOnly
    } else if scopes.contains(&Scope::Node) {
        Locality::PreferNode
    } else if scopes
        .iter()
        .any(|s| matches!(s, Scope::Region | Scope::Zone | Scope::Subzone))
    {
        Locality::PreferZone
    } else {
        Locality::Any
    })
}

/// Services with their endpoints: each workload naming a service (by `namespace/hostname`)
/// is an endpoint of it at each of its addresses.
#[must_use]
pub fn services_with_endpoints<'a>(
    services: impl IntoIterator<Item = &'a MeshService>,
    workloads: &[&MeshWorkload],
) -> Vec<Service> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for s in services {
        if !seen.insert((s.service.namespace.clone(), s.service.name.clone())) {
            continue;
        }
        let mut service = s.service.clone();
        for w in workloads {
            let Some(ports) = w.services.get(&s.key) else {
                continue;
            };
            for address in &w.workload.ips {
                service
                    .endpoints
                    .push(crate::state::service::ServiceEndpoint {
                        address: *address,
                        ready: w.healthy,
                        node: (!w.workload.node.is_empty()).then(|| w.workload.node.clone()),
                        zone: w.zone.clone(),
                        ports: ports.clone(),
                    });
            }
        }
        service.endpoints.sort_by_key(|e| e.address);
        service.endpoints.dedup_by_key(|e| e.address);
        out.push(service);
    }
    out
}

/// The networks istiod's workloads name gateways for (`network_gateway` by address), each
/// gateway with the identity of the workload at its address (else Istio's default east-west
/// gateway identity); a network the file lists is the file's.
#[must_use]
pub fn networks(workloads: &[&MeshWorkload], file: &[Network]) -> Vec<Network> {
    let mut networks: Vec<Network> = file.to_vec();
    for w in workloads {
        let (Some(address), network) = (w.network_gateway, &w.workload.network) else {
            continue;
        };
        if network.is_empty() || file.iter().any(|n| n.name == *network) {
            continue;
        }
        let at_address = workloads
            .iter()
            .find(|g| g.workload.ips.contains(&address.ip()));
        let mut gateway = NetworkGateway {
            address,
            namespace: "istio-system".to_owned(),
            service_account: "istio-eastwestgateway".to_owned(),
            trust_domain: None,
        };
        if let Some(g) = at_address {
            gateway.namespace.clone_from(&g.workload.namespace);
            gateway
                .service_account
                .clone_from(&g.workload.service_account);
            gateway.trust_domain.clone_from(&g.workload.trust_domain);
        }
        match networks.iter_mut().find(|n| n.name == *network) {
            Some(n) if n.gateways.iter().any(|g| g.address == address) => {}
            Some(n) => n.gateways.push(gateway),
            None => networks.push(Network {
                name: network.clone(),
                gateways: vec![gateway],
            }),
        }
    }
    for n in &mut networks {
        n.gateways.sort_by_key(|g| g.address);
    }
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    networks
}

#[cfg(test)]
mod tests;
