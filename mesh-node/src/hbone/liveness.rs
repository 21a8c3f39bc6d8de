//! How dead peers are found: HTTP/2 PING keepalive on HBONE connections (both sides), TCP
//! keepalive and `TCP_USER_TIMEOUT` on every socket of the daemon (HBONE and the plaintext
//! paths). A peer that vanishes (link down, power off: no FIN, no RST) would otherwise hold its
//! connections, their streams and the upstream sockets forever.

use std::{
    io,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use h2::{Ping, PingPong};
use socket2::{SockRef, TcpKeepalive};

/// Keepalive and idle settings (`proxy.*` in the configuration).
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// A PING is sent this long after the previous PONG.
    pub ping_interval: Duration,
    /// A PING not answered within this long ends the connection.
    pub ping_timeout: Duration,
    /// Server connections without a stream for this long are closed.
    pub idle_timeout: Duration,
    /// TCP keepalive: idle time before the first probe.
    pub tcp_keepalive_time: Duration,
    /// TCP keepalive: time between probes.
    pub tcp_keepalive_interval: Duration,
    /// `TCP_USER_TIMEOUT`: unacknowledged data or probes for this long end the connection.
    pub tcp_user_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            ping_interval: super::PING_INTERVAL,
            ping_timeout: super::PING_TIMEOUT,
            idle_timeout: Duration::from_mins(6),
            tcp_keepalive_time: Duration::from_mins(1),
            tcp_keepalive_interval: Duration::from_secs(10),
            tcp_user_timeout: Duration::from_mins(1),
        }
    }
}

impl Liveness {
    /// Turns on TCP keepalive and sets `TCP_USER_TIMEOUT` on a socket (connected, accepted or
    /// about to connect). With a user timeout the kernel ends a connection whose probes go
    /// unanswered once that much time passed since the peer was last heard of (`tcp_timer.c`,
    /// `tcp_keepalive_timer`); the probe count only matters without one.
    pub fn apply(&self, socket: &impl AsFd) -> io::Result<()> {
        let socket = SockRef::from(socket);
        let retries = self
            .tcp_user_timeout
            .as_millis()
            .checked_div(self.tcp_keepalive_interval.as_millis())
            .unwrap_or(1)
            .clamp(1, 127);
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(self.tcp_keepalive_time)
                .with_interval(self.tcp_keepalive_interval)
                .with_retries(u32::try_from(retries).unwrap_or(127)),
        )?;
        socket.set_tcp_user_timeout(Some(self.tcp_user_timeout))
    }
}

/// Why [`keepalive`] ended a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dead {
    /// The first PING (sent when the HTTP/2 handshake is done) was not answered by the setup
    /// deadline.
    Setup,
    /// A PING was not answered within the PING timeout.
    Ping,
}

/// Pings the peer until it stops answering, and returns why the connection is dead. The
/// connection must be driven meanwhile (by whoever polls it); this only waits for PONGs.
///
/// With `setup`, the first PING goes out at once and must be answered by the deadline (a
/// conforming peer sends its SETTINGS before anything else, so a PONG says the HTTP/2
/// handshake is complete); `established` is called when it is. Without it, the first PING
/// follows one interval after the start.
///
/// Never returns if the connection has no `PingPong` or is already closed (the connection's
/// own future reports that).
pub async fn keepalive(
    ping_pong: Option<PingPong>,
    liveness: Liveness,
    setup: Option<Instant>,
    established: impl FnOnce(),
) -> Dead {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    if let Some(deadline) = setup {
        match tokio::time::timeout_at(deadline.into(), ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => established(),
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return Dead::Setup,
        }
    }
    loop {
        tokio::time::sleep(liveness.ping_interval).await;
        match tokio::time::timeout(liveness.ping_timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return Dead::Ping,
        }
    }
}
