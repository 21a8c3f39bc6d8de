//! The two seams the proxy is written against where the kernel is, one of each per enrolled
//! pod: the [`SocketFactory`] that opens sockets in the pod's network namespace (carrying the
//! daemon's mark, so the kernel programs leave them alone), and the [`OriginalDst`] lookup that
//! says where a captured connection was going. `redirect` implements both with the netns
//! thread and the kernel's tables; the plain implementations here ([`PlainSockets`],
//! [`KnownDestinations`]) let the whole data path run on loopback, without root or a kernel
//! program (the rootless tests).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
};

use tokio::net::TcpSocket;

use crate::hbone::BoxFuture;

/// Opens sockets for connections a pod makes (its upstream and HBONE connections).
pub trait SocketFactory: Send + Sync {
    /// An unconnected TCP socket of the address family of `v6`, in the pod's network
    /// namespace.
    fn tcp_socket(&self, v6: bool) -> BoxFuture<'_, io::Result<TcpSocket>>;
}

/// Where captured connections of a pod were going.
pub trait OriginalDst: Send + Sync {
    /// The destination the application dialled, for a connection accepted on the pod's
    /// outbound listener from `peer` (asked once per connection; the answer may be consumed).
    fn outbound(&self, peer: SocketAddr) -> Option<SocketAddr>;

    /// The destination a peer dialled, for a connection accepted on the pod's inbound
    /// plaintext listener at `local`. The kernel's `sk_lookup` keeps it as the accepted
    /// socket's local address.
    fn inbound(&self, local: SocketAddr) -> SocketAddr {
        local
    }
}

/// Sockets in the daemon's own network namespace, unmarked, bound to `source` when it is set
/// (a pod's address: its connections come from there, as they would from its netns).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainSockets {
    pub source: Option<std::net::IpAddr>,
}

impl SocketFactory for PlainSockets {
    fn tcp_socket(&self, v6: bool) -> BoxFuture<'_, io::Result<TcpSocket>> {
        Box::pin(async move {
            let socket = if v6 {
                TcpSocket::new_v6()?
            } else {
                TcpSocket::new_v4()?
            };
            if let Some(ip) = self.source.filter(|ip| ip.is_ipv6() == v6) {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            Ok(socket)
        })
    }
}

/// Original destinations told in advance, as the kernel would have recorded them: outbound by
/// the client's address, inbound by the listener's.
#[derive(Debug, Default)]
pub struct KnownDestinations {
    outbound: Mutex<HashMap<SocketAddr, SocketAddr>>,
    inbound: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl KnownDestinations {
    /// The next connection from `client` to the outbound listener was dialled to `dst`.
    pub fn outbound_from(&self, client: SocketAddr, dst: SocketAddr) {
        self.outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(client, dst);
    }

    /// Connections accepted on the inbound listener at `listener` were dialled to `dst`.
    pub fn inbound_at(&self, listener: SocketAddr, dst: SocketAddr) {
        self.inbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(listener, dst);
    }
}

impl OriginalDst for KnownDestinations {
    fn outbound(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer)
    }

    fn inbound(&self, local: SocketAddr) -> SocketAddr {
        self.inbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&local)
            .copied()
            .unwrap_or(local)
    }
}
