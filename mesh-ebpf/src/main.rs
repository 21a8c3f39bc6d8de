//! mesh's kernel programs: one module per attach point, shared maps in `maps`; the address
//! encoding is `mesh_common`'s (shared with the daemon, tested on the host).
//!
//! The kernel side only classifies, steers and counts; anything that needs identities or policy
//! lives in the daemon. The crate also builds (to nothing) on the host so that workspace-wide
//! `clippy` and `test` work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod getpeername;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sockops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic; this is never called.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
