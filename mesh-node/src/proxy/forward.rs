//! Per-connection plumbing: connecting from inside a pod's netns, the plaintext copy loop,
//! resets.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;
use tracing::debug;

use crate::redirect::NetnsWorker;

/// Connects to `dst` with a marked socket created inside the worker's netns.
pub async fn connect_in_netns(
    worker: &NetnsWorker,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = worker.tcp_socket(dst.is_ipv6(), mark).await?;
    let stream = match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out after {timeout:?}"),
            ));
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Copies both directions until each side has sent EOF; an EOF from one side is passed on as a
/// half-close (`shutdown(SHUT_WR)`) to the other. Logs the byte counts at debug level.
pub async fn copy_logged(
    mut client: TcpStream,
    mut upstream: TcpStream,
    direction: &'static str,
    uid: &str,
    dst: SocketAddr,
    admission: Option<&super::Admission>,
) {
    let _ = client.set_nodelay(true);
    let started = std::time::Instant::now();
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let revoked = async {
        match admission {
            Some(a) => a.closed.notified().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = copy => r,
        () = revoked => {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            return;
        }
    };
    match result {
        Ok((sent, received)) => debug!(
            direction,
            workload = %uid,
            orig_dst = %dst,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = started.elapsed().as_millis(),
            "connection closed"
        ),
        Err(e) => {
            debug!(direction, workload = %uid, orig_dst = %dst, error = %e, "connection ended with an error");
        }
    }
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
