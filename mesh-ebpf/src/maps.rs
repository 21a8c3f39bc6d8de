//! Maps shared by the programs, load-time globals, and one `lookup_<thing>()` helper per map.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use mesh_common::{COUNTER_COUNT, Counter, MAX_ENROLLED_NETNS, NetnsInfo};

/// Enrolled network namespaces, keyed by netns cookie. Filled by the daemon.
#[map(name = "MESH_ENROLLED")]
static MESH_ENROLLED: HashMap<u64, NetnsInfo> = HashMap::with_max_entries(MAX_ENROLLED_NETNS, 0);

/// Per-CPU event counters indexed by [`Counter`]; the daemon sums the CPUs.
#[map(name = "MESH_COUNTERS")]
static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// `SO_MARK` of the daemon's own sockets. Load-time global (set by the loader), so a node can
/// choose another mark without rebuilding the programs.
#[unsafe(no_mangle)]
static MESH_DAEMON_MARK: u32 = mesh_common::DAEMON_MARK;

/// The daemon's socket mark, as set at load time.
#[inline(always)]
pub fn daemon_mark() -> u32 {
    // SAFETY: a plain read of a global the loader patched before the program was loaded; the
    // volatile read stops the compiler from folding the compile-time default.
    unsafe { core::ptr::read_volatile(&raw const MESH_DAEMON_MARK) }
}

/// The enrollment record of the netns with this cookie, if enrolled.
#[inline(always)]
pub fn lookup_enrolled_netns(cookie: u64) -> Option<NetnsInfo> {
    // SAFETY: the value is copied out immediately; the map holds plain data.
    unsafe { MESH_ENROLLED.get(&cookie).copied() }
}

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = MESH_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; programs on this CPU do not preempt each other mid-update.
        unsafe { *slot += 1 };
    }
}
