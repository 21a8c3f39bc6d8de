//! Wiring: the one place that builds the daemon's parts from the configuration, runs them, and
//! shuts them down in order.

use std::path::{Path, PathBuf};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::Config,
    redirect::{Programs, RedirectError},
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("kernel redirection")]
    Redirect(#[from] RedirectError),
    #[error("no cgroup v2 hierarchy found (looked at {tried:?}); set `redirect.cgroup`")]
    NoCgroup2 { tried: Vec<PathBuf> },
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("serializing the configuration")]
    Serialize(#[source] serde_json::Error),
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), AppError> {
    let effective = serde_json::to_string(&config).map_err(AppError::Serialize)?;
    info!(config = %effective, version = env!("CARGO_PKG_VERSION"), "mesh-node starting");

    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;

    let cgroup = match &config.redirect.cgroup {
        Some(dir) => dir.clone(),
        None => cgroup2_root()?,
    };
    let mut programs = Programs::load(config.redirect.mark)?;
    programs.attach_connect(&cgroup)?;
    let names: Vec<&str> = programs.program_names().collect();
    info!(node = %config.node, cgroup = %cgroup.display(), programs = ?names, "kernel programs attached; ready");

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    info!(signal, "shutting down");
    match programs.counters() {
        Ok(counters) => {
            let counters: Vec<_> = counters.iter().collect();
            info!(?counters, "kernel counters at shutdown");
        }
        Err(error) => warn!(error = %error, "could not read kernel counters"),
    }
    drop(programs);
    info!("kernel programs detached; stopped");
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
fn cgroup2_root() -> Result<PathBuf, AppError> {
    let candidates = [
        Path::new("/sys/fs/cgroup"),
        Path::new("/sys/fs/cgroup/unified"),
    ];
    candidates
        .iter()
        .find(|dir| dir.join("cgroup.controllers").exists())
        .map(|dir| dir.to_path_buf())
        .ok_or_else(|| AppError::NoCgroup2 {
            tried: candidates.iter().map(|p| p.to_path_buf()).collect(),
        })
}
