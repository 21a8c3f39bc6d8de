//! Services: virtual addresses (Kubernetes `ClusterIP`s) whose connections the daemon
//! load-balances, one choice per connection, across the ready endpoints.
//!
//! Endpoints come from a label `selector` over the known workloads (as Kubernetes' service
//! controller does) and from an explicit list (what the Kubernetes source reads from
//! `EndpointSlice`s, or static entries such as VMs). The proxy looks a captured destination up
//! in a [`ServiceTable`] compiled once per state change for this node's locality.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

mod hosts;
pub use hosts::{HostEntry, HostIndex};

use crate::{
    identity::Identity,
    traffic::{
        Fault, L4Policy, Match, Route, TrafficSet, WeightedBackend,
        runtime::{Cluster, Limiter, PoolSlot, Registry},
    },
    workload::Workload,
};

/// A service: virtual addresses and ports in front of a set of endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace. Default: `default`.
    #[serde(default = "crate::workload::default_namespace")]
    pub namespace: String,
    /// Virtual addresses (cluster IPs) that clients connect to.
    pub addresses: Vec<IpAddr>,
    /// Service ports.
    pub ports: Vec<ServicePort>,
    /// Workloads of the same namespace carrying all these labels are endpoints. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Endpoints listed explicitly (the Kubernetes source fills them from `EndpointSlice`s).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ServiceEndpoint>,
    /// Which endpoints a connection may go to, by locality. Default: `any`.
    #[serde(default)]
    pub load_balancing: Locality,
    /// New connections per second admitted to the service from each node. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_rate_limit: Option<crate::traffic::RateLimit>,
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port clients connect to on the service address.
    pub port: u16,
    /// Port on the endpoints. Default: `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEndpoint {
    /// Endpoint address.
    pub address: IpAddr,
    /// Whether the endpoint takes connections. Default: `true`.
    #[serde(default = "crate::workload::yes")]
    pub ready: bool,
    /// Node the endpoint runs on. Default: the node of the workload with this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Zone the endpoint runs in. Default: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Service port → port on this endpoint, where it differs from the service's
    /// `targetPort`. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
}

/// Locality preference of a service's load balancing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Locality {
    /// Any ready endpoint.
    #[default]
    Any,
    /// Endpoints in this node's zone when there are any, else any.
    PreferZone,
    /// Endpoints on this node, else in this zone, else any.
    PreferNode,
    /// Only endpoints on this node (Kubernetes `internalTrafficPolicy: Local`).
    NodeOnly,
}

impl Service {
    /// `name.namespace.svc.cluster.local`, as Istio's `destination_service` label.
    #[must_use]
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// Checks a service list for problems a YAML schema cannot express.
pub fn validate_services(services: &[Service]) -> Result<(), (String, String)> {
    let mut seen = HashMap::new();
    for (i, s) in services.iter().enumerate() {
        let field = |f: &str| format!("services[{i}].{f}");
        if s.name.is_empty() {
            return Err((field("name"), "must not be empty".to_owned()));
        }
        if s.addresses.is_empty() {
            return Err((field("addresses"), "needs at least one address".to_owned()));
        }
        if s.ports.is_empty() {
            return Err((field("ports"), "needs at least one port".to_owned()));
        }
        for (j, p) in s.ports.iter().enumerate() {
            if p.port == 0 || p.target_port == Some(0) {
                return Err((field(&format!("ports[{j}]")), "0 is not a port".to_owned()));
            }
        }
        for (k, addr) in s.addresses.iter().enumerate() {
            for p in &s.ports {
                let key = SocketAddr::new(*addr, p.port);
                if let Some(other) = seen.insert(key, format!("{}/{}", s.namespace, s.name)) {
                    return Err((
                        field(&format!("addresses[{k}]")),
                        format!("{key} is also served by {other}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A service as the proxy and metrics name it.
#[derive(Debug)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub hostname: Arc<str>,
}

/// Where connections to one service address and port go, for this node: the service's own
/// endpoints, or the backends of the route that splits it, with the rate limit and the faults
/// of the service.
#[derive(Debug)]
pub struct Backends {
    pub service: Arc<ServiceRef>,
    /// The service's own endpoints (after the locality preference) with its
    /// `DestinationRule` policy: where connections go without a route.
    pub default: Arc<Cluster>,
    route: Option<CompiledRoute>,
    limiter: Option<Arc<Limiter>>,
    faults: Vec<Arc<Fault>>,
}

/// A route compiled against the services: each rule's backends are clusters.
#[derive(Debug)]
struct CompiledRoute {
    origin: Arc<str>,
    rules: Vec<CompiledRule>,
}

#[derive(Debug)]
struct CompiledRule {
    matches: Vec<Match>,
    /// `(cumulative weight, backend)`; the last weight is the total.
    splits: Vec<(u64, Arc<Cluster>)>,
}

/// The connection a plan is made for.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub workload: &'a Workload,
    /// The source's SPIFFE identity (per-source rate limits).
    pub identity: &'a Identity,
    pub ip: IpAddr,
}

/// What the traffic rules decided for one new connection.
#[derive(Debug)]
pub struct Plan {
    /// The destination to pick endpoints from.
    pub cluster: Arc<Cluster>,
    /// The route that chose it (`TCPRoute ns/name`), when one did.
    pub route: Option<Arc<str>>,
    /// Hold the connection this long first (an injected delay), and the fault's name.
    pub delay: Option<(Duration, Arc<str>)>,
    /// The connection's place in the destination's pool.
    pub slot: PoolSlot,
}

/// Why the traffic rules refused a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// An injected abort (the `FaultInjection`).
    Fault(Arc<str>),
    /// The service's connection rate limit.
    RateLimited,
    /// The destination's `maxConnections` are open (the destination).
    PoolFull(Arc<str>),
    /// The route's rule sends nothing anywhere (every weight is 0).
    NoBackend,
}

impl Backends {
    /// The endpoint for the next connection without any traffic rule (round robin over the
    /// service's own endpoints), or `None` when no endpoint is ready.
    #[must_use]
    pub fn pick(&self) -> Option<SocketAddr> {
        self.default
            .pick(&[], Instant::now(), &mut Vec::new())
            .map(|lease| lease.addr)
    }

    /// How many endpoints connections are spread across without a route.
    #[must_use]
    pub fn len(&self) -> usize {
        self.default.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.default.is_empty()
    }

    /// Decides a new connection from `source` to `dst` (this service address): injected
    /// faults, the rate limit, the route's split, the pool limit, in this order.
    pub fn plan(
        &self,
        source: &Source<'_>,
        dst: SocketAddr,
        now: Instant,
    ) -> Result<Plan, Refusal> {
        let mut delay = None;
        for fault in &self.faults {
            if fault.port.is_some_and(|p| p != dst.port()) || !fault_applies(fault, source) {
                continue;
            }
            if fault.abort > 0.0 && fastrand::f64() < fault.abort {
                return Err(Refusal::Fault(Arc::clone(&fault.origin)));
            }
            if let Some((share, duration)) = fault.delay
                && delay.is_none()
                && fastrand::f64() < share
            {
                delay = Some((duration, Arc::clone(&fault.origin)));
            }
        }
        if let Some(limiter) = &self.limiter
            && !limiter.admit(|| source.identity.to_string(), now)
        {
            return Err(Refusal::RateLimited);
        }
        let (cluster, route) = match &self.route {
            None => (&self.default, None),
            Some(route) => {
                let rule = route.rules.iter().find(|r| {
                    r.matches.is_empty() || r.matches.iter().any(|m| matches(m, source, dst))
                });
                match rule {
                    // No rule matches: the service's own endpoints (as Istio's default route).
                    None => (&self.default, None),
                    Some(rule) => {
                        let total = rule.splits.last().map_or(0, |(w, _)| *w);
                        if total == 0 {
                            return Err(Refusal::NoBackend);
                        }
                        let roll = fastrand::u64(..total);
                        let (_, cluster) = rule
                            .splits
                            .iter()
                            .find(|(w, _)| roll < *w)
                            .ok_or(Refusal::NoBackend)?;
                        (cluster, Some(Arc::clone(&route.origin)))
                    }
                }
            }
        };
        let slot = cluster
            .reserve()
            .ok_or_else(|| Refusal::PoolFull(Arc::clone(&cluster.name)))?;
        Ok(Plan {
            cluster: Arc::clone(cluster),
            route,
            delay,
            slot,
        })
    }

    /// Whether any traffic rule applies (a route, a limit, a fault or a `DestinationRule`).
    #[must_use]
    pub fn managed(&self) -> bool {
        self.route.is_some()
            || self.limiter.is_some()
            || !self.faults.is_empty()
            || self.default.policy != L4Policy::default()
    }
}

fn fault_applies(fault: &Fault, source: &Source<'_>) -> bool {
    fault.sources.is_empty()
        || fault.sources.iter().any(|s| {
            s.namespace
                .as_ref()
                .is_none_or(|ns| *ns == source.workload.namespace)
                && s.service_account
                    .as_ref()
                    .is_none_or(|sa| *sa == source.workload.service_account)
                && s.labels
                    .iter()
                    .all(|(k, v)| source.workload.labels.get(k) == Some(v))
        })
}

fn matches(m: &Match, source: &Source<'_>, dst: SocketAddr) -> bool {
    (m.destination_subnets.is_empty()
        || m.destination_subnets.iter().any(|n| n.contains(&dst.ip())))
        && m.source_subnet.is_none_or(|n| n.contains(&source.ip))
        && m.source_namespace
            .as_ref()
            .is_none_or(|ns| *ns == source.workload.namespace)
        && m.source_labels
            .iter()
            .all(|(k, v)| source.workload.labels.get(k) == Some(v))
}

/// Service address and port → where its connections go, compiled for one node's locality.
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_addr: HashMap<SocketAddr, Arc<Backends>>,
    /// The services by hostname (inner `CONNECT`s of double HBONE name them).
    hosts: HostIndex,
}

/// A ready endpoint before the locality choice.
struct Candidate<'a> {
    addr: SocketAddr,
    node: Option<String>,
    zone: Option<String>,
    /// The workload's labels, when the endpoint is a known workload (for subsets).
    labels: Option<&'a BTreeMap<String, String>>,
    /// On another network than this node's (reached through its gateway).
    remote: bool,
}

/// What compiling a table needs at hand.
struct Builder<'a> {
    services: &'a [Service],
    workloads: &'a [Workload],
    by_ip: HashMap<IpAddr, &'a Workload>,
    traffic: &'a TrafficSet,
    registry: &'a Registry,
    node: &'a str,
    zone: Option<&'a str>,
    network: &'a str,
}

impl ServiceTable {
    /// Compiles `services` for a proxy on `node` in `zone` and `network`; `workloads` resolve
    /// selectors, subsets and the placement of endpoints, `traffic` adds routes, destination
    /// rules and faults, and `registry` keeps endpoint health, pools and buckets across tables.
    /// Endpoints on this node's network are preferred: a service's endpoints on other networks
    /// take connections only while none of this network is ready.
    #[must_use]
    pub fn build(
        services: &[Service],
        workloads: &[Workload],
        traffic: &TrafficSet,
        registry: &Registry,
        (node, zone): (&str, Option<&str>),
        network: &str,
    ) -> Self {
        let builder = Builder {
            services,
            workloads,
            by_ip: workloads
                .iter()
                .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w)))
                .collect(),
            traffic,
            registry,
            node,
            zone,
            network,
        };
        let mut by_addr = HashMap::new();
        for service in services {
            let reference = Arc::new(ServiceRef {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                hostname: service.hostname().into(),
            });
            let host = &reference.hostname;
            let limiter = service
                .connection_rate_limit
                .as_ref()
                .map(|limit| registry.limiter(host, limit));
            for port in &service.ports {
                let faults: Vec<Arc<Fault>> = traffic
                    .faults(host)
                    .iter()
                    .filter(|f| f.port.is_none_or(|p| p == port.port))
                    .cloned()
                    .collect();
                for vip in &service.addresses {
                    let default = builder.cluster(service, port, None, vip.is_ipv4());
                    let route = traffic
                        .route(host)
                        .and_then(|route| builder.route(route, port.port, vip.is_ipv4()));
                    by_addr.insert(
                        SocketAddr::new(*vip, port.port),
                        Arc::new(Backends {
                            service: Arc::clone(&reference),
                            default: Arc::new(default),
                            route,
                            limiter: limiter.clone(),
                            faults: faults.clone(),
                        }),
                    );
                }
            }
        }
        registry.sweep();
        Self {
            by_addr,
            hosts: HostIndex::build(services, workloads),
        }
    }

    /// The services by hostname.
    #[must_use]
    pub fn hosts(&self) -> &HostIndex {
        &self.hosts
    }

    /// The endpoints behind a service address, if `dst` is one.
    #[must_use]
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Arc<Backends>> {
        self.by_addr.get(&dst)
    }

    /// Whether no service is known.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// The endpoints of the service named `hostname` (`name.namespace.svc.cluster.local`,
    /// any case) on its port `port`: those compiled for an IPv4 service address when it has
    /// one (they are the same endpoints for each address of a family).
    #[must_use]
    pub fn lookup_hostname(&self, hostname: &str, port: u16) -> Option<&Arc<Backends>> {
        self.by_addr
            .iter()
            .filter(|(addr, b)| {
                addr.port() == port && b.service.hostname.eq_ignore_ascii_case(hostname)
            })
            .min_by_key(|(addr, _)| (addr.is_ipv6(), **addr))
            .map(|(_, b)| b)
    }
}

impl Builder<'_> {
    /// The route's rules for the service port `port`, with their backends as clusters of
    /// the address family of the service address.
    fn route(&self, route: &Route, port: u16, ipv4: bool) -> Option<CompiledRoute> {
        let rules: Vec<CompiledRule> = route
            .rules
            .iter()
            .filter(|r| r.port.is_none_or(|p| p == port))
            .map(|r| {
                let mut total = 0;
                let splits = r
                    .backends
                    .iter()
                    .map(|b| {
                        let cluster = self.backend(b, port, ipv4);
                        total += u64::from(b.weight);
                        (total, Arc::new(cluster))
                    })
                    .collect();
                CompiledRule {
                    matches: r.matches.clone(),
                    splits,
                }
            })
            .collect();
        (!rules.is_empty()).then(|| CompiledRoute {
            origin: Arc::clone(&route.origin),
            rules,
        })
    }

    /// One backend of a split as a cluster. A backend that is not a known service (or not
    /// its port) is a cluster without endpoints: its share of connections is refused, as a
    /// route to a missing backend is in the Gateway API.
    fn backend(&self, b: &WeightedBackend, port: u16, ipv4: bool) -> Cluster {
        let port = b.port.unwrap_or(port);
        let service = self.services.iter().find(|s| s.hostname() == b.host);
        if let Some(service) = service
            && let Some(service_port) = service.ports.iter().find(|p| p.port == port)
        {
            return self.cluster(service, service_port, b.subset.as_deref(), ipv4);
        }
        let name: Arc<str> = match &b.subset {
            Some(subset) => format!("{}/{subset}", b.host).into(),
            None => b.host.as_str().into(),
        };
        Cluster::new(
            name,
            b.host.as_str().into(),
            L4Policy::default(),
            &[],
            self.registry,
        )
    }

    /// The endpoints of `service` on `port` (of the family), narrowed to `subset`'s labels,
    /// with the `DestinationRule` policy.
    fn cluster(
        &self,
        service: &Service,
        port: &ServicePort,
        subset: Option<&str>,
        ipv4: bool,
    ) -> Cluster {
        let host: Arc<str> = service.hostname().into();
        let rule = self.traffic.rule(&host);
        // `None`: no subset asked for; `Some(None)`: a subset the rule does not define (it
        // selects nothing, as Istio's "no healthy upstream").
        let subset_rule =
            subset.map(|name| rule.and_then(|r| r.subsets.iter().find(|s| s.name == name)));
        let policy = match (subset_rule, rule) {
            (Some(Some(s)), _) => s.policy,
            (_, Some(r)) => r.policy,
            _ => L4Policy::default(),
        };
        let unknown_subset = matches!(subset_rule, Some(None));
        let labels = subset_rule.flatten().map(|s| &s.labels);
        let name: Arc<str> = match subset {
            Some(subset) => format!("{host}/{subset}").into(),
            None => Arc::clone(&host),
        };
        let ready = self.candidates(service, port);
        let family: Vec<&Candidate<'_>> = ready
            .iter()
            .filter(|c| c.addr.is_ipv4() == ipv4)
            .filter(|c| {
                !unknown_subset
                    && labels.is_none_or(|want| {
                        c.labels
                            .is_some_and(|have| want.iter().all(|(k, v)| have.get(k) == Some(v)))
                    })
            })
            .collect();
        let local: Vec<&Candidate<'_>> = family.iter().copied().filter(|c| !c.remote).collect();
        let tier = if local.is_empty() { &family } else { &local };
        let mut endpoints = choose_locality(tier, service.load_balancing, self.node, self.zone);
        endpoints.sort_unstable();
        Cluster::new(name, host, policy, &endpoints, self.registry)
    }

    /// The ready endpoints of `service` on `port`: selected workloads, then the listed ones.
    fn candidates(&self, service: &Service, port: &ServicePort) -> Vec<Candidate<'_>> {
        let target = port.target_port.unwrap_or(port.port);
        let mut ready: Vec<Candidate<'_>> = Vec::new();
        if let Some(selector) = &service.selector {
            let selected = self.workloads.iter().filter(|w| {
                w.namespace == service.namespace
                    && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            });
            for w in selected {
                ready.extend(w.ips.iter().map(|ip| Candidate {
                    addr: SocketAddr::new(*ip, target),
                    node: Some(w.node.clone()),
                    zone: None,
                    labels: Some(&w.labels),
                    remote: w.remote_network(self.network),
                }));
            }
        }
        for e in service.endpoints.iter().filter(|e| e.ready) {
            let port = e.ports.get(&port.port).copied().unwrap_or(target);
            let addr = SocketAddr::new(e.address, port);
            if ready.iter().any(|c| c.addr == addr) {
                continue;
            }
            let workload = self.by_ip.get(&e.address);
            ready.push(Candidate {
                addr,
                node: e.node.clone().or_else(|| workload.map(|w| w.node.clone())),
                zone: e.zone.clone(),
                labels: workload.map(|w| &w.labels),
                remote: workload.is_some_and(|w| w.remote_network(self.network)),
            });
        }
        ready
    }
}

/// The endpoints a connection may go to under `locality`.
fn choose_locality(
    ready: &[&Candidate<'_>],
    locality: Locality,
    node: &str,
    zone: Option<&str>,
) -> Vec<SocketAddr> {
    let on_node = || -> Vec<SocketAddr> {
        ready
            .iter()
            .filter(|c| c.node.as_deref() == Some(node))
            .map(|c| c.addr)
            .collect()
    };
    let in_zone = || -> Vec<SocketAddr> {
        match zone {
            Some(zone) => ready
                .iter()
                .filter(|c| c.zone.as_deref() == Some(zone))
                .map(|c| c.addr)
                .collect(),
            None => Vec::new(),
        }
    };
    let all = || ready.iter().map(|c| c.addr).collect::<Vec<_>>();
    let first_non_empty = |tiers: &[&dyn Fn() -> Vec<SocketAddr>]| {
        tiers
            .iter()
            .map(|tier| tier())
            .find(|c| !c.is_empty())
            .unwrap_or_default()
    };
    match locality {
        Locality::Any => all(),
        Locality::PreferZone => first_non_empty(&[&in_zone, &all]),
        Locality::PreferNode => first_non_empty(&[&on_node, &in_zone, &all]),
        Locality::NodeOnly => on_node(),
    }
}

#[cfg(test)]
mod tests;
