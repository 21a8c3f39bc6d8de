//! The HBONE server on a pod's 15008 listener: TLS (client certificate required), HTTP/2, one
//! `CONNECT` per stream, each answered only after the target was connected (and authorized):
//! `200` then raw bytes, `400` bad request or authority, `401` denied by policy (decided before
//! connecting upstream, so no byte reaches the application), `503` upstream failure.
//!
//! Every stage of a connection is bounded in time: TLS, the HTTP/2 preface and the first PING
//! round trip share one deadline (`proxy.handshakeTimeoutMs` from the TCP accept); then a PING
//! goes out every `proxy.pingIntervalMs` and must be answered within `proxy.pingTimeoutMs`; a
//! connection without a stream for `proxy.hboneIdleTimeoutMs` is closed. Admission (limits) is
//! the proxy's: the accept loop counts the connection before it gets here.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{Reason, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{debug, info, warn};

use super::{
    BadConnect, CONNECTION_WINDOW, Dead, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, OpenGauge,
    SERVER_MAX_STREAMS, STREAM_WINDOW, abuse, keepalive, pipe,
};
use crate::{
    identity::Identity,
    metrics::Metrics,
    proxy::{Active, PodContext, Proxy, Unit},
    tls::peer_identity,
};

/// After a GOAWAY of the daemon's own (idle), how long the peer has to read it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a pod's HBONE listener forwards to.
pub struct InboundTarget {
    pub pod: Arc<PodContext>,
    pub proxy: Arc<Proxy>,
    pub reserved_ports: [u16; 3],
}

type Connection = h2::server::Connection<abuse::Watched<TlsStream<TcpStream>>, Bytes>;

/// Serves one accepted TCP connection: TLS handshake, then HTTP/2 until the client is done or
/// a time limit ends it. `admitted` keeps the connection counted against the limits until then.
pub async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    target: Arc<InboundTarget>,
    admitted: Active,
) {
    let uid = target.pod.workload.uid();
    // Small HTTP/2 frames (responses, window updates) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let metrics = Arc::clone(target.proxy.metrics());
    let mut gauge = OpenGauge::new(&metrics, "server", "handshake");
    let deadline = Instant::now() + target.proxy.handshake_timeout();
    // Boxed: the handshakes are large and finish long before the connection does.
    let Some((mut conn, source, sent)) =
        Box::pin(setup(acceptor, tcp, peer, &uid, &metrics, deadline)).await
    else {
        return;
    };
    debug!(dst_workload = %uid, client = %peer, peer_identity = %source, "HBONE connection accepted");
    let liveness = target.proxy.liveness();
    let alive = keepalive(conn.ping_pong(), liveness, Some(deadline), || {
        gauge.set_state("established");
    });
    tokio::pin!(alive);
    let streams = Arc::new(watch::Sender::new(0usize));
    let idle = idle(streams.subscribe(), liveness.idle_timeout);
    tokio::pin!(idle);
    let source = Arc::new(source);
    let mut draining = target.proxy.draining();
    let mut going_away = false;
    let ended = loop {
        let request = tokio::select! {
            request = conn.accept() => request,
            dead = &mut alive => break Some(match dead {
                Dead::Setup => "http2_handshake_timeout",
                Dead::Ping => "ping_timeout",
            }),
            () = &mut idle, if !going_away => break Some("idle_timeout"),
            _ = draining.wait_for(|d| *d), if !going_away => {
                debug!(dst_workload = %uid, client = %peer, "draining: GOAWAY");
                conn.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        match request {
            None => break None,
            Some(Ok((request, respond))) => {
                accept_stream(request, respond, peer, &source, &target, &streams);
            }
            Some(Err(e)) => {
                if let Some(reason) = abuse::connection_error(&e, &sent) {
                    if let Some(suppressed) = metrics.error("hbone", reason) {
                        warn!(direction = "inbound", dst_workload = %uid, client = %peer, peer_identity = %source, reason, error = %e, suppressed, "HBONE connection ended by a protocol error (GOAWAY)");
                    }
                } else {
                    debug!(dst_workload = %uid, client = %peer, error = %e, "HBONE connection ended");
                }
                break None;
            }
        }
    };
    match ended {
        Some("idle_timeout") => {
            if let Some(suppressed) = metrics.error("hbone", "idle_timeout") {
                info!(direction = "inbound", dst_workload = %uid, client = %peer, peer_identity = %source, timeout = ?liveness.idle_timeout, suppressed, "HBONE connection without a stream closed (idle)");
            }
            // Idle: no stream to lose; a request already on its way is not processed, and
            // the GOAWAY's last stream id tells the peer to retry it on a new connection.
            conn.abrupt_shutdown(Reason::NO_ERROR);
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                while conn.accept().await.is_some() {}
            })
            .await;
        }
        Some(reason) => {
            if let Some(suppressed) = metrics.error("hbone", reason) {
                let message = if reason == "ping_timeout" {
                    "HBONE peer did not answer a PING in time; dropping the connection"
                } else {
                    "HTTP/2 handshake timed out (no PING answered)"
                };
                warn!(direction = "inbound", dst_workload = %uid, client = %peer, peer_identity = %source, reason, suppressed, "{message}");
            }
        }
        None => {}
    }
    // Dropping the connection ends its streams (their pipes reset the application side).
    drop(conn);
    drop(admitted);
}

/// TLS, the peer's identity and the HTTP/2 handshake, all by `deadline`. `None` (logged and
/// counted) when one fails.
async fn setup(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    uid: &str,
    metrics: &Metrics,
    deadline: Instant,
) -> Option<(Connection, Identity, abuse::SentGoaway)> {
    let started = Instant::now();
    let refuse = |reason: &'static str, message: &str, error: Option<&dyn std::fmt::Display>| {
        if let Some(suppressed) = metrics.error("hbone", reason) {
            let error = error.map(ToString::to_string).unwrap_or_default();
            warn!(direction = "inbound", dst_workload = %uid, client = %peer, reason, error, suppressed, "{message}");
        }
    };
    let tls = match tokio::time::timeout_at(deadline.into(), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            refuse(
                abuse::tls_error(&e),
                "HBONE TLS handshake rejected",
                Some(&e),
            );
            return None;
        }
        Err(_) => {
            refuse("handshake_timeout", "HBONE TLS handshake timed out", None);
            return None;
        }
    };
    metrics
        .tls_handshake_seconds
        .get_or_create(&crate::metrics::RoleLabels { role: "server" })
        .observe(started.elapsed().as_secs_f64());
    let Some(source) = tls.get_ref().1.peer_certificates().and_then(peer_identity) else {
        refuse(
            "no_peer_identity",
            "HBONE peer without a SPIFFE identity",
            None,
        );
        return None;
    };
    let (tls, sent) = abuse::Watched::new(tls);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(tls);
    match tokio::time::timeout_at(deadline.into(), handshake).await {
        Ok(Ok(conn)) => Some((conn, source, sent)),
        Ok(Err(e)) => {
            refuse("http2_handshake", "HTTP/2 handshake failed", Some(&e));
            None
        }
        Err(_) => {
            refuse(
                "http2_handshake_timeout",
                "HTTP/2 handshake timed out (no preface)",
                None,
            );
            None
        }
    }
}

/// Resolves once the connection has had no stream for `timeout`.
async fn idle(mut streams: watch::Receiver<usize>, timeout: Duration) {
    loop {
        let gone = streams.wait_for(|n| *n == 0).await.is_err();
        if gone {
            return std::future::pending().await;
        }
        let busy = tokio::select! {
            () = tokio::time::sleep(timeout) => return,
            busy = streams.wait_for(|n| *n > 0) => busy.is_ok(),
        };
        if !busy {
            return std::future::pending().await;
        }
    }
}

/// Counts a stream on its connection while alive (for the idle timeout and the stream cap).
struct StreamSlot(Arc<watch::Sender<usize>>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Admits a new stream and starts handling it. Streams whose handling outlives their HTTP/2
/// stream (a peer that resets each one at once, as in a rapid-reset attack, frees h2's slot
/// while the upstream connect still runs) count until their task ends: past
/// [`SERVER_MAX_STREAMS`] such tasks a new stream is refused.
fn accept_stream(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    source: &Arc<Identity>,
    target: &Arc<InboundTarget>,
    streams: &Arc<watch::Sender<usize>>,
) {
    if *streams.borrow() >= SERVER_MAX_STREAMS as usize {
        if let Some(suppressed) = target.proxy.metrics().error("hbone", "stream_limit") {
            warn!(direction = "inbound", dst_workload = %target.pod.workload.uid(), client = %peer, peer_identity = %source, suppressed, "HBONE stream refused: too many streams in progress on the connection");
        }
        respond.send_reset(Reason::REFUSED_STREAM);
        return;
    }
    let Some(active) = target
        .proxy
        .track(Unit::HboneStream, &target.pod, Some(peer.ip()))
    else {
        reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    streams.send_modify(|n| *n += 1);
    let slot = StreamSlot(Arc::clone(streams));
    let (target, source) = (Arc::clone(target), Arc::clone(source));
    tokio::spawn(async move {
        handle(request, respond, peer, &source, &target, (active, slot)).await;
    });
}

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

/// Why a CONNECT was answered with something other than 200.
fn reject(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(response, true);
}

async fn handle(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    source: &Identity,
    target: &InboundTarget,
    counted: (Active, StreamSlot),
) {
    let uid = target.pod.workload.uid();
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let dst = match check_connect(
        request.method(),
        authority.as_deref(),
        &target.pod.workload.ips,
        &target.reserved_ports,
    ) {
        Ok(dst) => dst,
        Err(bad) => {
            if let Some(suppressed) = target.proxy.metrics().error("hbone", bad.reason()) {
                warn!(
                    direction = "inbound",
                    dst_workload = %uid,
                    peer_identity = %source,
                    client = %peer,
                    method = %request.method(),
                    authority = authority.as_deref().unwrap_or(""),
                    reason = bad.reason(),
                    error = %bad,
                    suppressed,
                    "HBONE request rejected (400)"
                );
            }
            return reject(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    let record = target
        .proxy
        .record_inbound(&target.pod, peer, Some(source), dst);
    // Authorize before anything reaches the application: a denied stream gets 401 and no
    // connection is ever made upstream.
    let Ok(admission) =
        target
            .proxy
            .admit(&target.pod.workload, peer.ip(), Some(source), dst, "hbone")
    else {
        record.fail("DENY", "denied by policy");
        return reject(&mut respond, StatusCode::UNAUTHORIZED);
    };
    // Futures that finish before the connection's long copy phase are boxed, so that the
    // task of an open connection does not carry their state (memory per idle connection).
    let connect = Box::pin(target.proxy.connect_upstream(&target.pod.worker, dst));
    let upstream = match connect.await {
        Ok(s) => s,
        Err(e) => {
            warn!(direction = "inbound", dst_workload = %uid, orig_dst = %dst, error = %e, "HBONE upstream connect failed (503)");
            record.fail("UF", &e.to_string());
            return reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            debug!(error = %e, "client went away before the 200");
            record.close("client went away before the 200");
            return;
        }
    };
    record.connected();
    debug!(
        direction = "inbound",
        path = "hbone",
        dst_workload = %uid,
        peer_identity = %source,
        client = %peer,
        orig_dst = %dst,
        "connection captured"
    );
    // The copy phase runs in a task of its own that holds only what it needs, so the setup
    // state (request, handshake futures) is freed: an open connection costs less memory.
    let body = request.into_body();
    tokio::spawn(async move {
        // Application → stream is "sent" (response direction), stream → application "received".
        let counts = (&record.sent, &record.received);
        let result = pipe(upstream, send, body, Some(&admission.closed), counts).await;
        match result {
            Ok(_) => record.close("completed"),
            Err(e) => record.close(&e.to_string()),
        }
        drop(counted);
    });
}
