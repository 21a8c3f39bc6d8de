//! HBONE, the transport: one HTTP/2 `CONNECT` stream per application connection, inside
//! mutual TLS to the destination pod's port 15008. Wire facts (settings, status codes) follow
//! Istio ztunnel so that the two interoperate in both directions.
//!
//! Transport only: the server hands each stream to a [`Handler`] and the pool dials through a
//! [`Dialer`], both given by the proxy, which decides what a connection is for. Nothing here
//! knows policy, workloads or the kernel.

mod abuse;
mod headers;
mod liveness;
pub mod nested;
mod pipe;
mod pool;
mod server;

use std::{sync::Arc, time::Duration};

pub use abuse::tls_error as tls_failure;
pub use headers::{BAGGAGE, TRACEPARENT, TraceParent, connect_headers, forwarded};
pub use liveness::{Dead, Liveness, keepalive};
pub use pipe::pipe;
pub use pool::{BoxFuture, Dialer, HboneError, Pool, PoolKey, Stream};
pub use server::{
    Handler, Incoming, ServerError, ServerSettings, StreamSlot, Tunnel, serve_connection,
};

use crate::metrics::{HboneLabels, Metrics};

/// Counts one HBONE connection in `mesh_open_hbone_connections` while alive.
pub struct OpenGauge {
    metrics: Arc<Metrics>,
    labels: HboneLabels,
}

impl OpenGauge {
    /// Counts a connection of `role` in `state`.
    #[must_use]
    pub fn new(metrics: &Arc<Metrics>, role: &'static str, state: &'static str) -> Self {
        let labels = HboneLabels { role, state };
        metrics.open_hbone.get_or_create(&labels).inc();
        Self {
            metrics: Arc::clone(metrics),
            labels,
        }
    }

    /// Moves the connection to another state.
    pub fn set_state(&mut self, state: &'static str) {
        self.metrics.open_hbone.get_or_create(&self.labels).dec();
        self.labels.state = state;
        self.metrics.open_hbone.get_or_create(&self.labels).inc();
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.metrics.open_hbone.get_or_create(&self.labels).dec();
    }
}

/// Stream flow-control window (4 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection flow-control window (4x the stream window, avoids cross-stream stalls).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame (1 MiB).
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Concurrent streams a server allows on one connection.
pub const SERVER_MAX_STREAMS: u32 = 200;
/// Streams after which the client pool opens another connection.
pub const CLIENT_MAX_STREAMS: usize = 100;
/// Keepalive PING interval (the default of `proxy.pingIntervalMs`).
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PONG may take before the connection is dropped (`proxy.pingTimeoutMs`).
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Pooled connections without streams for this long are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_mins(5);
/// Largest header block a peer may send (a CONNECT needs a few hundred bytes).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Time limit for a TLS handshake the daemon starts (the server side is configurable).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The HBONE port.
pub const PORT: u16 = mesh_common::PORT_INBOUND_HBONE;
