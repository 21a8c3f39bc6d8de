//! The ABI between mesh's kernel programs (`mesh-ebpf`) and the daemon (`mesh-node`): map
//! names, key and value layouts, counter indices, ports and marks.
//!
//! Every type that crosses the kernel boundary is `#[repr(C)]` with explicit padding, and its
//! size is asserted at compile time so that a change on one side cannot silently disagree with
//! the other.
#![no_std]

use core::mem::size_of;

/// `SO_MARK` carried by every socket the daemon opens (1337, as Istio uses). The kernel programs
/// never capture a marked socket, so the daemon cannot loop into itself.
pub const DAEMON_MARK: u32 = 0x539;

/// Outbound capture listener inside each enrolled pod netns (`127.0.0.1` / `::1`), as in Istio.
pub const PORT_OUTBOUND: u16 = 15001;
/// Inbound plaintext capture listener inside each enrolled pod netns, as in Istio.
pub const PORT_INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (mTLS + HTTP/2 CONNECT) listener on the pod IP, as in Istio ztunnel.
pub const PORT_INBOUND_HBONE: u16 = 15008;
/// Node admin endpoint (127.0.0.1 only).
pub const PORT_ADMIN: u16 = 15000;
/// Node Prometheus endpoint.
pub const PORT_METRICS: u16 = 15020;
/// Node readiness endpoint.
pub const PORT_READINESS: u16 = 15021;

/// Name of the hash map of enrolled network namespaces (`netns cookie -> NetnsInfo`).
pub const MAP_ENROLLED_NETNS: &str = "MESH_ENROLLED";
/// Name of the per-CPU array of counters (indexed by [`Counter`]).
pub const MAP_COUNTERS: &str = "MESH_COUNTERS";
/// Capacity of [`MAP_ENROLLED_NETNS`]: enrolled pods on one node. Kubernetes' default pod limit
/// per node is 110; 4096 leaves room for dense nodes and VMs.
pub const MAX_ENROLLED_NETNS: u32 = 4096;

/// Value of the enrolled-netns map, keyed by the netns cookie (`u64`, from
/// `bpf_get_netns_cookie` in the kernel and `SO_NETNS_COOKIE` in user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsInfo {
    /// Index of the workload in the daemon's table (opaque to the kernel, shown in counters
    /// and logs).
    pub workload_id: u32,
    /// Reserved flag bits (zero for now).
    pub flags: u32,
}
const _: () = assert!(size_of::<NetnsInfo>() == 8);

/// Indices into the per-CPU counter array. The kernel only counts; the daemon sums the CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` on a TCP socket whose netns is enrolled.
    ConnectEnrolled = 0,
    /// `connect()` on a socket whose netns is not enrolled (left untouched).
    ConnectNotEnrolled = 1,
    /// `connect()` on a socket carrying [`DAEMON_MARK`] (the daemon's own; left untouched).
    ConnectMarked = 2,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 3] = [
        Counter::ConnectEnrolled,
        Counter::ConnectNotEnrolled,
        Counter::ConnectMarked,
    ];

    /// Stable, label-friendly name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectEnrolled => "connect_enrolled",
            Counter::ConnectNotEnrolled => "connect_not_enrolled",
            Counter::ConnectMarked => "connect_marked",
        }
    }
}

/// Number of entries in [`MAP_COUNTERS`].
#[expect(clippy::cast_possible_truncation, reason = "a handful of counters")]
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
// SAFETY: `NetnsInfo` is `repr(C)`, `Copy`, has no padding (asserted above) and every bit
// pattern is valid.
unsafe impl aya::Pod for NetnsInfo {}
