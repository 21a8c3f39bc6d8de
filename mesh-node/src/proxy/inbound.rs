//! Inbound plaintext (15006): a connection `sk_lookup` handed to the pod's capture listener.
//! Refused when the workload's `PeerAuthentication` is STRICT or a policy denies it (closed
//! before anything connects upstream); otherwise forwarded to the application from inside the
//! pod's netns.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{PodContext, Proxy, forward};

impl Proxy {
    pub(super) async fn inbound(&self, ctx: &PodContext, client: TcpStream, peer: SocketAddr) {
        let uid = ctx.workload.uid();
        let dst = match client.local_addr() {
            Ok(dst) => forward::unmap(dst),
            Err(e) => {
                warn!(direction = "inbound", dst_workload = %uid, error = %e, "getsockname failed");
                return;
            }
        };
        let peer = forward::unmap(peer);
        if self.reserved_ports.contains(&dst.port()) {
            warn!(direction = "inbound", dst_workload = %uid, client = %peer, orig_dst = %dst, "connection to a reserved port refused");
            forward::reset(client);
            return;
        }
        let Ok(admission) = self.admit(&ctx.workload, peer.ip(), None, dst, "plaintext") else {
            forward::reset(client);
            return;
        };
        info!(
            direction = "inbound",
            path = "plaintext",
            dst_workload = %uid,
            client = %peer,
            orig_dst = %dst,
            "connection captured"
        );
        let upstream = match forward::connect_in_netns(
            &ctx.worker,
            dst,
            self.mark,
            self.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(direction = "inbound", dst_workload = %uid, orig_dst = %dst, error = %e, "upstream connect failed");
                forward::reset(client);
                return;
            }
        };
        forward::copy_logged(client, upstream, "inbound", &uid, dst, Some(&admission)).await;
    }
}
