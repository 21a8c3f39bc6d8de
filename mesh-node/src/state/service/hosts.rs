//! Services by hostname, for the destination side of double HBONE: an inner `CONNECT` names
//! `<service hostname>:<port>`, and the pod it arrives at takes it only as one of that
//! service's endpoints, on the port's target port for that pod.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{Service, ServicePort};
use crate::workload::Workload;

/// One service as a hostname authority resolves it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HostEntry {
    pub hostname: Arc<str>,
    ports: Vec<ServicePort>,
    /// Endpoint address → its own service port → port mapping (empty: the target ports).
    endpoints: HashMap<IpAddr, BTreeMap<u16, u16>>,
}

impl HostEntry {
    /// The application port on the endpoint `ip` for the service port `port`; `None` when
    /// the service has no such port or `ip` is not one of its endpoints.
    #[must_use]
    pub fn target(&self, ip: IpAddr, port: u16) -> Option<u16> {
        let service_port = self.ports.iter().find(|p| p.port == port)?;
        let own = self.endpoints.get(&ip)?;
        Some(
            own.get(&port)
                .copied()
                .unwrap_or(service_port.target_port.unwrap_or(port)),
        )
    }
}

/// Hostname (lower case) → its service.
#[derive(Debug, Default)]
pub struct HostIndex {
    by_host: HashMap<String, HostEntry>,
}

impl HostIndex {
    /// Indexes `services`, whose endpoints are the workloads their selectors select (in any
    /// network) and the ready endpoints they list.
    #[must_use]
    pub fn build(services: &[Service], workloads: &[Workload]) -> Self {
        let mut by_host = HashMap::new();
        for service in services {
            let hostname = service.hostname();
            let mut endpoints: HashMap<IpAddr, BTreeMap<u16, u16>> = HashMap::new();
            if let Some(selector) = &service.selector {
                let selected = workloads.iter().filter(|w| {
                    w.namespace == service.namespace
                        && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                });
                for w in selected {
                    for ip in &w.ips {
                        endpoints.entry(*ip).or_default();
                    }
                }
            }
            for e in service.endpoints.iter().filter(|e| e.ready) {
                endpoints.entry(e.address).or_default().extend(&e.ports);
            }
            by_host.insert(
                hostname.to_ascii_lowercase(),
                HostEntry {
                    hostname: hostname.into(),
                    ports: service.ports.clone(),
                    endpoints,
                },
            );
        }
        Self { by_host }
    }

    /// The service named `hostname` (any case).
    #[must_use]
    pub fn get(&self, hostname: &str) -> Option<&HostEntry> {
        self.by_host.get(&hostname.to_ascii_lowercase())
    }
}
