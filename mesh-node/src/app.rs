//! Wiring: the one place that builds the daemon's parts from the configuration, runs them, and
//! shuts them down in order.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::{
    PORT_ADMIN, PORT_INBOUND_HBONE, PORT_INBOUND_PLAINTEXT, PORT_METRICS, PORT_OUTBOUND,
    PORT_READINESS,
};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tracing::{info, warn};

mod gateway;
mod sources;

use sources::start_sources;

use crate::{
    admin::{self, AdminState, Readiness},
    config::Config,
    hbone::Liveness,
    identity::{CaError, CertManager, CertSource, LocalCa},
    inpod::InPod,
    logging::LogHandle,
    metrics::{Metrics, NodeCollector},
    proxy::{Descriptors, MaxConnections, MeshTls, Proxy, ProxyOptions},
    redirect::{Attachment, LoadOptions, PodPorts, Programs, RedirectError, Succession},
    state::{self, MeshState},
    tls,
};

/// How often the configuration file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How often enrollments that failed are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How often the kernel state of the enrolled pods is checked (and restored).
const AUDIT_INTERVAL: Duration = Duration::from_millis(500);

/// A timer firing every `period`, first after one period. A tick missed while the daemon was
/// busy (or while the timer's branch was disabled) is not made up for: the next one comes a
/// period later, never a burst of catch-up ticks.
fn periodic(period: Duration) -> tokio::time::Interval {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("kernel redirection")]
    Redirect(#[from] RedirectError),
    #[error("no cgroup v2 hierarchy found (looked at {tried:?}); set `redirect.cgroup`")]
    NoCgroup2 { tried: Vec<PathBuf> },
    #[error("loading the CA (create a development CA with `mesh-node ca init --dir DIR`)")]
    Ca(#[source] CaError),
    #[error("listening on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("claiming this daemon's generation under {path}")]
    Succession {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("serving the gateway on {address}")]
    Gateway {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serializing the configuration")]
    Serialize(#[source] serde_json::Error),
    #[cfg(feature = "kubernetes")]
    #[error("Kubernetes state source")]
    Kube(#[source] state::kube::KubeError),
    #[cfg(not(feature = "kubernetes"))]
    #[error(
        "`kubernetes.enabled` is set, but this mesh-node was built without the `kubernetes` feature"
    )]
    NoKubernetes,
}

/// Runs the daemon with `document`'s settings and state until SIGINT or SIGTERM.
/// `config_file` is watched for changes of its workloads, services and policies.
pub async fn run(
    document: state::file::Document,
    config_file: Option<state::file::Watched>,
    log: LogHandle,
) -> Result<(), AppError> {
    let state::file::Document {
        config,
        state: from_file,
    } = document;
    let effective = serde_json::to_string(&config).map_err(AppError::Serialize)?;
    info!(
        config = %effective,
        workloads = from_file.workloads.len(),
        services = from_file.services.len(),
        policies = from_file.policies.documents().len(),
        version = env!("CARGO_PKG_VERSION"),
        "mesh-node starting"
    );

    let started = Started::new(&config)?;
    if config.gateway.enabled {
        return gateway::run(config, from_file, config_file, log, started).await;
    }
    let Started {
        ca,
        readiness,
        readiness_server,
        mut sigterm,
        mut sigint,
    } = started;

    let cgroup = match &config.redirect.cgroup {
        Some(dir) => dir.clone(),
        None => cgroup2_root()?,
    };
    let mut programs = Programs::load(&LoadOptions {
        bpffs: config.redirect.bpffs.clone(),
        mark: config.redirect.mark,
        outbound_port: PORT_OUTBOUND,
        hbone_port: PORT_INBOUND_HBONE,
    })?;
    programs.set_exclusions(
        &config.redirect.exclude_cidrs,
        &config.redirect.exclude_ports,
    )?;
    let succession =
        Succession::claim(&config.redirect.bpffs).map_err(|source| AppError::Succession {
            path: config.redirect.bpffs.clone(),
            source,
        })?;
    let attachment = programs.attach_cgroup(&cgroup)?;
    let orig_dst = programs.take_orig_dst_table()?;
    let (proxy, metrics, admin_state, _endpoints) = build_proxy(&config, ca, log)?;
    let mut inpod = InPod::new(
        config.node.clone(),
        programs,
        succession,
        Arc::new(orig_dst),
        Arc::clone(&proxy),
        config.redirect.mark,
        PodPorts {
            outbound: PORT_OUTBOUND,
            inbound: PORT_INBOUND_PLAINTEXT,
            hbone: PORT_INBOUND_HBONE,
        },
    );

    let (_sources, mut states) =
        start_sources(&config, &cgroup, from_file, config_file, &metrics).await?;
    let mut warned = HashSet::new();
    let observers = Observers {
        metrics: &metrics,
        readiness: &readiness,
        admin: &admin_state,
    };
    let current = Arc::clone(&states.borrow_and_update());
    apply(&mut inpod, &proxy, &current, &mut warned, &observers);
    info!(
        node = %config.node,
        cgroup = %cgroup.display(),
        adopted = attachment == Attachment::Adopted,
        enrolled = inpod.enrolled(),
        failed = ?inpod.failed(),
        pending = current.pending.as_deref().unwrap_or(""),
        "ready"
    );

    let _trim = tokio::spawn(release_idle_memory(Arc::clone(&proxy)));
    let fds = Arc::clone(&proxy);
    let _fds = tokio::spawn(async move { fds.watch_descriptors().await });
    let signal = serve_until_signal(
        &mut inpod,
        &proxy,
        &mut states,
        &mut warned,
        &observers,
        (&mut sigterm, &mut sigint),
    )
    .await;
    info!(signal, "shutting down");
    // A successor (upgrade) shares 15021: from now on only it answers readiness probes.
    readiness_server.abort();
    shutdown(
        &mut inpod,
        &proxy,
        &readiness,
        Duration::from_millis(config.proxy.drain_timeout_ms),
    )
    .await;
    Ok(())
}

/// What every role starts with, before it serves anything: the signal handlers, the
/// certificate source, and the readiness endpoint (answering 503 until the role is ready).
struct Started {
    ca: Arc<dyn CertSource>,
    readiness: Arc<Readiness>,
    readiness_server: tokio::task::JoinHandle<()>,
    sigterm: Signal,
    sigint: Signal,
}

impl Started {
    fn new(config: &Config) -> Result<Self, AppError> {
        Descriptors::raise_limit();
        let sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
        let sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;
        // Before anything listens or touches the kernel: a bad CA (or, with istiod, an
        // unreadable root file) fails the start at once.
        let ca = cert_source(config).map_err(AppError::Ca)?;
        // Readiness answers 503 until the state is loaded, the programs attached and every
        // enrolled pod served (a gateway: its state synced and its certificate issued).
        let readiness = Arc::new(Readiness::default());
        readiness.set(false, "starting");
        let ready_addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT_READINESS));
        let readiness_server =
            admin::spawn_readiness(ready_addr, Arc::clone(&readiness)).map_err(|e| {
                AppError::Listen {
                    address: ready_addr,
                    source: e,
                }
            })?;
        Ok(Self {
            ca,
            readiness,
            readiness_server,
            sigterm,
            sigint,
        })
    }
}

/// The proxy, its metrics and admin state, and the tasks serving them.
type Built = (Arc<Proxy>, Arc<Metrics>, Arc<AdminState>, Endpoints);

/// The proxy with its certificates from `ca`, and the observability endpoints serving its
/// metrics and admin API.
fn build_proxy(
    config: &Config,
    ca: Arc<dyn CertSource>,
    log: LogHandle,
) -> Result<Built, AppError> {
    let provider = tls::provider();
    // Libraries that build TLS configurations without naming a provider (the Kubernetes
    // client) use the process default: the same one.
    let _ = rustls::crypto::CryptoProvider::install_default(rustls::crypto::CryptoProvider::clone(
        &provider,
    ));
    let certs = CertManager::new(
        ca,
        Duration::from_secs(config.identity.cert_lifetime_seconds),
        Arc::clone(&provider),
    );
    let (metrics, admin_state, endpoints) = serve_observability(config, &certs, log)?;
    let proxy = Arc::new(Proxy::new(
        proxy_options(config, &metrics),
        MeshTls::new(config.identity.trust_domain.clone(), certs, provider)
            .with_aliases(&config.identity.trust_domain_aliases),
    ));
    Ok((proxy, metrics, admin_state, endpoints))
}

/// Serves until SIGTERM or SIGINT (returns which): applies each new state, retries failed
/// enrollments, and audits the kernel state of the enrolled pods.
async fn serve_until_signal(
    inpod: &mut InPod,
    proxy: &Proxy,
    states: &mut watch::Receiver<Arc<MeshState>>,
    warned: &mut HashSet<(String, String)>,
    observers: &Observers<'_>,
    (sigterm, sigint): (&mut Signal, &mut Signal),
) -> &'static str {
    let mut retry = periodic(RETRY_INTERVAL);
    let mut audit = periodic(AUDIT_INTERVAL);
    loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            changed = states.changed() => {
                if changed.is_ok() {
                    let current = Arc::clone(&states.borrow_and_update());
                    apply(inpod, proxy, &current, warned, observers);
                }
            }
            _ = retry.tick(), if !inpod.failed().is_empty() => {
                let current = Arc::clone(&states.borrow());
                apply(inpod, proxy, &current, warned, observers);
            }
            _ = audit.tick() => {
                if states.borrow().pending.is_none() {
                    let found = inpod.audit();
                    report_audit(inpod, &found, observers);
                }
            }
        }
    }
}

/// The state sources' tasks and the channel of states they publish.
/// istiod's CA in the `istio:` mode, else the local CA.
fn cert_source(config: &Config) -> Result<Arc<dyn CertSource>, CaError> {
    let source: Arc<dyn CertSource> = if config.istio.enabled {
        Arc::new(crate::istio::ca::IstioCa::new(&config.istio)?)
    } else {
        Arc::new(LocalCa::load(
            &config.identity.ca_cert_file,
            &config.identity.ca_key_file,
        )?)
    };
    if config.identity.trust_bundle_files.is_empty() {
        return Ok(source);
    }
    Ok(Arc::new(crate::identity::TrustBundle::new(
        source,
        &config.identity.trust_bundle_files,
    )?))
}

/// The proxy's settings from the configuration.
fn proxy_options(config: &Config, metrics: &Arc<Metrics>) -> ProxyOptions {
    let proxy = &config.proxy;
    ProxyOptions {
        metrics: Arc::clone(metrics),
        node: config.node.clone(),
        network: config.network.clone(),
        handshake_timeout: Duration::from_millis(proxy.handshake_timeout_ms),
        max_connections: MaxConnections {
            total: proxy.max_connections,
            per_workload: proxy.max_connections_per_workload,
            per_source: proxy.max_connections_per_source,
        },
        liveness: Liveness {
            ping_interval: Duration::from_millis(proxy.ping_interval_ms),
            ping_timeout: Duration::from_millis(proxy.ping_timeout_ms),
            idle_timeout: Duration::from_millis(proxy.hbone_idle_timeout_ms),
            tcp_keepalive_time: Duration::from_millis(proxy.tcp_keepalive_time_ms),
            tcp_keepalive_interval: Duration::from_millis(proxy.tcp_keepalive_interval_ms),
            tcp_user_timeout: Duration::from_millis(proxy.tcp_user_timeout_ms),
        },
        connect_timeout: Duration::from_millis(proxy.connect_timeout_ms),
        reserved_ports: [PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_INBOUND_HBONE],
    }
}

/// Stops accepting, drains open connections, and leaves the kernel state pinned.
async fn shutdown(inpod: &mut InPod, proxy: &Proxy, readiness: &Readiness, deadline: Duration) {
    match inpod.programs().counters() {
        Ok(counters) => {
            let counters: Vec<_> = counters.iter().collect();
            info!(?counters, "kernel counters at shutdown");
        }
        Err(error) => warn!(error = %error, "could not read kernel counters"),
    }
    // Stop accepting (a new daemon, if any, takes the new connections: the listeners share
    // their ports and the kernel migrates queued connections), then let open ones finish.
    proxy.start_draining();
    inpod.stop_serving();
    readiness.set(false, "draining");
    drain(proxy, deadline).await;
    info!(
        "stopped; kernel programs stay pinned (enrolled pods fail closed until a daemon runs \
         again; `mesh-node cleanup` removes them)"
    );
}

/// Gives memory freed by finished connections back to the system: glibc keeps freed heap pages
/// for reuse, so after a burst (or an attack) the daemon's RSS would stay at its peak. Runs
/// `malloc_trim` every 5 s when fewer connections are open than at the previous check.
async fn release_idle_memory(proxy: Arc<Proxy>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut last = 0;
    loop {
        ticker.tick().await;
        let now = proxy.active();
        if now < last || (now == 0 && last == 0) {
            // SAFETY: malloc_trim only releases free memory; no pointer is involved.
            unsafe { libc::malloc_trim(0) };
        }
        last = now;
    }
}

/// Waits until no connection is being handled, at most `deadline`.
async fn drain(proxy: &Proxy, deadline: Duration) {
    let started = std::time::Instant::now();
    let open = proxy.active();
    if open > 0 {
        info!(
            open,
            deadline_ms = deadline.as_millis(),
            "draining open connections"
        );
    }
    while proxy.active() > 0 && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = proxy.active();
    if left > 0 {
        warn!(
            left,
            "drain deadline reached; closing the remaining connections"
        );
    } else if open > 0 {
        info!(
            drained = open,
            elapsed_ms = started.elapsed().as_millis(),
            "all connections finished"
        );
    }
}

/// The tasks serving `/metrics` and the admin API.
type Endpoints = [tokio::task::JoinHandle<()>; 2];

/// The metrics registry, the admin state, and the tasks serving them.
type Observability = (Arc<Metrics>, Arc<AdminState>, Endpoints);

/// Starts `/metrics` (`metrics.bindAddress`, 15020) and the admin API (127.0.0.1:15000).
fn serve_observability(
    config: &Config,
    certs: &CertManager,
    log: LogHandle,
) -> Result<Observability, AppError> {
    // Workloads whose labels name no cluster are of this one (`source_cluster`, baggage).
    let metrics = Metrics::in_cluster(
        NodeCollector {
            bpffs: config.redirect.bpffs.clone(),
            certs: certs.clone(),
        },
        &config.istio.cluster_id,
    );
    let listen_err = |address| move |source| AppError::Listen { address, source };
    let metrics_addr = SocketAddr::new(config.metrics.bind_address, PORT_METRICS);
    let metrics_server = admin::spawn_metrics(metrics_addr, Arc::clone(&metrics))
        .map_err(listen_err(metrics_addr))?;
    let admin_state = Arc::new(AdminState {
        config: serde_json::to_value(config).map_err(AppError::Serialize)?,
        state: std::sync::RwLock::new(serde_json::Value::Null),
        certs: certs.clone(),
        bpffs: config.redirect.bpffs.clone(),
        log,
    });
    let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT_ADMIN));
    let admin_server =
        admin::spawn_admin(admin_addr, Arc::clone(&admin_state)).map_err(listen_err(admin_addr))?;
    Ok((metrics, admin_state, [metrics_server, admin_server]))
}

/// What reports on the daemon's state.
struct Observers<'a> {
    metrics: &'a Metrics,
    readiness: &'a Readiness,
    admin: &'a AdminState,
}

/// Applies a new state: enrollments, then the policies (which re-decides open connections),
/// then readiness, metrics and the admin dump. Policies the node enforces differently from
/// what they say (attributes it cannot see) are reported once each.
fn apply(
    inpod: &mut InPod,
    proxy: &Proxy,
    state: &MeshState,
    warned: &mut HashSet<(String, String)>,
    observers: &Observers<'_>,
) {
    if let Some(reason) = &state.pending {
        // Enrolling or unenrolling on a partial state would undo a previous daemon's
        // enrollments (pods fail closed meanwhile, as while no daemon runs).
        observers.readiness.set(false, reason);
        return;
    }
    inpod.reconcile(&state.workloads);
    proxy.set_services(state, inpod.node());
    warn_notes(state, warned);
    let enrolled = i64::try_from(inpod.enrolled()).unwrap_or(i64::MAX);
    observers.metrics.enrolled_workloads.set(enrolled);
    let found = inpod.audit();
    report_audit(inpod, &found, observers);
    *observers
        .admin
        .state
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = serde_json::json!({
        "workloads": state.workloads,
        "services": state.services,
        "policies": state.policies.documents(),
        "traffic": state.traffic.documents(),
        "enrolled": inpod.enrolled_pods(),
        "failed": inpod.failed(),
    });
    proxy.set_policies(Arc::clone(&state.policies));
}

/// Reports, once each, the traffic rules and policies the daemon applies differently from
/// what they say (attributes it cannot see).
fn warn_notes(state: &MeshState, warned: &mut HashSet<(String, String)>) {
    for (document, note) in state.traffic.notes() {
        if warned.insert((document.clone(), note.clone())) {
            warn!(document = %document, note = %note, "traffic rule is applied at the node as noted");
        }
    }
    for (policy, note) in state.policies.notes() {
        if warned.insert((policy.clone(), note.clone())) {
            warn!(policy = %policy, note = %note, "policy is enforced at the node as noted");
        }
    }
}

/// Readiness from the enrollments and the last kernel-state audit: ready when every enrolled
/// pod is served and its kernel state is in place (or a newer daemon owns it).
fn report_audit(inpod: &InPod, audit: &crate::inpod::Audit, observers: &Observers<'_>) {
    for (_, what) in &audit.repaired {
        observers
            .metrics
            .kernel_repairs
            .get_or_create(&crate::metrics::StateLabels { state: what })
            .inc();
    }
    if !inpod.failed().is_empty() {
        observers.readiness.set(
            false,
            &format!("not ready: enrollment failed for {:?}", inpod.failed()),
        );
    } else if !audit.broken.is_empty() {
        observers.readiness.set(
            false,
            &format!("not ready: kernel state missing for {:?}", audit.broken),
        );
    } else {
        observers.readiness.set(
            true,
            &format!("ready: {} workloads enrolled", inpod.enrolled()),
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A timer whose branch was disabled for a long time fires once when enabled again, not
    /// once per missed period (seen: 76 retries in 311 ms after six minutes).
    #[tokio::test(start_paused = true)]
    async fn periodic_timers_do_not_catch_up_on_missed_ticks() {
        let mut timer = periodic(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_mins(6)).await;
        let mut fired = 0;
        let window = tokio::time::sleep(Duration::from_millis(311));
        tokio::pin!(window);
        loop {
            tokio::select! {
                biased;
                () = &mut window => break,
                _ = timer.tick() => fired += 1,
            }
        }
        assert_eq!(fired, 1, "one tick after the pause, then one per period");
    }
}
