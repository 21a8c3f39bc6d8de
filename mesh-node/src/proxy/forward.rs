//! Per-connection plumbing: connecting upstream from a pod's netns, the copy loop, resets.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

use crate::redirect::NetnsWorker;

/// Connects to `dst` with a marked socket created inside the worker's netns.
pub async fn connect(
    worker: &NetnsWorker,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = worker.tcp_socket(dst.is_ipv6(), mark).await?;
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

/// Copies both directions until each side has sent EOF; an EOF from one side is passed on as a
/// half-close (`shutdown(SHUT_WR)`) to the other. Returns (client→upstream, upstream→client)
/// byte counts.
pub async fn copy_both(mut client: TcpStream, mut upstream: TcpStream) -> io::Result<(u64, u64)> {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
}

/// Closes a connection with a reset, so the application fails at once instead of seeing a
/// clean end of stream.
pub fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// `::ffff:a.b.c.d` (as seen on a dual-stack listener) as the IPv4 address it is.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}
