//! Kubernetes objects → the mesh's state: pods → workloads, services with their
//! `EndpointSlice`s (and rate-limit annotations) → services, Istio policy objects → policy
//! documents, traffic objects (`TCPRoute`, `VirtualService`, `DestinationRule`,
//! `FaultInjection`) → traffic documents.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::{ResourceExt, api::DynamicObject};

use crate::{
    config::KubernetesConfig,
    policy::{Kind, PolicyDocument},
    state::service::{Locality, Service, ServiceEndpoint, ServicePort},
    traffic::{RateLimit, TrafficDocument, TrafficError, TrafficKind, TrafficSet},
    workload::Workload,
};

/// Label of an `EndpointSlice` naming its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Istio's annotation for a service's traffic distribution.
const ISTIO_TRAFFIC_DISTRIBUTION: &str = "networking.istio.io/traffic-distribution";
/// Annotation of a Service: new connections per second admitted to it from each node (a whole
/// number, at least 1). Without it the service has no connection rate limit.
pub const RATE_LIMIT_ANNOTATION: &str = "mesh.io/connection-rate-limit";
/// Annotation of a Service: the bucket size of its rate limit (connections admitted at once
/// after a quiet time). Default: the rate.
pub const RATE_BURST_ANNOTATION: &str = "mesh.io/connection-rate-burst";
/// Annotation of a Service: `"true"` for one bucket per source identity. Default: `"false"`.
pub const RATE_PER_SOURCE_ANNOTATION: &str = "mesh.io/connection-rate-per-source";

/// Which namespaces are in the mesh.
#[must_use]
pub fn enrolled_namespaces<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    config: &KubernetesConfig,
) -> HashSet<String> {
    namespaces
        .into_iter()
        .filter(|ns| ns.labels().get(&config.enroll_label) == Some(&config.enroll_value))
        .map(ResourceExt::name_any)
        .collect()
}

/// The workload of a pod, or `None` for pods without addresses of their own (not yet
/// scheduled or started, finished, or on the host network).
#[must_use]
pub fn workload(
    pod: &Pod,
    enrolled_namespaces: &HashSet<String>,
    config: &KubernetesConfig,
) -> Option<Workload> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let node = spec.node_name.clone()?;
    let mut ips: Vec<std::net::IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return None;
    }
    let namespace = pod.namespace().unwrap_or_else(|| "default".to_owned());
    let labels: BTreeMap<String, String> = pod.labels().clone();
    let opted_out = labels.get(&config.enroll_label) == Some(&config.opt_out_value);
    Some(Workload {
        name: pod.name_any(),
        enrolled: enrolled_namespaces.contains(&namespace) && !opted_out,
        namespace,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        labels,
        ips,
        node,
        netns: None,
        // The cluster's own pods are on this node's network.
        network: String::new(),
        trust_domain: None,
    })
}

/// A service with its endpoints, or `None` for services without a virtual address (headless,
/// `ExternalName`) or without TCP ports.
#[must_use]
pub fn service(svc: &KubeService, slices: &[&EndpointSlice]) -> Option<Service> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addresses: Vec<std::net::IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut all, ip| {
            if !all.contains(&ip) {
                all.push(ip);
            }
            all
        });
    if addresses.is_empty() {
        return None;
    }
    let tcp_ports: Vec<_> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let ports: Vec<ServicePort> = tcp_ports
        .iter()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone(),
                port: u16::try_from(p.port).ok()?,
                target_port: match &p.target_port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        u16::try_from(*n).ok()
                    }
                    _ => None,
                },
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut endpoints = Vec::new();
    for slice in slices {
        // Slice port name → port number on the endpoints.
        let slice_ports: HashMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let port_map: BTreeMap<u16, u16> = ports
            .iter()
            .filter_map(|p| {
                let name = p.name.clone().unwrap_or_default();
                Some((p.port, *slice_ports.get(&name)?))
            })
            .collect();
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for address in e.addresses.iter().filter_map(|a| a.parse().ok()) {
                endpoints.push(ServiceEndpoint {
                    address,
                    ready,
                    node: e.node_name.clone(),
                    zone: e.zone.clone(),
                    ports: port_map.clone(),
                });
            }
        }
    }
    endpoints.sort_by_key(|e| e.address);
    endpoints.dedup_by_key(|e| e.address);
    Some(Service {
        name: svc.name_any(),
        namespace: svc.namespace().unwrap_or_else(|| "default".to_owned()),
        addresses,
        ports,
        selector: None,
        endpoints,
        load_balancing: locality(svc),
        connection_rate_limit: rate_limit(svc).0,
    })
}

/// A rate-limit annotation that was ignored, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadAnnotation {
    pub annotation: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// A service's connection rate limit from its annotations, and the annotations ignored. A
/// rate limit is not a security control, so a malformed annotation is ignored (with a
/// warning by the caller) rather than failing the service: a bad rate leaves the service
/// without a limit, a bad burst or per-source flag leaves that setting at its default.
#[must_use]
pub fn rate_limit(svc: &KubeService) -> (Option<RateLimit>, Vec<BadAnnotation>) {
    let annotations = svc.annotations();
    let mut bad = Vec::new();
    let mut ignore = |annotation: &'static str, value: &str, reason: &'static str| {
        bad.push(BadAnnotation {
            annotation,
            value: value.to_owned(),
            reason,
        });
    };
    let positive = |value: &str| value.trim().parse::<u32>().ok().filter(|n| *n > 0);
    let rate = annotations.get(RATE_LIMIT_ANNOTATION);
    let burst = annotations.get(RATE_BURST_ANNOTATION);
    let per_source = annotations.get(RATE_PER_SOURCE_ANNOTATION);
    let Some(rate) = rate else {
        for (annotation, value) in [
            (RATE_BURST_ANNOTATION, burst),
            (RATE_PER_SOURCE_ANNOTATION, per_source),
        ] {
            if let Some(value) = value {
                ignore(annotation, value, "needs mesh.io/connection-rate-limit");
            }
        }
        return (None, bad);
    };
    let Some(connections_per_second) = positive(rate) else {
        ignore(
            RATE_LIMIT_ANNOTATION,
            rate,
            "not a whole number of connections per second, at least 1; the service has no limit",
        );
        return (None, bad);
    };
    let burst = burst.and_then(|value| {
        let n = positive(value);
        if n.is_none() {
            ignore(
                RATE_BURST_ANNOTATION,
                value,
                "not a whole number, at least 1; the burst is the rate",
            );
        }
        n
    });
    let per_source = match per_source.map(|v| v.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(value) => {
            ignore(
                RATE_PER_SOURCE_ANNOTATION,
                value,
                "neither \"true\" nor \"false\"; one bucket for all sources",
            );
            false
        }
    };
    let limit = RateLimit {
        connections_per_second,
        burst,
        per_source,
    };
    (Some(limit), bad)
}

/// A service's locality preference: `internalTrafficPolicy: Local` keeps connections on the
/// node; `trafficDistribution` (or Istio's annotation) `PreferClose`/`PreferSameZone` prefers
/// the zone, `PreferSameNode` the node.
fn locality(svc: &KubeService) -> Locality {
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.internal_traffic_policy.as_deref()) == Some("Local") {
        return Locality::NodeOnly;
    }
    let distribution = svc
        .annotations()
        .get(ISTIO_TRAFFIC_DISTRIBUTION)
        .cloned()
        .or_else(|| spec.and_then(|s| s.traffic_distribution.clone()));
    match distribution.as_deref() {
        Some("PreferClose" | "PreferSameZone") => Locality::PreferZone,
        Some("PreferSameNode") => Locality::PreferNode,
        _ => Locality::Any,
    }
}

/// An Istio policy object as a policy document (only the fields the mesh reads: the status
/// and server-side metadata are left out).
pub fn policy(obj: &DynamicObject, kind: &str) -> Result<PolicyDocument, String> {
    let api_version = obj.types.as_ref().map_or_else(
        || "security.istio.io/v1".to_owned(),
        |t| t.api_version.clone(),
    );
    let mut metadata = serde_json::json!({
        "name": obj.name_any(),
        "namespace": obj.namespace().unwrap_or_else(|| "default".to_owned()),
    });
    if !obj.annotations().is_empty() {
        metadata["annotations"] = serde_json::to_value(obj.annotations()).unwrap_or_default();
    }
    let value = serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata,
        "spec": obj.data.get("spec").cloned().unwrap_or_else(|| serde_json::json!({})),
    });
    // serde_json names the field in its message ("unknown field `x`, expected one of …").
    serde_json::from_value::<PolicyDocument>(value).map_err(|e| e.to_string())
}

/// A traffic object as a traffic document, checked on its own ([`TrafficSet::validate`]).
/// A spec that does not parse is reported at the first top-level spec field that does not
/// parse on its own (serde's message names the inner field).
pub fn traffic_document(
    obj: &DynamicObject,
    kind: TrafficKind,
) -> Result<TrafficDocument, TrafficError> {
    let api_version = obj.types.as_ref().map_or_else(
        || kind.api_versions()[0].to_owned(),
        |t| t.api_version.clone(),
    );
    let spec = obj
        .data
        .get("spec")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    let value = serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": obj.name_any(),
            "namespace": obj.namespace().unwrap_or_else(|| "default".to_owned()),
        },
        "spec": spec,
    });
    let rejected = |field: String, reason: String| TrafficError {
        index: 0,
        document: format!(
            "{kind} {}/{}",
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        ),
        field,
        reason,
    };
    let doc = serde_json::from_value::<TrafficDocument>(value).map_err(|e| {
        let field = spec
            .as_object()
            .and_then(|fields| {
                fields.iter().find_map(|(key, v)| {
                    let alone = serde_json::json!({ key: v });
                    serde_json::from_value::<crate::traffic::model::TrafficSpec>(alone)
                        .is_err()
                        .then(|| format!("spec.{key}"))
                })
            })
            .unwrap_or_else(|| "spec".to_owned());
        rejected(field, e.to_string())
    })?;
    TrafficSet::validate(&doc).map_err(|e| rejected(e.field, e.reason))?;
    Ok(doc)
}

/// What stands in for a policy object that cannot be read and has no earlier good version:
/// leaving it out would fail open (a DENY not enforced; an only ALLOW gone, which allows
/// everything), so it is enforced as the strictest policy of its kind for what it selects: an
/// `AuthorizationPolicy` denies every connection, a `PeerAuthentication` is STRICT. The scope is
/// the object's `spec.selector.matchLabels` when that much can be read, else its whole
/// namespace (mesh-wide in the root namespace).
#[must_use]
pub fn fail_closed_policy(obj: &DynamicObject, kind: Kind) -> PolicyDocument {
    let labels = obj
        .data
        .pointer("/spec/selector/matchLabels")
        .and_then(|v| {
            serde_json::from_value::<std::collections::BTreeMap<String, String>>(v.clone()).ok()
        })
        .filter(|labels| !labels.is_empty());
    let mut spec = match kind {
        Kind::AuthorizationPolicy => serde_json::json!({"action": "DENY", "rules": [{}]}),
        Kind::PeerAuthentication => serde_json::json!({"mtls": {"mode": "STRICT"}}),
    };
    if let Some(labels) = labels {
        spec["selector"] = serde_json::json!({ "matchLabels": labels });
    }
    let value = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": kind.to_string(),
        "metadata": {
            "name": obj.name_any(),
            "namespace": obj.namespace().unwrap_or_else(|| "default".to_owned()),
        },
        "spec": spec,
    });
    serde_json::from_value(value).expect("a fixed, valid policy document")
}

/// An object's UID, or `kind/namespace/name` when it has none (as in tests).
pub(super) fn object_uid(obj: &DynamicObject, kind: &dyn std::fmt::Display) -> String {
    obj.uid().unwrap_or_else(|| {
        format!(
            "{kind}/{}/{}",
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        )
    })
}

#[cfg(test)]
mod tests;
