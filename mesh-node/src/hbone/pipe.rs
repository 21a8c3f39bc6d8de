//! Copies between an application TCP connection and an HTTP/2 stream: a FIN becomes
//! `END_STREAM` and the other way round (half-close), a reset becomes `RST_STREAM` and the other way
//! round, and the HTTP/2 receive window is released as bytes are written out.

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::net::TcpStream;

use crate::metrics::ByteCount;

/// Largest read buffer for the TCP → HTTP/2 direction.
const CHUNK: usize = 256 * 1024;
/// First read buffer of a burst (grows 4x per full read up to `CHUNK`).
const FIRST_CHUNK: usize = 16 * 1024;
/// A buffer with less room left than this is replaced rather than read into.
const MIN_READ: usize = 4 * 1024;

/// Pipes `tcp` and an HTTP/2 stream until both directions are done. Returns (bytes from TCP to
/// the stream, bytes from the stream to TCP).
///
/// Bytes are added to `from_tcp` and `from_h2` as they are copied.
///
/// A reset on either side ends both directions at once and resets the other side: a reset
/// stream (or a failed write to it) resets the application's connection with a TCP RST, and
/// nothing else (no FIN first: the application must not take it for a clean end); a reset
/// application connection resets the stream (`RST_STREAM`). When `revoked` fires (a policy
/// change took the connection's authorization away), both sides are reset the same way.
pub async fn pipe(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    revoked: Option<&tokio::sync::Notify>,
    (from_tcp, from_h2): (&ByteCount, &ByteCount),
) -> io::Result<(u64, u64)> {
    let _ = tcp.set_nodelay(true);
    let result = {
        // Both directions borrow the socket: nothing closes or half-closes it behind our
        // back (owned halves shut the write side down when dropped).
        let up = tcp_to_h2(&tcp, send, from_tcp);
        let down = h2_to_tcp(recv, &tcp, from_h2);
        tokio::pin!(up, down);
        let revoked = async {
            match revoked {
                Some(notify) => notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(revoked);
        let (mut up_done, mut down_done) = (None, None);
        // Dropping the stream handles (on return) sends RST_STREAM(CANCEL).
        loop {
            if let (Some(up), Some(down)) = (up_done, down_done) {
                break Ok((up, down));
            }
            tokio::select! {
                r = &mut up, if up_done.is_none() => match r {
                    Ok(n) => up_done = Some(n),
                    Err(e) => break Err(e),
                },
                r = &mut down, if down_done.is_none() => match r {
                    Ok(n) => down_done = Some(n),
                    Err(e) => break Err(e),
                },
                () = &mut revoked => break Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "revoked by a policy change",
                )),
            }
        }
    };
    if result.is_err() {
        // Closed with a RST, not a FIN.
        let _ = tcp.set_zero_linger();
    }
    result
}

async fn tcp_to_h2(
    read: &TcpStream,
    mut send: SendStream<Bytes>,
    count: &ByteCount,
) -> io::Result<u64> {
    let mut total = 0u64;
    // Allocated when bytes arrive, dropped when the application has nothing more for now (an
    // idle connection holds no buffer); it grows while reads fill it.
    let mut buf = BytesMut::new();
    let mut size = FIRST_CHUNK;
    loop {
        if let Err(e) = read.readable().await {
            send.send_reset(Reason::CANCEL);
            return Err(e);
        }
        if buf.capacity() - buf.len() < MIN_READ {
            buf = BytesMut::with_capacity(size);
        }
        let room = buf.capacity() - buf.len();
        let n = match read.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf = BytesMut::new();
                continue;
            }
            Err(e) => {
                // The application reset its connection: reset the stream.
                send.send_reset(Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            // Half-close: END_STREAM, the peer may keep sending.
            let _ = send.send_data(Bytes::new(), true);
            return Ok(total);
        }
        if n == room {
            size = (size * 4).min(CHUNK);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => n,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(h2_io(e)),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
            };
            let part = chunk.split_to(granted.min(chunk.len()));
            total += part.len() as u64;
            count.add(part.len() as u64);
            send.send_data(part, false).map_err(h2_io)?;
        }
    }
}

async fn h2_to_tcp(mut recv: RecvStream, write: &TcpStream, count: &ByteCount) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        match recv.data().await {
            Some(Ok(data)) => {
                let n = data.len();
                write_all(write, &data).await?;
                total += n as u64;
                count.add(n as u64);
                let _ = recv.flow_control().release_capacity(n);
            }
            // The peer reset the stream: `pipe` resets the application's connection.
            Some(Err(e)) => return Err(h2_io(e)),
            None => {
                // Half-close: the application may keep sending. A socket the peer has closed
                // already (not connected) has nothing left to half-close; a reset shows in the
                // other direction's read.
                match socket2::SockRef::from(write).shutdown(std::net::Shutdown::Write) {
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                    _ => return Ok(total),
                }
            }
        }
    }
}

/// Writes all of `data` to the socket.
async fn write_all(tcp: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}
