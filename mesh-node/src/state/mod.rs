//! What the mesh knows about: workloads, services, policies and traffic rules, and the sources that feed it:
//! the configuration file (`file`: the only source without Kubernetes, and how VMs join) and
//! the Kubernetes API (`kube`), which merges the file's state into the cluster's.

pub mod file;
#[cfg(feature = "kubernetes")]
pub mod kube;
pub mod service;

pub use service::{Service, ServiceTable, validate_services};

use crate::workload::Workload;

/// Everything the mesh knows at one moment, as the proxy and the enroller consume it.
#[derive(Debug)]
pub struct MeshState {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: std::sync::Arc<crate::policy::PolicyStore>,
    /// Routes, destination rules and faults (`TCPRoute`, `VirtualService`, `DestinationRule`,
    /// `FaultInjection`).
    pub traffic: std::sync::Arc<crate::traffic::TrafficSet>,
    /// The other networks and their gateways (`networks`).
    pub networks: Vec<crate::network::Network>,
    /// This node's zone (for services preferring their zone), when known.
    pub zone: Option<String>,
    /// Why the state is not complete yet (a source has not synced): while set, the daemon
    /// neither enrolls nor unenrolls pods and reports not ready.
    pub pending: Option<String>,
}
