//! The traffic documents as users write them: Gateway API `TCPRoute`, Istio `VirtualService`
//! and `DestinationRule`, and mesh-node's own `FaultInjection`, parsed strictly (unknown
//! fields and bad values are errors that serde reports with their line). The L7 parts of
//! Istio's objects (`http` and `tls` routes, HTTP pool settings, consistent hashing, ...)
//! are accepted so manifests load unchanged, and named once per object as not applied at the
//! node ([`TrafficDocument::ignored`]): they are a waypoint's.
//!
//! One spec type holds the union of the kinds' fields (as policies do); the validation in
//! [`super::TrafficSet::new`] checks each document against its kind.

use std::{collections::BTreeMap, fmt, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Any YAML, accepted and not applied at the node.
pub type Ignored = serde_yaml_ng::Value;

/// One traffic document (`kind` says which).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficDocument {
    /// `gateway.networking.k8s.io/v1alpha2` (`TCPRoute`), `networking.istio.io/v1`
    /// (also `v1beta1`, `v1alpha3`), `mesh.io/v1alpha1` (`FaultInjection`).
    pub api_version: String,
    pub kind: TrafficKind,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: TrafficSpec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrafficKind {
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    VirtualService,
    DestinationRule,
    FaultInjection,
}

impl fmt::Display for TrafficKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrafficKind::TcpRoute => "TCPRoute",
            TrafficKind::VirtualService => "VirtualService",
            TrafficKind::DestinationRule => "DestinationRule",
            TrafficKind::FaultInjection => "FaultInjection",
        })
    }
}

impl TrafficKind {
    /// The API versions accepted for the kind.
    #[must_use]
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            TrafficKind::TcpRoute => &[
                "gateway.networking.k8s.io/v1alpha2",
                "gateway.networking.k8s.io/v1",
            ],
            TrafficKind::VirtualService | TrafficKind::DestinationRule => &[
                "networking.istio.io/v1",
                "networking.istio.io/v1beta1",
                "networking.istio.io/v1alpha3",
            ],
            TrafficKind::FaultInjection => &["mesh.io/v1alpha1"],
        }
    }
}

/// Object metadata; fields other than these are ignored (labels, uid, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "crate::workload::default_namespace")]
    pub namespace: String,
}

/// The spec of any kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSpec {
    // TCPRoute
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_refs: Option<Vec<ParentRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<TcpRouteRule>>,
    // VirtualService
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Vec<TcpRoute>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Ignored>,
    // VirtualService and DestinationRule
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_to: Option<Ignored>,
    // DestinationRule
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets: Option<Vec<Subset>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<Ignored>,
    // FaultInjection
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Vec<TargetRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<FaultSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
}

/// A `TCPRoute` parent: at the node, a `Service` (the Gateway API's mesh binding).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// `""` or `core` for a Service. Default: `gateway.networking.k8s.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Default: `Gateway` (a gateway's route: not applied at the node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Default: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The service port the route takes. Default: every port of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// Whether the parent is a Service (group `""`/`core`, kind `Service`).
    #[must_use]
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), Some("" | "core"))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// A `TCPRoute` backend: a Service and port, with a relative weight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    /// Default: `""` (core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Default: `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    /// Default: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The backend service's port (required for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// A `VirtualService` `tcp` route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRoute {
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// Conditions of a `tcp` route (all that are set must hold).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct L4Match {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_subnet: Option<IpNet>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Only `mesh` (or none) applies at the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    /// Relative weight. Default: 100 when it is the only destination, else 0 (as Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    pub number: u16,
}

/// A `DestinationRule` subset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `DestinationRule` `trafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_settings: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<Ignored>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Ignored>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPool {
    /// Open connections to the destination from this node, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<IstioDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Ignored>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_duration_secs: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Ignored>,
}

/// `loadBalancer.simple`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    #[default]
    Unspecified,
    RoundRobin,
    Random,
    LeastRequest,
    /// Istio's deprecated name of `LEAST_REQUEST`.
    LeastConn,
    /// Envoy's original-destination passthrough: not applied at the node (round robin).
    Passthrough,
}

/// `outlierDetection`, at L4: a failed connect (refused, timed out, HBONE 503) is an error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_external_local_origin_errors: Option<Ignored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<IstioDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<IstioDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<Ignored>,
}

/// What a `FaultInjection` applies to: a Service of its namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    /// Default: `""` (core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service`.
    pub kind: String,
    pub name: String,
    /// The service port. Default: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// The source workloads a `FaultInjection` applies to (every field that is set must match).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// New connections reset at once, as if the destination refused them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Abort {
    /// Share of new connections, 0–100.
    pub percentage: f64,
}

/// New connections held for a while before they are connected.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Delay {
    /// Share of new connections, 0–100.
    pub percentage: f64,
    pub fixed_delay: IstioDuration,
}

/// A duration as Istio writes it: `1s`, `250ms`, `1.5s`, `2m`, `1h`, `10us`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IstioDuration(pub Duration);

impl IstioDuration {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` has no unit (h, m, s, ms, us, ns)"))?;
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration"))?;
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => {
                return Err(format!(
                    "`{text}`: unknown unit `{unit}` (h, m, s, ms, us, ns)"
                ));
            }
        };
        Duration::try_from_secs_f64(value * seconds)
            .map(Self)
            .map_err(|_| format!("`{text}` is out of range"))
    }
}

impl fmt::Display for IstioDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)) == self.0 {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}us", self.0.as_micros())
        }
    }
}

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for IstioDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl TrafficDocument {
    /// `Kind namespace/name`.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind, self.metadata.namespace, self.metadata.name
        )
    }

    /// The fields set in the document that the node does not apply (L7, or a gateway's).
    #[must_use]
    pub fn ignored(&self) -> Vec<&'static str> {
        let s = &self.spec;
        let mut out = Vec::new();
        let mut note = |set: bool, field: &'static str| {
            if set {
                out.push(field);
            }
        };
        note(s.http.is_some(), "http");
        note(s.tls.is_some(), "tls");
        note(s.export_to.is_some(), "exportTo");
        note(s.workload_selector.is_some(), "workloadSelector");
        let policies = s.traffic_policy.iter().chain(
            s.subsets
                .iter()
                .flatten()
                .filter_map(|s| s.traffic_policy.as_ref()),
        );
        for p in policies {
            note(p.tls.is_some(), "trafficPolicy.tls");
            note(
                p.port_level_settings.is_some(),
                "trafficPolicy.portLevelSettings",
            );
            note(p.tunnel.is_some(), "trafficPolicy.tunnel");
            note(p.proxy_protocol.is_some(), "trafficPolicy.proxyProtocol");
            if let Some(pool) = &p.connection_pool {
                note(pool.http.is_some(), "trafficPolicy.connectionPool.http");
                if let Some(tcp) = &pool.tcp {
                    note(
                        tcp.tcp_keepalive.is_some(),
                        "trafficPolicy.connectionPool.tcp.tcpKeepalive",
                    );
                    note(
                        tcp.max_connection_duration.is_some(),
                        "trafficPolicy.connectionPool.tcp.maxConnectionDuration",
                    );
                    note(
                        tcp.idle_timeout.is_some(),
                        "trafficPolicy.connectionPool.tcp.idleTimeout",
                    );
                }
            }
            if let Some(lb) = &p.load_balancer {
                note(
                    lb.consistent_hash.is_some(),
                    "trafficPolicy.loadBalancer.consistentHash",
                );
                note(
                    lb.locality_lb_setting.is_some(),
                    "trafficPolicy.loadBalancer.localityLbSetting",
                );
                note(
                    lb.warmup_duration_secs.is_some() || lb.warmup.is_some(),
                    "trafficPolicy.loadBalancer.warmup",
                );
                note(
                    lb.simple == Some(SimpleLb::Passthrough),
                    "trafficPolicy.loadBalancer.simple: PASSTHROUGH",
                );
            }
            if let Some(o) = &p.outlier_detection {
                note(
                    o.split_external_local_origin_errors.is_some(),
                    "trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
                );
                note(
                    o.min_health_percent.is_some(),
                    "trafficPolicy.outlierDetection.minHealthPercent",
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_istio_writes_them() {
        let d = |s: &str| IstioDuration::parse(s).map(|d| d.0);
        assert_eq!(d("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(d("10us"), Ok(Duration::from_micros(10)));
        assert!(d("10").unwrap_err().contains("no unit"));
        assert!(d("1d").unwrap_err().contains("unknown unit"));
        assert!(d("x1s").is_err());
        assert_eq!(
            IstioDuration(Duration::from_millis(200)).to_string(),
            "200ms"
        );
    }
}
