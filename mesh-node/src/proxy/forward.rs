//! Per-connection plumbing: connecting from inside a pod's netns, the plaintext copy loop,
//! resets.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{
    metrics::{ByteCount, ConnRecord},
    redirect::NetnsWorker,
};

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

/// A stream that counts the bytes read from it.
struct Counted<'a> {
    inner: &'a mut TcpStream,
    count: &'a ByteCount,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.count.add((buf.filled().len() - before) as u64);
        result
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies both directions until each side has sent EOF; an EOF from one side is passed on as a
/// half-close (`shutdown(SHUT_WR)`) to the other. Bytes are counted into `record` as they flow
/// (client → upstream is "received", upstream → client "sent"); the record is closed with how
/// the connection ended. A revoked `admission` resets both sides.
pub async fn copy_recorded(
    mut client: TcpStream,
    mut upstream: TcpStream,
    record: ConnRecord,
    admission: Option<&super::Admission>,
) {
    let _ = client.set_nodelay(true);
    let result = {
        let mut from_client = Counted {
            inner: &mut client,
            count: &record.received,
        };
        let mut from_upstream = Counted {
            inner: &mut upstream,
            count: &record.sent,
        };
        let copy = tokio::io::copy_bidirectional(&mut from_client, &mut from_upstream);
        let revoked = async {
            match admission {
                Some(a) => a.closed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = copy => r.map(|_| ()),
            () = revoked => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "revoked by a policy change")),
        }
    };
    match result {
        Ok(()) => record.close("completed"),
        Err(e) => {
            if e.kind() == io::ErrorKind::ConnectionAborted {
                let _ = client.set_zero_linger();
                let _ = upstream.set_zero_linger();
            }
            record.close(&e.to_string());
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
