//! The L4 proxy: accept loops on each enrolled pod's listeners and the per-connection paths.
//!
//! - Outbound (15001): the kernel steered an application's `connect()` here; the original
//!   destination comes from the kernel's table. Destination an enrolled pod on another node →
//!   HBONE (mTLS) to `podIP:15008`, opened from inside the source pod's netns; on this node →
//!   the same-node path (no TLS: straight into the destination pod's netns); outside the mesh →
//!   plaintext passthrough from inside the source pod's netns.
//! - Inbound HBONE (15008 on each pod IP): see `hbone::server`.
//! - Inbound plaintext (15006): `sk_lookup` handed a connection for the pod here; admitted
//!   (PERMISSIVE) and forwarded to the application from inside the pod's netns.
//!
//! Every accepted connection is counted against the limits before anything else happens
//! (`limits`), and every socket gets TCP keepalive and a user timeout (`hbone::Liveness`).

mod admission;
mod descriptors;
mod forward;
mod inbound;
mod limits;
mod outbound;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError, RwLock, atomic::AtomicUsize},
    time::Duration,
};

pub use admission::{Admission, Admissions, Refusal};
pub use descriptors::{Budget, Descriptors, accept};
pub use limits::{Active, Limits, MaxConnections, Unit};
use rustls::crypto::CryptoProvider;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::{
    hbone::{self, InboundTarget, Liveness, Pool},
    identity::{CertManager, Identity},
    metrics::{Endpoint, Metrics},
    policy::PolicyStore,
    redirect::{EnrolledPod, NetnsWorker, OrigDstTable},
    state::{ServiceTable, Workload},
    tls,
};

/// Mesh identity settings shared by every connection.
pub struct MeshTls {
    pub trust_domain: String,
    pub certs: CertManager,
    pub provider: Arc<CryptoProvider>,
    client_configs: Mutex<HashMap<(Identity, Identity), Arc<rustls::ClientConfig>>>,
}

impl MeshTls {
    #[must_use]
    pub fn new(trust_domain: String, certs: CertManager, provider: Arc<CryptoProvider>) -> Self {
        Self {
            trust_domain,
            certs,
            provider,
            client_configs: Mutex::new(HashMap::new()),
        }
    }

    /// The SPIFFE identity of a workload.
    #[must_use]
    pub fn identity(&self, workload: &Workload) -> Identity {
        Identity::new(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        )
    }

    fn client_config(
        &self,
        source: &Identity,
        destination: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, tls::TlsError> {
        let key = (source.clone(), destination.clone());
        let mut configs = self
            .client_configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = configs.get(&key) {
            return Ok(Arc::clone(config));
        }
        let config = tls::client_config(
            &self.provider,
            &self.certs,
            source,
            destination,
            &self.certs.roots(),
        )?;
        configs.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

/// Settings and shared state of the proxy.
pub struct Proxy {
    node: String,
    mark: u32,
    orig_dst: OrigDstTable,
    connect_timeout: Duration,
    /// Ports a connection may never be forwarded to (the daemon's own listeners).
    reserved_ports: [u16; 3],
    mesh: MeshTls,
    pool: Pool,
    directory: RwLock<Directory>,
    services: RwLock<Arc<ServiceTable>>,
    policies: RwLock<Arc<PolicyStore>>,
    admissions: Arc<Admissions>,
    metrics: Arc<Metrics>,
    /// What is open, against the limits.
    limits: Arc<Limits>,
    /// Set when the daemon starts draining: HBONE servers send GOAWAY.
    draining: tokio::sync::watch::Sender<bool>,
    handshake_timeout: Duration,
    liveness: Liveness,
}

/// What the proxy knows about workloads: all of them by address, and the enrolled pods of this
/// node.
#[derive(Default)]
struct Directory {
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    local: HashMap<String, Arc<PodContext>>,
}

/// One enrolled pod as the proxy sees it.
pub struct PodContext {
    pub workload: Arc<Workload>,
    pub identity: Identity,
    pub worker: Arc<NetnsWorker>,
    /// Connections of this workload being handled (for the per-workload limit).
    pub active: Arc<AtomicUsize>,
}

/// The accept loops serving one pod; dropping it stops them, closes the listeners and releases
/// the pod's certificate.
pub struct PodServing {
    tasks: Vec<JoinHandle<()>>,
    proxy: Arc<Proxy>,
    ctx: Arc<PodContext>,
    /// The inbound capture listener (also held by its accept loop), for the kernel's map.
    inbound: Arc<TcpListener>,
}

impl PodServing {
    /// The inbound capture listener, to be (re)installed as the netns's capture socket.
    #[must_use]
    pub fn inbound_listener(&self) -> &TcpListener {
        &self.inbound
    }

    /// Makes the pod known to the rest of the proxy (the same-node path, policy re-checks), in
    /// place of a previous enrollment of the same workload. Done once its kernel state is in
    /// place.
    pub fn publish(&self) {
        self.proxy
            .directory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .local
            .insert(self.ctx.workload.uid(), Arc::clone(&self.ctx));
    }
}

impl Drop for PodServing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let mut directory = self
            .proxy
            .directory
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let uid = self.ctx.workload.uid();
        // A newer enrollment of the same workload (a replacement) may already be served.
        if directory
            .local
            .get(&uid)
            .is_some_and(|ctx| Arc::ptr_eq(ctx, &self.ctx))
        {
            directory.local.remove(&uid);
        }
        drop(directory);
        self.proxy.mesh.certs.release(&self.ctx.identity);
    }
}

/// Options of a [`Proxy`].
pub struct ProxyOptions {
    pub metrics: Arc<Metrics>,
    pub node: String,
    pub mark: u32,
    pub handshake_timeout: Duration,
    pub max_connections: MaxConnections,
    pub liveness: Liveness,
    pub connect_timeout: Duration,
    pub reserved_ports: [u16; 3],
}

impl Proxy {
    pub fn new(options: ProxyOptions, orig_dst: OrigDstTable, mesh: MeshTls) -> Self {
        Self {
            node: options.node,
            mark: options.mark,
            orig_dst,
            connect_timeout: options.connect_timeout,
            reserved_ports: options.reserved_ports,
            mesh,
            pool: Pool::new(Arc::clone(&options.metrics), options.liveness),
            directory: RwLock::new(Directory::default()),
            services: RwLock::new(Arc::new(ServiceTable::default())),
            policies: RwLock::new(Arc::new(PolicyStore::default())),
            admissions: Arc::new(Admissions::default()),
            limits: Arc::new(Limits::new(
                options.max_connections,
                Descriptors::new(),
                Arc::clone(&options.metrics),
            )),
            metrics: options.metrics,
            draining: tokio::sync::watch::Sender::new(false),
            handshake_timeout: options.handshake_timeout,
            liveness: options.liveness,
        }
    }

    /// How dead peers and idle connections are found.
    #[must_use]
    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// Measures the descriptor budget every second (the limit can change at run time, the
    /// descriptors held besides connections do), publishes it, and logs it when the limit
    /// changed. Runs until aborted.
    pub async fn watch_descriptors(&self) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let descriptors = self.limits.descriptors();
            if let Some(budget) = descriptors.refresh() {
                info!(
                    limit = budget.limit,
                    reserved = budget.reserved,
                    base = budget.base,
                    available = budget.available,
                    "file descriptor budget"
                );
            }
            descriptors.export(&self.metrics);
        }
    }

    /// Time a peer has to finish the TLS handshake on 15008.
    #[must_use]
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Counts a new `unit` of `pod` (from `source`, for connections into the pod) against the
    /// limits, unless one is reached: then it is logged and counted, and `None` says to refuse
    /// it.
    pub fn track(&self, unit: Unit, pod: &PodContext, source: Option<IpAddr>) -> Option<Active> {
        self.limits.admit(unit, &pod.workload, &pod.active, source)
    }

    /// Starts draining: HBONE connections get a graceful GOAWAY (peers open new streams on a
    /// fresh connection, which a new daemon accepts), open streams run to completion.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Fires when draining starts.
    #[must_use]
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Connections being proxied now.
    #[must_use]
    pub fn active(&self) -> usize {
        self.limits.proxied()
    }

    /// Starts the metrics record of an inbound HBONE stream to `pod`.
    #[must_use]
    pub fn record_inbound(
        &self,
        pod: &PodContext,
        peer: SocketAddr,
        source: Option<&Identity>,
        dst: SocketAddr,
    ) -> crate::metrics::ConnRecord {
        crate::metrics::ConnRecord::open(
            &self.metrics,
            "inbound",
            "hbone",
            Endpoint {
                workload: self.workload_at(peer.ip()),
                identity: source.cloned(),
                addr: Some(peer),
                service: None,
            },
            Self::local_endpoint(pod, dst),
            crate::metrics::Security::MutualTls,
        )
    }

    /// The metrics registry.
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A pod of this node as a metrics endpoint.
    fn local_endpoint(pod: &PodContext, addr: SocketAddr) -> Endpoint {
        Endpoint {
            workload: Some(Arc::clone(&pod.workload)),
            identity: Some(pod.identity.clone()),
            addr: Some(addr),
            service: None,
        }
    }

    /// The policy set in force.
    #[must_use]
    pub fn policies(&self) -> Arc<PolicyStore> {
        Arc::clone(&self.policies.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Installs a new policy set and decides every open admitted connection again.
    pub fn set_policies(&self, policies: Arc<PolicyStore>) {
        *self
            .policies
            .write()
            .unwrap_or_else(PoisonError::into_inner) = policies;
        self.recheck_open_connections();
    }

    /// The admission counters and open connections (for metrics).
    #[must_use]
    pub fn admissions(&self) -> &Admissions {
        &self.admissions
    }

    /// Replaces the service table.
    pub fn set_services(&self, services: ServiceTable) {
        *self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(services);
    }

    /// The endpoints behind `dst`, if it is a service address.
    fn service_at(&self, dst: SocketAddr) -> Option<Arc<crate::state::service::Backends>> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .lookup(dst)
            .cloned()
    }

    /// Replaces the set of known workloads (all nodes).
    pub fn set_workloads(&self, workloads: &[Workload]) {
        let by_ip = workloads
            .iter()
            .flat_map(|w| {
                let w = Arc::new(w.clone());
                w.ips
                    .clone()
                    .into_iter()
                    .map(move |ip| (ip, Arc::clone(&w)))
            })
            .collect();
        self.directory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .by_ip = by_ip;
    }

    /// HBONE connections dialled since start.
    #[must_use]
    pub fn hbone_connections_opened(&self) -> u64 {
        self.pool.opened()
    }

    /// Starts serving a prepared pod: its certificate (prefetched now), its accept loops. The
    /// pod is known to the rest of the proxy once [`PodServing::publish`] is called.
    pub fn serve(self: &Arc<Self>, pod: EnrolledPod) -> std::io::Result<PodServing> {
        let identity = self.mesh.identity(&pod.workload);
        self.mesh.certs.acquire(&identity);
        let ctx = Arc::new(PodContext {
            workload: pod.workload,
            identity: identity.clone(),
            worker: pod.worker,
            active: Arc::default(),
        });
        let server = tls::server_config(
            &self.mesh.provider,
            &self.mesh.certs,
            &identity,
            &self.mesh.trust_domain,
            &self.mesh.certs.roots(),
        )
        .map_err(std::io::Error::other)?;
        let inbound = Arc::new(tokio_listener(pod.inbound)?);
        let mut serving = PodServing {
            tasks: Vec::new(),
            proxy: Arc::clone(self),
            ctx: Arc::clone(&ctx),
            inbound: Arc::clone(&inbound),
        };
        let target = Arc::new(InboundTarget {
            pod: Arc::clone(&ctx),
            proxy: Arc::clone(self),
            reserved_ports: self.reserved_ports,
        });
        for listener in pod.hbone {
            let listener = Arc::new(tokio_listener(listener)?);
            let acceptor = TlsAcceptor::from(Arc::clone(&server));
            let target = Arc::clone(&target);
            serving.tasks.push(tokio::spawn(self.accept_loop(
                listener,
                Unit::HboneConnection,
                Arc::clone(&ctx),
                move |tcp, peer, active| {
                    tokio::spawn(hbone::serve_connection(
                        acceptor.clone(),
                        tcp,
                        peer,
                        Arc::clone(&target),
                        active,
                    ));
                },
            )));
        }
        for listener in pod.outbound {
            let listener = Arc::new(tokio_listener(listener)?);
            let (this, outbound_ctx) = (Arc::clone(self), Arc::clone(&ctx));
            serving.tasks.push(tokio::spawn(self.accept_loop(
                listener,
                Unit::Outbound,
                Arc::clone(&ctx),
                move |tcp, peer, active| {
                    let (this, ctx) = (Arc::clone(&this), Arc::clone(&outbound_ctx));
                    tokio::spawn(async move {
                        this.outbound(&ctx, tcp, peer, active).await;
                    });
                },
            )));
        }
        let (this, inbound_ctx) = (Arc::clone(self), Arc::clone(&ctx));
        serving.tasks.push(tokio::spawn(self.accept_loop(
            inbound,
            Unit::Inbound,
            Arc::clone(&ctx),
            move |tcp, peer, active| {
                let (this, ctx) = (Arc::clone(&this), Arc::clone(&inbound_ctx));
                tokio::spawn(async move {
                    this.inbound(&ctx, tcp, peer).await;
                    drop(active);
                });
            },
        )));
        Ok(serving)
    }

    fn workload_at(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let directory = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        directory.by_ip.get(&ip).cloned()
    }

    fn local_pod(&self, uid: &str) -> Option<Arc<PodContext>> {
        let directory = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        directory.local.get(uid).cloned()
    }
}

fn tokio_listener(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

impl Proxy {
    /// Accepts connections until aborted: each is counted against the limits as a `unit` of
    /// `pod` (refused with a reset beyond them), gets TCP keepalive, and is handed to `handle`
    /// with what counts it. Accept errors never end the loop (see [`accept`]).
    fn accept_loop(
        self: &Arc<Self>,
        listener: Arc<TcpListener>,
        unit: Unit,
        pod: Arc<PodContext>,
        handle: impl Fn(tokio::net::TcpStream, SocketAddr, Active) + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = Arc::clone(self);
        async move {
            loop {
                let (stream, peer) = accept(&listener, unit.listener(), Some(&this.metrics)).await;
                // Outbound connections come from the pod itself: only connections into it
                // count against their source.
                let source = (unit != Unit::Outbound).then(|| forward::unmap(peer).ip());
                let Some(active) = this.track(unit, &pod, source) else {
                    forward::reset(stream);
                    continue;
                };
                if let Err(e) = this.liveness.apply(&stream) {
                    warn!(listener = unit.listener(), error = %e, "setting TCP keepalive failed");
                }
                handle(stream, peer, active);
            }
        }
    }
}
