//! The L4 proxy: it owns the data path. For every connection the kernel captured it chooses
//! the path, admits the connection (peer authentication, policy, limits), connects upstream,
//! counts bytes, and writes the metrics and the access log; `hbone` is only its transport.
//!
//! - Outbound (15001, `outbound`): the original destination comes from the pod's
//!   [`OriginalDst`]; a service address picks an endpoint; then the [`Path`]: a pod on another
//!   node → HBONE to `podIP:15008`; a pod on this node → the same-node path (no TLS, straight
//!   into the destination pod's netns); outside the mesh → passthrough.
//! - Inbound HBONE (15008, `inbound`): the HBONE server hands each `CONNECT` stream to the
//!   proxy's handler.
//! - Inbound plaintext (15006, `inbound`): what `sk_lookup` captured into the pod.
//!
//! Both inbound paths share one admit-and-connect step. Every accepted connection is counted
//! against the limits before anything else happens (`limits`), every socket gets TCP
//! keepalive and a user timeout (`hbone::Liveness`), and every refusal or failure is one
//! typed [`Error`], reported in one place (`report`). Sockets come from each pod's
//! [`SocketFactory`] (the seams, `seams`: the kernel implementation is in `redirect`, plain
//! ones let the path run on loopback in tests).

mod admission;
mod crossing;
mod descriptors;
mod error;
mod forward;
mod gateway;
mod inbound;
mod limits;
mod outbound;
mod seams;
mod serve;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError, RwLock, atomic::AtomicUsize},
    time::Duration,
};

pub use admission::{Admission, Admissions};
pub use descriptors::{Budget, Descriptors, accept};
pub use error::{BadConnect, Error};
pub use gateway::{GatewayServing, check_gateway_connect};
pub use inbound::{check_connect, check_connect_to};
pub use limits::{Active, Limits, MaxConnections, Unit};
use rustls::crypto::CryptoProvider;
pub use seams::{KnownDestinations, OriginalDst, PlainSockets, SocketFactory};
pub use serve::{PodListeners, PodServing};
use tracing::info;

use crate::{
    hbone::{Liveness, Pool},
    identity::{CertManager, Identity},
    metrics::{Endpoint, Metrics},
    policy::PolicyStore,
    state::{MeshState, ServiceTable},
    tls,
    traffic::runtime::Registry,
    workload::Workload,
};

/// TLS client configs, by what they were built for.
type ConfigCache<K> = Mutex<HashMap<K, Arc<rustls::ClientConfig>>>;

/// Mesh identity settings shared by every connection.
pub struct MeshTls {
    pub trust_domain: String,
    /// Trust domains whose workloads are accepted as peers: the mesh's own and its aliases.
    pub accepted_domains: Vec<String>,
    pub certs: CertManager,
    pub provider: Arc<CryptoProvider>,
    client_configs: Mutex<HashMap<(Identity, Identity), Arc<rustls::ClientConfig>>>,
    /// Inner (double HBONE) client configs: a source and the identities a server may show.
    any_of_configs: ConfigCache<(Identity, Vec<Identity>)>,
}

impl MeshTls {
    #[must_use]
    pub fn new(trust_domain: String, certs: CertManager, provider: Arc<CryptoProvider>) -> Self {
        Self {
            accepted_domains: vec![trust_domain.clone()],
            trust_domain,
            certs,
            provider,
            client_configs: Mutex::new(HashMap::new()),
            any_of_configs: Mutex::new(HashMap::new()),
        }
    }

    /// Also accepts peers of `aliases` (other clusters' trust domains).
    #[must_use]
    pub fn with_aliases(mut self, aliases: &[String]) -> Self {
        for alias in aliases {
            if !self.accepted_domains.contains(alias) {
                self.accepted_domains.push(alias.clone());
            }
        }
        self
    }

    /// The SPIFFE identity of a workload (in its own trust domain, when it names one).
    #[must_use]
    pub fn identity(&self, workload: &Workload) -> Identity {
        Identity::new(
            workload
                .trust_domain
                .as_deref()
                .unwrap_or(&self.trust_domain),
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
        let config = tls::client_config(&self.provider, &self.certs, source, destination)?;
        configs.insert(key, Arc::clone(&config));
        Ok(config)
    }

    /// A client config from `source` to a server showing any one of `destinations` (sorted
    /// and deduplicated by the caller, so equal sets share a config).
    fn client_config_any(
        &self,
        source: &Identity,
        destinations: &[Identity],
    ) -> Result<Arc<rustls::ClientConfig>, tls::TlsError> {
        let key = (source.clone(), destinations.to_vec());
        let mut configs = self
            .any_of_configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = configs.get(&key) {
            return Ok(Arc::clone(config));
        }
        let config = tls::client_config_any(&self.provider, &self.certs, source, destinations)?;
        configs.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

/// Settings and shared state of the proxy.
pub struct Proxy {
    node: String,
    /// This node's network (`network`).
    network: String,
    /// The other networks and their gateways, as the state last named them.
    networks: RwLock<Arc<[crate::network::Network]>>,
    /// Turns of the gateway choice (round robin across a network's gateways).
    gateway_turn: AtomicUsize,
    connect_timeout: Duration,
    /// Ports a connection may never be forwarded to (the daemon's own listeners).
    reserved_ports: [u16; 3],
    mesh: MeshTls,
    pool: Pool,
    directory: RwLock<Directory>,
    services: RwLock<Arc<ServiceTable>>,
    /// Endpoint health, pools and rate-limit buckets, across service tables.
    traffic: Registry,
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
    /// Opens the pod's sockets (inside its netns).
    pub sockets: Arc<dyn SocketFactory>,
    /// Where its captured connections were going.
    pub orig_dst: Arc<dyn OriginalDst>,
    /// Connections of this workload being handled (for the per-workload limit).
    pub active: Arc<AtomicUsize>,
}

/// Options of a [`Proxy`].
pub struct ProxyOptions {
    pub metrics: Arc<Metrics>,
    pub node: String,
    pub network: String,
    pub handshake_timeout: Duration,
    pub max_connections: MaxConnections,
    pub liveness: Liveness,
    pub connect_timeout: Duration,
    pub reserved_ports: [u16; 3],
}

impl Proxy {
    pub fn new(options: ProxyOptions, mesh: MeshTls) -> Self {
        Self {
            node: options.node,
            network: options.network,
            networks: RwLock::new(Arc::from(Vec::new())),
            gateway_turn: AtomicUsize::new(0),
            connect_timeout: options.connect_timeout,
            reserved_ports: options.reserved_ports,
            mesh,
            pool: Pool::new(Arc::clone(&options.metrics), options.liveness),
            directory: RwLock::new(Directory::default()),
            services: RwLock::new(Arc::new(ServiceTable::default())),
            traffic: Registry::default(),
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

    /// The certificates of this node's workloads.
    #[must_use]
    pub fn certs(&self) -> &CertManager {
        &self.mesh.certs
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
            peer: None,
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

    /// Compiles the services and traffic rules of `state` for this proxy on `node` and puts
    /// them in force (endpoint health, pools and buckets carry over).
    pub fn set_services(&self, state: &MeshState, node: &str) {
        let table = ServiceTable::build(
            &state.services,
            &state.workloads,
            &state.traffic,
            &self.traffic,
            (node, state.zone.as_deref()),
            &self.network,
        );
        *self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        *self
            .networks
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::from(state.networks.clone());
    }

    /// The service table in force.
    fn service_table(&self) -> Arc<ServiceTable> {
        Arc::clone(&self.services.read().unwrap_or_else(PoisonError::into_inner))
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

    fn workload_at(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        let directory = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        directory.by_ip.get(&ip).cloned()
    }

    /// The state's current version of a pod of this node: its labels (which select policies)
    /// may have changed since it was served; the served version if the state no longer
    /// lists it at its address.
    fn current_workload(&self, served: &Arc<Workload>) -> Arc<Workload> {
        served
            .ips
            .first()
            .and_then(|ip| self.workload_at(*ip))
            .filter(|w| w.namespace == served.namespace && w.name == served.name)
            .unwrap_or_else(|| Arc::clone(served))
    }

    fn local_pod(&self, uid: &str) -> Option<Arc<PodContext>> {
        let directory = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        directory.local.get(uid).cloned()
    }
}
