//! The HBONE server transport on a pod's 15008 listener: TLS (client certificate required),
//! HTTP/2, and one [`Incoming`] `CONNECT` stream handed to the [`Handler`] at a time. What a
//! stream is for (its target, admission, the upstream connection, the status) is the
//! handler's: the proxy's inbound path. This module only speaks the protocol and bounds it.
//!
//! Every stage of a connection is bounded in time: TLS, the HTTP/2 preface and the first PING
//! round trip share one deadline (`proxy.handshakeTimeoutMs` from the TCP accept); then a PING
//! goes out every `proxy.pingIntervalMs` and must be answered within `proxy.pingTimeoutMs`; a
//! connection without a stream for `proxy.hboneIdleTimeoutMs` is closed. At most
//! [`SERVER_MAX_STREAMS`] streams are in progress on a connection, counting those whose
//! handling outlives their HTTP/2 stream. Every refusal and every end that is not the peer's
//! own doing is reported to the handler as a [`ServerError`].

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::debug;

use super::{
    CONNECTION_WINDOW, Dead, Liveness, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, OpenGauge,
    SERVER_MAX_STREAMS, STREAM_WINDOW, abuse, keepalive,
};
use crate::{identity::Identity, metrics::Metrics, tls::peer_identity};

/// After a GOAWAY of the daemon's own (idle), how long the peer has to read it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the server hands each `CONNECT` stream to.
pub trait Handler: Send + Sync + 'static {
    /// A new stream from an authenticated peer. Called on the connection's task: anything that
    /// waits (an upstream connect, the copy) belongs in a task of its own, which holds the
    /// stream (its slot on the connection) until done.
    fn stream(self: &Arc<Self>, stream: Incoming);

    /// The transport refused or ended a connection or a stream on its own (for logs and
    /// metrics). `identity` is the peer's, once TLS told it.
    fn error(&self, peer: SocketAddr, identity: Option<&Identity>, error: &ServerError);
}

/// Why the server transport refused or ended a connection (or a stream).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("HBONE TLS handshake rejected")]
    Tls {
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("HBONE TLS handshake timed out")]
    HandshakeTimeout,
    #[error("HBONE peer without a SPIFFE identity")]
    NoPeerIdentity,
    #[error("HTTP/2 handshake failed")]
    Http2Handshake(#[source] h2::Error),
    #[error("HTTP/2 handshake timed out (no preface)")]
    Http2HandshakeTimeout,
    /// The first PING, sent when the HTTP/2 handshake was done, was not answered in time.
    #[error("HTTP/2 handshake timed out (no PING answered)")]
    SetupPingTimeout,
    #[error("HBONE connection ended by a protocol error (GOAWAY)")]
    Protocol {
        reason: &'static str,
        #[source]
        source: h2::Error,
    },
    #[error("HBONE peer did not answer a PING in time; dropping the connection")]
    PingTimeout,
    #[error("HBONE connection without a stream closed (idle)")]
    Idle(Duration),
    #[error("HBONE request headers over the limit (answered 431)")]
    HeadersRefused,
    #[error("HBONE stream reset for an HTTP/2 protocol error")]
    StreamProtocol,
    #[error("HBONE stream refused: too many streams in progress on the connection")]
    StreamLimit,
}

impl ServerError {
    /// The metrics label (`mesh_connection_errors_total{listener="hbone",reason}`).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            ServerError::Tls { reason, .. } | ServerError::Protocol { reason, .. } => reason,
            ServerError::HandshakeTimeout => "handshake_timeout",
            ServerError::NoPeerIdentity => "no_peer_identity",
            ServerError::Http2Handshake(_) => "http2_handshake",
            ServerError::Http2HandshakeTimeout | ServerError::SetupPingTimeout => {
                "http2_handshake_timeout"
            }
            ServerError::PingTimeout => "ping_timeout",
            ServerError::Idle(_) => "idle_timeout",
            ServerError::StreamLimit => "stream_limit",
            ServerError::HeadersRefused => abuse::REFUSED_STREAMS[0],
            ServerError::StreamProtocol => abuse::REFUSED_STREAMS[1],
        }
    }
}

/// How server connections are bounded.
#[derive(Clone)]
pub struct ServerSettings {
    /// TLS, the HTTP/2 preface and the first PING round trip, from the TCP accept.
    pub handshake_timeout: Duration,
    pub liveness: Liveness,
    /// Becomes `true` when the daemon starts draining: connections get a graceful GOAWAY.
    pub draining: watch::Receiver<bool>,
    /// The transport's own metrics (handshake time, open connections by state).
    pub metrics: Arc<Metrics>,
}

/// One `CONNECT` stream, until the handler answers it.
pub struct Incoming {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The peer's verified identity.
    pub identity: Arc<Identity>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    slot: StreamSlot,
}

/// An accepted stream: a byte pipe in both directions (see [`super::pipe`]).
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Counts the stream on its connection until the tunnel is dropped.
    pub slot: StreamSlot,
}

impl Incoming {
    /// The request's method.
    #[must_use]
    pub fn method(&self) -> &Method {
        self.request.method()
    }

    /// The request's `:authority`.
    #[must_use]
    pub fn authority(&self) -> Option<&str> {
        self.request
            .uri()
            .authority()
            .map(http::uri::Authority::as_str)
    }

    /// The request's headers (the peer's: bounded by [`super::MAX_HEADER_LIST_SIZE`], to be
    /// parsed with care).
    #[must_use]
    pub fn headers(&self) -> &http::HeaderMap {
        self.request.headers()
    }

    /// Answers with `status` (not 200) and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 200: the stream is a byte pipe from now on. Fails when the peer went away.
    pub fn accept(mut self) -> Result<Tunnel, h2::Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(Tunnel {
            send,
            recv: self.request.into_body(),
            slot: self.slot,
        })
    }
}

type Connection = h2::server::Connection<abuse::Watched<TlsStream<TcpStream>>, Bytes>;

/// Serves one accepted TCP connection: TLS handshake, then HTTP/2 until the client is done or
/// a time limit ends it, handing each stream to `handler`.
pub async fn serve_connection<H: Handler>(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    settings: &ServerSettings,
    handler: Arc<H>,
) {
    // Small HTTP/2 frames (responses, window updates) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let mut gauge = OpenGauge::new(&settings.metrics, "server", "handshake");
    let deadline = Instant::now() + settings.handshake_timeout;
    // Boxed: the handshakes are large and finish long before the connection does.
    let (mut conn, source, sent, mut refusals) =
        match Box::pin(setup(acceptor, tcp, &settings.metrics, deadline)).await {
            Ok(ready) => ready,
            Err((identity, error)) => return handler.error(peer, identity.as_ref(), &error),
        };
    debug!(client = %peer, peer_identity = %source, "HBONE connection accepted");
    let liveness = settings.liveness;
    let alive = keepalive(conn.ping_pong(), liveness, Some(deadline), || {
        gauge.set_state("established");
    });
    tokio::pin!(alive);
    let streams = Arc::new(watch::Sender::new(0usize));
    let idle = idle(streams.subscribe(), liveness.idle_timeout);
    tokio::pin!(idle);
    let source = Arc::new(source);
    let mut draining = settings.draining.clone();
    let mut going_away = false;
    // Streams h2 refused itself (it answers them; they never reach `accept`), as reported.
    let mut refused = [0u64; 2];
    let ended = loop {
        let request = tokio::select! {
            request = conn.accept() => request,
            Ok(()) = refusals.changed() => {
                let now = *refusals.borrow_and_update();
                for (error, (seen, told)) in [ServerError::HeadersRefused, ServerError::StreamProtocol]
                    .iter()
                    .zip(now.iter().zip(refused.iter_mut()))
                {
                    for _ in *told..*seen {
                        handler.error(peer, Some(&source), error);
                    }
                    *told = *seen;
                }
                continue;
            }
            dead = &mut alive => break Some(match dead {
                Dead::Setup => ServerError::SetupPingTimeout,
                Dead::Ping => ServerError::PingTimeout,
            }),
            () = &mut idle, if !going_away => break Some(ServerError::Idle(liveness.idle_timeout)),
            _ = draining.wait_for(|d| *d), if !going_away => {
                debug!(client = %peer, "draining: GOAWAY");
                conn.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        match request {
            None => break None,
            Some(Ok((request, mut respond))) => {
                if *streams.borrow() >= SERVER_MAX_STREAMS as usize {
                    handler.error(peer, Some(&source), &ServerError::StreamLimit);
                    respond.send_reset(Reason::REFUSED_STREAM);
                    continue;
                }
                streams.send_modify(|n| *n += 1);
                handler.stream(Incoming {
                    peer,
                    identity: Arc::clone(&source),
                    request,
                    respond,
                    slot: StreamSlot(Arc::clone(&streams)),
                });
            }
            Some(Err(e)) => {
                if let Some(reason) = abuse::connection_error(&e, &sent) {
                    break Some(ServerError::Protocol { reason, source: e });
                }
                debug!(client = %peer, error = %e, "HBONE connection ended");
                break None;
            }
        }
    };
    if let Some(error) = ended {
        handler.error(peer, Some(&source), &error);
        if let ServerError::Idle(_) = error {
            // Idle: no stream to lose; a request already on its way is not processed, and
            // the GOAWAY's last stream id tells the peer to retry it on a new connection.
            conn.abrupt_shutdown(Reason::NO_ERROR);
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                while conn.accept().await.is_some() {}
            })
            .await;
        }
    }
    // Dropping the connection ends its streams (their pipes reset the application side).
    drop(conn);
}

/// What failed in [`setup`], with the peer's identity once known.
type SetupError = (Option<Identity>, ServerError);

/// TLS, the peer's identity and the HTTP/2 handshake, all by `deadline`.
async fn setup(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    metrics: &Metrics,
    deadline: Instant,
) -> Result<
    (
        Connection,
        Identity,
        abuse::SentGoaway,
        abuse::StreamRefusals,
    ),
    SetupError,
> {
    let started = Instant::now();
    let tls = match tokio::time::timeout_at(deadline.into(), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => {
            let reason = abuse::tls_error(&source);
            return Err((None, ServerError::Tls { reason, source }));
        }
        Err(_) => return Err((None, ServerError::HandshakeTimeout)),
    };
    metrics
        .tls_handshake_seconds
        .get_or_create(&crate::metrics::RoleLabels { role: "server" })
        .observe(started.elapsed().as_secs_f64());
    let Some(source) = tls.get_ref().1.peer_certificates().and_then(peer_identity) else {
        return Err((None, ServerError::NoPeerIdentity));
    };
    let (tls, sent, refusals) = abuse::Watched::new(tls);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .handshake::<_, Bytes>(tls);
    match tokio::time::timeout_at(deadline.into(), handshake).await {
        Ok(Ok(conn)) => Ok((conn, source, sent, refusals)),
        Ok(Err(e)) => Err((Some(source), ServerError::Http2Handshake(e))),
        Err(_) => Err((Some(source), ServerError::Http2HandshakeTimeout)),
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
pub struct StreamSlot(Arc<watch::Sender<usize>>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}
