//! The east-west gateway's data path (`gateway.enabled`): the outer hop of Istio's "double
//! HBONE". A daemon of another network opens HBONE to the gateway (its client certificate is
//! the source workload's) and sends `CONNECT <service hostname>:<port>`; the gateway counts the
//! stream against the limits, authorizes the source identity with the policies that select
//! the gateway's own workload, resolves the hostname to a service of its state, picks a ready
//! endpoint of that service on its own network (the node proxy's load balancing, outlier
//! detection and failover), opens plain TCP to the endpoint's 15008, answers 200 and copies
//! bytes both ways without reading them: the inner HBONE connection (TLS included) is end to
//! end between the client's daemon and the endpoint's.
//!
//! Refusals: a request that is not `CONNECT <hostname>:<port>` (an address authority
//! included: a gateway never forwards to arbitrary addresses) → 400; a policy denial → 401
//! (as the node proxy); an unknown service, no ready endpoint, a failed connect or a limit →
//! 503. Every hop is one connection record (`path="gateway"`) and one access-log line naming
//! the source identity, the service, the endpoint and this network.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, PoisonError},
    time::Instant,
};

use http::Method;
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    Active, BadConnect, Error, KnownDestinations, PlainSockets, PodContext, Proxy, Unit,
    error::Context, serve::tokio_listener,
};
use crate::{
    hbone::{self, Incoming, ServerError},
    identity::Identity,
    metrics::{ConnRecord, Direction, Endpoint, Path, Security, TrafficNote},
    state::service::Backends,
    tls,
    traffic::runtime::{Cluster, HealthEvent, Lease},
    workload::Workload,
};

/// The listener name of the gateway's streams in metrics and logs.
const LISTENER: &str = "gateway";
/// Endpoints tried for one stream, at most (as the node proxy).
const MAX_ATTEMPTS: usize = 3;
/// The longest DNS name.
const MAX_HOSTNAME: usize = 253;

/// Validates a gateway request: a `CONNECT` whose authority is `<hostname>:<port>`, the
/// hostname a DNS name (an IP address is refused: the gateway forwards to services only).
/// Returns the hostname (as sent) and the port. Pure, so it is tested (and fuzzable) alone.
pub fn check_gateway_connect<'a>(
    method: &Method,
    authority: Option<&'a str>,
) -> Result<(&'a str, u16), BadConnect> {
    if method != Method::CONNECT {
        return Err(BadConnect::NotConnect);
    }
    let authority = authority.ok_or(BadConnect::BadAuthority)?;
    if authority.parse::<SocketAddr>().is_ok() || authority.starts_with('[') {
        return Err(BadConnect::AddressAuthority);
    }
    let (host, port) = authority.rsplit_once(':').ok_or(BadConnect::BadAuthority)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(BadConnect::BadAuthority)?;
    if host.parse::<IpAddr>().is_ok() {
        return Err(BadConnect::AddressAuthority);
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > MAX_HOSTNAME || !host.split('.').all(label_ok) {
        return Err(BadConnect::BadAuthority);
    }
    Ok((host, port))
}

/// The gateway being served; dropping it stops accepting, and releases its certificate.
pub struct GatewayServing {
    task: JoinHandle<()>,
    proxy: Arc<Proxy>,
    ctx: Arc<PodContext>,
    local: SocketAddr,
}

impl GatewayServing {
    /// Where it accepts HBONE.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The gateway's identity (its certificate).
    #[must_use]
    pub fn identity(&self) -> &Identity {
        &self.ctx.identity
    }
}

impl Drop for GatewayServing {
    fn drop(&mut self) {
        self.task.abort();
        self.proxy.withdraw(&self.ctx);
    }
}

/// The gateway's handler of HBONE streams.
struct GatewayHandler {
    gateway: Arc<PodContext>,
    proxy: Arc<Proxy>,
    /// The listener's address (the destination address policies see).
    local: SocketAddr,
}

impl hbone::Handler for GatewayHandler {
    fn stream(self: &Arc<Self>, stream: Incoming) {
        let Some(active) =
            self.proxy
                .track(Unit::HboneStream, &self.gateway, Some(stream.peer.ip()))
        else {
            stream.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            return;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.proxy
                .gateway_stream(&this.gateway, this.local, stream, active)
                .await;
        });
    }

    fn error(&self, peer: SocketAddr, identity: Option<&Identity>, error: &ServerError) {
        self.proxy
            .transport_error(&self.gateway.workload.uid(), peer, identity, error);
    }
}

/// A stream connected to an endpoint: the connection, what it holds of the endpoint, and
/// the endpoints tried.
struct Upstream {
    tcp: TcpStream,
    lease: Lease,
    dst: SocketAddr,
    attempts: u32,
}

impl Proxy {
    /// Serves the gateway role on `listener` as `workload` (its name, namespace, labels and
    /// service account: the identity its certificate shows, the workload policies select):
    /// its certificate is requested now, and HBONE is accepted from peers of the accepted
    /// trust domains. Services and workloads come from `set_services`/`set_workloads`.
    pub fn serve_gateway(
        self: &Arc<Self>,
        workload: Workload,
        listener: std::net::TcpListener,
    ) -> std::io::Result<GatewayServing> {
        let identity = self.mesh.identity(&workload);
        let server = tls::server_config(
            &self.mesh.provider,
            &self.mesh.certs,
            &identity,
            &self.mesh.accepted_domains,
        )
        .map_err(std::io::Error::other)?;
        let local = listener.local_addr()?;
        let listener = Arc::new(tokio_listener(listener)?);
        self.mesh.certs.acquire(&identity);
        let ctx = Arc::new(PodContext {
            workload: Arc::new(workload),
            identity,
            // Endpoints are dialled from the gateway's own network namespace.
            sockets: Arc::new(PlainSockets::default()),
            orig_dst: Arc::new(KnownDestinations::default()),
            active: Arc::default(),
        });
        // Known as a local workload: a policy change decides its open streams again.
        self.publish(&ctx);
        let handler = Arc::new(GatewayHandler {
            gateway: Arc::clone(&ctx),
            proxy: Arc::clone(self),
            local,
        });
        let task = tokio::spawn(self.hbone_accept_loop(
            listener,
            TlsAcceptor::from(server),
            Arc::new(self.hbone_settings()),
            Arc::clone(&ctx),
            handler,
        ));
        Ok(GatewayServing {
            task,
            proxy: Arc::clone(self),
            ctx,
            local,
        })
    }

    /// One stream through the gateway; `active` counts it until it ends.
    async fn gateway_stream(
        &self,
        gateway: &PodContext,
        local: SocketAddr,
        stream: Incoming,
        active: Active,
    ) {
        let accepted = Instant::now();
        let uid = gateway.workload.uid();
        let (peer, identity) = (stream.peer, Arc::clone(&stream.identity));
        let mut context = Context {
            direction: Direction::Inbound,
            workload: &uid,
            client: peer,
            dst: None,
            peer_identity: Some(&identity),
        };
        let (hostname, port) = match check_gateway_connect(stream.method(), stream.authority()) {
            Ok((host, port)) => (Arc::<str>::from(host.to_ascii_lowercase()), port),
            Err(bad) => {
                let error = Error::BadRequest(bad);
                self.report(LISTENER, &error, None, &context);
                return stream.reject(error.status());
            }
        };
        let source = self.peer_endpoint(peer, Some(&identity), Some(stream.headers()));
        let mut destination = Endpoint {
            service: Some(Arc::clone(&hostname)),
            ..Endpoint::default()
        };
        let admitted = self
            .admit(
                &self.current_workload(&gateway.workload),
                peer.ip(),
                Some(&identity),
                SocketAddr::new(local.ip(), port),
                Path::Gateway,
            )
            .and_then(|admission| {
                let backends =
                    self.service_named(&hostname, port)
                        .ok_or_else(|| Error::UnknownService {
                            hostname: Arc::clone(&hostname),
                        })?;
                let slot = backends.default.reserve().ok_or_else(|| Error::PoolFull {
                    destination: Arc::clone(&backends.default.name),
                })?;
                Ok((admission, backends, slot))
            });
        let (admission, backends, slot) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => {
                return self.gateway_refuse(stream, &error, (source, destination), &context);
            }
        };
        let service = Arc::clone(&backends.service.hostname);
        destination.service = Some(Arc::clone(&service));
        let upstream = match self
            .connect_endpoint(gateway, &backends.default, &mut context)
            .await
        {
            Ok(upstream) => upstream,
            Err((error, dst)) => {
                destination.addr = dst;
                return self.gateway_refuse(stream, &error, (source, destination), &context);
            }
        };
        let target = self.workload_at(upstream.dst.ip());
        destination = Endpoint {
            identity: target.as_ref().map(|w| self.mesh.identity(w)),
            workload: target,
            addr: Some(upstream.dst),
            service: Some(Arc::clone(&service)),
            peer: None,
        };
        let mut record = ConnRecord::open(
            &self.metrics,
            (Direction::Inbound, Path::Gateway),
            source,
            destination,
            Security::MutualTls,
        )
        .started_at(accepted)
        .with_traffic(TrafficNote {
            attempts: upstream.attempts,
            ..TrafficNote::default()
        });
        if !self.network.is_empty() {
            record = record.with_network(self.network.as_str().into());
        }
        let tunnel = match stream.accept() {
            Ok(tunnel) => tunnel,
            Err(e) => return self.report(LISTENER, &Error::PeerGone(e), Some(record), &context),
        };
        record.connected();
        debug!(path = "gateway", gateway = %uid, peer_identity = %identity, client = %peer, service = %service, endpoint = %upstream.dst, "stream forwarded");
        let Upstream { tcp, lease, .. } = upstream;
        // The copy runs in a task holding only what it needs (as the inbound path).
        tokio::spawn(async move {
            // Endpoint → peer is "sent" (response direction), peer → endpoint "received".
            let counts = (&record.sent, &record.received);
            let hbone::Tunnel {
                send,
                recv,
                slot: stream_slot,
            } = tunnel;
            let result = hbone::pipe(tcp, send, recv, Some(&admission.closed), counts).await;
            match result {
                Ok(_) => record.close("completed"),
                Err(e) => record.close(&e.to_string()),
            }
            drop((stream_slot, active, lease, slot));
        });
    }

    /// Refuses a stream that got past the request checks: counted, one connection record
    /// (failed with the error's flag, so the hop is in the access log), and its status.
    fn gateway_refuse(
        &self,
        stream: Incoming,
        error: &Error,
        (source, destination): (Endpoint, Endpoint),
        context: &Context<'_>,
    ) {
        let mut record = ConnRecord::open(
            &self.metrics,
            (Direction::Inbound, Path::Gateway),
            source,
            destination,
            Security::MutualTls,
        );
        if !self.network.is_empty() {
            record = record.with_network(self.network.as_str().into());
        }
        self.report(LISTENER, error, Some(record), context);
        stream.reject(error.status());
    }

    /// The endpoints of the service named `hostname` on `port`.
    fn service_named(&self, hostname: &str, port: u16) -> Option<Arc<Backends>> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup_hostname(hostname, port)
            .cloned()
    }

    /// Connects to the 15008 of a ready endpoint of `cluster` on this network: the node
    /// proxy's balancing and outlier detection; an endpoint that fails is counted against it
    /// and another is tried, up to [`MAX_ATTEMPTS`], each within the connect timeout. The
    /// error names the last endpoint tried, if any.
    async fn connect_endpoint(
        &self,
        gateway: &PodContext,
        cluster: &Cluster,
        context: &mut Context<'_>,
    ) -> Result<Upstream, (Error, Option<SocketAddr>)> {
        let timeout = cluster
            .policy
            .connect_timeout
            .unwrap_or(self.connect_timeout);
        let (mut tried, mut events, mut attempts) = (Vec::new(), Vec::new(), 0u32);
        let mut last = None;
        loop {
            let lease = cluster.pick(&tried, Instant::now(), &mut events);
            self.gateway_health(cluster, &mut events);
            let Some(lease) = lease else {
                let error = last.unwrap_or_else(|| Error::NoEndpoint {
                    service: Arc::clone(&cluster.host),
                });
                return Err((error, context.dst));
            };
            // Only this network's endpoints: another network's would need a gateway of its
            // own (the service table falls back to them when none here is ready).
            if self
                .workload_at(lease.addr.ip())
                .is_some_and(|w| w.remote_network(&self.network))
            {
                tried.push(lease.addr);
                continue;
            }
            attempts += 1;
            let dst = SocketAddr::new(lease.addr.ip(), hbone::PORT);
            context.dst = Some(dst);
            let connect = self.connect_upstream(&*gateway.sockets, dst);
            let source = match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(tcp)) => {
                    cluster.succeeded(&lease, Instant::now());
                    return Ok(Upstream {
                        tcp,
                        lease,
                        dst,
                        attempts,
                    });
                }
                Ok(Err(source)) => source,
                Err(_) => std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {dst} timed out after {timeout:?}"),
                ),
            };
            events.extend(cluster.failed(&lease, Instant::now()));
            self.gateway_health(cluster, &mut events);
            tried.push(lease.addr);
            debug!(service = %cluster.host, endpoint = %dst, error = %source, "gateway connect failed");
            last = Some(Error::Upstream { dst, source });
            if attempts as usize >= MAX_ATTEMPTS {
                return Err((last.unwrap_or(Error::Limit("attempts")), context.dst));
            }
        }
    }

    /// Counts and logs what outlier detection did to the gateway's endpoints.
    fn gateway_health(&self, cluster: &Cluster, events: &mut Vec<HealthEvent>) {
        for event in events.drain(..) {
            let (what, addr) = match event {
                HealthEvent::Ejected { addr, .. } => ("ejected", addr),
                HealthEvent::Returned { addr } => ("returned", addr),
            };
            self.metrics.traffic(&cluster.host, what, &cluster.name);
            if what == "ejected" {
                warn!(service = %cluster.host, endpoint = %addr, "gateway endpoint ejected (outlier detection)");
            } else {
                info!(service = %cluster.host, endpoint = %addr, "gateway endpoint back from ejection");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(method: &Method, authority: &str) -> Result<(&'static str, u16), BadConnect> {
        let authority: &'static str = Box::leak(authority.to_owned().into_boxed_str());
        check_gateway_connect(method, Some(authority))
    }

    #[test]
    fn a_service_hostname_and_port_is_forwarded() {
        assert_eq!(
            check(&Method::CONNECT, "echo.default.svc.cluster.local:8080"),
            Ok(("echo.default.svc.cluster.local", 8080))
        );
        assert_eq!(check(&Method::CONNECT, "Echo-1.ns:1"), Ok(("Echo-1.ns", 1)));
    }

    #[test]
    fn addresses_are_refused_as_such() {
        for authority in ["10.0.0.1:8080", "[fd00::1]:8080", "[fd00::1]", "::1:80"] {
            assert_eq!(
                check(&Method::CONNECT, authority),
                Err(BadConnect::AddressAuthority),
                "{authority}"
            );
        }
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        assert_eq!(
            check(&Method::GET, "echo.default.svc.cluster.local:8080"),
            Err(BadConnect::NotConnect)
        );
        assert_eq!(
            check_gateway_connect(&Method::CONNECT, None),
            Err(BadConnect::BadAuthority)
        );
        let long = format!("{}.svc:80", "a.".repeat(130));
        for authority in [
            "echo.default.svc.cluster.local",
            "echo:0",
            "echo:65536",
            "echo:http",
            ":80",
            "echo..svc:80",
            "-echo.svc:80",
            "ec_ho.svc:80",
            "ec/ho:80",
            long.as_str(),
        ] {
            assert_eq!(
                check(&Method::CONNECT, authority),
                Err(BadConnect::BadAuthority),
                "{authority}"
            );
        }
    }

    #[test]
    fn each_refusal_keeps_its_label_and_status() {
        let address = Error::BadRequest(BadConnect::AddressAuthority);
        assert_eq!(
            (address.reason(), address.status()),
            ("bad_request_address", http::StatusCode::BAD_REQUEST)
        );
        let unknown = Error::UnknownService {
            hostname: "nope.default.svc.cluster.local".into(),
        };
        assert_eq!(
            (unknown.reason(), unknown.flag(), unknown.status()),
            (
                "unknown_service",
                "NR",
                http::StatusCode::SERVICE_UNAVAILABLE
            )
        );
    }
}
