//! The embedded kernel object: load it once with node-specific globals and pinned maps, attach
//! (or adopt) its programs, and read and write its maps.
//!
//! Pinned layout under the bpffs directory (`redirect.bpffs`):
//! - `maps/<MAP>`: every map, pinned by name (aya reuses an existing pin on load);
//! - `links/<program>`: the cgroup links (`connect4`, `connect6`, `getpeername4`,
//!   `getpeername6`, `sockops`);
//! - `netns/<cookie>`: the `sk_lookup` link of each enrolled pod's netns;
//! - `progs/<program>` (and `progs/inbound_lookup-<cookie>`; bpffs names cannot hold a `.`):
//!   the programs, for their run
//!   statistics.
//!
//! `sk_lookup` is loaded once per enrolled netns with that netns's cookie as a load-time
//! global (the program type has no helper that names its namespace); the instance lives as
//! long as its pinned link.
//!
//! A restarted daemon finds the links pinned and adopts them instead of attaching a second copy;
//! the programs they hold use the pinned maps, which the new daemon reuses.

use std::{
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, SockHash, lpm_trie::Key as LpmKey},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    COUNTER_COUNT, ConnKey, Counter, MAP_CONN_ORIG_DST, MAP_COUNTERS, MAP_ENROLLED_NETNS,
    MAP_EXCLUDED_CIDRS, MAP_EXCLUDED_PORTS, MAP_INBOUND_LISTENERS, MAP_POD_ADDRS, NetnsInfo,
    PodAddrKey, SockAddr,
};
use tracing::{debug, info};

/// The object built from `mesh-ebpf` by `build.rs` (empty when the BPF toolchain was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-programs"));

/// `cgroup/*` `sock_addr` programs in the object.
const SOCK_ADDR_PROGRAMS: [&str; 4] = ["connect4", "connect6", "getpeername4", "getpeername6"];
const SOCKOPS_PROGRAM: &str = "capture_sockops";
const SK_LOOKUP_PROGRAM: &str = "inbound_lookup";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "this mesh-node was built without its kernel programs (the BPF toolchain was missing \
         at build time); run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error("bpffs directory {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a bpffs mount (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("loading the kernel programs")]
    Load(#[source] aya::EbpfError),
    #[error("reading the cookie of the daemon's own network namespace")]
    DaemonNetns {
        #[source]
        source: io::Error,
    },
    #[error("program `{name}` is not in the kernel object")]
    MissingProgram { name: &'static str },
    #[error("map `{name}` is not in the kernel object")]
    MissingMap { name: &'static str },
    #[error("program `{name}`")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Event counters summed over all CPUs, in [`Counter`] order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot([u64; COUNTER_COUNT as usize]);

impl CounterSnapshot {
    /// The value of one counter.
    #[must_use]
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// `(name, value)` pairs, for logs and metrics.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }
}

/// Node-specific values the programs are loaded with.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// `SO_MARK` of the daemon's sockets.
    pub mark: u32,
    /// In-pod outbound listener port.
    pub outbound_port: u16,
    /// In-pod HBONE port (left to the regular lookup by `sk_lookup`).
    pub hbone_port: u16,
}

/// Whether links were found pinned (a previous daemon attached them) or attached now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    Adopted,
    Attached,
}

/// The loaded kernel object and the links this daemon holds.
pub struct Programs {
    ebpf: Ebpf,
    options: LoadOptions,
    /// Cookie of the daemon's own netns (see `MESH_DAEMON_NETNS` in the kernel programs).
    daemon_netns: u64,
    /// Keeps `bpf_stats` (run count and time per program) enabled while the daemon runs.
    _stats: Option<std::os::fd::OwnedFd>,
    bpffs: PathBuf,
    cgroup_links: Vec<PinnedLink>,
    netns_links: std::collections::HashMap<u64, PinnedLink>,
}

/// Shared handle to the original-destination table, for the proxy's accept loops.
pub struct OrigDstTable(std::sync::Mutex<HashMap<MapData, ConnKey, SockAddr>>);

impl OrigDstTable {
    /// Takes the original destination of the connection accepted from `peer` by a listener in
    /// the netns with `netns` cookie.
    pub fn take(&self, netns: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey::new(netns, &SockAddr::from_socket_addr(peer));
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        dst.to_socket_addr()
    }
}

/// One pod's view of the original-destination table (the kernel implementation of
/// [`crate::proxy::OriginalDst`]): outbound by the client's address in the pod's netns; inbound
/// the accepted socket's own local address (`sk_lookup` keeps it).
pub struct PodOrigDst {
    pub table: std::sync::Arc<OrigDstTable>,
    pub cookie: u64,
}

impl crate::proxy::OriginalDst for PodOrigDst {
    fn outbound(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.table.take(self.cookie, peer)
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> RedirectError {
    move |source| RedirectError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> RedirectError {
    move |source| RedirectError::Program { name, source }
}

impl Programs {
    /// Loads the embedded object, reusing maps pinned under `options.bpffs` by a previous run.
    pub fn load(options: &LoadOptions) -> Result<Self, RedirectError> {
        if OBJECT.is_empty() {
            return Err(RedirectError::NotBuilt);
        }
        let bpffs = options.bpffs.clone();
        for dir in ["maps", "links", "netns", "progs"] {
            let path = bpffs.join(dir);
            fs::create_dir_all(&path).map_err(|source| RedirectError::Bpffs { path, source })?;
        }
        if !is_bpffs(&bpffs) {
            return Err(RedirectError::NotBpffs { path: bpffs });
        }
        raise_memlock_limit();
        // Every thread but the namespace workers' lives in the daemon's own netns.
        let daemon_netns = super::netns::current_netns_cookie()
            .map_err(|source| RedirectError::DaemonNetns { source })?;
        let ebpf = load_object(options, daemon_netns, 0)?;
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "could not enable bpf_stats; program run metrics will be zero");
                None
            }
        };
        Ok(Self {
            ebpf,
            options: options.clone(),
            daemon_netns,
            _stats: stats,
            bpffs,
            cgroup_links: Vec::new(),
            netns_links: std::collections::HashMap::new(),
        })
    }

    /// Names of the programs in the object.
    pub fn program_names(&self) -> impl Iterator<Item = &str> {
        self.ebpf.programs().map(|(name, _)| name)
    }

    /// The bpffs directory holding this node's pins.
    #[must_use]
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Attaches the cgroup programs to `cgroup`, or adopts the links a previous daemon pinned.
    ///
    /// Links are BPF links (kernel >= 5.7); cgroup links always join the cgroup's multi-program
    /// list (the kernel rejects `BPF_F_ALLOW_MULTI` on `BPF_LINK_CREATE`, hence `Single` here),
    /// so programs a CNI attaches to the same cgroup keep running, in attach order.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<Attachment, RedirectError> {
        let names: Vec<&'static str> = SOCK_ADDR_PROGRAMS
            .iter()
            .copied()
            .chain([SOCKOPS_PROGRAM])
            .collect();
        let pins: Vec<PathBuf> = names
            .iter()
            .map(|n| self.bpffs.join("links").join(n))
            .collect();
        if pins.iter().all(|p| p.exists()) {
            for pin in &pins {
                let link = PinnedLink::from_pin(pin).map_err(|e| RedirectError::Link {
                    path: pin.clone(),
                    source: io::Error::other(e),
                })?;
                self.cgroup_links.push(link);
            }
            info!(cgroup = %cgroup.display(), "adopted pinned cgroup programs");
            return Ok(Attachment::Adopted);
        }
        // A partial set is the leftover of an interrupted start: replace it.
        for pin in &pins {
            unpin_link(pin)?;
        }
        let dir = File::open(cgroup).map_err(|source| RedirectError::Open {
            path: cgroup.to_owned(),
            source,
        })?;
        for (name, pin) in names.iter().copied().zip(&pins) {
            let link = self.attach_one(name, &dir)?;
            let pinned = link.pin(pin).map_err(|e| RedirectError::Link {
                path: pin.clone(),
                source: io::Error::other(e),
            })?;
            self.cgroup_links.push(pinned);
        }
        info!(cgroup = %cgroup.display(), "attached cgroup programs");
        Ok(Attachment::Attached)
    }

    fn attach_one(&mut self, name: &'static str, cgroup: &File) -> Result<FdLink, RedirectError> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(RedirectError::MissingProgram { name })?;
        let prog_pin = self.bpffs.join("progs").join(name);
        let _ = fs::remove_file(&prog_pin);
        // The same steps for both program types (their `attach` methods are not a trait).
        macro_rules! load_pin_attach {
            ($ty:ty) => {{
                let program: &mut $ty = program.try_into().map_err(prog_err(name))?;
                program.load().map_err(prog_err(name))?;
                pin_program(program.pin(&prog_pin), &prog_pin);
                let id = program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(prog_err(name))?;
                let link = program.take_link(id).map_err(prog_err(name))?;
                FdLink::try_from(link).map_err(|e| RedirectError::Link {
                    path: PathBuf::from(name),
                    source: io::Error::other(e),
                })
            }};
        }
        if name == SOCKOPS_PROGRAM {
            load_pin_attach!(SockOps)
        } else {
            load_pin_attach!(CgroupSockAddr)
        }
    }

    /// Attaches `sk_lookup` to the netns at `netns` (cookie `cookie`), or adopts its pinned
    /// link. Each netns gets its own instance of the program, loaded with `cookie`.
    pub fn attach_netns(&mut self, netns: &Path, cookie: u64) -> Result<Attachment, RedirectError> {
        let pin = self.netns_pin(cookie);
        if self.netns_links.contains_key(&cookie) && pin.exists() {
            return Ok(Attachment::Adopted);
        }
        if pin.exists()
            && let Ok(link) = PinnedLink::from_pin(&pin)
        {
            self.netns_links.insert(cookie, link);
            return Ok(Attachment::Adopted);
        }
        unpin_link(&pin)?;
        let ns = File::open(netns).map_err(|source| RedirectError::Open {
            path: netns.to_owned(),
            source,
        })?;
        // The instance's maps are the pinned ones; only its program outlives this function,
        // held by the pinned link.
        let mut instance = load_object(&self.options, self.daemon_netns, cookie)?;
        let name = SK_LOOKUP_PROGRAM;
        let program: &mut SkLookup = instance
            .program_mut(name)
            .ok_or(RedirectError::MissingProgram { name })?
            .try_into()
            .map_err(prog_err(name))?;
        program.load().map_err(prog_err(name))?;
        let prog_pin = self.netns_program_pin(cookie);
        let _ = fs::remove_file(&prog_pin);
        pin_program(program.pin(&prog_pin), &prog_pin);
        let id = program.attach(ns).map_err(prog_err(name))?;
        let link: FdLink = program.take_link(id).map_err(prog_err(name))?.into();
        let pinned = link.pin(&pin).map_err(|e| RedirectError::Link {
            path: pin.clone(),
            source: io::Error::other(e),
        })?;
        self.netns_links.insert(cookie, pinned);
        Ok(Attachment::Attached)
    }

    /// Whether the `sk_lookup` link of the netns with `cookie` is pinned (attached).
    #[must_use]
    pub fn netns_attached(&self, cookie: u64) -> bool {
        self.netns_pin(cookie).exists()
    }

    /// Detaches and unpins the `sk_lookup` link of the netns with `cookie`.
    pub fn detach_netns(&mut self, cookie: u64) -> Result<(), RedirectError> {
        self.netns_links.remove(&cookie);
        let _ = fs::remove_file(self.netns_program_pin(cookie));
        unpin_link(&self.netns_pin(cookie))
    }

    /// Detaches pinned `sk_lookup` links of namespaces not in `keep` (pods that went away
    /// while no daemon ran). Returns how many were removed.
    pub fn prune_netns_links(&mut self, keep: &[u64]) -> usize {
        let Ok(entries) = fs::read_dir(self.bpffs.join("netns")) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.filter_map(Result::ok) {
            let cookie = entry.file_name().to_string_lossy().parse::<u64>().ok();
            if cookie.is_some_and(|c| !keep.contains(&c)) {
                if let Some(c) = cookie {
                    self.netns_links.remove(&c);
                    let _ = fs::remove_file(self.netns_program_pin(c));
                }
                if unpin_link(&entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    fn netns_pin(&self, cookie: u64) -> PathBuf {
        self.bpffs.join("netns").join(cookie.to_string())
    }

    fn netns_program_pin(&self, cookie: u64) -> PathBuf {
        self.bpffs
            .join("progs")
            .join(format!("{SK_LOOKUP_PROGRAM}-{cookie}"))
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, RedirectError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(RedirectError::MissingMap { name })?;
        HashMap::try_from(map).map_err(map_err(name))
    }

    /// Marks the netns with `cookie` as enrolled: its outbound connections are captured.
    pub fn enroll_netns(&mut self, cookie: u64, info: NetnsInfo) -> Result<(), RedirectError> {
        self.hash_map::<u64, NetnsInfo>(MAP_ENROLLED_NETNS)?
            .insert(cookie, info, 0)
            .map_err(map_err(MAP_ENROLLED_NETNS))
    }

    /// Whether the netns with `cookie` is marked as enrolled.
    pub fn netns_enrolled(&mut self, cookie: u64) -> Result<bool, RedirectError> {
        let map = self.hash_map::<u64, NetnsInfo>(MAP_ENROLLED_NETNS)?;
        match map.get(&cookie, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(RedirectError::Map {
                name: MAP_ENROLLED_NETNS,
                source,
            }),
        }
    }

    /// Stops capturing the netns with `cookie` (absent is fine).
    pub fn unenroll_netns(&mut self, cookie: u64) -> Result<(), RedirectError> {
        ignore_missing(
            self.hash_map::<u64, NetnsInfo>(MAP_ENROLLED_NETNS)?
                .remove(&cookie),
            MAP_ENROLLED_NETNS,
        )
    }

    /// Cookies of every enrolled netns (including ones a previous daemon enrolled).
    pub fn enrolled_netns(&mut self) -> Result<Vec<u64>, RedirectError> {
        let map = self.hash_map::<u64, NetnsInfo>(MAP_ENROLLED_NETNS)?;
        Ok(map.keys().filter_map(Result::ok).collect())
    }

    /// Records `ip` as an address of the pod in netns `cookie`, with `flags`
    /// ([`mesh_common::ADDR_HBONE`]).
    pub fn add_pod_addr(
        &mut self,
        cookie: u64,
        ip: IpAddr,
        flags: u32,
    ) -> Result<(), RedirectError> {
        self.hash_map::<PodAddrKey, u32>(MAP_POD_ADDRS)?
            .insert(pod_addr_key(cookie, ip), flags, 0)
            .map_err(map_err(MAP_POD_ADDRS))
    }

    /// Forgets `ip` as an address of the pod in netns `cookie` (absent is fine).
    pub fn remove_pod_addr(&mut self, cookie: u64, ip: IpAddr) -> Result<(), RedirectError> {
        self.remove_pod_key(&pod_addr_key(cookie, ip))
    }

    /// Pod addresses recorded in the kernel, with their flags.
    pub fn pod_addrs(&mut self) -> Result<Vec<(PodAddrKey, u32)>, RedirectError> {
        let map = self.hash_map::<PodAddrKey, u32>(MAP_POD_ADDRS)?;
        Ok(map.iter().filter_map(Result::ok).collect())
    }

    /// The addresses (and flags) recorded for the pod in netns `cookie`.
    pub fn addrs_of(&mut self, cookie: u64) -> Result<Vec<(IpAddr, u32)>, RedirectError> {
        Ok(self
            .pod_addrs()?
            .into_iter()
            .filter(|(key, _)| key.netns == cookie)
            .filter_map(|(key, flags)| Some((key.ip()?, flags)))
            .collect())
    }

    /// Removes a pod address by its raw key (for pruning stale entries).
    pub fn remove_pod_key(&mut self, key: &PodAddrKey) -> Result<(), RedirectError> {
        ignore_missing(
            self.hash_map::<PodAddrKey, u32>(MAP_POD_ADDRS)?.remove(key),
            MAP_POD_ADDRS,
        )
    }

    fn inbound_listeners(&mut self) -> Result<SockHash<&mut MapData, u64>, RedirectError> {
        let name = MAP_INBOUND_LISTENERS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(RedirectError::MissingMap { name })?;
        SockHash::try_from(map).map_err(map_err(name))
    }

    /// Makes `listener` the inbound capture socket of the netns with `cookie`. The entry goes
    /// away by itself when the socket closes.
    pub fn set_inbound_listener(
        &mut self,
        cookie: u64,
        listener: &impl AsRawFd,
    ) -> Result<(), RedirectError> {
        self.inbound_listeners()?
            .insert(cookie, listener.as_raw_fd(), 0)
            .map_err(map_err(MAP_INBOUND_LISTENERS))
    }

    /// Whether the netns with `cookie` has an inbound capture socket (this daemon's or
    /// another's: the kernel removes the entry when its socket closes).
    pub fn has_inbound_listener(&mut self, cookie: u64) -> Result<bool, RedirectError> {
        let hash = self.inbound_listeners()?;
        let mut keys = hash.keys();
        Ok(keys.any(|k| k.is_ok_and(|k| k == cookie)))
    }

    /// Replaces the excluded destination CIDRs and ports.
    pub fn set_exclusions(
        &mut self,
        cidrs: &[ipnet::IpNet],
        ports: &[u16],
    ) -> Result<(), RedirectError> {
        let name = MAP_EXCLUDED_CIDRS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(RedirectError::MissingMap { name })?;
        let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> =
            LpmTrie::try_from(map).map_err(map_err(name))?;
        let old: Vec<_> = trie.keys().filter_map(Result::ok).collect();
        for key in old {
            let _ = trie.remove(&key);
        }
        for net in cidrs {
            let (data, len) = lpm_key(net);
            trie.insert(&LpmKey::new(len, data), 1, 0)
                .map_err(map_err(name))?;
        }
        let mut map = self.hash_map::<u16, u32>(MAP_EXCLUDED_PORTS)?;
        let old: Vec<u16> = map.keys().filter_map(Result::ok).collect();
        for port in old {
            let _ = map.remove(&port);
        }
        for port in ports {
            map.insert(port, 1, 0)
                .map_err(map_err(MAP_EXCLUDED_PORTS))?;
        }
        Ok(())
    }

    /// Moves the original-destination map out for the proxy's accept loops.
    pub fn take_orig_dst_table(&mut self) -> Result<OrigDstTable, RedirectError> {
        let name = MAP_CONN_ORIG_DST;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(RedirectError::MissingMap { name })?;
        let map = HashMap::try_from(map).map_err(map_err(name))?;
        Ok(OrigDstTable(std::sync::Mutex::new(map)))
    }

    /// Reads the per-CPU counters and sums them.
    pub fn counters(&self) -> Result<CounterSnapshot, RedirectError> {
        let name = MAP_COUNTERS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(RedirectError::MissingMap { name })?;
        let counters = PerCpuArray::<_, u64>::try_from(map).map_err(map_err(name))?;
        let mut snapshot = CounterSnapshot::default();
        for counter in Counter::ALL {
            let per_cpu = counters.get(&(counter as u32), 0).map_err(map_err(name))?;
            snapshot.0[counter as usize] = per_cpu.iter().sum();
        }
        Ok(snapshot)
    }
}

/// The key of `ip` as an address of the pod with netns `netns`.
fn pod_addr_key(netns: u64, ip: IpAddr) -> PodAddrKey {
    PodAddrKey::new(netns, &SockAddr::from_socket_addr(SocketAddr::new(ip, 0)))
}

/// LPM trie data and prefix length for a CIDR (IPv4 as `::ffff:0:0/96` + prefix, as the kernel
/// looks it up).
fn lpm_key(net: &ipnet::IpNet) -> ([u8; 16], u32) {
    let data = SockAddr::from_socket_addr(SocketAddr::new(net.network(), 0)).lpm_bytes();
    let prefix = u32::from(net.prefix_len());
    match net {
        ipnet::IpNet::V4(_) => (data, 96 + prefix),
        ipnet::IpNet::V6(_) => (data, prefix),
    }
}

fn ignore_missing(result: Result<(), MapError>, name: &'static str) -> Result<(), RedirectError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(RedirectError::Map { name, source }),
    }
}

/// Loads the embedded object with the node's globals (the daemon's own netns cookie and, for
/// an `sk_lookup` instance, its netns cookie), reusing the maps pinned under `options.bpffs`.
fn load_object(
    options: &LoadOptions,
    daemon_netns: u64,
    netns_cookie: u64,
) -> Result<Ebpf, RedirectError> {
    EbpfLoader::new()
        .default_map_pin_directory(options.bpffs.join("maps"))
        .override_global("MESH_DAEMON_MARK", &options.mark, true)
        .override_global("MESH_OUTBOUND_PORT", &options.outbound_port, true)
        .override_global("MESH_HBONE_PORT", &options.hbone_port, true)
        .override_global("MESH_NETNS_COOKIE", &netns_cookie, true)
        .override_global("MESH_DAEMON_NETNS", &daemon_netns, true)
        .load(OBJECT)
        .map_err(RedirectError::Load)
}

/// Pins a program for the metrics collector (its run statistics); failure only costs metrics.
fn pin_program(result: Result<(), aya::pin::PinError>, path: &Path) {
    if let Err(e) = result {
        tracing::warn!(pin = %path.display(), error = %e, "could not pin a program; its run metrics are unavailable");
    }
}

/// Removes a pinned link; the link is detached once no file descriptor holds it.
fn unpin_link(path: &Path) -> Result<(), RedirectError> {
    match fs::remove_file(path) {
        Ok(()) => {
            debug!(pin = %path.display(), "unpinned link");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RedirectError::Link {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes everything the daemon pinned under `bpffs` (uninstall): links first, which detaches
/// the programs, then the maps. Returns how many pins were removed.
pub fn remove_pins(bpffs: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for dir in ["links", "netns", "progs", "maps", "daemons"] {
        let path = bpffs.join(dir);
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                // A daemon's generation (`daemons/<n>`, see `succession`).
                fs::remove_dir(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        fs::remove_dir(&path)?;
    }
    match fs::remove_dir(bpffs) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    #[expect(
        clippy::useless_conversion,
        reason = "`__fsword_t` differs across architectures"
    )]
    nix::sys::statfs::statfs(path).is_ok_and(|s| i64::from(s.filesystem_type().0) == BPF_FS_MAGIC)
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`; newer ones use memcg accounting.
/// Raising the limit needs `CAP_SYS_RESOURCE`, which the daemon may lack: don't fail.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to an initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        debug!(
            error = %io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (not needed on kernels >= 5.11)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_keys_map_ipv4_into_ipv6() {
        let (data, len) = lpm_key(&"10.0.0.0/8".parse().unwrap());
        assert_eq!(len, 104);
        assert_eq!(&data[10..13], &[0xff, 0xff, 10]);
        let (data, len) = lpm_key(&"fd00::/8".parse().unwrap());
        assert_eq!((data[0], len), (0xfd, 8));
    }

    #[test]
    fn snapshot_names_follow_counter_order() {
        let mut s = CounterSnapshot::default();
        s.0[Counter::ConnectMarked as usize] = 7;
        let names: Vec<_> = s.iter().collect();
        assert_eq!(names.len(), Counter::ALL.len());
        assert_eq!(names[2], ("connect_marked", 7));
        assert_eq!(s.get(Counter::ConnectCaptured), 0);
    }
}
