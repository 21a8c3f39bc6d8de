//! Outbound (15001): choose the path for a captured connection and carry it.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{PodContext, Proxy, forward};
use crate::metrics::{ConnRecord, Endpoint, Security};
use crate::{
    hbone::{self, PoolKey},
    state::Workload,
};

/// How an outbound connection is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// mTLS HBONE to the destination pod's node.
    Hbone,
    /// Destination pod on this node: straight into its netns, no TLS.
    SameNode,
    /// Destination outside the mesh: plaintext, from the source pod's netns.
    Passthrough,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Path::Hbone => "hbone",
            Path::SameNode => "same-node",
            Path::Passthrough => "passthrough",
        }
    }
}

impl Proxy {
    /// Carries one captured connection; `active` counts it until it is done.
    pub(super) async fn outbound(
        &self,
        ctx: &PodContext,
        client: TcpStream,
        peer: SocketAddr,
        active: super::Active,
    ) {
        let uid = ctx.workload.uid();
        let Some(dst) = self.orig_dst.take(ctx.worker.cookie(), peer) else {
            if let Some(suppressed) = self.metrics.error("outbound", "no_original_destination") {
                warn!(
                    direction = "outbound",
                    src_workload = %uid,
                    client = %peer,
                    suppressed,
                    "no original destination recorded for a captured connection; closing it"
                );
            }
            forward::reset(client);
            return;
        };
        // A service address: one endpoint per connection.
        let (dst, service) = match self.service_at(dst) {
            None => (dst, None),
            Some(backends) => {
                if let Some(endpoint) = backends.pick() {
                    debug!(service = %backends.service.hostname, vip = %dst, endpoint = %endpoint, "service endpoint chosen");
                    (endpoint, Some(Arc::clone(&backends.service.hostname)))
                } else {
                    if let Some(suppressed) = self.metrics.error("outbound", "no_endpoint") {
                        warn!(
                            direction = "outbound",
                            src_workload = %uid,
                            service = %backends.service.hostname,
                            orig_dst = %dst,
                            suppressed,
                            "no ready endpoint for the service; closing the connection"
                        );
                    }
                    forward::reset(client);
                    return;
                }
            }
        };
        let target = self.workload_at(dst.ip()).filter(|w| w.enrolled);
        let (path, local_target) = match &target {
            Some(w) if w.node == self.node => match self.local_pod(&w.uid()) {
                Some(pod) => (Path::SameNode, Some(pod)),
                // Enrolled here but not (yet) served: let its capture take it.
                None => (Path::Passthrough, None),
            },
            Some(_) => (Path::Hbone, None),
            None => (Path::Passthrough, None),
        };
        debug!(
            direction = "outbound",
            path = path.as_str(),
            src_workload = %uid,
            src_identity = %ctx.identity,
            dst_workload = target.as_ref().map(|w| w.uid()).unwrap_or_default(),
            client = %peer,
            orig_dst = %dst,
            "connection captured"
        );
        let src_ip = source_ip(&ctx.workload, dst);
        let record = ConnRecord::open(
            &self.metrics,
            "outbound",
            path.as_str(),
            Self::local_endpoint(ctx, SocketAddr::new(src_ip, peer.port())),
            Endpoint {
                identity: target.as_ref().map(|w| self.mesh.identity(w)),
                workload: target.clone(),
                addr: Some(dst),
                service,
            },
            if path == Path::Hbone {
                Security::MutualTls
            } else {
                Security::None
            },
        );
        match (path, target, local_target) {
            (Path::Hbone, Some(w), _) => {
                self.via_hbone(ctx, client, dst, &w, record, active).await;
            }
            (Path::SameNode, _, Some(pod)) => {
                // The same admission as inbound, in process: both identities are known here.
                if let Ok(admission) =
                    self.admit(&pod.workload, src_ip, Some(&ctx.identity), dst, "same-node")
                {
                    self.direct(&pod, client, dst, record, Some(&admission))
                        .await;
                } else {
                    record.fail("DENY", "denied by policy");
                    forward::reset(client);
                }
            }
            _ => self.direct(ctx, client, dst, record, None).await,
        }
    }

    /// Connects to `dst` from inside `netns_of`'s namespace and copies.
    async fn direct(
        &self,
        netns_of: &PodContext,
        client: TcpStream,
        dst: SocketAddr,
        record: ConnRecord,
        admission: Option<&super::Admission>,
    ) {
        match self.connect_upstream(&netns_of.worker, dst).await {
            Ok(upstream) => {
                record.connected();
                forward::copy_recorded(client, upstream, record, admission, self.limits()).await;
            }
            Err(e) => {
                warn!(direction = "outbound", workload = %netns_of.workload.uid(), orig_dst = %dst, error = %e, "upstream connect failed");
                record.fail("UF", &e.to_string());
                forward::reset(client);
            }
        }
    }

    async fn via_hbone(
        &self,
        ctx: &PodContext,
        client: TcpStream,
        dst: SocketAddr,
        target: &Arc<Workload>,
        record: ConnRecord,
        active: super::Active,
    ) {
        let uid = ctx.workload.uid();
        let destination = self.mesh.identity(target);
        let key = PoolKey {
            source: ctx.identity.clone(),
            destination: destination.clone(),
            address: SocketAddr::new(dst.ip(), hbone::PORT),
        };
        // The first certificate may still be on its way from the CA. Futures that finish before
        // the long copy phase are boxed, so that the task of an open connection does not carry
        // their state (memory per idle connection).
        let certificate = Box::pin(self.mesh.certs.get(&ctx.identity));
        if let Err(e) = certificate.await {
            warn!(direction = "outbound", src_workload = %uid, orig_dst = %dst, error = %e, "no certificate for the source workload");
            record.fail("UF", &e.to_string());
            forward::reset(client);
            return;
        }
        let config = match self.mesh.client_config(&ctx.identity, &destination) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "TLS client configuration");
                record.fail("UF", &e.to_string());
                forward::reset(client);
                return;
            }
        };
        let connect = Box::pin(
            self.pool
                .connect(&key, dst, &ctx.worker, self.mark, &config),
        );
        let stream = match connect.await {
            Ok(s) => s,
            Err(e) => {
                warn!(
                    direction = "outbound",
                    src_workload = %uid,
                    dst_identity = %destination,
                    orig_dst = %dst,
                    error = %crate::error_chain(&e),
                    "HBONE connection failed"
                );
                record.fail("UF", &crate::error_chain(&e));
                forward::reset(client);
                return;
            }
        };
        record.connected();
        let hbone::Stream {
            send, recv, guard, ..
        } = stream;
        // The copy phase runs in a task of its own that holds only what it needs, so the setup
        // state (pool, handshake futures) is freed: an open connection costs less memory.
        tokio::spawn(async move {
            // Application → stream is "received" (request direction), stream → application
            // "sent".
            let result =
                hbone::pipe(client, send, recv, None, (&record.received, &record.sent)).await;
            drop(guard);
            match result {
                Ok(_) => record.close("completed"),
                Err(e) => record.close(&e.to_string()),
            }
            drop(active);
        });
    }
}

/// The source pod's address of the destination's family (what the destination would see).
fn source_ip(source: &Workload, dst: SocketAddr) -> std::net::IpAddr {
    source
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or_else(|| source.ips.first().copied())
        .unwrap_or(dst.ip())
}
