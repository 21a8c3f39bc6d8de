//! A workload: one pod or VM of the mesh, with its identity, addresses and placement, as every
//! state source produces it and the proxy, the policies, the metrics and the enroller read it.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// A workload: one pod (or VM) with its identity, addresses and placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    /// Workload name (the pod name in Kubernetes).
    pub name: String,
    /// Namespace. Default: `default`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Service account; with the namespace and the trust domain it forms the workload's SPIFFE
    /// identity. Default: `default`.
    #[serde(default = "default_namespace")]
    pub service_account: String,
    /// Labels (Kubernetes pod labels): policy selectors match them; `app` and `version` feed
    /// metrics. Default: none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The workload's IP addresses (IPv4 and/or IPv6).
    pub ips: Vec<IpAddr>,
    /// Name of the node the workload runs on.
    pub node: String,
    /// Path of the workload's network namespace on its node (e.g. `/run/netns/web-1` or
    /// `/proc/<pid>/ns/net`). Required for enrolled workloads on this node.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Whether the workload is in the mesh (its traffic is captured). Default: `true`.
    #[serde(default = "yes")]
    pub enrolled: bool,
    /// The network the workload is on: workloads of another network than this node's
    /// (`network`) are reached through that network's gateway (`networks`), and only as
    /// endpoints of a service. Default: none, which is this node's network (the cluster's own
    /// pods need not name it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// The SPIFFE trust domain of the workload's identity, when it is not the mesh's own (a
    /// workload of another cluster with a trust domain of its own; its roots must be in
    /// `identity.trustBundleFiles` and the domain in `identity.trustDomainAliases`). Default:
    /// `identity.trustDomain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

pub(crate) fn default_namespace() -> String {
    "default".to_owned()
}

pub(crate) fn yes() -> bool {
    true
}

impl Workload {
    /// `namespace/name`, unique in the mesh.
    #[must_use]
    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the workload is on another network than `local` (this node's): unnamed is
    /// local.
    #[must_use]
    pub fn remote_network(&self, local: &str) -> bool {
        !self.network.is_empty() && self.network != local
    }
}

/// Checks a workload list for problems a YAML schema cannot express; returns the offending
/// field path and the reason.
pub fn validate_workloads(workloads: &[Workload]) -> Result<(), (String, String)> {
    let mut uids = std::collections::HashSet::new();
    let mut ips = std::collections::HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        let field = |f: &str| format!("workloads[{i}].{f}");
        if w.name.is_empty() {
            return Err((field("name"), "must not be empty".to_owned()));
        }
        if w.node.is_empty() {
            return Err((field("node"), "must not be empty".to_owned()));
        }
        if w.ips.is_empty() {
            return Err((field("ips"), "needs at least one address".to_owned()));
        }
        // The namespace and service account are the path of the workload's SPIFFE id.
        for (name, value) in [
            ("namespace", &w.namespace),
            ("serviceAccount", &w.service_account),
        ] {
            if !crate::identity::valid_segment(value) {
                return Err((
                    field(name),
                    "must be a SPIFFE path segment: letters, digits, `.`, `-`, `_`".to_owned(),
                ));
            }
        }
        if !uids.insert(w.uid()) {
            return Err((field("name"), format!("{} is listed twice", w.uid())));
        }
        for (j, ip) in w.ips.iter().enumerate() {
            if let Some(other) = ips.insert(*ip, w.uid()) {
                return Err((
                    field(&format!("ips[{j}]")),
                    format!("{ip} is also used by {other}"),
                ));
            }
        }
        if w.trust_domain
            .as_ref()
            .is_some_and(|td| !crate::identity::valid_trust_domain(td))
        {
            return Err((
                field("trustDomain"),
                "must be a SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`"
                    .to_owned(),
            ));
        }
        if w.netns.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err((field("netns"), "must be an absolute path".to_owned()));
        }
    }
    Ok(())
}
