//! `cgroup/connect4` and `cgroup/connect6`: outbound capture.
//!
//! For a TCP socket in an enrolled network namespace that does not carry the daemon's mark and
//! whose destination is not excluded, record the original destination under the socket's
//! cookie and rewrite the destination to the pod's own outbound listener (`127.0.0.1:15001`,
//! `[::1]:15001`, or `[::ffff:127.0.0.1]:15001` for IPv4-mapped destinations). Everything else
//! is left alone. Return 1 lets `connect()` proceed, 0 fails it with `EPERM` (see the kernel's
//! `BPF_CGROUP_INET4_CONNECT` hook); we only refuse when a capture could not be recorded, so
//! that traffic never leaves the mesh by accident.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{Counter, FAMILY_V4, SockAddr};

use crate::maps::{
    count, daemon_mark, lookup_enrolled_netns, lookup_excluded_cidr, lookup_excluded_port,
    lookup_pod_addr, outbound_port, record_sock_dst,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `127.0.0.1` in network byte order.
const LOCALHOST_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

// The verifier requires the return value to be provably 0 or 1, so the entry points map the
// result to constants instead of returning a value that went through the stack.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, false) {
        Ok(()) => ALLOW,
        Err(()) => REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx, true) {
        Ok(()) => ALLOW,
        Err(()) => REFUSE,
    }
}

/// `Err` refuses the `connect()`.
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sk` is set for connect hooks; the verifier checks every access.
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    if sk.is_null() {
        return Ok(());
    }
    // SAFETY: non-null socket from the context, read-only field.
    if unsafe { (*sk).mark } == daemon_mark() {
        count(Counter::ConnectMarked);
        return Ok(());
    }
    // SAFETY: helper 122 accepts the sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    if lookup_enrolled_netns(netns).is_none() {
        count(Counter::ConnectNotEnrolled);
        return Ok(());
    }
    // SAFETY: plain context reads, checked by the verifier.
    let (kind, protocol, port) = unsafe { ((*sa).type_, (*sa).protocol, (*sa).user_port) };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    let port = u16::from_be(port as u16);
    // SAFETY: as above.
    let dst = unsafe {
        if v6 {
            SockAddr::from_v6((*sa).user_ip6, port)
        } else {
            SockAddr::from_v4((*sa).user_ip4, port)
        }
    };
    if kind != SOCK_STREAM || protocol != IPPROTO_TCP || excluded(&dst, netns) {
        count(Counter::ConnectExcluded);
        return Ok(());
    }
    // SAFETY: helper 46 accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    if record_sock_dst(cookie, &dst).is_err() {
        count(Counter::ConnectFailed);
        return Err(());
    }
    rewrite(sa, v6, &dst);
    count(Counter::ConnectCaptured);
    Ok(())
}

fn excluded(dst: &SockAddr, netns: u64) -> bool {
    dst.is_loopback()
        || lookup_excluded_port(dst.port)
        || lookup_excluded_cidr(dst)
        || lookup_pod_addr(netns, dst).is_some()
}

/// Points the socket at the outbound listener of its own netns.
fn rewrite(sa: *mut bpf_sock_addr, v6: bool, dst: &SockAddr) {
    let port = u32::from(outbound_port().to_be());
    // SAFETY: the verifier allows 4-byte writes to `user_ip4`, `user_ip6[i]` and `user_port` in
    // connect hooks.
    unsafe {
        if v6 {
            let listener = if dst.family == FAMILY_V4 {
                SockAddr::from_v4(LOCALHOST_V4, 0).v6_words()
            } else {
                [0, 0, 0, 1u32.to_be()]
            };
            (*sa).user_ip6[0] = listener[0];
            (*sa).user_ip6[1] = listener[1];
            (*sa).user_ip6[2] = listener[2];
            (*sa).user_ip6[3] = listener[3];
        } else {
            (*sa).user_ip4 = LOCALHOST_V4;
        }
        (*sa).user_port = port;
    }
}
