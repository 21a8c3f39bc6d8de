//! Inbound: connections into a pod of this node, over HBONE (a `CONNECT` stream the HBONE server
//! hands over) or in plaintext (what `sk_lookup` captured into the pod's 15006 listener). Both
//! share one admit-and-connect step: peer authentication (STRICT refuses plaintext), the
//! authorization policies, then the connection to the application from inside the pod's netns.
//! A refused HBONE stream gets its status (400, 401, 503) before anything reaches the
//! application; a refused plaintext connection is reset.

use std::{net::SocketAddr, sync::Arc};

use http::Method;
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    Active, Admission, BadConnect, Error, PodContext, Proxy, Unit, error::Context, forward,
};
use crate::{
    hbone::{self, Incoming, ServerError},
    identity::Identity,
    metrics::{ConnRecord, Direction, Endpoint, NoMtls, Path, Security, peer::Peer},
    state::service::HostIndex,
};

/// Validates a request's method and authority against the listening workload: the target
/// address, or why the answer is 400. Pure, so it is fuzzed directly.
pub fn check_connect(
    method: &Method,
    authority: Option<&str>,
    workload_ips: &[std::net::IpAddr],
    reserved_ports: &[u16],
) -> Result<SocketAddr, BadConnect> {
    if method != Method::CONNECT {
        return Err(BadConnect::NotConnect);
    }
    let dst = authority
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or(BadConnect::BadAuthority)?;
    if !workload_ips.contains(&dst.ip()) {
        return Err(BadConnect::NotThisWorkload);
    }
    if reserved_ports.contains(&dst.port()) {
        return Err(BadConnect::ReservedPort);
    }
    Ok(dst)
}

/// As [`check_connect`], and a hostname authority too (`<service hostname>:<port>`, the
/// inner `CONNECT` of double HBONE): the service must have that port and count the
/// listening workload among its endpoints; the target is the workload's address and the
/// port's target port for it. Returns the target and, for a hostname, the service's
/// hostname. Pure, so it is fuzzed directly.
pub fn check_connect_to(
    method: &Method,
    authority: Option<&str>,
    workload_ips: &[std::net::IpAddr],
    reserved_ports: &[u16],
    hosts: &HostIndex,
) -> Result<(SocketAddr, Option<Arc<str>>), BadConnect> {
    let Some(host_port) = authority.filter(|a| a.parse::<SocketAddr>().is_err()) else {
        return check_connect(method, authority, workload_ips, reserved_ports).map(|d| (d, None));
    };
    if method != Method::CONNECT {
        return Err(BadConnect::NotConnect);
    }
    let (host, port) = host_port.rsplit_once(':').ok_or(BadConnect::BadAuthority)?;
    let port = port.parse::<u16>().map_err(|_| BadConnect::BadAuthority)?;
    let entry = hosts.get(host).ok_or(BadConnect::BadAuthority)?;
    let dst = workload_ips
        .iter()
        .find_map(|ip| entry.target(*ip, port).map(|t| SocketAddr::new(*ip, t)))
        .ok_or(BadConnect::BadAuthority)?;
    if reserved_ports.contains(&dst.port()) {
        return Err(BadConnect::ReservedPort);
    }
    Ok((dst, Some(Arc::clone(&entry.hostname))))
}

/// The proxy's handler of one pod's HBONE streams.
pub(super) struct HboneHandler {
    pub pod: Arc<PodContext>,
    pub proxy: Arc<Proxy>,
}

impl hbone::Handler for HboneHandler {
    fn stream(self: &Arc<Self>, stream: Incoming) {
        // Counted against the limits while it is handled (the upstream socket).
        let Some(active) = self
            .proxy
            .track(Unit::HboneStream, &self.pod, Some(stream.peer.ip()))
        else {
            stream.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            return;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.proxy.inbound_hbone(&this.pod, stream, active).await;
        });
    }

    fn error(&self, peer: SocketAddr, identity: Option<&Identity>, error: &ServerError) {
        self.proxy
            .transport_error(&self.pod.workload.uid(), peer, identity, error);
    }
}

impl Proxy {
    /// Admits a connection into `pod` from `peer` (with `identity` over mTLS, none in
    /// plaintext) to `dst`, and connects to the application: the step both inbound paths (and
    /// the same-node path) share. Nothing reaches the application unless it is admitted.
    pub(super) async fn admit_and_connect(
        &self,
        pod: &PodContext,
        peer: SocketAddr,
        identity: Option<&Identity>,
        dst: SocketAddr,
        path: Path,
    ) -> Result<(Admission, TcpStream), Error> {
        let destination = self.current_workload(&pod.workload);
        let admission = self.admit(&destination, peer.ip(), identity, dst, path)?;
        // Boxed: it finishes long before the connection does (memory per idle connection).
        let upstream = Box::pin(self.connect_upstream(&*pod.sockets, dst))
            .await
            .map_err(|source| Error::Upstream { dst, source })?;
        Ok((admission, upstream))
    }

    /// Who is on the other end of an inbound connection, for metrics. A peer the state does
    /// not know (a ztunnel's workload of another cluster, a state not synced yet) is described
    /// by the `baggage` of its request (`headers`), if it agrees with its verified identity.
    pub(super) fn peer_endpoint(
        &self,
        peer: SocketAddr,
        identity: Option<&Identity>,
        headers: Option<&http::HeaderMap>,
    ) -> Endpoint {
        let workload = self.workload_at(peer.ip());
        let said = match (&workload, identity, headers) {
            (None, Some(identity), Some(headers)) => {
                let lines = headers.get_all(hbone::BAGGAGE);
                Peer::from_baggage(lines.iter().map(http::HeaderValue::as_bytes))
                    .and_then(|p| p.vouched_by(identity))
                    .map(Arc::new)
            }
            _ => None,
        };
        Endpoint {
            workload,
            identity: identity.cloned(),
            addr: Some(peer),
            service: None,
            peer: said,
        }
    }

    /// One HBONE stream into `pod`; `active` counts it until it ends.
    async fn inbound_hbone(&self, pod: &PodContext, stream: Incoming, active: Active) {
        let uid = pod.workload.uid();
        let (peer, identity) = (stream.peer, Arc::clone(&stream.identity));
        let mut context = Context {
            direction: Direction::Inbound,
            workload: &uid,
            client: peer,
            dst: None,
            peer_identity: Some(&identity),
        };
        let services = self.service_table();
        let (dst, service) = match check_connect_to(
            stream.method(),
            stream.authority(),
            &pod.workload.ips,
            &self.reserved_ports,
            services.hosts(),
        ) {
            Ok(target) => target,
            Err(bad) => {
                let error = Error::BadRequest(bad);
                self.report("hbone", &error, None, &context);
                return stream.reject(error.status());
            }
        };
        drop(services);
        context.dst = Some(dst);
        let record = ConnRecord::open(
            &self.metrics,
            (Direction::Inbound, Path::Hbone),
            self.peer_endpoint(peer, Some(&identity), Some(stream.headers())),
            Endpoint {
                service,
                ..Self::local_endpoint(pod, dst)
            },
            Security::MutualTls,
        );
        let (admission, upstream) = match self
            .admit_and_connect(pod, peer, Some(&identity), dst, Path::Hbone)
            .await
        {
            Ok(admitted) => admitted,
            Err(error) => {
                let status = error.status();
                self.report("hbone", &error, Some(record), &context);
                return stream.reject(status);
            }
        };
        let trace = stream
            .headers()
            .get(hbone::TRACEPARENT)
            .and_then(|v| hbone::TraceParent::parse(v.as_bytes()));
        let tunnel = match stream.accept() {
            Ok(tunnel) => tunnel,
            Err(e) => return self.report("hbone", &Error::PeerGone(e), Some(record), &context),
        };
        record.connected();
        debug!(direction = "inbound", path = "hbone", dst_workload = %uid, peer_identity = %identity, client = %peer, orig_dst = %dst, traceparent = trace.map(|t| t.to_string()), "connection captured");
        // The copy phase runs in a task of its own that holds only what it needs, so the setup
        // state (request, handshake futures) is freed: an open connection costs less memory.
        tokio::spawn(async move {
            // Application → stream is "sent" (response direction), stream → application
            // "received".
            let counts = (&record.sent, &record.received);
            let hbone::Tunnel { send, recv, slot } = tunnel;
            let result = hbone::pipe(upstream, send, recv, Some(&admission.closed), counts).await;
            match result {
                Ok(_) => record.close("completed"),
                Err(e) => record.close(&e.to_string()),
            }
            drop((slot, active));
        });
    }

    /// One plaintext connection captured into `pod` (accepted from `peer`).
    pub(super) async fn plaintext(&self, pod: &PodContext, client: TcpStream, peer: SocketAddr) {
        let uid = pod.workload.uid();
        let peer = forward::unmap(peer);
        let mut context = Context {
            direction: Direction::Inbound,
            workload: &uid,
            client: peer,
            dst: None,
            peer_identity: None,
        };
        let dst = match client.local_addr() {
            Ok(local) => forward::unmap(pod.orig_dst.inbound(forward::unmap(local))),
            Err(e) => {
                debug!(direction = "inbound", dst_workload = %uid, error = %e, "getsockname failed");
                return;
            }
        };
        context.dst = Some(dst);
        if self.reserved_ports.contains(&dst.port()) {
            self.report("inbound", &Error::ReservedPort(dst.port()), None, &context);
            return forward::reset(client);
        }
        let record = ConnRecord::open(
            &self.metrics,
            (Direction::Inbound, Path::Plaintext),
            self.peer_endpoint(peer, None, None),
            Self::local_endpoint(pod, dst),
            Security::None(NoMtls::PlaintextPeer),
        );
        match self
            .admit_and_connect(pod, peer, None, dst, Path::Plaintext)
            .await
        {
            Ok((admission, upstream)) => {
                record.connected();
                debug!(direction = "inbound", path = "plaintext", dst_workload = %uid, client = %peer, orig_dst = %dst, "connection captured");
                forward::copy_recorded(client, upstream, record, Some(&admission), self.limits())
                    .await;
            }
            Err(error) => {
                self.report("inbound", &error, Some(record), &context);
                forward::reset(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::{BadConnect, HostIndex, check_connect_to};
    use crate::state::service::Service;

    const RESERVED: [u16; 3] = [15001, 15006, 15008];

    /// `echo` (8080 → 7000, 9090 → 9090) with the endpoints 10.0.0.1 (its own 8080 → 7100) and
    /// 10.0.0.2, and a not-ready 10.0.0.3; `admin` whose port targets a reserved port.
    fn hosts() -> HostIndex {
        let services: Vec<Service> = serde_yaml_ng::from_str(
            "- {name: echo, addresses: [10.96.0.1], ports: [{port: 8080, targetPort: 7000}, {port: 9090}], endpoints: [{address: 10.0.0.1, ports: {8080: 7100}}, {address: 10.0.0.2}, {address: 10.0.0.3, ready: false}]}\n\
             - {name: admin, addresses: [10.96.0.2], ports: [{port: 80, targetPort: 15008}], endpoints: [{address: 10.0.0.2}]}\n",
        )
        .unwrap();
        HostIndex::build(&services, &[])
    }

    fn check(authority: &str, pod: &str) -> Result<(String, Option<String>), BadConnect> {
        check_connect_to(
            &Method::CONNECT,
            Some(authority),
            &[pod.parse().unwrap()],
            &RESERVED,
            &hosts(),
        )
        .map(|(dst, host)| (dst.to_string(), host.map(|h| h.to_string())))
    }

    #[test]
    fn a_hostname_authority_resolves_to_the_target_port_of_this_endpoint() {
        let echo = Some("echo.default.svc.cluster.local".to_owned());
        assert_eq!(
            check("echo.default.svc.cluster.local:8080", "10.0.0.2"),
            Ok(("10.0.0.2:7000".to_owned(), echo.clone()))
        );
        // The endpoint's own port mapping; any case.
        assert_eq!(
            check("ECHO.default.svc.cluster.local:8080", "10.0.0.1"),
            Ok(("10.0.0.1:7100".to_owned(), echo.clone()))
        );
        assert_eq!(
            check("echo.default.svc.cluster.local:9090", "10.0.0.1"),
            Ok(("10.0.0.1:9090".to_owned(), echo))
        );
        // An address authority is checked as before, without a service.
        assert_eq!(
            check("10.0.0.1:7000", "10.0.0.1"),
            Ok(("10.0.0.1:7000".to_owned(), None))
        );
    }

    #[test]
    fn other_hostname_authorities_are_bad_requests() {
        for (authority, pod, why) in [
            (
                "echo.default.svc.cluster.local:8080",
                "10.0.0.9",
                BadConnect::BadAuthority,
            ),
            (
                "echo.default.svc.cluster.local:8080",
                "10.0.0.3",
                BadConnect::BadAuthority,
            ),
            (
                "echo.default.svc.cluster.local:7000",
                "10.0.0.1",
                BadConnect::BadAuthority,
            ),
            (
                "other.default.svc.cluster.local:8080",
                "10.0.0.1",
                BadConnect::BadAuthority,
            ),
            (
                "echo.default.svc.cluster.local",
                "10.0.0.1",
                BadConnect::BadAuthority,
            ),
            (
                "echo.default.svc.cluster.local:",
                "10.0.0.1",
                BadConnect::BadAuthority,
            ),
            (
                "echo.default.svc.cluster.local:99999",
                "10.0.0.1",
                BadConnect::BadAuthority,
            ),
            ("", "10.0.0.1", BadConnect::BadAuthority),
            (
                "admin.default.svc.cluster.local:80",
                "10.0.0.2",
                BadConnect::ReservedPort,
            ),
        ] {
            assert_eq!(check(authority, pod), Err(why), "{authority} at {pod}");
        }
        let get = check_connect_to(
            &Method::GET,
            Some("echo.default.svc.cluster.local:8080"),
            &["10.0.0.2".parse().unwrap()],
            &RESERVED,
            &hosts(),
        );
        assert_eq!(get, Err(BadConnect::NotConnect));
    }
}
