//! `sockops`: hands each captured connection's original destination to the daemon, keyed the
//! way the daemon sees the connection.
//!
//! `connect` runs before the kernel picks the source port, so it can only key the original
//! destination by socket cookie. `BPF_SOCK_OPS_TCP_CONNECT_CB` runs in `tcp_connect()` once the
//! source address and port are set and before the SYN leaves, so the entry exists before the
//! daemon can accept: the key is (netns cookie, client address, client port), which is what
//! the daemon reads off the accepted socket's peer address in that pod's listener. Both entries
//! are dropped when the socket reaches `TCP_CLOSE` (`BPF_SOCK_OPS_STATE_CB`).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{ConnKey, Counter, SockAddr};

use crate::maps::{
    count, forget_conn_dst, forget_sock_dst, lookup_sock_dst, outbound_port, record_conn_dst,
};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn capture_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(&ctx),
        _ => {}
    }
    1
}

/// The connection's key as the daemon will build it from the accepted socket's peer.
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    // SAFETY: helper accepts the sock_ops context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "local_port is a 16-bit port"
    )]
    let port = ctx.local_port() as u16;
    let local = if ctx.family() == AF_INET {
        SockAddr::from_v4(ctx.local_ip4(), port)
    } else {
        SockAddr::from_v6(ctx.local_ip6(), port)
    };
    ConnKey::new(netns, &local)
}

fn record(ctx: &SockOpsContext) {
    // SAFETY: helper 46 accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(dst) = lookup_sock_dst(cookie) else {
        // Not captured. A connection to the outbound port that was not captured is one the
        // daemon will not be able to place: count it.
        #[expect(clippy::cast_possible_truncation, reason = "remote_port is 16 bits")]
        let remote = u16::from_be(ctx.remote_port() as u16);
        if remote == outbound_port() && ctx.family() == AF_INET {
            count(Counter::OrigDstMissing);
        }
        return;
    };
    let key = conn_key(ctx);
    if record_conn_dst(&key, &dst).is_ok() {
        count(Counter::OrigDstRecorded);
    } else {
        count(Counter::OrigDstMissing);
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

fn forget(ctx: &SockOpsContext) {
    // SAFETY: helper 46 accepts the sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    forget_sock_dst(cookie);
    forget_conn_dst(&conn_key(ctx));
}
