//! The file state source: the configuration file's `workloads` and `policies`, re-read when the
//! file changes.
//!
//! The file is polled (every 250 ms by default): cheap for one small file, and robust to the
//! ways editors and Kubernetes `ConfigMap`s replace files (rename, symlink swap), which inotify
//! watches lose. A change that does not parse is logged with the field and line, and the last
//! good state stays in force.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{error, info};

use super::MeshState;
use crate::config::{Config, Origin};

/// What identifies a version of the file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

#[must_use = "dropping the handle does not stop the watcher; keep it to abort it"]
/// Watches `path` and publishes its workloads on `tx` whenever a changed file parses.
pub fn spawn_watcher(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<MeshState>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let origin = Origin::File(path.clone());
        let mut last = stamp(&path);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let now = stamp(&path);
            if now == last {
                continue;
            }
            last = now;
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    error!(file = %path.display(), error = %e, "cannot read the configuration; keeping the last good state");
                    continue;
                }
            };
            match Config::parse(&text, &origin).map(|c| MeshState::from_config(&c)) {
                Ok(Ok(state)) => {
                    info!(
                        file = %path.display(),
                        workloads = state.workloads.len(),
                        policies = state.policies.authorization_policies(),
                        "configuration reloaded"
                    );
                    tx.send_replace(Arc::new(state));
                }
                Ok(Err(e)) => {
                    error!(error = %e, "rejected configuration change; keeping the last good state");
                }
                Err(e) => {
                    error!(error = %e, "rejected configuration change; keeping the last good state");
                }
            }
        }
    })
}
