//! The L4 proxy: accept loops on each enrolled pod's capture listeners and the per-connection
//! forwarding.
//!
//! Outbound (15001): the kernel steered an application's `connect()` here; the original
//! destination comes from the kernel's table, keyed by the pod's netns and the client's
//! address. Until the tunnel lands, the daemon connects to it directly from inside the source
//! pod's netns (the path that stays for destinations outside the mesh).
//! Inbound (15006): `sk_lookup` handed a new connection for the pod here; the accepted socket's
//! local address is the original destination, and the daemon connects to the application from
//! inside the pod's netns.

mod forward;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, error, warn};

use crate::{
    redirect::{EnrolledPod, NetnsWorker, OrigDstTable},
    state::Workload,
};

/// Settings and shared state of the proxy.
pub struct Proxy {
    mark: u32,
    orig_dst: OrigDstTable,
    connect_timeout: Duration,
    /// Ports a connection may never be forwarded to (the daemon's own listeners).
    reserved_ports: [u16; 3],
}

/// One enrolled pod as the proxy sees it.
pub struct PodContext {
    pub workload: Arc<Workload>,
    pub worker: Arc<NetnsWorker>,
}

/// The accept loops serving one pod; dropping it stops them and closes the listeners.
pub struct PodServing {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodServing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

impl Proxy {
    pub fn new(
        mark: u32,
        orig_dst: OrigDstTable,
        connect_timeout: Duration,
        reserved_ports: [u16; 3],
    ) -> Self {
        Self {
            mark,
            orig_dst,
            connect_timeout,
            reserved_ports,
        }
    }

    /// Starts the accept loops of an enrolled pod.
    pub fn serve(self: &Arc<Self>, pod: EnrolledPod) -> std::io::Result<PodServing> {
        let ctx = Arc::new(PodContext {
            workload: pod.workload,
            worker: pod.worker,
        });
        let mut tasks = Vec::new();
        for listener in pod.outbound {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            tasks.push(tokio::spawn(Arc::clone(self).accept_loop(
                listener,
                Arc::clone(&ctx),
                Direction::Outbound,
            )));
        }
        pod.inbound.set_nonblocking(true)?;
        let inbound = TcpListener::from_std(pod.inbound)?;
        tasks.push(tokio::spawn(Arc::clone(self).accept_loop(
            inbound,
            ctx,
            Direction::Inbound,
        )));
        Ok(PodServing { tasks })
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        ctx: Arc<PodContext>,
        dir: Direction,
    ) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let this = Arc::clone(&self);
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        match dir {
                            Direction::Outbound => this.outbound(&ctx, stream, peer).await,
                            Direction::Inbound => this.inbound(&ctx, stream, peer).await,
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    error!(workload = %ctx.workload.uid(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn outbound(&self, ctx: &PodContext, client: tokio::net::TcpStream, peer: SocketAddr) {
        let uid = ctx.workload.uid();
        let Some(dst) = self.orig_dst.take(ctx.worker.cookie(), peer) else {
            warn!(
                direction = "outbound",
                src_workload = %uid,
                client = %peer,
                "no original destination recorded for a captured connection; closing it"
            );
            forward::reset(client);
            return;
        };
        tracing::info!(
            direction = "outbound",
            src_workload = %uid,
            client = %peer,
            orig_dst = %dst,
            "connection captured"
        );
        self.forward(ctx, client, dst, "outbound", &uid).await;
    }

    async fn inbound(&self, ctx: &PodContext, client: tokio::net::TcpStream, peer: SocketAddr) {
        let uid = ctx.workload.uid();
        let dst = match client.local_addr() {
            Ok(dst) => forward::unmap(dst),
            Err(e) => {
                warn!(direction = "inbound", dst_workload = %uid, error = %e, "getsockname failed");
                return;
            }
        };
        if self.reserved_ports.contains(&dst.port()) {
            warn!(
                direction = "inbound",
                dst_workload = %uid,
                client = %peer,
                orig_dst = %dst,
                "connection to a reserved port refused"
            );
            forward::reset(client);
            return;
        }
        tracing::info!(
            direction = "inbound",
            dst_workload = %uid,
            client = %forward::unmap(peer),
            orig_dst = %dst,
            "connection captured"
        );
        self.forward(ctx, client, dst, "inbound", &uid).await;
    }

    /// Connects to `dst` from inside the pod's netns and copies both ways until both sides
    /// are done.
    async fn forward(
        &self,
        ctx: &PodContext,
        client: tokio::net::TcpStream,
        dst: SocketAddr,
        direction: &'static str,
        uid: &str,
    ) {
        let upstream = match forward::connect(&ctx.worker, dst, self.mark, self.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(direction, workload = %uid, orig_dst = %dst, error = %e, "upstream connect failed");
                forward::reset(client);
                return;
            }
        };
        let started = std::time::Instant::now();
        match forward::copy_both(client, upstream).await {
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
}
