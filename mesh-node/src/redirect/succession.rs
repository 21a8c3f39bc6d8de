//! Which mesh-node of a node is the newest, across processes, containers and network
//! namespaces: during an upgrade two daemons serve the same node's pods for a while, and the
//! newest one owns the kernel state (an older one must neither undo nor overwrite it). When the
//! newest one goes away (a rollback: the upgrade's new daemon is stopped again), the older one
//! is the newest again and restores the kernel state it relies on.
//!
//! Each daemon claims a *generation* under the node's bpffs directory, `daemons/<n>` with `n`
//! one more than the highest present, and holds an exclusive `flock(2)` on that directory for
//! as long as it lives (the kernel drops the lock when the process dies, however it dies). A
//! daemon is superseded while a directory with a higher generation is locked. bpffs is shared
//! by every daemon of the node (it is where the pinned programs live), whatever its mount
//! namespace.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// This daemon's claim on a generation (released on drop).
#[derive(Debug)]
pub struct Succession {
    dir: PathBuf,
    generation: u64,
    _lock: Flock<File>,
}

/// Attempts to claim a generation before giving up (each attempt loses only to a daemon
/// starting at the same moment).
const CLAIM_ATTEMPTS: usize = 64;

impl Succession {
    /// Claims the next generation under `bpffs/daemons`, and removes the directories of dead
    /// older daemons.
    pub fn claim(bpffs: &Path) -> io::Result<Self> {
        let dir = bpffs.join("daemons");
        fs::create_dir_all(&dir)?;
        for _ in 0..CLAIM_ATTEMPTS {
            let generation = generations(&dir)?.into_iter().max().unwrap_or(0) + 1;
            let path = dir.join(generation.to_string());
            match fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            let file = match File::open(&path) {
                Ok(file) => file,
                // Removed by a daemon that found it unlocked (it was not locked yet).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            let this = Self {
                dir,
                generation,
                _lock: lock,
            };
            this.remove_dead();
            return Ok(this);
        }
        Err(io::Error::other(format!(
            "could not claim a generation under {} in {CLAIM_ATTEMPTS} attempts",
            dir.display()
        )))
    }

    /// This daemon's generation.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a newer daemon is alive on this node.
    #[must_use]
    pub fn superseded(&self) -> bool {
        generations(&self.dir).is_ok_and(|all| {
            all.into_iter()
                .filter(|g| *g > self.generation)
                .any(|g| alive(&self.dir.join(g.to_string())))
        })
    }

    /// Removes the directories of older daemons that are gone (newer ones may be starting:
    /// created but not locked yet).
    fn remove_dead(&self) {
        let Ok(all) = generations(&self.dir) else {
            return;
        };
        for g in all.into_iter().filter(|g| *g < self.generation) {
            let path = self.dir.join(g.to_string());
            if !alive(&path) {
                let _ = fs::remove_dir(&path);
            }
        }
    }
}

impl Drop for Succession {
    fn drop(&mut self) {
        let _ = fs::remove_dir(self.dir.join(self.generation.to_string()));
    }
}

/// Whether the daemon of the generation directory `path` holds its lock.
fn alive(path: &Path) -> bool {
    match File::open(path) {
        Ok(file) => matches!(
            Flock::lock(file, FlockArg::LockSharedNonblock),
            Err((_, nix::errno::Errno::EWOULDBLOCK))
        ),
        Err(_) => false,
    }
}

/// The generations present under `dir`.
fn generations(dir: &Path) -> io::Result<Vec<u64>> {
    Ok(fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mesh-succession-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn the_newest_claim_supersedes_older_ones_while_it_lives() {
        let dir = scratch();
        let first = Succession::claim(&dir).expect("first");
        assert!(!first.superseded(), "alone");
        let second = Succession::claim(&dir).expect("second");
        assert!(second.generation() > first.generation());
        assert!(first.superseded(), "a newer daemon runs");
        assert!(!second.superseded(), "an older one does not count");
        drop(second);
        assert!(!first.superseded(), "the newer daemon went away");
        // A dead daemon's directory (left by a crash) is not alive and is removed by the next.
        let leftover = dir
            .join("daemons")
            .join((first.generation() + 1).to_string());
        fs::create_dir(&leftover).expect("leftover");
        assert!(!first.superseded(), "an unlocked directory is not a daemon");
        let third = Succession::claim(&dir).expect("third");
        assert!(third.generation() > first.generation() + 1);
        assert!(
            !leftover.exists(),
            "the dead daemon's directory was removed"
        );
        assert!(first.superseded());
        drop((first, third));
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
