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

#[cfg(test)]
mod tests {
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
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels}}),
            )
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
            "node-x",
            None,
        );
        let b = table.lookup("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(b.pick().unwrap().to_string(), "10.0.0.5:8080");
        assert_eq!(b.len(), 1, "the unready endpoint takes no connection");
    }

    #[test]
    fn headless_and_external_services_are_not_proxied() {
        let headless = kube_service(
            &serde_json::json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
        );
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
        let close =
            kube_service(&serde_json::json!({"spec": {"trafficDistribution": "PreferClose"}}));
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
                annotated(
                    serde_json::json!({RATE_LIMIT_ANNOTATION: rate, RATE_BURST_ANNOTATION: "5"})
                ),
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
        };
        let conn = ConnInfo {
            src_ip: "198.18.2.2".parse().unwrap(),
            src_identity: None,
            dst_ip: "198.18.1.2".parse().unwrap(),
            dst_port: 80,
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
}
