//! The `istio:` section: istiod as the source of certificates and state.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variables a Kubernetes pod spec sets from the downward API (as for ztunnel):
/// the daemon's own pod, which names the node proxy to istiod.
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_INSTANCE_IP: &str = "INSTANCE_IP";

/// istiod as the control plane: workload certificates from its CA, workloads, services and
/// authorization policies from its delta xDS. Replaces the local CA and the Kubernetes source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioConfig {
    /// Use istiod. Default: `false`.
    pub enabled: bool,
    /// istiod's xDS endpoint, `https://host:port`. Default:
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// istiod's CA endpoint (`IstioCertificateService`), when not `address` (cert-manager
    /// istio-csr, an external istiod). Default: `address`.
    pub ca_address: Option<String>,
    /// istiod's namespace: its certificate must carry `istiod.<namespace>.svc`. Default:
    /// `istio-system`.
    pub namespace: String,
    /// The name istiod's certificate must carry, when not `istiod.<namespace>.svc`. Default:
    /// none.
    pub istiod_san: Option<String>,
    /// The mesh's root certificates (PEM), which istiod's certificate chains to: the
    /// `istio-ca-root-cert` `ConfigMap` mounted. Re-read when it changes. Default:
    /// `/var/run/secrets/istio/root-cert.pem`.
    pub root_cert_file: PathBuf,
    /// The projected service-account token (audience `istio-ca`) sent as the bearer token;
    /// re-read on every request (the kubelet rotates it). Default:
    /// `/var/run/secrets/tokens/istio-token`.
    pub token_file: PathBuf,
    /// This cluster's ID, as istiod knows it (`global.multiCluster.clusterName`). Default:
    /// `Kubernetes`.
    pub cluster_id: String,
    /// The daemon's pod name, part of the node id istiod sees. Default: `$POD_NAME`, else
    /// `mesh-node-<node>`.
    pub pod_name: String,
    /// The daemon's pod namespace. Default: `$POD_NAMESPACE`, else `istio-system`.
    pub pod_namespace: String,
    /// The daemon's pod IP. Default: `$INSTANCE_IP`, else none (`0.0.0.0` in the node id).
    pub pod_ip: Option<std::net::IpAddr>,
    /// The host's `/proc`, scanned for the network namespaces of this node's workloads (by
    /// their addresses). Default: `/proc`.
    pub proc_root: PathBuf,
    /// How often this node's workloads are matched with their network namespaces again, in
    /// milliseconds. Default: 5000.
    pub rescan_interval_ms: u64,
}

impl Default for IstioConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            address: "https://istiod.istio-system.svc:15012".to_owned(),
            ca_address: None,
            namespace: "istio-system".to_owned(),
            istiod_san: None,
            root_cert_file: PathBuf::from("/var/run/secrets/istio/root-cert.pem"),
            token_file: PathBuf::from("/var/run/secrets/tokens/istio-token"),
            cluster_id: "Kubernetes".to_owned(),
            pod_name: String::new(),
            pod_namespace: String::new(),
            pod_ip: None,
            proc_root: PathBuf::from("/proc"),
            rescan_interval_ms: 5_000,
        }
    }
}

impl IstioConfig {
    /// The CA's endpoint.
    #[must_use]
    pub fn ca_address(&self) -> &str {
        self.ca_address.as_deref().unwrap_or(&self.address)
    }

    /// The name istiod's certificate must carry.
    #[must_use]
    pub fn istiod_san(&self) -> String {
        self.istiod_san
            .clone()
            .unwrap_or_else(|| format!("istiod.{}.svc", self.namespace))
    }

    /// The node id of a node proxy: `ztunnel~<pod ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    #[must_use]
    pub fn node_id(&self) -> String {
        let ip = self
            .pod_ip
            .map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string());
        format!(
            "ztunnel~{ip}~{}.{}~{}.svc.cluster.local",
            self.pod_name, self.pod_namespace, self.pod_namespace
        )
    }

    /// Fills the pod's name, namespace and address from the environment, then the defaults.
    pub(super) fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>, node: &str) {
        let set = |v: Option<String>| v.filter(|v| !v.is_empty());
        if let Some(name) = set(env(ENV_POD_NAME)) {
            self.pod_name = name;
        }
        if let Some(ns) = set(env(ENV_POD_NAMESPACE)) {
            self.pod_namespace = ns;
        }
        if let Some(ip) = set(env(ENV_INSTANCE_IP)).and_then(|v| v.parse().ok()) {
            self.pod_ip = Some(ip);
        }
        if self.pod_name.is_empty() {
            self.pod_name = format!("mesh-node-{node}");
        }
        if self.pod_namespace.is_empty() {
            "istio-system".clone_into(&mut self.pod_namespace);
        }
    }

    /// The first invalid setting: its field path (below `istio.`) and why.
    pub(super) fn validate(&self, kubernetes: bool) -> Result<(), (String, &'static str)> {
        let invalid = |field: &str, reason| Err((format!("istio.{field}"), reason));
        if !self.enabled {
            return Ok(());
        }
        if kubernetes {
            return invalid(
                "enabled",
                "istiod is the state source: set kubernetes.enabled to false",
            );
        }
        for (field, url) in [
            ("address", Some(self.address.as_str())),
            ("caAddress", self.ca_address.as_deref()),
        ] {
            if let Some(url) = url
                && url.parse::<http::Uri>().ok().is_none_or(|u| {
                    u.scheme_str() != Some("https") || u.host().is_none() || u.port().is_none()
                })
            {
                return invalid(field, "must be https://host:port");
            }
        }
        if self.cluster_id.is_empty() || http::HeaderValue::from_str(&self.cluster_id).is_err() {
            return invalid(
                "clusterId",
                "must be a non-empty header value (visible ASCII)",
            );
        }
        for (field, path) in [
            ("rootCertFile", &self.root_cert_file),
            ("tokenFile", &self.token_file),
            ("procRoot", &self.proc_root),
        ] {
            if !path.is_absolute() {
                return invalid(field, "must be an absolute path");
            }
        }
        if self.rescan_interval_ms == 0 {
            return invalid("rescanIntervalMs", "must be positive");
        }
        Ok(())
    }
}
