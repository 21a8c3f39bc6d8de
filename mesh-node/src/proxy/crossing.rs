//! Crossing networks (the client side of double HBONE): an endpoint of a service on another
//! network is reached through one of that network's east-west gateways. The outer HBONE
//! stream (pooled, to the gateway, authority `<service hostname>:<port>`) carries an inner
//! mutual TLS and HTTP/2 `CONNECT` to the endpoint itself (`hbone::nested`), so the gateway
//! forwards bytes it cannot read and the destination authenticates this connection's source.
//! A workload of another network addressed by its IP (not through a service) has no hostname
//! a gateway could resolve: it is refused, never passed through.

use std::{net::SocketAddr, sync::Arc, sync::PoisonError, sync::atomic::Ordering};

use super::{Error, PodContext, Proxy, outbound::PodDialer, outbound::source_ip};
use crate::{
    hbone::{self, PoolKey},
    identity::Identity,
    metrics::GatewayHop,
    network::{Network, NetworkGateway},
    traffic::runtime::Cluster,
    workload::Workload,
};

/// How one connection reaches an endpoint on another network.
#[derive(Debug)]
pub(super) struct Crossing {
    pub workload: Arc<Workload>,
    pub network: Arc<str>,
    pub gateway: NetworkGateway,
    pub gateway_identity: Identity,
    /// `<service hostname>:<service port>`, the `:authority` of both `CONNECT`s.
    pub authority: String,
    /// Who may answer the inner TLS: the identities of the service's endpoints on that
    /// network (the gateway picks one of them), sorted.
    pub identities: Vec<Identity>,
}

impl Crossing {
    /// The gateway hop, for the access log.
    pub fn hop(&self) -> GatewayHop {
        GatewayHop {
            address: self.gateway.address,
            identity: self.gateway_identity.clone(),
        }
    }
}

/// The gateway of `network` for the connection numbered `turn` (round robin), if the network
/// is known and has gateways.
pub(super) fn choose_gateway<'a>(
    networks: &'a [Network],
    network: &str,
    turn: usize,
) -> Option<&'a NetworkGateway> {
    let gateways = &networks.iter().find(|n| n.name == network)?.gateways;
    gateways.get(turn.checked_rem(gateways.len())?)
}

impl Proxy {
    /// How to reach `workload` (of another network), an endpoint of `cluster`, for a connection
    /// to the service port `port`: through the next gateway of its network. `Err`: its
    /// network has no gateway.
    pub(super) fn crossing(
        &self,
        workload: Arc<Workload>,
        cluster: &Cluster,
        port: u16,
    ) -> Result<Crossing, Arc<str>> {
        let network: Arc<str> = workload.network.as_str().into();
        let networks = Arc::clone(&self.networks.read().unwrap_or_else(PoisonError::into_inner));
        let turn = self.gateway_turn.fetch_add(1, Ordering::Relaxed);
        let Some(gateway) = choose_gateway(&networks, &network, turn) else {
            return Err(network);
        };
        let mut identities: Vec<Identity> = cluster
            .addresses()
            .filter_map(|addr| self.workload_at(addr.ip()))
            .filter(|w| w.network == workload.network)
            .map(|w| self.mesh.identity(&w))
            .collect();
        identities.push(self.mesh.identity(&workload));
        identities.sort_unstable();
        identities.dedup();
        Ok(Crossing {
            gateway_identity: gateway.identity(&self.mesh.trust_domain),
            gateway: gateway.clone(),
            authority: format!("{}:{port}", cluster.host),
            identities,
            network,
            workload,
        })
    }

    /// The inner `CONNECT` stream to `dst` (an endpoint on another network) inside an outer
    /// stream to the crossing's gateway, for the application's connection from `peer`.
    pub(super) async fn open_crossing(
        &self,
        ctx: &PodContext,
        (peer, dst): (SocketAddr, SocketAddr),
        crossing: &Crossing,
    ) -> Result<hbone::Stream, Error> {
        self.source_certificate(ctx).await?;
        let outer_tls = self
            .mesh
            .client_config(&ctx.identity, &crossing.gateway_identity)
            .map_err(Error::TlsConfig)?;
        let inner_tls = self
            .mesh
            .client_config_any(&ctx.identity, &crossing.identities)
            .map_err(Error::TlsConfig)?;
        let key = PoolKey {
            source: ctx.identity.clone(),
            destination: crossing.gateway_identity.clone(),
            address: crossing.gateway.address,
        };
        let dialer = PodDialer {
            proxy: self,
            sockets: &*ctx.sockets,
        };
        let client = SocketAddr::new(source_ip(&ctx.workload, dst), peer.port());
        let baggage = self.metrics.peer(&ctx.workload).to_baggage();
        let headers = hbone::connect_headers(client, Some(&baggage));
        let authority = crossing.authority.as_str();
        let outer = self
            .pool
            .connect_to(&key, (authority, &headers), &dialer, &outer_tls)
            .await
            .map_err(Error::Hbone)?;
        let far = SocketAddr::new(dst.ip(), hbone::PORT);
        Box::pin(hbone::nested::connect(
            outer,
            inner_tls,
            (authority, &headers),
            far,
        ))
        .await
        .map_err(Error::Hbone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(address: &str) -> NetworkGateway {
        NetworkGateway {
            address: address.parse().unwrap(),
            namespace: "istio-system".to_owned(),
            service_account: "istio-eastwestgateway".to_owned(),
            trust_domain: None,
        }
    }

    #[test]
    fn gateways_take_turns_and_unknown_networks_have_none() {
        let networks = [
            Network {
                name: "west".to_owned(),
                gateways: vec![gateway("198.51.100.7:15008"), gateway("198.51.100.8:15008")],
            },
            Network {
                name: "empty".to_owned(),
                gateways: Vec::new(),
            },
        ];
        let chosen: Vec<SocketAddr> = (0..4)
            .map(|turn| choose_gateway(&networks, "west", turn).unwrap().address)
            .collect();
        let (a, b) = (
            networks[0].gateways[0].address,
            networks[0].gateways[1].address,
        );
        assert_eq!(chosen, [a, b, a, b]);
        assert!(choose_gateway(&networks, "west", usize::MAX).is_some());
        assert!(
            choose_gateway(&networks, "east", 0).is_none(),
            "unknown network"
        );
        assert!(
            choose_gateway(&networks, "empty", 3).is_none(),
            "no gateway"
        );
    }
}
