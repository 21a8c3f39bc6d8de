//! The `gateway:` section: the east-west gateway role of the same binary.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The east-west gateway role: instead of serving the workloads of a node, the daemon accepts
/// HBONE from other networks on `listen` as the workload `namespace/name` (with the identity of
/// `serviceAccount`), authorizes the source identity with the policies that select that
/// workload, and forwards each `CONNECT <service hostname>:<port>` stream, unread, to port 15008
/// of a ready endpoint of that service on this network (the inner HBONE connection is end to
/// end between the two daemons).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Run as a gateway (no kernel programs, no enrolled workloads). Default: `false`.
    pub enabled: bool,
    /// Address the gateway accepts HBONE on. Default: `[::]:15008`.
    pub listen: SocketAddr,
    /// The gateway's workload name (policies select it by its labels). Default:
    /// `istio-eastwestgateway`.
    pub name: String,
    /// Namespace of the gateway (and of its identity). Default: `istio-system`.
    pub namespace: String,
    /// Service account of the gateway's identity. Default: `istio-eastwestgateway`.
    pub service_account: String,
    /// Labels of the gateway workload, for policy selectors. Default: `istio:
    /// eastwestgateway`.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 15008),
            name: "istio-eastwestgateway".to_owned(),
            namespace: "istio-system".to_owned(),
            service_account: "istio-eastwestgateway".to_owned(),
            labels: [("istio".to_owned(), "eastwestgateway".to_owned())].into(),
        }
    }
}

impl GatewayConfig {
    /// The first invalid field (path below `gateway.`) and why.
    pub(super) fn validate(&self) -> Result<(), (String, &'static str)> {
        if self.listen.port() == 0 {
            return Err(("gateway.listen".to_owned(), "needs a port"));
        }
        if self.name.is_empty() {
            return Err(("gateway.name".to_owned(), "must not be empty"));
        }
        for (field, value) in [
            ("gateway.namespace", &self.namespace),
            ("gateway.serviceAccount", &self.service_account),
        ] {
            if !crate::identity::valid_segment(value) {
                return Err((
                    field.to_owned(),
                    "must be a SPIFFE path segment: letters, digits, `.`, `-`, `_`",
                ));
            }
        }
        Ok(())
    }
}
