//! Per-connection plumbing: connecting through a pod's sockets, the plaintext copy loop,
//! resets.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

use super::{
    Proxy, SocketFactory,
    limits::{Limits, PipeCharge},
};
use crate::metrics::{ByteCount, ConnRecord};

impl Proxy {
    /// Connects to `dst` with a socket of `sockets` (inside a pod's netns): time-limited,
    /// with TCP keepalive and the user timeout set before the SYN.
    pub async fn connect_upstream(
        &self,
        sockets: &dyn SocketFactory,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = sockets.tcp_socket(dst.is_ipv6()).await?;
        self.liveness.apply(&socket)?;
        connect(socket, dst, self.connect_timeout).await
    }

    /// The limits (pipes are charged against the descriptor budget).
    pub(super) fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }
}

/// Connects `socket` to `dst` within `timeout`; small frames are not delayed (no Nagle).
async fn connect(
    socket: tokio::net::TcpSocket,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
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
/// half-close (`shutdown(SHUT_WR)`) to the other. Bytes are counted into `record` as they flow
/// (client → upstream is "received", upstream → client "sent"); the record is closed with how
/// the connection ended. A revoked `admission` resets both sides.
///
/// Each direction moves bytes with `splice(2)` through a pipe (the kernel moves the pages, no
/// copy through user space); the pipe exists only while bytes are in flight, so an idle
/// connection holds no buffer (see [`copy_one_way`]), and is charged against the descriptor
/// budget of `limits` meanwhile.
pub async fn copy_recorded(
    client: TcpStream,
    upstream: TcpStream,
    record: ConnRecord,
    admission: Option<&super::Admission>,
    limits: &Arc<Limits>,
) {
    let _ = client.set_nodelay(true);
    let result = {
        let up = copy_one_way(&client, &upstream, &record.received, limits);
        let down = copy_one_way(&upstream, &client, &record.sent, limits);
        let copy = async { tokio::try_join!(up, down) };
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
            // A reset on one side (or a revocation) resets the other: closed with a RST, not
            // a FIN the application would take for a clean end.
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
            record.close(&e.to_string());
        }
    }
}

/// Bytes a pipe holds (the Linux default: 16 pages).
const PIPE_BYTES: usize = 64 * 1024;
/// Read buffer of the user-space fallback.
const COPY_CHUNK: usize = 64 * 1024;

/// A pipe used to splice between two sockets; closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe.
    held: usize,
    _charge: PipeCharge,
}

impl Pipe {
    /// A pipe, if the descriptor budget has room for one (`None` otherwise, or if the kernel
    /// refuses one).
    fn new(limits: &Arc<Limits>) -> Option<Self> {
        let charge = limits.charge_pipe()?;
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .ok()?;
        Some(Self {
            read,
            write,
            held: 0,
            _charge: charge,
        })
    }
}

/// `splice(2)` between two descriptors, non-blocking on the pipe side.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are valid for the call; no offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves bytes from `from` to `to` until `from` sends EOF (then half-closes `to`). Returns the
/// byte count. Uses a pipe and `splice(2)`, created when bytes arrive and closed once they are
/// all written and `from` has nothing more, so an idle direction holds nothing; falls back to
/// a user-space copy (a 64 KiB buffer, same lifetime) if a pipe cannot be had.
async fn copy_one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &ByteCount,
    limits: &Arc<Limits>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        if pipe.is_none() {
            match Pipe::new(limits) {
                Some(p) => pipe = Some(p),
                None => {
                    // Out of descriptors: copy this burst through user space instead.
                    match copy_burst(from, to, count).await? {
                        Some(n) => {
                            total += n;
                            continue;
                        }
                        None => break,
                    }
                }
            }
        }
        let Some(p) = pipe.as_mut() else { continue };
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), p.write.as_fd(), PIPE_BYTES)
        });
        match moved {
            Ok(0) => break,
            Ok(n) => {
                p.held = n;
                total += n as u64;
                count.add(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing more for now: the pipe is empty (drained below), let it go.
                pipe = None;
                continue;
            }
            Err(e) => return Err(e),
        }
        while p.held > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(p.read.as_fd(), to.as_fd(), p.held)
            }) {
                Ok(n) => p.held -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
    Ok(total)
}

/// One burst through a user-space buffer: reads what `from` has (at least one read) and writes
/// it all to `to`. `None` at EOF.
async fn copy_burst(
    from: &TcpStream,
    to: &TcpStream,
    count: &ByteCount,
) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.try_read(&mut buf) {
            Ok(0) if total == 0 => return Ok(None),
            Ok(0) => return Ok(Some(total)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(total)),
            Err(e) => return Err(e),
        };
        count.add(n as u64);
        total += n as u64;
        let mut written = 0;
        while written < n {
            to.writable().await?;
            match to.try_write(&buf[written..n]) {
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
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
