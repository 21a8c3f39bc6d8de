//! The HBONE client: a pool of HTTP/2-over-mTLS connections keyed by (source identity,
//! destination identity, destination address). A new application connection takes a stream on
//! a pooled connection with fewer than 100 open streams, or dials a new one. Each connection
//! sends a PING every 10 s and is dropped when a PONG takes longer than 20 s (`Liveness`); a
//! connection without streams for 5 minutes is closed.
//!
//! The pool does not open sockets itself: it dials through the [`Dialer`] it is given (the
//! proxy's, which opens them inside the source pod's network namespace).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{
    CLIENT_MAX_STREAMS, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, Liveness,
    MAX_FRAME_SIZE, OpenGauge, STREAM_WINDOW, keepalive,
};
use crate::identity::Identity;

/// A boxed future, so that [`Dialer`] stays object-safe.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens the TCP connections under pooled HBONE connections.
pub trait Dialer: Send + Sync {
    /// A TCP connection to `address` (time-limited by the dialer).
    fn dial(&self, address: SocketAddr) -> BoxFuture<'_, std::io::Result<tokio::net::TcpStream>>;
}

/// Which pooled connections a request may share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: Identity,
    pub destination: Identity,
    /// The destination pod's HBONE address (`podIP:15008`).
    pub address: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {address}")]
    Connect {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {address}")]
    Tls {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} timed out")]
    TlsTimeout { address: SocketAddr },
    #[error("HTTP/2 with {address}")]
    H2 {
        address: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{address} answered the CONNECT with {status}")]
    Status {
        address: SocketAddr,
        status: StatusCode,
    },
}

/// A pooled connection handed to one new stream.
struct Pooled {
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    id: u64,
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

/// A stream on a pooled connection.
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Id of the pooled connection carrying it (for logs).
    pub connection: u64,
    /// Keeps the stream counted on its connection until dropped.
    pub guard: StreamGuard,
}

/// Counts a stream on its pooled connection while alive.
pub struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    /// A guard that counts on no pool (a stream of a connection of its own).
    pub(super) fn unpooled() -> Self {
        Self(Arc::new(AtomicUsize::new(1)))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection pool.
pub struct Pool {
    metrics: Arc<crate::metrics::Metrics>,
    liveness: Liveness,
    conns: Mutex<HashMap<PoolKey, Vec<Conn>>>,
    /// One dial at a time per key, so a burst of new connections shares the first dial instead
    /// of each opening its own.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    next_id: AtomicU64,
    /// Connections dialled so far.
    opened: AtomicU64,
}

impl Pool {
    #[must_use]
    pub fn new(metrics: Arc<crate::metrics::Metrics>, liveness: Liveness) -> Self {
        Self {
            metrics,
            liveness,
            conns: Mutex::default(),
            dialing: Mutex::default(),
            next_id: AtomicU64::default(),
            opened: AtomicU64::default(),
        }
    }

    /// Connections dialled since start.
    #[must_use]
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Opens a CONNECT stream to `authority` with `headers` (see [`super::connect_headers`])
    /// through a pooled connection for `key`, dialling one through `dialer` when needed.
    pub async fn connect(
        &self,
        key: &PoolKey,
        (authority, headers): (SocketAddr, &http::HeaderMap),
        dialer: &dyn Dialer,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Stream, HboneError> {
        self.connect_to(key, (&authority.to_string(), headers), dialer, tls)
            .await
    }

    /// As [`Pool::connect`], to an `:authority` that need not be an address (through an
    /// east-west gateway: `<service hostname>:<port>`).
    pub async fn connect_to(
        &self,
        key: &PoolKey,
        (authority, headers): (&str, &http::HeaderMap),
        dialer: &dyn Dialer,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Stream, HboneError> {
        // A pooled connection the peer is shutting down (GOAWAY, e.g. its daemon is being
        // upgraded) refuses new streams: retire it and try once more on a fresh one.
        let mut retried = false;
        loop {
            let pooled = self.pooled(key, dialer, tls).await?;
            let guard = StreamGuard(pooled.streams);
            match request(pooled.send, (authority, headers), key.address).await {
                Ok((send, recv)) => {
                    return Ok(Stream {
                        send,
                        recv,
                        connection: pooled.id,
                        guard,
                    });
                }
                Err(HboneError::H2 { source, .. })
                    if !retried
                        && (source.is_go_away()
                            || source.is_io()
                            || source.reason() == Some(h2::Reason::REFUSED_STREAM)) =>
                {
                    pooled.closed.store(true, Ordering::Relaxed);
                    debug!(connection = pooled.id, error = %source, "pooled HBONE connection is going away; retrying on a new one");
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A pooled connection with room for a stream (counted now), dialled if needed.
    async fn pooled(
        &self,
        key: &PoolKey,
        dialer: &dyn Dialer,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Pooled, HboneError> {
        if let Some(found) = self.checkout(key) {
            return Ok(found);
        }
        let lock = {
            let mut dialing = self.dialing.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(dialing.entry(key.clone()).or_default())
        };
        let _dialing = lock.lock().await;
        match self.checkout(key) {
            Some(found) => Ok(found),
            // Boxed: the dial (TLS and HTTP/2 handshakes) is large and rare; inline it would
            // make every connection's task as large as a handshake.
            None => Box::pin(self.dial(key, dialer, tls)).await,
        }
    }

    /// A live pooled connection with room for one more stream (counted now).
    fn checkout(&self, key: &PoolKey) -> Option<Pooled> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Relaxed));
        let conn = list
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < CLIENT_MAX_STREAMS)?;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some(Pooled {
            send: conn.send.clone(),
            streams: Arc::clone(&conn.streams),
            closed: Arc::clone(&conn.closed),
            id: conn.id,
        })
    }

    async fn dial(
        &self,
        key: &PoolKey,
        dialer: &dyn Dialer,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Pooled, HboneError> {
        let address = key.address;
        let tcp = dialer
            .dial(address)
            .await
            .map_err(|source| HboneError::Connect { address, source })?;
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::IpAddress(address.ip().into());
        let handshake_started = std::time::Instant::now();
        let tls_stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::clone(tls)).connect(server_name, tcp),
        )
        .await
        .map_err(|_| HboneError::TlsTimeout { address })?
        .map_err(|source| HboneError::Tls { address, source })?;
        self.metrics
            .tls_handshake_seconds
            .get_or_create(&crate::metrics::RoleLabels { role: "client" })
            .observe(handshake_started.elapsed().as_secs_f64());
        let (send, mut connection) = client_builder()
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|source| HboneError::H2 { address, source })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.metrics.hbone_connections.inc();
        let streams = Arc::new(AtomicUsize::new(1));
        let closed = Arc::new(AtomicBool::new(false));
        info!(
            connection = id,
            source = %key.source,
            destination = %key.destination,
            address = %address,
            "HBONE connection opened"
        );
        let ping_pong = connection.ping_pong();
        let driver_streams = Arc::clone(&streams);
        let driver_closed = Arc::clone(&closed);
        let gauge = OpenGauge::new(&self.metrics, "client", "established");
        let liveness = self.liveness;
        tokio::spawn(async move {
            let reason = drive(&mut connection, ping_pong, &driver_streams, liveness).await;
            driver_closed.store(true, Ordering::Relaxed);
            drop(gauge);
            debug!(connection = id, address = %address, reason, "HBONE connection closed");
        });
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.entry(key.clone()).or_default().push(Conn {
            id,
            send: send.clone(),
            streams: Arc::clone(&streams),
            closed: Arc::clone(&closed),
        });
        Ok(Pooled {
            send,
            streams,
            closed,
            id,
        })
    }
}

/// Runs a client connection until it ends, pinging it and closing it when idle. Returns why it
/// ended.
async fn drive(
    connection: &mut h2::client::Connection<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        Bytes,
    >,
    ping_pong: Option<h2::PingPong>,
    streams: &AtomicUsize,
    liveness: Liveness,
) -> &'static str {
    let alive = keepalive(ping_pong, liveness, None, || ());
    tokio::pin!(alive);
    let mut ticker = tokio::time::interval(IDLE_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut idle_for = Duration::ZERO;
    loop {
        tokio::select! {
            result = &mut *connection => {
                return if result.is_ok() { "closed by peer" } else { "connection error" };
            }
            _ = &mut alive => {
                warn!(timeout = ?liveness.ping_timeout, "HBONE peer did not answer a PING in time; dropping the connection");
                return "ping timeout";
            }
            _ = ticker.tick() => {
                if streams.load(Ordering::Relaxed) == 0 {
                    idle_for += IDLE_CHECK;
                    if idle_for >= IDLE_TIMEOUT {
                        return "idle";
                    }
                } else {
                    idle_for = Duration::ZERO;
                }
            }
        }
    }
}

/// How often a client connection checks whether it has been idle for [`IDLE_TIMEOUT`].
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// The HTTP/2 client settings of every HBONE connection (pooled or nested).
pub(super) fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .enable_push(false);
    builder
}

/// Sends one `CONNECT` to `authority` on `send` and waits for its 200.
pub(super) async fn request(
    send: SendRequest<Bytes>,
    (authority, headers): (&str, &http::HeaderMap),
    address: SocketAddr,
) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
    let h2_err = |source| HboneError::H2 { address, source };
    let mut send = send.ready().await.map_err(h2_err)?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|_| HboneError::Status {
            address,
            status: StatusCode::BAD_REQUEST,
        })?;
    request.headers_mut().clone_from(headers);
    let (response, stream) = send.send_request(request, false).map_err(h2_err)?;
    let response = response.await.map_err(h2_err)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status {
            address,
            status: response.status(),
        });
    }
    Ok((stream, response.into_body()))
}
