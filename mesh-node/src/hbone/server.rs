//! The HBONE server on a pod's 15008 listener: TLS (client certificate required), HTTP/2, one
//! `CONNECT` per stream, each answered only after the target was connected (and authorized):
//! `200` then raw bytes, `400` bad request or authority, `401` denied by policy (decided before
//! connecting upstream, so no byte reaches the application), `503` upstream failure.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, SERVER_MAX_STREAMS, STREAM_WINDOW,
    pipe,
};
use crate::{
    identity::Identity,
    proxy::{Active, PodContext, Proxy, connect_in_netns},
    tls::peer_identity,
};

/// What a pod's HBONE listener forwards to.
pub struct InboundTarget {
    pub pod: Arc<PodContext>,
    pub proxy: Arc<Proxy>,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub reserved_ports: [u16; 3],
}

/// Serves one accepted TCP connection: TLS handshake, then HTTP/2 until the client is done.
pub async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    target: Arc<InboundTarget>,
) {
    let uid = target.pod.workload.uid();
    // Small HTTP/2 frames (responses, window updates) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let metrics = Arc::clone(target.proxy.metrics());
    let handshake_timeout = target.proxy.handshake_timeout();
    let handshake_started = std::time::Instant::now();
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            target
                .proxy
                .metrics()
                .tls_handshake_seconds
                .get_or_create(&crate::metrics::RoleLabels { role: "server" })
                .observe(handshake_started.elapsed().as_secs_f64());
            tls
        }
        Ok(Err(e)) => {
            warn!(direction = "inbound", dst_workload = %uid, client = %peer, error = %e, "HBONE TLS handshake rejected");
            metrics.error("hbone", "tls_handshake");
            return;
        }
        Err(_) => {
            warn!(direction = "inbound", dst_workload = %uid, client = %peer, "HBONE TLS handshake timed out");
            metrics.error("hbone", "handshake_timeout");
            return;
        }
    };
    let Some(source) = tls.get_ref().1.peer_certificates().and_then(peer_identity) else {
        warn!(dst_workload = %uid, client = %peer, "HBONE peer without a SPIFFE identity");
        return;
    };
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(conn) => conn,
        Err(e) => {
            warn!(dst_workload = %uid, client = %peer, peer_identity = %source, error = %e, "HTTP/2 handshake failed");
            metrics.error("hbone", "http2");
            return;
        }
    };
    debug!(dst_workload = %uid, client = %peer, peer_identity = %source, "HBONE connection accepted");
    let source = Arc::new(source);
    let mut draining = target.proxy.draining();
    let mut going_away = false;
    loop {
        let request = tokio::select! {
            request = conn.accept() => request,
            _ = draining.wait_for(|d| *d), if !going_away => {
                debug!(dst_workload = %uid, client = %peer, "draining: GOAWAY");
                conn.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        let Some(request) = request else { break };
        match request {
            Ok((request, respond)) => {
                let target = Arc::clone(&target);
                let source = Arc::clone(&source);
                let Some(active) = target.proxy.track_for(&target.pod, "hbone") else {
                    let mut respond = respond;
                    reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                    continue;
                };
                tokio::spawn(async move {
                    handle(request, respond, peer, &source, &target, active).await;
                });
            }
            Err(e) => {
                if e.is_io() || e.is_go_away() {
                    debug!(dst_workload = %uid, client = %peer, error = %e, "HBONE connection ended");
                } else {
                    warn!(dst_workload = %uid, client = %peer, error = %e, "HBONE connection ended by a protocol error");
                    metrics.error("hbone", "http2");
                }
                break;
            }
        }
    }
}

/// Validates a request's method and authority against the listening workload: the target
/// address, or why the answer is 400. Pure, so it is fuzzed directly.
pub fn check_connect(
    method: &Method,
    authority: Option<&str>,
    workload_ips: &[std::net::IpAddr],
    reserved_ports: &[u16],
) -> Result<SocketAddr, &'static str> {
    if method != Method::CONNECT {
        return Err("not a CONNECT");
    }
    let dst = authority
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or("authority is not ip:port")?;
    if !workload_ips.contains(&dst.ip()) {
        return Err("authority IP is not this workload");
    }
    if reserved_ports.contains(&dst.port()) {
        return Err("reserved port");
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
    active: Active,
) {
    let uid = target.pod.workload.uid();
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let bad = |reason: &str| {
        warn!(
            direction = "inbound",
            dst_workload = %uid,
            peer_identity = %source,
            client = %peer,
            authority = authority.as_deref().unwrap_or(""),
            reason,
            "HBONE request rejected (400)"
        );
    };
    let dst = match check_connect(
        request.method(),
        authority.as_deref(),
        &target.pod.workload.ips,
        &target.reserved_ports,
    ) {
        Ok(dst) => dst,
        Err(reason) => {
            bad(reason);
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
    let connect = Box::pin(connect_in_netns(
        &target.pod.worker,
        dst,
        target.mark,
        target.connect_timeout,
    ));
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
        drop(active);
    });
}
