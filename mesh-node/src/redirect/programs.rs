//! The embedded kernel object: load it once with node-specific globals, attach its programs and
//! read and write its maps.

use std::{fs::File, io, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError},
};
use mesh_common::{
    COUNTER_COUNT, Counter, DAEMON_MARK, MAP_COUNTERS, MAP_ENROLLED_NETNS, NetnsInfo,
};
use tracing::debug;

/// The object built from `mesh-ebpf` by `build.rs` (empty when the BPF toolchain was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-programs"));

/// Names of the `cgroup/connect*` programs in the object.
const CONNECT_PROGRAMS: [&str; 2] = ["connect4", "connect6"];

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "this mesh-node was built without its kernel programs (the BPF toolchain was missing \
         at build time); run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error("loading the kernel programs")]
    Load(#[source] aya::EbpfError),
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
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: String,
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

/// The loaded kernel object. Dropping it detaches everything it attached (pinning comes with
/// the redirection work).
pub struct Programs {
    ebpf: Ebpf,
}

impl Programs {
    /// Loads the embedded object into the kernel with this node's socket mark.
    pub fn load(mark: u32) -> Result<Self, RedirectError> {
        if OBJECT.is_empty() {
            return Err(RedirectError::NotBuilt);
        }
        raise_memlock_limit();
        let ebpf = EbpfLoader::new()
            .override_global("MESH_DAEMON_MARK", &mark, true)
            .load(OBJECT)
            .map_err(RedirectError::Load)?;
        if mark != DAEMON_MARK {
            debug!(
                mark,
                "kernel programs loaded with a non-default daemon mark"
            );
        }
        Ok(Self { ebpf })
    }

    /// Names of the programs in the object.
    pub fn program_names(&self) -> impl Iterator<Item = &str> {
        self.ebpf.programs().map(|(name, _)| name)
    }

    /// Loads and attaches `connect4`/`connect6` to the cgroup v2 directory `cgroup`.
    ///
    /// On kernels >= 5.7 aya attaches through a BPF link, and cgroup links always join the
    /// cgroup's multi-program list (the kernel rejects the `BPF_F_ALLOW_MULTI` flag on
    /// `BPF_LINK_CREATE`, hence `Single` here): other `sock_addr` programs on the same cgroup, such
    /// as a CNI's socket load balancer, keep running, in attach order.
    pub fn attach_connect(&mut self, cgroup: &Path) -> Result<(), RedirectError> {
        let dir = File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        for name in CONNECT_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(RedirectError::MissingProgram { name })?
                .try_into()
                .map_err(|source| RedirectError::Program { name, source })?;
            program
                .load()
                .map_err(|source| RedirectError::Program { name, source })?;
            program
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| RedirectError::Program { name, source })?;
        }
        Ok(())
    }

    /// Marks the network namespace with `cookie` as enrolled.
    pub fn enroll_netns(&mut self, cookie: u64, info: NetnsInfo) -> Result<(), RedirectError> {
        self.enrolled_map()?
            .insert(cookie, info, 0)
            .map_err(|source| RedirectError::Map {
                name: MAP_ENROLLED_NETNS,
                source,
            })
    }

    /// Removes the network namespace with `cookie` from the enrolled set (absent is fine).
    pub fn unenroll_netns(&mut self, cookie: u64) -> Result<(), RedirectError> {
        match self.enrolled_map()?.remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map {
                name: MAP_ENROLLED_NETNS,
                source,
            }),
        }
    }

    /// Reads the per-CPU counters and sums them.
    pub fn counters(&self) -> Result<CounterSnapshot, RedirectError> {
        let name = MAP_COUNTERS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(RedirectError::MissingMap { name })?;
        let counters = PerCpuArray::<_, u64>::try_from(map)
            .map_err(|source| RedirectError::Map { name, source })?;
        let mut snapshot = CounterSnapshot::default();
        for counter in Counter::ALL {
            let per_cpu = counters
                .get(&(counter as u32), 0)
                .map_err(|source| RedirectError::Map { name, source })?;
            snapshot.0[counter as usize] = per_cpu.iter().sum();
        }
        Ok(snapshot)
    }

    fn enrolled_map(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, u64, NetnsInfo>, RedirectError> {
        let name = MAP_ENROLLED_NETNS;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(RedirectError::MissingMap { name })?;
        HashMap::try_from(map).map_err(|source| RedirectError::Map { name, source })
    }
}

/// Kernels before 5.11 charge BPF memory to `RLIMIT_MEMLOCK`; newer ones use memcg accounting.
/// Raising the limit needs `CAP_SYS_RESOURCE`, which the daemon may lack: warn, don't fail.
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
    fn snapshot_names_follow_counter_order() {
        let mut s = CounterSnapshot::default();
        s.0[Counter::ConnectMarked as usize] = 7;
        let names: Vec<_> = s.iter().collect();
        assert_eq!(names.len(), Counter::ALL.len());
        assert_eq!(names[2], ("connect_marked", 7));
        assert_eq!(s.get(Counter::ConnectEnrolled), 0);
    }
}
