//! `sk_lookup`, attached to each enrolled pod's network namespace: every new TCP connection
//! for the pod goes to the daemon's in-pod inbound listener (15006), whose accepted socket
//! keeps the original destination as its local address.
//!
//! The network namespace is the unit of capture: every address the namespace receives on is
//! captured, whether or not the workload lists it (an IPv6 link-local address, an address
//! added later). `sk_lookup` runs only for packets routed for local delivery in the namespace it
//! is attached to (kernel 5.9, `Documentation/bpf/prog_sk_lookup.rst`), so the destination is
//! always the pod's. The program has no helper that names its namespace, so the daemon loads
//! one instance per namespace with the namespace's cookie as a load-time global.
//!
//! Left to the regular socket lookup:
//! - non-TCP, and connections arriving on the loopback device;
//! - the pod talking to itself (also the daemon's own connections to the application, which it
//!   makes from inside the pod): the source is a loopback address, the destination address
//!   itself (what the kernel picks for a local destination), or another address the daemon
//!   recorded for this namespace. `ingress_ifindex` alone is not enough: on 6.18 a connection
//!   from a pod to its own non-loopback address showed the pod's `eth0` there, not `lo`;
//! - port 15008 on an address where the daemon's HBONE listener is bound. On any other
//!   address 15008 is dropped: it would reach whatever the application bound there, around
//!   mTLS;
//! - in the daemon's own namespace (a VM or bare-metal host that enrolls itself), the daemon's
//!   own endpoints (`DAEMON_PORTS`: admin, metrics, readiness): they belong to the daemon, not
//!   to the workload, so a scraper reaches them whatever the workload's peer authentication.
//!
//! A namespace without a listener means the daemon is absent: the connection is dropped
//! rather than delivered around the mesh (fail closed).

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{ADDR_HBONE, Counter, DAEMON_PORTS, SockAddr};

use crate::maps::{INBOUND, count, daemon_netns, hbone_port, lookup_pod_addr, netns_cookie};

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
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        count(Counter::LookupBypassed);
        return Ok(());
    }
    // SAFETY: as above.
    let (local, remote) = unsafe {
        if family == AF_INET {
            (
                SockAddr::from_v4((*l).local_ip4, port),
                SockAddr::from_v4((*l).remote_ip4, 0),
            )
        } else {
            (
                SockAddr::from_v6((*l).local_ip6, port),
                SockAddr::from_v6((*l).remote_ip6, 0),
            )
        }
    };
    let netns = netns_cookie();
    if netns == daemon_netns() && DAEMON_PORTS.contains(&port) {
        count(Counter::LookupBypassed);
        return Ok(());
    }
    if remote.is_loopback() || remote.same_ip(&local) || lookup_pod_addr(netns, &remote).is_some() {
        count(Counter::LookupBypassed);
        return Ok(());
    }
    if port == hbone_port() {
        return match lookup_pod_addr(netns, &local) {
            Some(flags) if flags & ADDR_HBONE != 0 => {
                count(Counter::LookupBypassed);
                Ok(())
            }
            _ => {
                count(Counter::LookupRefused);
                Err(())
            }
        };
    }
    match INBOUND.redirect_sk_lookup(ctx, netns, 0) {
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
