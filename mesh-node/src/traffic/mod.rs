//! L4 traffic management in the node, from the APIs users already write: weighted splits
//! (Gateway API `TCPRoute` bound to a Service, Istio `VirtualService` `tcp` routes with
//! `DestinationRule` subsets), `DestinationRule`'s L4 traffic policy (connect timeout,
//! connection pool, load balancer, outlier detection), failover before the first byte,
//! per-service connection rate limits, and L4 fault injection (`FaultInjection`, our own
//! `mesh.io/v1alpha1` kind).
//!
//! This module holds the documents ([`model`]), their validated and indexed form
//! ([`TrafficSet`], one per state change), and the run-time parts that outlive a state change
//! ([`runtime`]: endpoint health and ejection, pool counters, token buckets). The service
//! table (`state::service`) joins them with the services for each service address; the proxy
//! asks it for a [`runtime::Plan`] per connection.

pub mod model;
pub mod runtime;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use model::{IstioDuration, SimpleLb, TrafficDocument, TrafficKind};
use model::{L4Match, TrafficPolicy};

/// A connection rate limit on a service: a token bucket of new connections, local to each
/// node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    /// Tokens added per second.
    pub connections_per_second: u32,
    /// Bucket size (connections admitted at once after a quiet time). Default:
    /// `connectionsPerSecond`, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket per source identity instead of one for all sources. Default: `false`.
    #[serde(default)]
    pub per_source: bool,
}

impl RateLimit {
    /// Checks the values; `(field, reason)` for the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.connections_per_second == 0 {
            return Err((
                "connectionsPerSecond".to_owned(),
                "must be at least 1".to_owned(),
            ));
        }
        if self.burst == Some(0) {
            return Err(("burst".to_owned(), "must be at least 1".to_owned()));
        }
        Ok(())
    }

    /// The bucket size.
    #[must_use]
    pub fn capacity(&self) -> f64 {
        f64::from(self.burst.unwrap_or(self.connections_per_second))
    }
}

/// Why a traffic document was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("traffic[{index}] ({document}): field `{field}`: {reason}")]
pub struct TrafficError {
    pub index: usize,
    /// `Kind namespace/name`.
    pub document: String,
    /// Path of the field in the document (`spec.tcp[0].route`).
    pub field: String,
    pub reason: String,
}

/// How a connection picks an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    /// Fewest open connections from this node (round robin among equals).
    LeastRequest,
}

impl Balance {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Random => "random",
            Balance::LeastRequest => "least_request",
        }
    }
}

/// L4 outlier detection of a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive failed connects that eject an endpoint.
    pub consecutive_errors: u32,
    /// Ejection time = this × the number of times the endpoint was ejected.
    pub base_ejection: Duration,
    /// At most this share of a destination's endpoints is ejected at once (percent).
    pub max_ejection_percent: u32,
    /// An endpoint healthy for this long has its ejection count lowered by one.
    pub interval: Duration,
}

/// The L4 settings of one destination (a service, or a subset of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4Policy {
    pub connect_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
    pub balance: Balance,
    pub outlier: Option<Outlier>,
}

impl L4Policy {
    fn from_istio(p: &TrafficPolicy) -> Self {
        let mut out = Self::default();
        out.merge(p);
        out
    }

    /// Overrides the fields `p` sets (a subset's policy over its rule's).
    fn merge(&mut self, p: &TrafficPolicy) {
        if let Some(tcp) = p.connection_pool.as_ref().and_then(|c| c.tcp.as_ref()) {
            if let Some(t) = tcp.connect_timeout {
                self.connect_timeout = Some(t.0);
            }
            if let Some(n) = tcp.max_connections {
                self.max_connections = Some(n);
            }
        }
        if let Some(simple) = p.load_balancer.as_ref().and_then(|l| l.simple) {
            self.balance = match simple {
                SimpleLb::Random => Balance::Random,
                SimpleLb::LeastRequest | SimpleLb::LeastConn => Balance::LeastRequest,
                SimpleLb::Unspecified | SimpleLb::RoundRobin | SimpleLb::Passthrough => {
                    Balance::RoundRobin
                }
            };
        }
        if let Some(o) = &p.outlier_detection {
            // Istio's defaults: 5 consecutive errors, 30 s, 10 %, a 10 s interval. At L4 every
            // failed connect is both a gateway error and a 5xx: the smaller threshold set wins.
            let consecutive = [
                o.consecutive_5xx_errors,
                o.consecutive_gateway_errors,
                o.consecutive_local_origin_failures,
            ]
            .into_iter()
            .flatten()
            .filter(|n| *n > 0)
            .min()
            .unwrap_or(5);
            let all_zero = [o.consecutive_5xx_errors, o.consecutive_gateway_errors]
                .into_iter()
                .flatten()
                .all(|n| n == 0)
                && (o.consecutive_5xx_errors.is_some() || o.consecutive_gateway_errors.is_some())
                && o.consecutive_local_origin_failures.unwrap_or(0) == 0;
            self.outlier = (!all_zero).then(|| Outlier {
                consecutive_errors: consecutive,
                base_ejection: o
                    .base_ejection_time
                    .map_or(Duration::from_secs(30), |d| d.0),
                max_ejection_percent: o.max_ejection_percent.unwrap_or(10).min(100),
                interval: o.interval.map_or(Duration::from_secs(10), |d| d.0),
            });
        }
    }
}

/// A `DestinationRule` as it applies: its policy and its subsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    /// `DestinationRule namespace/name`.
    pub origin: Arc<str>,
    pub policy: L4Policy,
    pub subsets: Vec<SubsetRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubsetRule {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The rule's policy with the subset's own settings over it.
    pub policy: L4Policy,
}

/// A route that splits a service's connections (from a `TCPRoute` or a `VirtualService`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `TCPRoute namespace/name` or `VirtualService namespace/name`.
    pub origin: Arc<str>,
    /// Tried in order; the first that matches the connection decides.
    pub rules: Vec<RouteRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRule {
    /// The service port the rule takes; `None`: every port.
    pub port: Option<u16>,
    /// Source and destination conditions (any of them; none: every connection).
    pub matches: Vec<Match>,
    pub backends: Vec<WeightedBackend>,
}

/// Conditions on a connection (all that are set must hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    pub destination_subnets: Vec<IpNet>,
    pub source_subnet: Option<IpNet>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// One backend of a split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedBackend {
    /// The backend service's hostname (`name.namespace.svc.cluster.local`).
    pub host: String,
    pub subset: Option<String>,
    /// The backend service's port; `None`: the port the connection was addressed to.
    pub port: Option<u16>,
    pub weight: u32,
}

/// A fault to inject into new connections to a service.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// `FaultInjection namespace/name`.
    pub origin: Arc<str>,
    /// The service port; `None`: every port.
    pub port: Option<u16>,
    /// Sources it applies to (any of them; none: every source).
    pub sources: Vec<model::FaultSource>,
    /// Share of new connections reset at once (0–1).
    pub abort: f64,
    /// Share of new connections delayed (0–1), and by how long.
    pub delay: Option<(f64, Duration)>,
}

/// The traffic documents in force, validated and indexed by the service hostname they apply
/// to.
#[derive(Debug, Default)]
pub struct TrafficSet {
    documents: Vec<TrafficDocument>,
    routes: BTreeMap<String, Arc<Route>>,
    rules: BTreeMap<String, Arc<DestinationRule>>,
    faults: BTreeMap<String, Vec<Arc<Fault>>>,
    /// `(document, note)`: what of a document the node does not apply, and why.
    notes: Vec<(String, String)>,
}

/// `host` as a service hostname, relative to `namespace` (Istio's short names: `echo`,
/// `echo.shop`, `echo.shop.svc`).
#[must_use]
pub fn hostname(host: &str, namespace: &str) -> String {
    let dots = host.matches('.').count();
    match dots {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        2 if host.rsplit('.').next() == Some("svc") => format!("{host}.cluster.local"),
        _ => host.to_owned(),
    }
}

impl TrafficSet {
    /// Validates and indexes `documents`; the first bad one is the error.
    pub fn new(documents: &[TrafficDocument]) -> Result<Self, TrafficError> {
        let mut set = Self {
            documents: documents.to_vec(),
            ..Self::default()
        };
        let mut seen = std::collections::HashSet::new();
        // Conflicts are settled by name (as the Gateway API's tie-break), so the outcome does
        // not depend on the order of the file or of the API server's list.
        let mut order: Vec<usize> = (0..documents.len()).collect();
        order.sort_by_key(|&i| {
            let d = &documents[i];
            (d.metadata.namespace.clone(), d.metadata.name.clone())
        });
        for index in order {
            let doc = &documents[index];
            if !seen.insert((
                doc.kind,
                doc.metadata.namespace.clone(),
                doc.metadata.name.clone(),
            )) {
                return Err(error(index, doc, "metadata.name", "defined twice"));
            }
            set.add(index, doc)?;
        }
        Ok(set)
    }

    /// Checks one document on its own (the Kubernetes source keeps the last good version of
    /// an object that fails).
    pub fn validate(document: &TrafficDocument) -> Result<(), TrafficError> {
        Self::default().add(0, document)
    }

    fn add(&mut self, index: usize, doc: &TrafficDocument) -> Result<(), TrafficError> {
        let err = |field: &str, reason: &str| error(index, doc, field, reason);
        if !doc.kind.api_versions().contains(&doc.api_version.as_str()) {
            return Err(err(
                "apiVersion",
                &format!("expected {}", doc.kind.api_versions()[0]),
            ));
        }
        if doc.metadata.name.is_empty() {
            return Err(err("metadata.name", "must not be empty"));
        }
        let s = &doc.spec;
        let present: &[(&str, bool)] = &[
            ("parentRefs", s.parent_refs.is_some()),
            ("rules", s.rules.is_some()),
            ("hosts", s.hosts.is_some()),
            ("gateways", s.gateways.is_some()),
            ("tcp", s.tcp.is_some()),
            ("http", s.http.is_some()),
            ("tls", s.tls.is_some()),
            ("exportTo", s.export_to.is_some()),
            ("host", s.host.is_some()),
            ("trafficPolicy", s.traffic_policy.is_some()),
            ("subsets", s.subsets.is_some()),
            ("workloadSelector", s.workload_selector.is_some()),
            ("targetRefs", s.target_refs.is_some()),
            ("sources", s.sources.is_some()),
            ("abort", s.abort.is_some()),
            ("delay", s.delay.is_some()),
        ];
        let allowed: &[&str] = match doc.kind {
            TrafficKind::TcpRoute => &["parentRefs", "rules"],
            TrafficKind::VirtualService => &["hosts", "gateways", "tcp", "http", "tls", "exportTo"],
            TrafficKind::DestinationRule => &[
                "host",
                "trafficPolicy",
                "subsets",
                "workloadSelector",
                "exportTo",
            ],
            TrafficKind::FaultInjection => &["targetRefs", "sources", "abort", "delay"],
        };
        if let Some((field, _)) = present
            .iter()
            .find(|(field, set)| *set && !allowed.contains(field))
        {
            return Err(err(
                &format!("spec.{field}"),
                &format!("is not a field of {}", doc.kind),
            ));
        }
        let ignored = doc.ignored();
        if !ignored.is_empty() {
            self.notes.push((
                doc.describe(),
                format!(
                    "not applied at the node (L7 or a gateway's: a waypoint applies them): {}",
                    ignored.join(", ")
                ),
            ));
        }
        let ns = &doc.metadata.namespace;
        let origin: Arc<str> = doc.describe().into();
        match doc.kind {
            TrafficKind::TcpRoute => self.add_tcp_route(doc, &origin, &err),
            TrafficKind::VirtualService => self.add_virtual_service(doc, &origin, &err),
            TrafficKind::DestinationRule => {
                let host = s
                    .host
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| err("spec.host", "is required"))?;
                let policy = s
                    .traffic_policy
                    .as_ref()
                    .map(L4Policy::from_istio)
                    .unwrap_or_default();
                let mut subsets = Vec::new();
                for (i, sub) in s.subsets.iter().flatten().enumerate() {
                    if sub.name.is_empty() {
                        return Err(err(&format!("spec.subsets[{i}].name"), "is required"));
                    }
                    if subsets.iter().any(|s: &SubsetRule| s.name == sub.name) {
                        return Err(err(&format!("spec.subsets[{i}].name"), "defined twice"));
                    }
                    let mut p = policy;
                    if let Some(own) = &sub.traffic_policy {
                        p.merge(own);
                    }
                    subsets.push(SubsetRule {
                        name: sub.name.clone(),
                        labels: sub.labels.clone(),
                        policy: p,
                    });
                }
                let host = hostname(host, ns);
                if let Some(other) = self.rules.get(&host) {
                    self.notes.push((
                        doc.describe(),
                        format!("not applied: {} already applies to {host}", other.origin),
                    ));
                } else {
                    self.rules.insert(
                        host,
                        Arc::new(DestinationRule {
                            origin,
                            policy,
                            subsets,
                        }),
                    );
                }
                Ok(())
            }
            TrafficKind::FaultInjection => self.add_fault(doc, &origin, &err),
        }
    }

    fn add_tcp_route(
        &mut self,
        doc: &TrafficDocument,
        origin: &Arc<str>,
        err: &dyn Fn(&str, &str) -> TrafficError,
    ) -> Result<(), TrafficError> {
        let ns = &doc.metadata.namespace;
        let parents = doc
            .spec
            .parent_refs
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| err("spec.parentRefs", "needs at least one parent"))?;
        let mut backends = Vec::new();
        for (r, rule) in doc.spec.rules.iter().flatten().enumerate() {
            for (b, backend) in rule.backend_refs.iter().enumerate() {
                let field = |f: &str| format!("spec.rules[{r}].backendRefs[{b}]{f}");
                if !matches!(backend.group.as_deref(), None | Some("" | "core"))
                    || !matches!(backend.kind.as_deref(), None | Some("Service"))
                {
                    return Err(err(&field(".kind"), "only a core Service is a backend"));
                }
                let port = backend
                    .port
                    .filter(|p| *p != 0)
                    .ok_or_else(|| err(&field(".port"), "is required for a Service"))?;
                let namespace = backend.namespace.as_deref().unwrap_or(ns);
                backends.push(WeightedBackend {
                    host: hostname(&backend.name, namespace),
                    subset: None,
                    port: Some(port),
                    weight: backend.weight.unwrap_or(1),
                });
            }
        }
        if backends.is_empty() {
            return Err(err("spec.rules", "needs at least one backendRef"));
        }
        let mut applies = false;
        for (p, parent) in parents.iter().enumerate() {
            if !parent.is_service() {
                continue;
            }
            if parent.port == Some(0) {
                return Err(err(
                    &format!("spec.parentRefs[{p}].port"),
                    "0 is not a port",
                ));
            }
            applies = true;
            let host = hostname(&parent.name, parent.namespace.as_deref().unwrap_or(ns));
            let rule = RouteRule {
                port: parent.port,
                matches: Vec::new(),
                backends: backends.clone(),
            };
            self.add_route(doc, origin, host, vec![rule]);
        }
        if !applies {
            self.notes.push((
                doc.describe(),
                "not applied at the node: no parentRef of kind Service (group \"\")".to_owned(),
            ));
        }
        Ok(())
    }

    fn add_virtual_service(
        &mut self,
        doc: &TrafficDocument,
        origin: &Arc<str>,
        err: &dyn Fn(&str, &str) -> TrafficError,
    ) -> Result<(), TrafficError> {
        let ns = &doc.metadata.namespace;
        let s = &doc.spec;
        let hosts = s
            .hosts
            .as_deref()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("spec.hosts", "needs at least one host"))?;
        let mesh =
            |gateways: &[String]| gateways.is_empty() || gateways.iter().any(|g| g == "mesh");
        if !mesh(s.gateways.as_deref().unwrap_or_default()) {
            self.notes.push((
                doc.describe(),
                "not applied at the node: bound to gateways only (add `mesh`)".to_owned(),
            ));
            return Ok(());
        }
        let mut rules = Vec::new();
        for (t, tcp) in s.tcp.iter().flatten().enumerate() {
            if tcp.route.is_empty() {
                return Err(err(&format!("spec.tcp[{t}].route"), "needs a destination"));
            }
            let single = tcp.route.len() == 1;
            let mut backends = Vec::new();
            for (d, dest) in tcp.route.iter().enumerate() {
                if dest.destination.host.is_empty() {
                    return Err(err(
                        &format!("spec.tcp[{t}].route[{d}].destination.host"),
                        "is required",
                    ));
                }
                backends.push(WeightedBackend {
                    host: hostname(&dest.destination.host, ns),
                    subset: dest.destination.subset.clone(),
                    port: dest.destination.port.map(|p| p.number).filter(|p| *p != 0),
                    weight: dest.weight.unwrap_or(if single { 100 } else { 0 }),
                });
            }
            // A match per port (the rule applies to the ports its matches name).
            let own: Vec<&L4Match> = tcp.matches.iter().filter(|m| mesh(&m.gateways)).collect();
            if !tcp.matches.is_empty() && own.is_empty() {
                continue;
            }
            let to_match = |m: &L4Match| Match {
                destination_subnets: m.destination_subnets.clone(),
                source_subnet: m.source_subnet,
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
            };
            if own.is_empty() {
                rules.push(RouteRule {
                    port: None,
                    matches: Vec::new(),
                    backends,
                });
            } else {
                for m in own {
                    rules.push(RouteRule {
                        port: m.port,
                        matches: vec![to_match(m)],
                        backends: backends.clone(),
                    });
                }
            }
        }
        if rules.is_empty() {
            if s.tcp.is_none() {
                self.notes.push((
                    doc.describe(),
                    "not applied at the node: no tcp routes".to_owned(),
                ));
            }
            return Ok(());
        }
        for host in hosts {
            self.add_route(doc, origin, hostname(host, ns), rules.clone());
        }
        Ok(())
    }

    fn add_route(
        &mut self,
        doc: &TrafficDocument,
        origin: &Arc<str>,
        host: String,
        rules: Vec<RouteRule>,
    ) {
        match self.routes.get_mut(&host) {
            // Several routes of one kind for a service: the first by name wins. A TCPRoute
            // and a VirtualService: the TCPRoute (the Gateway API is the newer binding).
            Some(existing) => {
                let tcp_route_wins =
                    doc.kind == TrafficKind::TcpRoute && !existing.origin.starts_with("TCPRoute ");
                let same_origin = existing.origin == *origin;
                if same_origin {
                    Arc::make_mut(existing).rules.extend(rules);
                } else if tcp_route_wins {
                    self.notes.push((
                        existing.origin.to_string(),
                        format!("not applied to {host}: {origin} routes it"),
                    ));
                    *existing = Arc::new(Route {
                        origin: Arc::clone(origin),
                        rules,
                    });
                } else {
                    self.notes.push((
                        doc.describe(),
                        format!("not applied to {host}: {} routes it", existing.origin),
                    ));
                }
            }
            None => {
                self.routes.insert(
                    host,
                    Arc::new(Route {
                        origin: Arc::clone(origin),
                        rules,
                    }),
                );
            }
        }
    }

    fn add_fault(
        &mut self,
        doc: &TrafficDocument,
        origin: &Arc<str>,
        err: &dyn Fn(&str, &str) -> TrafficError,
    ) -> Result<(), TrafficError> {
        let s = &doc.spec;
        let targets = s
            .target_refs
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err("spec.targetRefs", "needs at least one Service"))?;
        let share = |field: &str, p: f64| {
            if p.is_finite() && (0.0..=100.0).contains(&p) {
                Ok(p / 100.0)
            } else {
                Err(err(field, "must be between 0 and 100"))
            }
        };
        let abort = s
            .abort
            .as_ref()
            .map(|a| share("spec.abort.percentage", a.percentage))
            .transpose()?
            .unwrap_or(0.0);
        let delay = s
            .delay
            .as_ref()
            .map(|d| share("spec.delay.percentage", d.percentage).map(|p| (p, d.fixed_delay.0)))
            .transpose()?;
        if s.abort.is_none() && s.delay.is_none() {
            return Err(err("spec", "needs an abort or a delay"));
        }
        for (t, target) in targets.iter().enumerate() {
            if target.kind != "Service"
                || !matches!(target.group.as_deref(), None | Some("" | "core"))
            {
                return Err(err(
                    &format!("spec.targetRefs[{t}].kind"),
                    "only a core Service is a target",
                ));
            }
            let host = hostname(&target.name, &doc.metadata.namespace);
            self.faults.entry(host).or_default().push(Arc::new(Fault {
                origin: Arc::clone(origin),
                port: target.port,
                sources: s.sources.clone().unwrap_or_default(),
                abort,
                delay,
            }));
        }
        Ok(())
    }

    /// The documents, as given.
    #[must_use]
    pub fn documents(&self) -> &[TrafficDocument] {
        &self.documents
    }

    /// What of the documents the node does not apply: `(document, note)`.
    #[must_use]
    pub fn notes(&self) -> &[(String, String)] {
        &self.notes
    }

    /// The route splitting connections to the service `host`.
    #[must_use]
    pub fn route(&self, host: &str) -> Option<&Arc<Route>> {
        self.routes.get(host)
    }

    /// The `DestinationRule` of the service `host`.
    #[must_use]
    pub fn rule(&self, host: &str) -> Option<&Arc<DestinationRule>> {
        self.rules.get(host)
    }

    /// The faults injected into connections to the service `host`.
    #[must_use]
    pub fn faults(&self, host: &str) -> &[Arc<Fault>] {
        self.faults.get(host).map_or(&[], Vec::as_slice)
    }

    /// Whether nothing is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }
}

fn error(index: usize, doc: &TrafficDocument, field: &str, reason: &str) -> TrafficError {
    TrafficError {
        index,
        document: doc.describe(),
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
