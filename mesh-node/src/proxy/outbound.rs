//! Outbound (15001): where a captured connection was going (the pod's [`OriginalDst`]), which
//! endpoint when that is a service address, the [`Path`] that carries it, and carrying it.
//!
//! [`OriginalDst`]: super::OriginalDst

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::debug;

use super::{Active, Error, PodContext, Proxy, SocketFactory, error::Context, forward};
use crate::{
    hbone::{self, BoxFuture, Dialer, PoolKey},
    metrics::{ConnRecord, Direction, Endpoint, NoMtls, Path, Security},
    workload::Workload,
};

/// Where a captured connection goes, and how.
enum Route {
    /// To a pod on another node, over HBONE.
    Hbone(Arc<Workload>),
    /// To a pod of this node, straight into its netns.
    SameNode(Arc<PodContext>),
    /// Out of the mesh (or to a pod of this node not served yet: its own capture takes it).
    Passthrough(Option<Arc<Workload>>),
}

impl Route {
    fn path(&self) -> Path {
        match self {
            Route::Hbone(_) => Path::Hbone,
            Route::SameNode(_) => Path::SameNode,
            Route::Passthrough(_) => Path::Passthrough,
        }
    }

    fn security(&self) -> Security {
        match self {
            Route::Hbone(_) => Security::MutualTls,
            Route::SameNode(_) => Security::None(NoMtls::SameNode),
            Route::Passthrough(_) => Security::None(NoMtls::DestinationNotInMesh),
        }
    }

    fn workload(&self) -> Option<Arc<Workload>> {
        match self {
            Route::Hbone(w) => Some(Arc::clone(w)),
            Route::SameNode(pod) => Some(Arc::clone(&pod.workload)),
            Route::Passthrough(w) => w.clone(),
        }
    }
}

/// Dials the TCP connections of a pod's pooled HBONE connections through its sockets.
struct PodDialer<'a> {
    proxy: &'a Proxy,
    sockets: &'a dyn SocketFactory,
}

impl Dialer for PodDialer<'_> {
    fn dial(&self, address: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(self.proxy.connect_upstream(self.sockets, address))
    }
}

impl Proxy {
    /// Carries one captured connection; `active` counts it until it is done.
    pub(super) async fn outbound(
        &self,
        ctx: &PodContext,
        client: TcpStream,
        peer: SocketAddr,
        active: Active,
    ) {
        let uid = ctx.workload.uid();
        let mut context = Context {
            direction: Direction::Outbound,
            workload: &uid,
            client: peer,
            dst: None,
            peer_identity: None,
        };
        let Some(dst) = ctx.orig_dst.outbound(peer) else {
            self.report("outbound", &Error::NoOriginalDst, None, &context);
            return forward::reset(client);
        };
        context.dst = Some(dst);
        // A service address: one endpoint per connection.
        let (dst, service) = match self.service_at(dst) {
            None => (dst, None),
            Some(backends) => {
                let service = Arc::clone(&backends.service.hostname);
                let Some(endpoint) = backends.pick() else {
                    self.report("outbound", &Error::NoEndpoint { service }, None, &context);
                    return forward::reset(client);
                };
                debug!(service = %service, vip = %dst, endpoint = %endpoint, "service endpoint chosen");
                (endpoint, Some(service))
            }
        };
        context.dst = Some(dst);
        let route = self.route(dst);
        let target = route.workload();
        debug!(
            direction = "outbound",
            path = route.path().as_str(),
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
            (Direction::Outbound, route.path()),
            Self::local_endpoint(ctx, SocketAddr::new(src_ip, peer.port())),
            Endpoint {
                identity: target.as_ref().map(|w| self.mesh.identity(w)),
                workload: target,
                addr: Some(dst),
                service,
            },
            route.security(),
        );
        let result = match route {
            Route::Hbone(target) => {
                return self
                    .via_hbone(ctx, client, dst, &target, record, active, &context)
                    .await;
            }
            Route::SameNode(pod) => {
                // The same admission and connect as inbound, in process: both identities
                // are known here.
                self.admit_and_connect(
                    &pod,
                    SocketAddr::new(src_ip, 0),
                    Some(&ctx.identity),
                    dst,
                    Path::SameNode,
                )
                .await
                .map(|(admission, upstream)| (Some(admission), upstream))
            }
            Route::Passthrough(_) => Box::pin(self.connect_upstream(&*ctx.sockets, dst))
                .await
                .map(|upstream| (None, upstream))
                .map_err(|source| Error::Upstream { dst, source }),
        };
        match result {
            Ok((admission, upstream)) => {
                record.connected();
                forward::copy_recorded(client, upstream, record, admission.as_ref(), self.limits())
                    .await;
            }
            Err(error) => {
                self.report("outbound", &error, Some(record), &context);
                forward::reset(client);
            }
        }
    }

    /// How a connection to `dst` is carried.
    fn route(&self, dst: SocketAddr) -> Route {
        match self.workload_at(dst.ip()).filter(|w| w.enrolled) {
            Some(w) if w.node == self.node => match self.local_pod(&w.uid()) {
                Some(pod) => Route::SameNode(pod),
                // Enrolled here but not (yet) served: let its capture take it.
                None => Route::Passthrough(Some(w)),
            },
            Some(w) => Route::Hbone(w),
            None => Route::Passthrough(None),
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one connection's parts, handed over once"
    )]
    async fn via_hbone(
        &self,
        ctx: &PodContext,
        client: TcpStream,
        dst: SocketAddr,
        target: &Arc<Workload>,
        record: ConnRecord,
        active: Active,
        context: &Context<'_>,
    ) {
        // Boxed: it finishes before the long copy phase, so that the task of an open
        // connection does not carry its state (memory per idle connection).
        let stream = match Box::pin(self.open_stream(ctx, dst, target)).await {
            Ok(stream) => stream,
            Err(error) => {
                self.report("outbound", &error, Some(record), context);
                return forward::reset(client);
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

    /// A `CONNECT` stream to `dst` (a pod of `target`) on a pooled HBONE connection from `ctx`.
    async fn open_stream(
        &self,
        ctx: &PodContext,
        dst: SocketAddr,
        target: &Workload,
    ) -> Result<hbone::Stream, Error> {
        let destination = self.mesh.identity(target);
        // The first certificate may still be on its way from the CA.
        self.mesh
            .certs
            .get(&ctx.identity)
            .await
            .map_err(|source| Error::NoCertificate {
                identity: ctx.identity.clone(),
                source,
            })?;
        let config = self
            .mesh
            .client_config(&ctx.identity, &destination)
            .map_err(Error::TlsConfig)?;
        let key = PoolKey {
            source: ctx.identity.clone(),
            destination,
            address: SocketAddr::new(dst.ip(), hbone::PORT),
        };
        let dialer = PodDialer {
            proxy: self,
            sockets: &*ctx.sockets,
        };
        self.pool
            .connect(&key, dst, &dialer, &config)
            .await
            .map_err(Error::Hbone)
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
