//! Networks: sets of workloads that reach each other directly. A workload of another network
//! than this node's is reached through one of that network's east-west gateways (double
//! HBONE, `proxy::outbound`), which the `networks` section names with their addresses and
//! identities.

use std::{collections::HashSet, net::SocketAddr};

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, valid_segment, valid_trust_domain};

/// A network other than this node's, and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    /// The network's name, as workloads name it in `network`.
    pub name: String,
    /// Its east-west gateways (connections pick one per connection, in turn); at least one.
    pub gateways: Vec<NetworkGateway>,
}

/// One east-west gateway of a network: an address other networks reach, and the identity its
/// certificate must show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkGateway {
    /// Address and HBONE port of the gateway (`198.51.100.7:15008`).
    pub address: SocketAddr,
    /// Namespace of the gateway's identity. Default: `istio-system`.
    #[serde(default = "gateway_namespace")]
    pub namespace: String,
    /// Service account of the gateway's identity. Default: `istio-eastwestgateway`.
    #[serde(default = "gateway_service_account")]
    pub service_account: String,
    /// Trust domain of the gateway's identity. Default: `identity.trustDomain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

fn gateway_namespace() -> String {
    "istio-system".to_owned()
}

fn gateway_service_account() -> String {
    "istio-eastwestgateway".to_owned()
}

impl NetworkGateway {
    /// The identity the gateway's certificate must show, in the mesh of `trust_domain`.
    #[must_use]
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(
            self.trust_domain.as_deref().unwrap_or(trust_domain),
            &self.namespace,
            &self.service_account,
        )
    }
}

/// Checks the `networks` section: named once each, a gateway at least, identities that are
/// SPIFFE ids; returns the offending field path and the reason.
pub fn validate_networks(networks: &[Network]) -> Result<(), (String, String)> {
    let mut names = HashSet::new();
    for (i, n) in networks.iter().enumerate() {
        let field = |f: &str| format!("networks[{i}].{f}");
        if n.name.is_empty() {
            return Err((field("name"), "must not be empty".to_owned()));
        }
        if !names.insert(n.name.as_str()) {
            return Err((field("name"), format!("{} is listed twice", n.name)));
        }
        if n.gateways.is_empty() {
            return Err((field("gateways"), "needs at least one gateway".to_owned()));
        }
        for (j, g) in n.gateways.iter().enumerate() {
            let field = |f: &str| field(&format!("gateways[{j}].{f}"));
            if g.address.port() == 0 || g.address.ip().is_unspecified() {
                return Err((
                    field("address"),
                    "must be a reachable address and port".to_owned(),
                ));
            }
            for (name, value) in [
                ("namespace", &g.namespace),
                ("serviceAccount", &g.service_account),
            ] {
                if !valid_segment(value) {
                    return Err((
                        field(name),
                        "must be a SPIFFE path segment: letters, digits, `.`, `-`, `_`".to_owned(),
                    ));
                }
            }
            if g.trust_domain
                .as_ref()
                .is_some_and(|td| !valid_trust_domain(td))
            {
                return Err((
                    field("trustDomain"),
                    "must be a SPIFFE trust domain".to_owned(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Network> {
        serde_yaml_ng::from_str(text).expect("parses")
    }

    #[test]
    fn a_network_names_its_gateways_with_their_identities() {
        let networks = parse(
            "- name: west\n  gateways:\n  - address: 198.51.100.7:15008\n    serviceAccount: ew\n",
        );
        assert_eq!(validate_networks(&networks), Ok(()));
        let gateway = &networks[0].gateways[0];
        assert_eq!(
            gateway.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ew"
        );
    }

    #[test]
    fn bad_networks_name_the_field() {
        for (text, field) in [
            ("- name: west\n  gateways: []\n", "networks[0].gateways"),
            (
                "- name: west\n  gateways: [{address: '0.0.0.0:15008'}]\n",
                "networks[0].gateways[0].address",
            ),
            (
                "- name: west\n  gateways: [{address: '198.51.100.7:15008', namespace: 'a/b'}]\n",
                "networks[0].gateways[0].namespace",
            ),
            (
                "- name: west\n  gateways: [{address: '198.51.100.7:15008'}]\n- name: west\n  gateways: [{address: '198.51.100.8:15008'}]\n",
                "networks[1].name",
            ),
        ] {
            let (got, _) = validate_networks(&parse(text)).expect_err(text);
            assert_eq!(got, field, "{text}");
        }
    }
}
