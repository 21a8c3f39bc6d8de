//! Istio `WorkloadEntry` (`networking.istio.io/v1`) → workloads and service endpoints: a VM
//! or bare-metal host joined to the mesh, running its own `mesh-node` (see
//! `docs/operations.md`, "Joining a VM to the mesh").
//!
//! An entry becomes a [`Workload`] named after it, in its namespace, with the entry's
//! `serviceAccount` (default `default`), `labels`, `address` and `network`; it is enrolled when
//! its namespace is (and it is not opted out by the enrollment label), and its node is a name
//! of its own, `workloadentry/<name>`, never this node's: the cluster reaches it over HBONE on
//! `address:15008`, where the VM's daemon listens. A Service selects entries by its
//! `spec.selector` in its namespace, as istiod does: each becomes an endpoint, its `ports`
//! (service port name → port on the entry) mapping the service ports, its `locality`
//! (`region/zone/subzone`) giving the endpoint's zone. `weight` is not used (endpoints are
//! chosen round robin). An entry whose `address` is not an IP address (Istio also allows a
//! host name) is left out, with a warning once per version.

use std::collections::{BTreeMap, HashSet};

use kube::{ResourceExt as _, api::DynamicObject};
use serde::Deserialize;
use tracing::warn;

use crate::{
    config::KubernetesConfig,
    state::service::{Service, ServiceEndpoint},
    workload::Workload,
};

/// Group, version, kind and plural of the mirrored kind.
pub const API: (&str, &str, &str, &str) = (
    "networking.istio.io",
    "v1",
    "WorkloadEntry",
    "workloadentries",
);

/// Prefix of the node name of an entry's workload.
pub const NODE_PREFIX: &str = "workloadentry/";

/// The fields of `spec` the mesh reads (others are ignored, as istiod's ambient mode does).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Spec {
    address: String,
    labels: BTreeMap<String, String>,
    ports: BTreeMap<String, u32>,
    network: String,
    locality: String,
    service_account: String,
}

/// One entry, converted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub workload: Workload,
    /// The zone of its `locality`, if any.
    pub zone: Option<String>,
    /// Service port name → port on the entry.
    pub ports: BTreeMap<String, u16>,
}

/// An entry as a workload, or why it cannot be one.
pub fn entry(
    obj: &DynamicObject,
    enrolled_namespaces: &HashSet<String>,
    config: &KubernetesConfig,
) -> Result<Entry, String> {
    let spec: Spec = match obj.data.get("spec") {
        Some(spec) => serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?,
        None => Spec::default(),
    };
    let address: std::net::IpAddr = spec.address.parse().map_err(|_| {
        format!(
            "spec.address {:?} is not an IP address (host names are not supported)",
            spec.address
        )
    })?;
    let ports = spec
        .ports
        .iter()
        .map(|(name, port)| {
            u16::try_from(*port)
                .ok()
                .filter(|p| *p != 0)
                .map(|p| (name.clone(), p))
                .ok_or_else(|| format!("spec.ports.{name}: {port} is not a port"))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let namespace = obj.namespace().unwrap_or_else(|| "default".to_owned());
    let name = obj.name_any();
    let opted_out = spec.labels.get(&config.enroll_label) == Some(&config.opt_out_value);
    let zone = spec
        .locality
        .split('/')
        .nth(1)
        .filter(|z| !z.is_empty())
        .map(str::to_owned);
    Ok(Entry {
        workload: Workload {
            node: format!("{NODE_PREFIX}{name}"),
            enrolled: enrolled_namespaces.contains(&namespace) && !opted_out,
            service_account: Some(spec.service_account)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            labels: spec.labels,
            ips: vec![address],
            netns: None,
            network: spec.network,
            trust_domain: None,
            namespace,
            name,
        },
        zone,
        ports,
    })
}

/// Converts every entry, warning once per (uid, resourceVersion) about those left out.
#[derive(Debug, Default)]
pub struct EntryBuilder {
    warned: HashSet<(String, String)>,
}

impl EntryBuilder {
    pub fn build<'a>(
        &mut self,
        objects: impl IntoIterator<Item = &'a DynamicObject>,
        enrolled_namespaces: &HashSet<String>,
        config: &KubernetesConfig,
    ) -> Vec<Entry> {
        let mut live = HashSet::new();
        let mut entries = Vec::new();
        for obj in objects {
            match entry(obj, enrolled_namespaces, config) {
                Ok(e) => entries.push(e),
                Err(reason) => {
                    let key = (
                        super::convert::object_uid(obj, &API.2),
                        obj.resource_version().unwrap_or_default(),
                    );
                    if !self.warned.contains(&key) {
                        warn!(
                            namespace = obj.namespace().unwrap_or_default(),
                            name = obj.name_any(),
                            reason,
                            "WorkloadEntry left out"
                        );
                    }
                    live.insert(key);
                }
            }
        }
        self.warned = live;
        entries
    }
}

/// Adds to `service` (a Kubernetes Service with `selector`) the entries of its namespace that
/// the selector selects, as endpoints. An empty selector selects nothing (as Kubernetes).
pub fn add_endpoints(
    service: &mut Service,
    selector: &BTreeMap<String, String>,
    entries: &[Entry],
) {
    if selector.is_empty() {
        return;
    }
    let selected = entries.iter().filter(|e| {
        e.workload.namespace == service.namespace
            && selector
                .iter()
                .all(|(k, v)| e.workload.labels.get(k) == Some(v))
    });
    for e in selected {
        let ports: BTreeMap<u16, u16> = service
            .ports
            .iter()
            .filter_map(|p| {
                let name = p.name.as_deref().unwrap_or_default();
                Some((p.port, *e.ports.get(name)?))
            })
            .collect();
        for address in &e.workload.ips {
            if service.endpoints.iter().any(|x| x.address == *address) {
                continue;
            }
            service.endpoints.push(ServiceEndpoint {
                address: *address,
                ready: true,
                node: Some(e.workload.node.clone()),
                zone: e.zone.clone(),
                ports: ports.clone(),
            });
        }
    }
    service.endpoints.sort_by_key(|e| e.address);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::service::{Locality, ServicePort};

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("a DynamicObject")
    }

    fn vm(spec: serde_json::Value) -> DynamicObject {
        let mut value = serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": "vm-1", "namespace": "shop", "uid": "u1", "resourceVersion": "1"},
        });
        value["spec"] = spec;
        object(value)
    }

    fn enrolled() -> HashSet<String> {
        ["shop".to_owned()].into()
    }

    #[test]
    fn an_entry_becomes_an_enrolled_workload_of_its_own_node() {
        let obj = vm(serde_json::json!({
            "address": "10.0.0.7",
            "labels": {"app": "legacy", "version": "v1"},
            "serviceAccount": "legacy",
            "network": "vm-net",
            "locality": "eu/eu-west-1a/rack3",
            "ports": {"http": 8080},
            "weight": 3,
        }));
        let e = entry(&obj, &enrolled(), &KubernetesConfig::default()).expect("converts");
        let w = &e.workload;
        assert_eq!((w.name.as_str(), w.namespace.as_str()), ("vm-1", "shop"));
        assert_eq!(w.service_account, "legacy");
        assert_eq!(w.node, "workloadentry/vm-1");
        assert!(w.enrolled);
        assert_eq!(w.ips, ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(w.network, "vm-net");
        assert_eq!(w.labels["app"], "legacy");
        assert_eq!(w.netns, None);
        assert_eq!(e.zone.as_deref(), Some("eu-west-1a"));
        assert_eq!(e.ports["http"], 8080);
    }

    #[test]
    fn defaults_opt_out_and_bad_entries() {
        let config = KubernetesConfig::default();
        let bare = entry(
            &vm(serde_json::json!({"address": "fd00::7"})),
            &enrolled(),
            &config,
        )
        .expect("converts");
        assert_eq!(bare.workload.service_account, "default");
        assert_eq!(bare.workload.network, "");
        assert_eq!(bare.zone, None);
        let elsewhere = entry(
            &vm(serde_json::json!({"address": "10.0.0.7"})),
            &HashSet::new(),
            &config,
        )
        .expect("converts");
        assert!(!elsewhere.workload.enrolled, "namespace not enrolled");
        let opted_out = serde_json::json!({
            "address": "10.0.0.7",
            "labels": {"mesh.io/dataplane-mode": "none"},
        });
        assert!(
            !entry(&vm(opted_out), &enrolled(), &config)
                .unwrap()
                .workload
                .enrolled
        );
        for bad in [
            serde_json::json!({"address": "vm-1.example.com"}),
            serde_json::json!({}),
            serde_json::json!({"address": "10.0.0.7", "ports": {"http": 70000}}),
            serde_json::json!({"address": "10.0.0.7", "labels": "x"}),
        ] {
            assert!(
                entry(&vm(bad.clone()), &enrolled(), &config).is_err(),
                "{bad}"
            );
        }
        let mut builder = EntryBuilder::default();
        let objects = [vm(serde_json::json!({"address": "nope"}))];
        assert!(builder.build(&objects, &enrolled(), &config).is_empty());
    }

    #[test]
    fn a_service_selects_entries_by_labels_in_its_namespace() {
        let config = KubernetesConfig::default();
        let mk = |name: &str, ns: &str, app: &str, ip: &str| {
            entry(
                &object(serde_json::json!({
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"address": ip, "labels": {"app": app}, "ports": {"http": 9090}},
                })),
                &enrolled(),
                &config,
            )
            .unwrap()
        };
        let entries = [
            mk("vm-1", "shop", "web", "10.0.0.7"),
            mk("vm-2", "shop", "db", "10.0.0.8"),
            mk("vm-3", "other", "web", "10.0.0.9"),
        ];
        let mut service = Service {
            name: "web".to_owned(),
            namespace: "shop".to_owned(),
            addresses: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: Some("http".to_owned()),
                    port: 80,
                    target_port: Some(8080),
                },
                ServicePort {
                    name: Some("admin".to_owned()),
                    port: 81,
                    target_port: None,
                },
            ],
            selector: None,
            endpoints: Vec::new(),
            load_balancing: Locality::Any,
            connection_rate_limit: None,
        };
        add_endpoints(&mut service, &BTreeMap::new(), &entries);
        assert!(
            service.endpoints.is_empty(),
            "an empty selector selects nothing"
        );
        let selector: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        add_endpoints(&mut service, &selector, &entries);
        add_endpoints(&mut service, &selector, &entries);
        assert_eq!(service.endpoints.len(), 1, "{:?}", service.endpoints);
        let e = &service.endpoints[0];
        assert_eq!(e.address, "10.0.0.7".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(e.node.as_deref(), Some("workloadentry/vm-1"));
        assert_eq!(
            e.ports,
            [(80, 9090)].into(),
            "named port mapped, others by targetPort"
        );
        assert!(e.ready);
    }
}
