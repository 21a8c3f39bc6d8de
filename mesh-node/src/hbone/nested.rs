//! Double HBONE, the client's inner tunnel: a second mutual TLS and HTTP/2 `CONNECT` inside an
//! HBONE stream to an east-west gateway, so that the gateway forwards ciphertext it cannot
//! read and the destination authenticates the original client. One inner connection per
//! application connection (not pooled, as ztunnel); the stream it yields is a plain
//! [`Stream`], carried by [`super::pipe`] like any other (half-close, resets, byte counts).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf as _, Bytes};
use h2::{RecvStream, SendStream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{
    HANDSHAKE_TIMEOUT,
    pipe::h2_io,
    pool::{HboneError, Stream, StreamGuard, client_builder, request},
};

/// An HBONE stream as a byte stream (what the inner TLS runs over). Received bytes give their
/// flow-control window back as they are read out; writes wait for send capacity; shutdown is
/// `END_STREAM`; dropping it resets the stream.
pub struct StreamIo {
    send: SendStream<Bytes>,
    /// `None` only once dropped (see `Drop`).
    recv: Option<RecvStream>,
    /// Received, not read yet (at most one DATA frame).
    pending: Bytes,
    /// Keeps the stream counted on its pooled connection.
    guard: Option<StreamGuard>,
    ended: bool,
}

impl From<Stream> for StreamIo {
    fn from(stream: Stream) -> Self {
        Self {
            send: stream.send,
            recv: Some(stream.recv),
            pending: Bytes::new(),
            guard: Some(stream.guard),
            ended: false,
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(recv) = this.recv.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while this.pending.is_empty() {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // END_STREAM: end of file.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        let _ = recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let granted = this.send.capacity();
            if granted > 0 {
                let n = granted.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what h2 buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ended {
            this.ended = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Opens the inner tunnel over `outer` (a stream to a gateway): TLS with `tls` (its verifier
/// says which identities may answer), HTTP/2 with the pool's settings, and one `CONNECT` to
/// `authority` with `headers`, answered 200. `address` names the far end in errors.
pub async fn connect(
    outer: Stream,
    tls: Arc<rustls::ClientConfig>,
    (authority, headers): (&str, &http::HeaderMap),
    address: SocketAddr,
) -> Result<Stream, HboneError> {
    let connection = outer.connection;
    let io = StreamIo::from(outer);
    // No SNI is sent (the config disables it): the name only satisfies the API.
    let name = ServerName::IpAddress(address.ip().into());
    let tls_stream =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(tls).connect(name, io))
            .await
            .map_err(|_| HboneError::TlsTimeout { address })?
            .map_err(|source| HboneError::Tls { address, source })?;
    let (send, driver) = client_builder()
        .handshake::<_, Bytes>(tls_stream)
        .await
        .map_err(|source| HboneError::H2 { address, source })?;
    // Ends when the one stream is done and `send` is gone (or the outer stream breaks).
    tokio::spawn(async move {
        let result = driver.await;
        debug!(connection, address = %address, ok = result.is_ok(), "inner HBONE connection closed");
    });
    let (send, recv) = request(send, (authority, headers), address).await?;
    Ok(Stream {
        send,
        recv,
        connection,
        guard: StreamGuard::unpooled(),
    })
}

/// How long a closed inner tunnel waits for the gateway's `END_STREAM` before it gives up.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for StreamIo {
    /// After a clean close (`END_STREAM` sent), the outer stream is left to end the same way
    /// from the gateway's side: dropping it now would reset it (`CANCEL`), which the gateway
    /// would log as a failure. Its remaining bytes (none, normally) are read and discarded,
    /// for [`LINGER`] at most. After an error it is reset at once.
    fn drop(&mut self) {
        let (Some(mut recv), guard) = (self.recv.take(), self.guard.take()) else {
            return;
        };
        if !self.ended || recv.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        drop(runtime.spawn(async move {
            let drain = async {
                while let Some(Ok(data)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(data.len());
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
            drop(guard);
        }));
    }
}
