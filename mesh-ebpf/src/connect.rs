//! `cgroup/connect4` and `cgroup/connect6`: see every `connect()` made by a process in the
//! attached cgroup (and its descendants).
//!
//! Sockets are classified by the network namespace they live in (`bpf_get_netns_cookie`, kernel
//! 5.8+ for sock_addr programs) and by their mark. The programs never refuse a connection:
//! returning 1 lets `connect()` proceed (see the kernel's `Documentation/bpf/prog_cgroup_sockaddr`
//! semantics: 0 would fail it with EPERM).

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::Counter;

use crate::maps::{count, daemon_mark, lookup_enrolled_netns};

/// Let the `connect()` proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_connect(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_connect(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sk` is always set for connect hooks; the verifier checks the access.
    let sk = unsafe { (*sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return Ok(ALLOW);
    }
    // SAFETY: non-null socket pointer from the context, read-only field access.
    let mark = unsafe { (*sk).mark };
    if mark == daemon_mark() {
        count(Counter::ConnectMarked);
        return Ok(ALLOW);
    }
    // SAFETY: helper 122 accepts the sock_addr context.
    let cookie = unsafe { bpf_get_netns_cookie(sock_addr.cast()) };
    match lookup_enrolled_netns(cookie) {
        Some(_) => count(Counter::ConnectEnrolled),
        None => count(Counter::ConnectNotEnrolled),
    }
    Ok(ALLOW)
}
