//! Inbound plaintext (15006): a connection `sk_lookup` handed to the pod's capture listener.
//! Refused when the workload's `PeerAuthentication` is STRICT or a policy denies it (closed
//! before anything connects upstream); otherwise forwarded to the application from inside the
//! pod's netns.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{PodContext, Proxy, forward};
use crate::metrics::{ConnRecord, Endpoint, Security};

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
            if let Some(suppressed) = self.metrics.error("inbound", "reserved_port") {
                warn!(direction = "inbound", dst_workload = %uid, client = %peer, orig_dst = %dst, suppressed, "connection to a reserved port refused");
            }
            forward::reset(client);
            return;
        }
        let record = ConnRecord::open(
            &self.metrics,
            "inbound",
            "plaintext",
            Endpoint {
                workload: self.workload_at(peer.ip()),
                identity: None,
                addr: Some(peer),
                service: None,
            },
            Self::local_endpoint(ctx, dst),
            Security::None,
        );
        let Ok(admission) = self.admit(&ctx.workload, peer.ip(), None, dst, "plaintext") else {
            record.fail("DENY", "denied by policy");
            forward::reset(client);
            return;
        };
        debug!(
            direction = "inbound",
            path = "plaintext",
            dst_workload = %uid,
            client = %peer,
            orig_dst = %dst,
            "connection captured"
        );
        let upstream = match self.connect_upstream(&ctx.worker, dst).await {
            Ok(s) => s,
            Err(e) => {
                warn!(direction = "inbound", dst_workload = %uid, orig_dst = %dst, error = %e, "upstream connect failed");
                record.fail("UF", &e.to_string());
                forward::reset(client);
                return;
            }
        };
        record.connected();
        forward::copy_recorded(client, upstream, record, Some(&admission), self.limits()).await;
    }
}
