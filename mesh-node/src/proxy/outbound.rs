//! Outbound (15001): where a captured connection was going (the pod's [`OriginalDst`]), which
//! endpoint when that is a service address, the [`Path`] that carries it, and carrying it.
//!
//! [`OriginalDst`]: super::OriginalDst

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    Active, Error, PodContext, Proxy, SocketFactory, crossing::Crossing, error::Context, forward,
};
use crate::{
    hbone::{self, BoxFuture, Dialer, PoolKey},
    metrics::{ConnRecord, Direction, Endpoint, NoMtls, Path, Security, TrafficNote},
    state::service::{Refusal, Source},
    traffic::runtime::{Cluster, HealthEvent, Lease, PoolSlot},
    workload::Workload,
};

/// Endpoints tried for one connection, at most.
const MAX_ATTEMPTS: usize = 3;

/// What a connection holds of a destination while it is open: its endpoint's count and its
/// place in the pool.
type Held = (Lease, PoolSlot);

/// What traffic management adds to a connection to a service address.
#[derive(Default)]
struct Managed {
    service: Option<Arc<str>>,
    note: Option<TrafficNote>,
    hold: Option<Held>,
    started: Option<Instant>,
}

/// A connection to the destination, ready to carry bytes.
enum Established {
    Hbone(hbone::Stream),
    /// A TCP connection (same node: with its admission, re-decided on a policy change).
    Tcp(TcpStream, Option<super::Admission>),
}

/// Where a captured connection goes, and how.
enum Route {
    /// To a pod on another node, over HBONE.
    Hbone(Arc<Workload>),
    /// To a pod of this node, straight into its netns.
    SameNode(Arc<PodContext>),
    /// Out of the mesh (or to a pod of this node not served yet: its own capture takes it).
    Passthrough(Option<Arc<Workload>>),
    /// To an endpoint on another network, through its gateway (double HBONE).
    Gateway(Box<Crossing>),
    /// To a workload on another network that cannot be reached: its network has no gateway,
    /// or it was addressed by IP rather than through a service (`by_address`).
    Unreachable {
        workload: Arc<Workload>,
        network: Arc<str>,
        by_address: bool,
    },
}

impl Route {
    fn path(&self) -> Path {
        match self {
            Route::Hbone(_) => Path::Hbone,
            Route::SameNode(_) => Path::SameNode,
            Route::Passthrough(_) => Path::Passthrough,
            Route::Gateway(_) | Route::Unreachable { .. } => Path::DoubleHbone,
        }
    }

    fn security(&self) -> Security {
        match self {
            Route::Hbone(_) | Route::Gateway(_) | Route::Unreachable { .. } => Security::MutualTls,
            Route::SameNode(_) => Security::None(NoMtls::SameNode),
            Route::Passthrough(_) => Security::None(NoMtls::DestinationNotInMesh),
        }
    }

    fn workload(&self) -> Option<Arc<Workload>> {
        match self {
            Route::Hbone(w) => Some(Arc::clone(w)),
            Route::SameNode(pod) => Some(Arc::clone(&pod.workload)),
            Route::Passthrough(w) => w.clone(),
            Route::Gateway(c) => Some(Arc::clone(&c.workload)),
            Route::Unreachable { workload, .. } => Some(Arc::clone(workload)),
        }
    }

    /// The destination's network, when it is another one.
    fn network(&self) -> Option<Arc<str>> {
        match self {
            Route::Gateway(c) => Some(Arc::clone(&c.network)),
            Route::Unreachable { network, .. } => Some(Arc::clone(network)),
            _ => None,
        }
    }
}

/// Dials the TCP connections of a pod's pooled HBONE connections through its sockets.
pub(super) struct PodDialer<'a> {
    pub proxy: &'a Proxy,
    pub sockets: &'a dyn SocketFactory,
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
        let accepted = Instant::now();
        let Some(backends) = self.service_at(dst) else {
            // Not a service address: straight to where the application was going.
            let route = self.route(dst, None);
            let result = self.establish(ctx, &route, (peer, dst)).await;
            return self
                .carry(
                    ctx,
                    client,
                    peer,
                    (dst, route),
                    result,
                    Managed::default(),
                    active,
                    &context,
                )
                .await;
        };
        let service = Arc::clone(&backends.service.hostname);
        let source = Source {
            workload: &ctx.workload,
            identity: &ctx.identity,
            ip: source_ip(&ctx.workload, dst),
        };
        let plan = match backends.plan(&source, dst, accepted) {
            Ok(plan) => plan,
            Err(refusal) => {
                let error = self.refused(&service, refusal);
                let note = TrafficNote {
                    fault: match &error {
                        Error::FaultAbort { fault } => Some(format!("abort {fault}")),
                        _ => None,
                    },
                    ..TrafficNote::default()
                };
                self.refuse(ctx, (peer, dst), service, &error, &note, accepted, &context);
                return forward::reset(client);
            }
        };
        let mut note = TrafficNote {
            route: plan.route.clone(),
            backend: plan.route.as_ref().map(|_| Arc::clone(&plan.cluster.name)),
            attempts: 0,
            fault: None,
        };
        if plan.route.is_some() {
            self.metrics.traffic(&service, "split", &plan.cluster.name);
        }
        if let Some((delay, fault)) = &plan.delay {
            self.metrics.traffic(&service, "fault_delay", fault);
            note.fault = Some(format!("delay {}ms {fault}", delay.as_millis()));
            tokio::time::sleep(*delay).await;
        }
        let outcome = self
            .connect_with_failover(
                (ctx, peer, dst.port()),
                &plan.cluster,
                &service,
                &mut note,
                &mut context,
            )
            .await;
        let Some((target, result, lease)) = outcome else {
            let error = Error::NoEndpoint {
                service: Arc::clone(&service),
            };
            self.refuse(ctx, (peer, dst), service, &error, &note, accepted, &context);
            return forward::reset(client);
        };
        let managed = Managed {
            service: Some(service),
            note: backends.managed().then_some(note),
            hold: Some((lease, plan.slot)),
            started: Some(accepted),
        };
        self.carry(ctx, client, peer, target, result, managed, active, &context)
            .await;
    }

    /// Connects to an endpoint of `cluster`. Failover: an endpoint that fails before any byte
    /// reached the application is counted against it (outlier detection) and another is
    /// tried, up to [`MAX_ATTEMPTS`], each attempt within the connect timeout (through a
    /// gateway: a failed gateway or a 503 from it counts against the endpoint). `port` is the
    /// service port. `None`: no endpoint to try.
    async fn connect_with_failover(
        &self,
        (ctx, peer, port): (&PodContext, SocketAddr, u16),
        cluster: &Cluster,
        service: &Arc<str>,
        note: &mut TrafficNote,
        context: &mut Context<'_>,
    ) -> Option<((SocketAddr, Route), Result<Established, Error>, Lease)> {
        let timeout = cluster
            .policy
            .connect_timeout
            .unwrap_or(self.connect_timeout);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut events = Vec::new();
        loop {
            let lease = cluster.pick(&tried, Instant::now(), &mut events);
            self.health_events(service, &cluster.name, &mut events);
            let lease = lease?;
            let endpoint = lease.addr;
            context.dst = Some(endpoint);
            note.attempts += 1;
            let route = self.route(endpoint, Some((cluster, port)));
            debug!(service = %service, endpoint = %endpoint, attempt = note.attempts, "service endpoint chosen");
            let result =
                match tokio::time::timeout(timeout, self.establish(ctx, &route, (peer, endpoint)))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(Error::Upstream {
                        dst: endpoint,
                        source: std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connect to {endpoint} timed out after {timeout:?}"),
                        ),
                    }),
                };
            match result {
                Ok(established) => {
                    cluster.succeeded(&lease, Instant::now());
                    return Some(((endpoint, route), Ok(established), lease));
                }
                Err(error) if error.endpoint_failed() => {
                    if let Some(event) = cluster.failed(&lease, Instant::now()) {
                        events.push(event);
                        self.health_events(service, &cluster.name, &mut events);
                    }
                    tried.push(endpoint);
                    let more = tried.len() < MAX_ATTEMPTS.min(cluster.len());
                    if more {
                        self.metrics.traffic(service, "retry", &cluster.name);
                        debug!(service = %service, endpoint = %endpoint, error = %crate::error_chain(&error), "retrying the connection on another endpoint");
                        continue;
                    }
                    return Some(((endpoint, route), Err(error), lease));
                }
                Err(error) => return Some(((endpoint, route), Err(error), lease)),
            }
        }
    }

    /// Reports a connection to the service address `dst` that goes nowhere, with its own
    /// access-log line.
    #[expect(clippy::too_many_arguments, reason = "one refused connection's parts")]
    fn refuse(
        &self,
        ctx: &PodContext,
        (peer, dst): (SocketAddr, SocketAddr),
        service: Arc<str>,
        error: &Error,
        note: &TrafficNote,
        accepted: Instant,
        context: &Context<'_>,
    ) {
        self.report("outbound", error, None, context);
        let src_ip = source_ip(&ctx.workload, dst);
        ConnRecord::refused(
            &Self::local_endpoint(ctx, SocketAddr::new(src_ip, peer.port())),
            &Endpoint {
                addr: Some(dst),
                service: Some(service),
                ..Endpoint::default()
            },
            (error.flag(), &crate::error_chain(error)),
            note,
            accepted,
        );
    }

    /// Why the traffic rules refused a connection to `service`, counted.
    fn refused(&self, service: &Arc<str>, refusal: Refusal) -> Error {
        match refusal {
            Refusal::Fault(fault) => {
                self.metrics.traffic(service, "fault_abort", &fault);
                Error::FaultAbort { fault }
            }
            Refusal::RateLimited => {
                self.metrics.traffic(service, "rate_limit", "");
                Error::RateLimited {
                    service: Arc::clone(service),
                }
            }
            Refusal::PoolFull(destination) => {
                self.metrics.traffic(service, "pool_limit", &destination);
                Error::PoolFull { destination }
            }
            Refusal::NoBackend => Error::NoEndpoint {
                service: Arc::clone(service),
            },
        }
    }

    /// Counts (by destination: no label holds an address) and logs (with the endpoint) what
    /// outlier detection did.
    fn health_events(&self, service: &str, destination: &str, events: &mut Vec<HealthEvent>) {
        for event in events.drain(..) {
            match event {
                HealthEvent::Ejected {
                    addr,
                    failures,
                    duration,
                } => {
                    self.metrics.traffic(service, "ejected", destination);
                    warn!(service, endpoint = %addr, consecutive_failures = failures, ejected_ms = duration.as_millis(), "endpoint ejected (outlier detection)");
                }
                HealthEvent::Returned { addr } => {
                    self.metrics.traffic(service, "returned", destination);
                    info!(service, endpoint = %addr, "endpoint back from ejection");
                }
            }
        }
    }

    /// Connects `peer` (the application's socket) to `dst` the way `route` says.
    async fn establish(
        &self,
        ctx: &PodContext,
        route: &Route,
        (peer, dst): (SocketAddr, SocketAddr),
    ) -> Result<Established, Error> {
        match route {
            Route::Hbone(target) => Box::pin(self.open_stream(ctx, (peer, dst), target))
                .await
                .map(Established::Hbone),
            // The same admission and connect as inbound, in process: both identities are known
            // here.
            Route::SameNode(pod) => self
                .admit_and_connect(
                    pod,
                    SocketAddr::new(source_ip(&ctx.workload, dst), 0),
                    Some(&ctx.identity),
                    dst,
                    Path::SameNode,
                )
                .await
                .map(|(admission, upstream)| Established::Tcp(upstream, Some(admission))),
            Route::Passthrough(_) => Box::pin(self.connect_upstream(&*ctx.sockets, dst))
                .await
                .map(|upstream| Established::Tcp(upstream, None))
                .map_err(|source| Error::Upstream { dst, source }),
            Route::Gateway(crossing) => Box::pin(self.open_crossing(ctx, (peer, dst), crossing))
                .await
                .map(Established::Hbone),
            Route::Unreachable {
                network,
                by_address,
                ..
            } => Err(if *by_address {
                Error::RemoteAddress {
                    dst,
                    network: Arc::clone(network),
                }
            } else {
                Error::NoGateway {
                    network: Arc::clone(network),
                }
            }),
        }
    }

    /// Records the connection to `dst` (carried by `route`) and carries it, or reports how
    /// connecting failed.
    #[expect(
        clippy::too_many_arguments,
        reason = "one connection's parts, handed over once"
    )]
    async fn carry(
        &self,
        ctx: &PodContext,
        client: TcpStream,
        peer: SocketAddr,
        (dst, route): (SocketAddr, Route),
        result: Result<Established, Error>,
        managed: Managed,
        active: Active,
        context: &Context<'_>,
    ) {
        let uid = ctx.workload.uid();
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
        let mut record = ConnRecord::open(
            &self.metrics,
            (Direction::Outbound, route.path()),
            Self::local_endpoint(ctx, SocketAddr::new(src_ip, peer.port())),
            Endpoint {
                identity: target.as_ref().map(|w| self.mesh.identity(w)),
                workload: target,
                addr: Some(dst),
                service: managed.service,
                peer: None,
            },
            route.security(),
        );
        if let Some(started) = managed.started {
            record = record.started_at(started);
        }
        if let Some(network) = route.network() {
            record = record.with_network(network);
        }
        if let Route::Gateway(crossing) = &route {
            record = record.with_gateway(crossing.hop());
        }
        if let Some(note) = managed.note {
            record = record.with_traffic(note);
        }
        let hold = managed.hold;
        match result {
            Ok(Established::Hbone(stream)) => {
                record.connected();
                via_hbone(client, stream, record, (active, hold));
            }
            Ok(Established::Tcp(upstream, admission)) => {
                record.connected();
                forward::copy_recorded(client, upstream, record, admission.as_ref(), self.limits())
                    .await;
                drop(hold);
            }
            Err(error) => {
                self.report("outbound", &error, Some(record), context);
                forward::reset(client);
            }
        }
    }

    /// How a connection to `dst` is carried: as an endpoint of `service` (its cluster and
    /// port) when the application dialled a service address, which is what lets a workload on
    /// another network be reached.
    fn route(&self, dst: SocketAddr, service: Option<(&Cluster, u16)>) -> Route {
        // Another network's workload is never passed through, enrolled or not: its network is
        // reached only through a gateway (which refuses what it cannot carry).
        let known = self.workload_at(dst.ip());
        match known.filter(|w| w.enrolled || w.remote_network(&self.network)) {
            Some(w) if w.remote_network(&self.network) => match service {
                Some((cluster, port)) => match self.crossing(Arc::clone(&w), cluster, port) {
                    Ok(crossing) => Route::Gateway(Box::new(crossing)),
                    Err(network) => Route::Unreachable {
                        workload: w,
                        network,
                        by_address: false,
                    },
                },
                None => Route::Unreachable {
                    network: w.network.as_str().into(),
                    workload: w,
                    by_address: true,
                },
            },
            Some(w) if w.node == self.node => match self.local_pod(&w.uid()) {
                Some(pod) => Route::SameNode(pod),
                // Enrolled here but not (yet) served: let its capture take it.
                None => Route::Passthrough(Some(w)),
            },
            Some(w) => Route::Hbone(w),
            None => Route::Passthrough(None),
        }
    }

    /// Waits for the source's certificate: the first may still be on its way from the CA.
    pub(super) async fn source_certificate(&self, ctx: &PodContext) -> Result<(), Error> {
        self.mesh
            .certs
            .get(&ctx.identity)
            .await
            .map(drop)
            .map_err(|source| Error::NoCertificate {
                identity: ctx.identity.clone(),
                source,
            })
    }

    /// A `CONNECT` stream to `dst` (a pod of `target`) on a pooled HBONE connection from `ctx`,
    /// for the application's connection from `peer`, with the headers ztunnel sends
    /// (`forwarded`, the source's `baggage`, `traceparent`).
    async fn open_stream(
        &self,
        ctx: &PodContext,
        (peer, dst): (SocketAddr, SocketAddr),
        target: &Workload,
    ) -> Result<hbone::Stream, Error> {
        let destination = self.mesh.identity(target);
        self.source_certificate(ctx).await?;
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
        let client = SocketAddr::new(source_ip(&ctx.workload, dst), peer.port());
        let baggage = self.metrics.peer(&ctx.workload).to_baggage();
        let headers = hbone::connect_headers(client, Some(&baggage));
        self.pool
            .connect(&key, (dst, &headers), &dialer, &config)
            .await
            .map_err(Error::Hbone)
    }
}

/// The source pod's address of the destination's family (what the destination would see).
pub(super) fn source_ip(source: &Workload, dst: SocketAddr) -> std::net::IpAddr {
    source
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or_else(|| source.ips.first().copied())
        .unwrap_or(dst.ip())
}

/// Carries a connection over its HBONE stream, in a task of its own that holds only what
/// it needs, so the setup state (pool, handshake futures) is freed: an open connection
/// costs less memory. `held` is released when it ends.
fn via_hbone(
    client: TcpStream,
    stream: hbone::Stream,
    record: ConnRecord,
    held: (Active, Option<Held>),
) {
    let hbone::Stream {
        send, recv, guard, ..
    } = stream;
    tokio::spawn(async move {
        // Application → stream is "received" (request direction), stream → application
        // "sent".
        let result = hbone::pipe(client, send, recv, None, (&record.received, &record.sent)).await;
        drop(guard);
        match result {
            Ok(_) => record.close("completed"),
            Err(e) => record.close(&e.to_string()),
        }
        drop(held);
    });
}
