//! The ABI between mesh's kernel programs (`mesh-ebpf`) and the daemon (`mesh-node`): map
//! names, key and value layouts, counter indices, ports and marks.
//!
//! Every type that crosses the kernel boundary is `#[repr(C)]` with explicit padding, and its
//! size is asserted at compile time so that a change on one side cannot silently disagree with
//! the other. Addresses are kept as the kernel hands them over: IPv4 and IPv6 addresses as
//! 32-bit words in network byte order (an IPv4 address in word 0), ports in host byte order.
#![no_std]

mod addr;

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
/// Node admin endpoint (`127.0.0.1` only).
pub const PORT_ADMIN: u16 = 15000;
/// Node Prometheus endpoint.
pub const PORT_METRICS: u16 = 15020;
/// Node readiness endpoint.
pub const PORT_READINESS: u16 = 15021;
/// The daemon's own endpoints. When the daemon's own network namespace is enrolled (a VM or
/// bare-metal host whose processes are the workload), `sk_lookup` leaves connections to these
/// ports in that namespace to the regular lookup: they are the daemon's, not the workload's
/// (Istio's sidecar excludes its 15020/15021 from inbound capture the same way).
pub const DAEMON_PORTS: [u16; 3] = [PORT_ADMIN, PORT_METRICS, PORT_READINESS];

/// `AF_INET`, as stored in [`SockAddr::family`] and [`PodAddrKey::family`].
pub const FAMILY_V4: u16 = 2;
/// `AF_INET6`.
pub const FAMILY_V6: u16 = 10;

/// Enrolled network namespaces: `u64` netns cookie → [`NetnsInfo`].
pub const MAP_ENROLLED_NETNS: &str = "MESH_ENROLLED";
/// Addresses of each enrolled pod's network namespace: [`PodAddrKey`] (netns cookie, address)
/// → `u32` flags ([`ADDR_HBONE`]). The daemon records every address the namespace has, listed
/// in the workload or not. `connect` leaves a pod dialling one of its own addresses alone;
/// `sk_lookup` recognises the pod talking to itself by its source address, and lets port 15008
/// through only to an address where the daemon's HBONE listener is bound.
pub const MAP_POD_ADDRS: &str = "MESH_NETNS_ADDRS";
/// Inbound capture listeners: `u64` netns cookie → the pod's 15006 listening socket
/// (`SOCKHASH`). The netns is the unit of capture, so one listener takes every address.
pub const MAP_INBOUND_LISTENERS: &str = "MESH_LISTENERS";
/// Original destination per captured socket: `u64` socket cookie → [`SockAddr`]. Written by
/// `connect`, read by `getpeername` and `sockops`, removed when the socket closes.
pub const MAP_SOCK_ORIG_DST: &str = "MESH_SOCK_DST";
/// Original destination per captured connection as the daemon sees it: [`ConnKey`] (netns
/// cookie and the client's local address) → [`SockAddr`]. Written by `sockops` before the SYN
/// leaves; the daemon takes the entry when it accepts the connection.
pub const MAP_CONN_ORIG_DST: &str = "MESH_CONN_DST";
/// Destination CIDRs never captured: LPM trie over 16-byte addresses (IPv4 as `::ffff:a.b.c.d`,
/// prefix length + 96) → `u32` (unused).
pub const MAP_EXCLUDED_CIDRS: &str = "MESH_EXCL_CIDRS";
/// Destination ports never captured: `u16` (host order) → `u32` (unused).
pub const MAP_EXCLUDED_PORTS: &str = "MESH_EXCL_PORTS";
/// Per-CPU counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "MESH_COUNTERS";

/// Capacity of [`MAP_ENROLLED_NETNS`]: enrolled pods on one node. Kubernetes' default pod limit
/// per node is 110; 4096 leaves room for dense nodes and VMs.
pub const MAX_ENROLLED_NETNS: u32 = 4096;
/// Capacity of [`MAP_POD_ADDRS`]: a pod has a few addresses (IPv4, IPv6, IPv6 link-local, and
/// more on several interfaces).
pub const MAX_POD_ADDRS: u32 = 8 * MAX_ENROLLED_NETNS;

/// [`MAP_POD_ADDRS`] flag: the daemon's HBONE listener (15008) is bound on this address.
pub const ADDR_HBONE: u32 = 1;
/// Capacity of the original-destination maps: open captured connections on one node. LRU, so a
/// leak can never fill them; entries are also removed when sockets close.
pub const MAX_CAPTURED_CONNECTIONS: u32 = 262_144;
/// Capacity of the exclusion maps.
pub const MAX_EXCLUSIONS: u32 = 1024;

/// Value of the enrolled-netns map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsInfo {
    /// The daemon's index for the workload (opaque to the kernel).
    pub workload_id: u32,
    /// Reserved flag bits (zero for now).
    pub flags: u32,
}
const _: () = assert!(size_of::<NetnsInfo>() == 8);

/// An IPv4 or IPv6 socket address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddr {
    /// Address words in network byte order; IPv4 uses word 0, the rest are zero.
    pub ip: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
}
const _: () = assert!(size_of::<SockAddr>() == 20);

/// An address of one pod's network namespace (key of [`MAP_POD_ADDRS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodAddrKey {
    /// Netns cookie of the pod.
    pub netns: u64,
    /// Address words in network byte order; IPv4 uses word 0.
    pub ip: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
    /// Explicit padding (zero).
    pub pad: u32,
}
const _: () = assert!(size_of::<PodAddrKey>() == 32);

/// Key of [`MAP_CONN_ORIG_DST`]: the captured client socket's netns and local address, which
/// is the peer address of the connection the daemon accepts on 15001 in that netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Netns cookie of the client socket.
    pub netns: u64,
    /// Client's local address words (network byte order; IPv4 in word 0).
    pub ip: [u32; 4],
    /// Client's local port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
    /// Explicit padding (zero).
    pub pad: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 32);

/// Indices into the per-CPU counter array. The kernel only counts; the daemon sums the CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect()` from an enrolled netns steered to the outbound listener.
    ConnectCaptured = 0,
    /// `connect()` from a netns that is not enrolled (left alone).
    ConnectNotEnrolled = 1,
    /// `connect()` on a socket carrying the daemon's mark (left alone).
    ConnectMarked = 2,
    /// `connect()` from an enrolled netns that is excluded: not TCP, loopback, the pod's own
    /// address, an excluded CIDR or port.
    ConnectExcluded = 3,
    /// `connect()` that should have been captured but its original destination could not be
    /// recorded (map full); it is refused rather than let through uncaptured.
    ConnectFailed = 4,
    /// `sockops` recorded a captured connection's original destination for the daemon.
    OrigDstRecorded = 5,
    /// `sockops` found no original destination for a connection to the outbound listener.
    OrigDstMissing = 6,
    /// `getpeername()` answered with the original destination.
    PeerRewritten = 7,
    /// `sk_lookup` handed a connection to a pod's inbound listener.
    LookupCaptured = 8,
    /// `sk_lookup` left a connection alone: not TCP, arrived on loopback, the pod talking to
    /// itself, or the daemon's HBONE port on an address where its listener is bound.
    LookupBypassed = 9,
    /// `sk_lookup` found no inbound listener for the pod (daemon absent) and dropped the
    /// connection (fail closed).
    LookupFailed = 10,
    /// `sk_lookup` dropped a connection to port 15008 on an address where the daemon's HBONE
    /// listener is not bound (it would reach whatever the application bound there, around
    /// mTLS).
    LookupRefused = 11,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 12] = [
        Counter::ConnectCaptured,
        Counter::ConnectNotEnrolled,
        Counter::ConnectMarked,
        Counter::ConnectExcluded,
        Counter::ConnectFailed,
        Counter::OrigDstRecorded,
        Counter::OrigDstMissing,
        Counter::PeerRewritten,
        Counter::LookupCaptured,
        Counter::LookupBypassed,
        Counter::LookupFailed,
        Counter::LookupRefused,
    ];

    /// Stable, label-friendly name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectCaptured => "connect_captured",
            Counter::ConnectNotEnrolled => "connect_not_enrolled",
            Counter::ConnectMarked => "connect_marked",
            Counter::ConnectExcluded => "connect_excluded",
            Counter::ConnectFailed => "connect_failed",
            Counter::OrigDstRecorded => "orig_dst_recorded",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::PeerRewritten => "getpeername_rewritten",
            Counter::LookupCaptured => "lookup_captured",
            Counter::LookupBypassed => "lookup_bypassed",
            Counter::LookupFailed => "lookup_failed",
            Counter::LookupRefused => "lookup_refused",
        }
    }
}

/// Number of entries in [`MAP_COUNTERS`].
#[expect(clippy::cast_possible_truncation, reason = "a handful of counters")]
pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): `repr(C)`, `Copy`, no implicit padding (sizes asserted above), and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::NetnsInfo {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::PodAddrKey {}
    unsafe impl aya::Pod for super::ConnKey {}
}
