//! `sk_lookup`, attached to each enrolled pod's network namespace: new TCP connections for one
//! of the pod's addresses go to the daemon's in-pod inbound listener (15006), whose accepted
//! socket keeps the original destination as its local address.
//!
//! Left to the regular socket lookup: non-TCP, the pod talking to itself (and the daemon's own
//! connections to the application, which it makes from inside the pod), the HBONE port (the
//! daemon's 15008 listener owns it), and addresses that are not a known pod address.
//!
//! "Talking to itself" is recognised by the source: a loopback address, or an address of the
//! same pod. `ingress_ifindex` is not enough: on 6.18 a connection from a pod to its own
//! non-loopback address showed the pod's `eth0` there, not `lo`, and was captured again. A known pod address without a listener means the daemon is absent: the
//! connection is dropped rather than delivered around the mesh (fail closed). sk_lookup runs
//! only for packets routed for local delivery (kernel 5.9, `Documentation/bpf/prog_sk_lookup`).

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::Counter;

use crate::{
    addr,
    maps::{INBOUND, count, hbone_port, lookup_pod_addr},
};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn inbound_lookup(ctx: SkLookupContext) -> u32 {
    // Constants per branch: the verifier must see a return value of 0 or 1.
    match try_sk_lookup(&ctx) {
        Ok(()) => SK_PASS,
        Err(()) => SK_DROP,
    }
}

/// `Err` drops the connection.
#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> Result<(), ()> {
    let l = ctx.lookup;
    // SAFETY: plain context reads, checked by the verifier.
    let (protocol, ifindex, family, port) = unsafe {
        (
            (*l).protocol,
            (*l).ingress_ifindex,
            (*l).family,
            (*l).local_port,
        )
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "local_port is a 16-bit port"
    )]
    let port = port as u16;
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || port == hbone_port() {
        count(Counter::LookupBypassed);
        return Ok(());
    }
    // SAFETY: as above.
    let local = unsafe {
        if family == AF_INET {
            addr::from_v4((*l).local_ip4, port)
        } else {
            addr::from_v6((*l).local_ip6, port)
        }
    };
    let key = addr::ip_key(&local);
    let Some(pod) = lookup_pod_addr(&key) else {
        count(Counter::LookupBypassed);
        return Ok(());
    };
    // SAFETY: as above.
    let remote = unsafe {
        if family == AF_INET {
            addr::from_v4((*l).remote_ip4, 0)
        } else {
            addr::from_v6((*l).remote_ip6, 0)
        }
    };
    if addr::is_loopback(&remote) || lookup_pod_addr(&addr::ip_key(&remote)) == Some(pod) {
        count(Counter::LookupBypassed);
        return Ok(());
    }
    match INBOUND.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => {
            count(Counter::LookupCaptured);
            Ok(())
        }
        Err(_) => {
            count(Counter::LookupFailed);
            Err(())
        }
    }
}
