//! The east-west gateway role (`gateway.enabled`): the same daemon without kernel programs or
//! enrolled workloads. It serves HBONE on `gateway.listen` with the gateway's identity, runs
//! the state sources for the services, workloads and policies it forwards by, and the usual
//! admin, readiness and metrics endpoints; it is ready when its state is synced and its
//! certificate issued, and drains on SIGTERM as the node proxy does.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, PoisonError},
    time::Duration,
};

use tracing::info;

use super::{
    AppError, Observers, Started, build_proxy, drain, periodic, start_sources, warn_notes,
};
use crate::{
    config::Config,
    identity::Identity,
    logging::LogHandle,
    proxy::Proxy,
    state::{self, MeshState},
    workload::Workload,
};

/// How often readiness looks for the gateway's certificate until it is there.
const CERT_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The gateway as a workload: what its policies select and its identity is made of.
#[must_use]
pub(super) fn gateway_workload(config: &Config) -> Workload {
    let gateway = &config.gateway;
    Workload {
        name: gateway.name.clone(),
        namespace: gateway.namespace.clone(),
        service_account: gateway.service_account.clone(),
        labels: gateway.labels.clone(),
        ips: Vec::new(),
        node: config.node.clone(),
        netns: None,
        // Nothing of it is captured: it is a proxy, not an application.
        enrolled: false,
        network: config.network.clone(),
        trust_domain: None,
    }
}

/// Runs the gateway until SIGINT or SIGTERM.
pub(super) async fn run(
    config: Config,
    from_file: MeshState,
    config_file: Option<state::file::Watched>,
    log: LogHandle,
    started: Started,
) -> Result<(), AppError> {
    let Started {
        ca,
        readiness,
        readiness_server,
        mut sigterm,
        mut sigint,
    } = started;
    let (proxy, metrics, admin_state, _endpoints) = build_proxy(&config, ca, log)?;
    let address = config.gateway.listen;
    let listen_err = |source| AppError::Gateway { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(listen_err)?;
    let serving = proxy
        .serve_gateway(gateway_workload(&config), listener)
        .map_err(listen_err)?;
    let identity = serving.identity().clone();
    // The istio: source scopes its workloads by the cgroup; a gateway has no programs there.
    let cgroup = config
        .redirect
        .cgroup
        .clone()
        .or_else(|| super::cgroup2_root().ok())
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
    let (_sources, mut states) =
        start_sources(&config, &cgroup, from_file, config_file, &metrics).await?;
    let observers = Observers {
        metrics: &metrics,
        readiness: &readiness,
        admin: &admin_state,
    };
    let mut warned = HashSet::new();
    let current = Arc::clone(&states.borrow_and_update());
    apply(
        &proxy,
        &config,
        &current,
        &identity,
        &mut warned,
        &observers,
    );
    info!(
        listen = %serving.local_addr(),
        identity = %identity,
        network = %config.network,
        pending = current.pending.as_deref().unwrap_or(""),
        "gateway serving"
    );
    let _trim = tokio::spawn(super::release_idle_memory(Arc::clone(&proxy)));
    let fds = Arc::clone(&proxy);
    let _fds = tokio::spawn(async move { fds.watch_descriptors().await });
    let mut cert_check = periodic(CERT_CHECK_INTERVAL);
    let signal = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            changed = states.changed() => {
                if changed.is_ok() {
                    let current = Arc::clone(&states.borrow_and_update());
                    apply(&proxy, &config, &current, &identity, &mut warned, &observers);
                }
            }
            _ = cert_check.tick() => {
                let current = Arc::clone(&states.borrow());
                report_ready(&proxy, &current, &identity, &observers);
            }
        }
    };
    info!(signal, "shutting down");
    // A successor (upgrade) shares 15021: from now on only it answers readiness probes.
    readiness_server.abort();
    // Open HBONE connections get a GOAWAY, open streams run to completion.
    proxy.start_draining();
    drop(serving);
    readiness.set(false, "draining");
    drain(&proxy, Duration::from_millis(config.proxy.drain_timeout_ms)).await;
    info!("gateway stopped");
    Ok(())
}

/// Applies a new state: the workloads, services and policies the gateway forwards by, then
/// readiness and the admin dump. A pending (partial) state changes nothing.
fn apply(
    proxy: &Proxy,
    config: &Config,
    state: &MeshState,
    identity: &Identity,
    warned: &mut HashSet<(String, String)>,
    observers: &Observers<'_>,
) {
    if let Some(reason) = &state.pending {
        observers.readiness.set(false, reason);
        return;
    }
    proxy.set_workloads(&state.workloads);
    proxy.set_services(state, &config.node);
    warn_notes(state, warned);
    proxy.set_policies(Arc::clone(&state.policies));
    *observers
        .admin
        .state
        .write()
        .unwrap_or_else(PoisonError::into_inner) = serde_json::json!({
        "workloads": state.workloads,
        "services": state.services,
        "policies": state.policies.documents(),
        "traffic": state.traffic.documents(),
        "networks": state.networks,
        "gateway": {
            "identity": identity.to_string(),
            "listen": config.gateway.listen,
            "network": config.network,
        },
    });
    report_ready(proxy, state, identity, observers);
}

/// Ready when the state is synced and the gateway's certificate is issued.
fn report_ready(proxy: &Proxy, state: &MeshState, identity: &Identity, observers: &Observers<'_>) {
    if let Some(reason) = &state.pending {
        observers.readiness.set(false, reason);
    } else if proxy.certs().current(identity).is_none() {
        observers.readiness.set(
            false,
            &format!("not ready: no certificate for {identity} yet"),
        );
    } else {
        observers.readiness.set(
            true,
            &format!("ready: gateway serving {} services", state.services.len()),
        );
    }
}
