//! The state sources as the configuration chooses them: the file alone, the Kubernetes API
//! or istiod, each fed the file's state, publishing on one channel of states.

use std::sync::Arc;

use tokio::sync::watch;

use super::{AppError, WATCH_INTERVAL};
use crate::{
    config::Config,
    metrics::Metrics,
    state::{self, MeshState},
};

type Sources = (
    Vec<tokio::task::JoinHandle<()>>,
    watch::Receiver<Arc<MeshState>>,
);

/// Starts the state sources: the file watcher, and with `kubernetes.enabled` the Kubernetes
/// source, which merges the file's state into the cluster's. Returns their tasks and the
/// channel of states (the first one is pending until the cluster's state is synced).
pub(super) async fn start_sources(
    config: &Config,
    cgroup: &std::path::Path,
    from_file: MeshState,
    config_file: Option<state::file::Watched>,
    metrics: &Metrics,
) -> Result<Sources, AppError> {
    let reloads = metrics.config_reloads.clone();
    let watch_file = move |file, tx| state::file::spawn_watcher(file, WATCH_INTERVAL, tx, reloads);
    if config.istio.enabled {
        return Ok(start_istio(
            config,
            cgroup,
            config_file,
            from_file,
            watch_file,
        ));
    }
    if !config.kubernetes.enabled {
        let (tx, states) = watch::channel(Arc::new(from_file));
        let watcher = config_file.map(|file| watch_file(file, tx));
        return Ok((watcher.into_iter().collect(), states));
    }
    crate::redirect::set_proc_root(config.kubernetes.proc_root.clone());
    start_kube(config, config_file, from_file, watch_file).await
}

/// What a source publishes before its first complete state: nothing of the cluster's, the
/// file's policies and traffic, and why.
fn pending_state(from_file: &MeshState, config: &Config, why: &str) -> MeshState {
    MeshState {
        workloads: Vec::new(),
        services: Vec::new(),
        policies: Arc::clone(&from_file.policies),
        traffic: Arc::clone(&from_file.traffic),
        networks: from_file.networks.clone(),
        zone: config.zone.clone(),
        pending: Some(why.to_owned()),
    }
}

/// The xDS source (istiod), fed the file's state.
fn start_istio(
    config: &Config,
    cgroup: &std::path::Path,
    config_file: Option<state::file::Watched>,
    from_file: MeshState,
    watch_file: impl FnOnce(
        state::file::Watched,
        watch::Sender<Arc<MeshState>>,
    ) -> tokio::task::JoinHandle<()>,
) -> Sources {
    let pending = pending_state(&from_file, config, "waiting for istiod's first push");
    let (file_tx, file_rx) = watch::channel(Arc::new(from_file));
    let (tx, states) = watch::channel(Arc::new(pending));
    let settings = crate::istio::xds::XdsSettings {
        config: config.istio.clone(),
        node: config.node.clone(),
        trust_domain: config.identity.trust_domain.clone(),
        root_namespace: config.root_namespace.clone(),
        zone: config.zone.clone(),
        cgroup: crate::istio::netns::cgroup_scope(cgroup),
    };
    let mut tasks = vec![crate::istio::xds::spawn(settings, file_rx, tx)];
    tasks.extend(config_file.map(|file| watch_file(file, file_tx)));
    (tasks, states)
}

#[cfg(not(feature = "kubernetes"))]
#[allow(
    clippy::unused_async,
    reason = "the signature of the Kubernetes variant"
)]
async fn start_kube(
    _config: &Config,
    _config_file: Option<state::file::Watched>,
    _from_file: MeshState,
    _watch_file: impl FnOnce(
        state::file::Watched,
        watch::Sender<Arc<MeshState>>,
    ) -> tokio::task::JoinHandle<()>,
) -> Result<Sources, AppError> {
    Err(AppError::NoKubernetes)
}

/// The Kubernetes source, fed the file's state.
#[cfg(feature = "kubernetes")]
async fn start_kube(
    config: &Config,
    config_file: Option<state::file::Watched>,
    from_file: MeshState,
    watch_file: impl FnOnce(
        state::file::Watched,
        watch::Sender<Arc<MeshState>>,
    ) -> tokio::task::JoinHandle<()>,
) -> Result<Sources, AppError> {
    let client = state::kube::client(&config.kubernetes)
        .await
        .map_err(AppError::Kube)?;
    let pending = pending_state(
        &from_file,
        config,
        "waiting for the initial sync with the Kubernetes API",
    );
    let (file_tx, file_rx) = watch::channel(Arc::new(from_file));
    let (tx, states) = watch::channel(Arc::new(pending));
    let mut tasks = vec![state::kube::spawn(
        client,
        config.kubernetes.clone(),
        config.node.clone(),
        config.root_namespace.clone(),
        config.zone.clone(),
        file_rx,
        tx,
    )];
    tasks.extend(config_file.map(|file| watch_file(file, file_tx)));
    Ok((tasks, states))
}
