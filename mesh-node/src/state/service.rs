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
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::workload::Workload;

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

/// The endpoints one service address and port leads to, for this node.
#[derive(Debug)]
pub struct Backends {
    pub service: Arc<ServiceRef>,
    /// The endpoints a connection may go to (after the locality preference), in a stable order.
    candidates: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Backends {
    /// The endpoint for the next connection (round robin), or `None` when no endpoint is ready.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.candidates.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.candidates.len();
        Some(self.candidates[i])
    }

    /// How many endpoints connections are spread across.
    #[must_use]
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }
}

/// Service address and port → endpoints, compiled for one node's locality.
#[derive(Debug, Default)]
pub struct ServiceTable {
    by_addr: HashMap<SocketAddr, Arc<Backends>>,
}

/// A ready endpoint before the locality choice.
struct Candidate {
    addr: SocketAddr,
    node: Option<String>,
    zone: Option<String>,
}

impl ServiceTable {
    /// Compiles `services` for a proxy on `node` in `zone`; `workloads` resolve selectors and
    /// the placement of endpoints.
    #[must_use]
    pub fn build(
        services: &[Service],
        workloads: &[Workload],
        node: &str,
        zone: Option<&str>,
    ) -> Self {
        let by_ip: HashMap<IpAddr, &Workload> = workloads
            .iter()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w)))
            .collect();
        let mut by_addr = HashMap::new();
        for service in services {
            let reference = Arc::new(ServiceRef {
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                hostname: service.hostname().into(),
            });
            for port in &service.ports {
                let target = port.target_port.unwrap_or(port.port);
                let mut ready: Vec<Candidate> = Vec::new();
                if let Some(selector) = &service.selector {
                    let selected = workloads.iter().filter(|w| {
                        w.namespace == service.namespace
                            && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    });
                    for w in selected {
                        ready.extend(w.ips.iter().map(|ip| Candidate {
                            addr: SocketAddr::new(*ip, target),
                            node: Some(w.node.clone()),
                            zone: None,
                        }));
                    }
                }
                for e in service.endpoints.iter().filter(|e| e.ready) {
                    let port = e.ports.get(&port.port).copied().unwrap_or(target);
                    let addr = SocketAddr::new(e.address, port);
                    if ready.iter().any(|c| c.addr == addr) {
                        continue;
                    }
                    ready.push(Candidate {
                        addr,
                        node: e
                            .node
                            .clone()
                            .or_else(|| by_ip.get(&e.address).map(|w| w.node.clone())),
                        zone: e.zone.clone(),
                    });
                }
                for vip in &service.addresses {
                    let family: Vec<&Candidate> = ready
                        .iter()
                        .filter(|c| c.addr.is_ipv4() == vip.is_ipv4())
                        .collect();
                    let mut candidates =
                        choose_locality(&family, service.load_balancing, node, zone);
                    candidates.sort_unstable();
                    by_addr.insert(
                        SocketAddr::new(*vip, port.port),
                        Arc::new(Backends {
                            service: Arc::clone(&reference),
                            candidates,
                            next: AtomicUsize::new(0),
                        }),
                    );
                }
            }
        }
        Self { by_addr }
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
}

/// The endpoints a connection may go to under `locality`.
fn choose_locality(
    ready: &[&Candidate],
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
mod tests {
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
        }
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
        let table = ServiceTable::build(&[s], &workloads, "a", None);
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
        let table = ServiceTable::build(&[s], &[], "a", None);
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
            let table = ServiceTable::build(&[s], &[], node, zone);
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
    fn no_ready_endpoint_picks_nothing() {
        let s = service(
            "{name: s, addresses: [198.19.0.13], ports: [{port: 80}], selector: {app: none}}",
        );
        let table = ServiceTable::build(&[s], &[], "a", None);
        let b = table.lookup("198.19.0.13:80".parse().unwrap()).unwrap();
        assert!(b.pick().is_none());
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
}
