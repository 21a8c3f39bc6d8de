//! Maps shared by the programs, load-time globals, and one `lookup_<thing>()` helper per map.
//!
//! Every map is pinned by name (under the daemon's bpffs directory, chosen at load time), so a
//! restarted daemon reuses the maps that the still-attached programs use.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
};
use mesh_common::{
    COUNTER_COUNT, ConnKey, Counter, MAX_CAPTURED_CONNECTIONS, MAX_ENROLLED_NETNS, MAX_EXCLUSIONS,
    MAX_POD_ADDRS, NetnsInfo, PodAddrKey, SockAddr,
};

#[map(name = "MESH_ENROLLED")]
static ENROLLED: HashMap<u64, NetnsInfo> = HashMap::pinned(MAX_ENROLLED_NETNS, 0);

#[map(name = "MESH_NETNS_ADDRS")]
static POD_ADDRS: HashMap<PodAddrKey, u32> = HashMap::pinned(MAX_POD_ADDRS, 0);

#[map(name = "MESH_LISTENERS")]
pub static INBOUND: SockHash<u64> = SockHash::pinned(MAX_ENROLLED_NETNS, 0);

#[map(name = "MESH_SOCK_DST")]
static SOCK_DST: LruHashMap<u64, SockAddr> = LruHashMap::pinned(MAX_CAPTURED_CONNECTIONS, 0);

#[map(name = "MESH_CONN_DST")]
static CONN_DST: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(MAX_CAPTURED_CONNECTIONS, 0);

#[map(name = "MESH_EXCL_CIDRS")]
static EXCL_CIDRS: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(MAX_EXCLUSIONS, 0);

#[map(name = "MESH_EXCL_PORTS")]
static EXCL_PORTS: HashMap<u16, u32> = HashMap::pinned(MAX_EXCLUSIONS, 0);

#[map(name = "MESH_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// `SO_MARK` of the daemon's own sockets (load-time global).
#[unsafe(no_mangle)]
static MESH_DAEMON_MARK: u32 = mesh_common::DAEMON_MARK;
/// Port of the in-pod outbound listener (load-time global).
#[unsafe(no_mangle)]
static MESH_OUTBOUND_PORT: u16 = mesh_common::PORT_OUTBOUND;
/// Port of the in-pod HBONE listener, which `sk_lookup` leaves to the regular lookup.
#[unsafe(no_mangle)]
static MESH_HBONE_PORT: u16 = mesh_common::PORT_INBOUND_HBONE;
/// Cookie of the network namespace an `sk_lookup` instance is attached to (load-time global:
/// the daemon loads one instance per enrolled netns, because `sk_lookup` programs have no
/// helper that names their netns).
#[unsafe(no_mangle)]
static MESH_NETNS_COOKIE: u64 = 0;
/// Cookie of the daemon's own network namespace (load-time global): when it is enrolled (a VM
/// enrolling itself), its `sk_lookup` leaves the daemon's own ports alone.
#[unsafe(no_mangle)]
static MESH_DAEMON_NETNS: u64 = 0;

/// Reads a load-time global. The volatile read stops the compiler from folding the default.
macro_rules! global {
    ($name:ident) => {
        // SAFETY: a plain read of a global the loader patched before the program was loaded.
        unsafe { core::ptr::read_volatile(&raw const $name) }
    };
}

#[inline(always)]
pub fn daemon_mark() -> u32 {
    global!(MESH_DAEMON_MARK)
}

#[inline(always)]
pub fn outbound_port() -> u16 {
    global!(MESH_OUTBOUND_PORT)
}

#[inline(always)]
pub fn hbone_port() -> u16 {
    global!(MESH_HBONE_PORT)
}

#[inline(always)]
pub fn netns_cookie() -> u64 {
    global!(MESH_NETNS_COOKIE)
}

#[inline(always)]
pub fn daemon_netns() -> u64 {
    global!(MESH_DAEMON_NETNS)
}

#[inline(always)]
pub fn lookup_enrolled_netns(cookie: u64) -> Option<NetnsInfo> {
    // SAFETY: the value is copied out at once; the map holds plain data.
    unsafe { ENROLLED.get(&cookie).copied() }
}

/// The flags of `addr` if it is an address of the enrolled pod with netns `netns`.
#[inline(always)]
pub fn lookup_pod_addr(netns: u64, addr: &SockAddr) -> Option<u32> {
    let key = PodAddrKey::new(netns, addr);
    // SAFETY: as above.
    unsafe { POD_ADDRS.get(&key).copied() }
}

#[inline(always)]
pub fn lookup_sock_dst(cookie: u64) -> Option<SockAddr> {
    // SAFETY: as above.
    unsafe { SOCK_DST.get(&cookie).copied() }
}

#[inline(always)]
pub fn record_sock_dst(cookie: u64, dst: &SockAddr) -> Result<(), i64> {
    SOCK_DST.insert(&cookie, dst, 0).map_err(i64::from)
}

#[inline(always)]
pub fn forget_sock_dst(cookie: u64) {
    let _ = SOCK_DST.remove(&cookie);
}

#[inline(always)]
pub fn record_conn_dst(key: &ConnKey, dst: &SockAddr) -> Result<(), i64> {
    CONN_DST.insert(key, dst, 0).map_err(i64::from)
}

#[inline(always)]
pub fn forget_conn_dst(key: &ConnKey) {
    let _ = CONN_DST.remove(key);
}

/// Whether the destination is in an excluded CIDR.
#[inline(always)]
pub fn lookup_excluded_cidr(dst: &SockAddr) -> bool {
    EXCL_CIDRS.get(Key::new(128, dst.lpm_bytes())).is_some()
}

#[inline(always)]
pub fn lookup_excluded_port(port: u16) -> bool {
    // SAFETY: as above.
    unsafe { EXCL_PORTS.get(&port).is_some() }
}

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; programs on one CPU do not preempt each other mid-update.
        unsafe { *slot += 1 };
    }
}
