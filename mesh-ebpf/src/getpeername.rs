//! `cgroup/getpeername4` and `cgroup/getpeername6`: a captured socket reports the peer the
//! application dialled, not the outbound listener it was steered to.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{Counter, FAMILY_V6};

use crate::maps::{count, lookup_sock_dst};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    ALLOW
}

fn restore_peer(ctx: &SockAddrContext, v6: bool) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: helper 46 accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let Some(dst) = lookup_sock_dst(cookie) else {
        return;
    };
    if !v6 && dst.family == FAMILY_V6 {
        return;
    }
    let port = u32::from(dst.port.to_be());
    // SAFETY: getpeername hooks may write `user_ip4`, `user_ip6[i]` and `user_port`.
    unsafe {
        if v6 {
            let words = dst.v6_words();
            (*sa).user_ip6[0] = words[0];
            (*sa).user_ip6[1] = words[1];
            (*sa).user_ip6[2] = words[2];
            (*sa).user_ip6[3] = words[3];
        } else {
            (*sa).user_ip4 = dst.ip[0];
        }
        (*sa).user_port = port;
    }
    count(Counter::PeerRewritten);
}
