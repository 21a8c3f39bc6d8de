//! cgroup v2 directories of a testbed, and the bpffs mount.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Mount points where a cgroup v2 hierarchy may live (unified hosts, then hybrid hosts).
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// The cgroup v2 mount point.
pub fn root() -> anyhow::Result<PathBuf> {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("cgroup.controllers").exists())
        .with_context(|| format!("no cgroup v2 hierarchy at {CGROUP2_CANDIDATES:?}"))
}

pub fn create(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

/// Kills every process in the cgroup subtree (`cgroup.kill`, Linux 5.14) and waits until the
/// subtree is empty (at most 5 s).
pub fn kill_all(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.kill"), "1")
        .with_context(|| format!("writing {}/cgroup.kill", dir.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l == "populated 0") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes still alive in {} after 5 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes a cgroup directory and its descendants (deepest first).
pub fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

/// Makes sure `/sys/fs/bpf` is a bpffs mount (systemd mounts it on most distributions; some
/// minimal machines do not).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    const BPFFS: &str = "/sys/fs/bpf";
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let stat = nix::sys::statfs::statfs(BPFFS).with_context(|| format!("statfs {BPFFS}"))?;
    if stat.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {BPFFS}"))
}
