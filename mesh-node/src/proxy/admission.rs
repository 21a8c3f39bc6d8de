//! Authorization at the destination, and the open connections it admitted.
//!
//! Every connection into a workload of this node (inbound HBONE, inbound plaintext, the
//! same-node path) is admitted here: `PeerAuthentication` for plaintext, then the authorization
//! policies. Each decision is logged with the deciding policy (debug for allows) and counted in
//! `mesh_policy_decisions_total`.
//! Admitted connections stay registered until they end, and when the policy set or the
//! workloads change every one of them is decided again: those no longer allowed are closed,
//! with a log line naming the policy.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{Error, Proxy};
use crate::{
    identity::Identity,
    metrics::Path,
    policy::{ConnInfo, Decision, MtlsMode},
    workload::Workload,
};

/// What was admitted, kept to decide again later.
struct Admitted {
    destination: String,
    src_ip: IpAddr,
    src_identity: Option<Identity>,
    dst: SocketAddr,
    closed: Arc<Notify>,
}

/// The admitted connections and the decision counters.
#[derive(Default)]
pub struct Admissions {
    open: Mutex<HashMap<u64, Admitted>>,
    next: AtomicU64,
}

/// An admitted connection; dropping it unregisters it. `closed` fires when a policy change
/// revokes it.
pub struct Admission {
    id: u64,
    admissions: Arc<Admissions>,
    pub closed: Arc<Notify>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admissions
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Admissions {
    /// Open admitted connections.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Proxy {
    fn count_decision(&self, result: &'static str, policy: &str) {
        self.metrics
            .policy_decisions
            .get_or_create(&crate::metrics::DecisionLabels {
                result,
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Admits a connection to `destination` (a workload of this node) or says why not
    /// ([`Error::Strict`], [`Error::Denied`]).
    pub fn admit(
        &self,
        destination: &Workload,
        src_ip: IpAddr,
        src_identity: Option<&Identity>,
        dst: SocketAddr,
        path: Path,
    ) -> Result<Admission, Error> {
        let path = path.as_str();
        let uid = destination.uid();
        let policies = self.policies();
        if src_identity.is_none() && policies.mtls_mode(destination, dst.port()) == MtlsMode::Strict
        {
            warn!(
                dst_workload = %uid,
                client = %src_ip,
                orig_dst = %dst,
                "plaintext connection refused: PeerAuthentication is STRICT"
            );
            self.count_decision("deny", "PeerAuthentication STRICT");
            return Err(Error::Strict);
        }
        let conn = ConnInfo {
            src_ip,
            src_identity,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            trust_aliases: &self.mesh.accepted_domains,
        };
        let decision = policies.authorize(destination, &conn);
        log_dry_run(&decision, &uid, src_identity, src_ip, dst);
        self.count_decision(decision.result(), &decision.reason);
        if !decision.allowed {
            warn!(
                path,
                dst_workload = %uid,
                peer_identity = src_identity.map(ToString::to_string).unwrap_or_default(),
                client = %src_ip,
                orig_dst = %dst,
                policy = %decision.reason,
                "connection denied by policy"
            );
            return Err(Error::Denied {
                policy: decision.reason,
            });
        }
        debug!(path, dst_workload = %uid, client = %src_ip, orig_dst = %dst, policy = %decision.reason, "connection allowed by policy");
        let id = self.admissions.next.fetch_add(1, Ordering::Relaxed);
        let closed = Arc::new(Notify::new());
        self.admissions
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Admitted {
                    destination: uid,
                    src_ip,
                    src_identity: src_identity.cloned(),
                    dst,
                    closed: Arc::clone(&closed),
                },
            );
        Ok(Admission {
            id,
            admissions: Arc::clone(&self.admissions),
            closed,
        })
    }

    /// Decides every open admitted connection again (after a policy or workload change) and
    /// closes the ones no longer allowed. Returns how many were closed.
    pub fn recheck_open_connections(&self) -> usize {
        let policies = self.policies();
        let open = self
            .admissions
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for admitted in open.values() {
            // By workload, not by address: a connection to an address the workload does not
            // list (captured all the same) is decided again too.
            let Some(destination) = self
                .local_pod(&admitted.destination)
                .map(|pod| self.current_workload(&pod.workload))
            else {
                continue;
            };
            let conn = ConnInfo {
                src_ip: admitted.src_ip,
                src_identity: admitted.src_identity.as_ref(),
                dst_ip: admitted.dst.ip(),
                dst_port: admitted.dst.port(),
                trust_aliases: &self.mesh.accepted_domains,
            };
            let strict = admitted.src_identity.is_none()
                && policies.mtls_mode(&destination, admitted.dst.port()) == MtlsMode::Strict;
            let decision = policies.authorize(&destination, &conn);
            if strict || !decision.allowed {
                let policy = if strict {
                    "PeerAuthentication STRICT".to_owned()
                } else {
                    decision.reason
                };
                info!(
                    dst_workload = %admitted.destination,
                    peer_identity = admitted.src_identity.as_ref().map(ToString::to_string).unwrap_or_default(),
                    client = %admitted.src_ip,
                    orig_dst = %admitted.dst,
                    policy = %policy,
                    "open connection closed: no longer allowed after a policy change"
                );
                admitted.closed.notify_one();
                closed += 1;
            }
        }
        closed
    }
}

fn log_dry_run(
    decision: &Decision,
    uid: &str,
    src_identity: Option<&Identity>,
    src_ip: IpAddr,
    dst: SocketAddr,
) {
    if let Some((would_allow, policy)) = &decision.dry_run {
        info!(
            dst_workload = %uid,
            peer_identity = src_identity.map(ToString::to_string).unwrap_or_default(),
            client = %src_ip,
            orig_dst = %dst,
            policy = %policy,
            would = if *would_allow { "allow" } else { "deny" },
            enforced = decision.result(),
            "dry-run policy decision"
        );
    }
}
