//! An istiod stand-in: istiod's certificate service and delta xDS, over gRPC with TLS, as a
//! node proxy (ztunnel, or mesh-node in its `istio:` mode) sees them, so that the daemon's
//! istiod client is driven end to end without a cluster.
//!
//! What it speaks: `istio.v1.auth.IstioCertificateService/CreateCertificate` ([`ca`]) and
//! `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`
//! ([`xds`]), both on one TLS port whose certificate names `istiod.<namespace>.svc` and chains
//! to the stand-in's root, which is also the mesh's root (istiod's self-signed CA). Every call
//! needs `authorization: Bearer <token>` with a token from [`Istiod::issue_token`] (which
//! stands for a node proxy's service-account token: it names the proxy's node) and
//! `clusterid: <cluster>`. The test scripts the mesh with [`Istiod::set_resource`] and the
//! builders, and reads back what the client did (certificate requests, streams, ACKs and
//! NACKs). [`Istiod::stop`] and [`Istiod::restart`] cut every connection (as a crash does) and
//! bring it back on the same address.

mod ca;
mod resources;
mod xds;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_node::istio::proto::{
    ADDRESS_TYPE, AUTHORIZATION_TYPE,
    auth::istio_certificate_service_server::IstioCertificateServiceServer,
    discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
    security::Authorization,
    workload::{Address, Service, Workload, address},
};
use prost::Message as _;
use prost_types::Any;
use tonic::{
    codegen::{Service as TowerService, http},
    server::NamedService,
};

pub use ca::{CaOutcome, CaRecord, IMPERSONATED_IDENTITY};
pub use resources::{
    authorization_any, malformed_any, service, service_any, workload, workload_any,
};
pub use xds::{Ack, StreamInfo};

/// How the stand-in is set up.
#[derive(Clone, Debug)]
pub struct IstiodOptions {
    /// The cluster ID clients must send (`clusterid`). Default: `Kubernetes`.
    pub cluster_id: String,
    /// The mesh's trust domain: of workloads without one, and of the signed identities.
    /// Default: `cluster.local`.
    pub trust_domain: String,
    /// istiod's namespace: its certificate names `istiod.<namespace>.svc`. Default:
    /// `istio-system`.
    pub namespace: String,
    /// The longest workload certificate the CA signs (istiod's `MAX_WORKLOAD_CERT_TTL`).
    /// Default: 24 hours.
    pub max_cert_lifetime: Duration,
}

impl Default for IstiodOptions {
    fn default() -> Self {
        Self {
            cluster_id: "Kubernetes".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            namespace: "istio-system".to_owned(),
            max_cert_lifetime: Duration::from_hours(24),
        }
    }
}

/// One scripted resource.
#[derive(Clone, Debug)]
struct Stored {
    version: String,
    any: Any,
}

/// What the test scripted and what the clients did, behind one lock.
#[derive(Default)]
struct State {
    /// Token → the node it was issued for.
    tokens: HashMap<String, String>,
    tokens_issued: u64,
    ca_unavailable: bool,
    ca_records: Vec<CaRecord>,
    /// Type URL → name → resource.
    resources: BTreeMap<String, BTreeMap<String, Stored>>,
    /// Last resource version handed out (versions are `v<n>`).
    version: u64,
    /// Last nonce handed out (nonces are `n<n>`).
    nonce: u64,
    next_stream: u64,
    streams: BTreeMap<u64, xds::StreamState>,
    acks: Vec<Ack>,
    /// ADS streams refused for their token or cluster ID.
    rejected_streams: u64,
}

impl State {
    /// The scripted workloads of `node` (well-formed `Address` resources only).
    fn workloads_on(&self, node: &str) -> Vec<Workload> {
        self.resources
            .get(ADDRESS_TYPE)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter_map(|s| Address::decode(s.any.value.as_slice()).ok())
            .filter_map(|a| match a.r#type {
                Some(address::Type::Workload(w)) if w.node == node => Some(w),
                _ => None,
            })
            .collect()
    }
}

/// What the services and the handle share.
struct Shared {
    options: IstiodOptions,
    state: Mutex<State>,
    /// Signalled on every change of `state`, for the blocking waits.
    changed: Condvar,
    /// Bumped on every change of the scripted resources; each ADS stream then pushes its
    /// delta.
    pushes: tokio::sync::watch::Sender<u64>,
    roots: Mutex<ca::Roots>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn roots(&self) -> MutexGuard<'_, ca::Roots> {
        self.roots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state and wakes the waiters.
    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_all();
        out
    }

    /// Waits until `f` returns something, for at most `timeout`.
    fn wait_for<T>(&self, timeout: Duration, mut f: impl FnMut(&State) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(v) = f(&state) {
                return Some(v);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .changed
                .wait_timeout(state, left.min(Duration::from_millis(200)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Scripts a change of resources and pushes it to every stream.
    fn change(&self, f: impl FnOnce(&mut State)) {
        self.update(f);
        self.pushes.send_modify(|n| *n += 1);
    }
}

/// The running stand-in.
pub struct Istiod {
    shared: Arc<Shared>,
    netns: Option<PathBuf>,
    addr: SocketAddr,
    /// The current incarnation: its runtime owns the listener and every connection, so
    /// shutting it down cuts them all.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Istiod {
    /// Starts serving on `addr` (port 0: any free port, kept across restarts), inside the
    /// network namespace at `netns` when given (e.g. a testbed node's), else in this process's.
    pub fn start(
        netns: Option<&Path>,
        addr: SocketAddr,
        options: IstiodOptions,
    ) -> anyhow::Result<Self> {
        let roots = ca::Roots::new(&options.trust_domain)?;
        let mut istiod = Self {
            shared: Arc::new(Shared {
                options,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                pushes: tokio::sync::watch::channel(0).0,
                roots: Mutex::new(roots),
            }),
            netns: netns.map(Path::to_owned),
            addr,
            runtime: None,
        };
        istiod.serve()?;
        Ok(istiod)
    }

    /// Starts an incarnation: a fresh serving certificate from the current root, a listener,
    /// the two services.
    fn serve(&mut self) -> anyhow::Result<()> {
        if self.runtime.is_some() {
            return Ok(());
        }
        let identity = {
            let options = &self.shared.options;
            self.shared.roots().serving_identity(&options.namespace)?
        };
        let listener = bind_in_netns(self.netns.as_deref(), self.addr)?;
        self.addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("istiod-stand-in")
            .enable_all()
            .build()?;
        let incoming = {
            let _guard = runtime.enter();
            tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener::from_std(
                listener,
            )?)
            .with_nodelay(Some(true))
        };
        let server = tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("istiod's TLS configuration")?;
        let services = Dispatch {
            ca: IstioCertificateServiceServer::new(ca::CaService(Arc::clone(&self.shared))),
            ads: AggregatedDiscoveryServiceServer::new(xds::AdsService(Arc::clone(&self.shared))),
        };
        runtime.spawn(async move {
            if let Err(e) = server.serve_with_incoming(services, incoming).await {
                eprintln!("istiod stand-in: {e}");
            }
        });
        self.runtime = Some(runtime);
        Ok(())
    }

    /// Stops: the listener closes and every connection is cut mid-stream.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        // Let the runtime's threads drop the listener before a restart binds the address.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Comes back on the same address after [`Istiod::stop`] (with a serving certificate from
    /// the current root, which after [`Istiod::rotate_root`] is the new one).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.serve()
    }

    /// The address clients reach.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://<addr>`, for `istio.address` (the client must still verify the name
    /// `istiod.<namespace>.svc`).
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    // ---- the CA ----

    /// A bearer token that authenticates a node proxy on `node` (the Kubernetes node name
    /// its workloads carry in `Workload.node`).
    pub fn issue_token(&self, node: &str) -> String {
        self.shared.update(|s| {
            s.tokens_issued += 1;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let token = format!(
                "istiod-test.{node}.{}.{nanos:x}.{:x}",
                s.tokens_issued,
                std::process::id()
            );
            s.tokens.insert(token.clone(), node.to_owned());
            token
        })
    }

    /// Writes a new token for `node` to `path`.
    pub fn write_token(&self, node: &str, path: &Path) -> anyhow::Result<String> {
        let token = self.issue_token(node);
        std::fs::write(path, &token).with_context(|| format!("writing {}", path.display()))?;
        Ok(token)
    }

    /// Makes every token so far invalid (as a revoked service account's).
    pub fn revoke_tokens(&self) {
        self.shared.update(|s| s.tokens.clear());
    }

    /// While `false`, the CA answers `UNAVAILABLE` (istiod's CA down or overloaded).
    pub fn set_ca_available(&self, available: bool) {
        self.shared.update(|s| s.ca_unavailable = !available);
    }

    /// A new root signs from now on (the old one stays among [`Istiod::roots_pem`]); the
    /// serving certificate changes at the next [`Istiod::restart`].
    pub fn rotate_root(&self) -> anyhow::Result<()> {
        let trust_domain = self.shared.options.trust_domain.clone();
        self.shared.roots().rotate(&trust_domain)?;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The root that signs now, PEM.
    #[must_use]
    pub fn root_pem(&self) -> String {
        self.shared.roots().current().pem.clone()
    }

    /// Every root so far, oldest first, PEM.
    #[must_use]
    pub fn roots_pem(&self) -> Vec<String> {
        self.shared.roots().all().map(|r| r.pem.clone()).collect()
    }

    /// Every root so far, oldest first, DER.
    #[must_use]
    pub fn roots_der(&self) -> Vec<Vec<u8>> {
        self.shared.roots().all().map(|r| r.der.clone()).collect()
    }

    /// Writes the current root to `path` (what the daemon reads as `istio.rootCertFile`),
    /// atomically (a rename: a watcher never sees half a file).
    pub fn write_root(&self, path: &Path) -> anyhow::Result<()> {
        write_atomically(path, &self.root_pem())
    }

    /// Writes every root so far to `path` (a trust bundle across a rotation), atomically.
    pub fn write_roots(&self, path: &Path) -> anyhow::Result<()> {
        write_atomically(path, &self.roots_pem().concat())
    }

    /// Every certificate request so far, in order.
    #[must_use]
    pub fn ca_records(&self) -> Vec<CaRecord> {
        self.shared.lock().ca_records.clone()
    }

    /// Waits for a certificate request (after the first `skip`) that `f` accepts.
    pub fn wait_ca_record(
        &self,
        skip: usize,
        timeout: Duration,
        f: impl Fn(&CaRecord) -> bool,
    ) -> anyhow::Result<CaRecord> {
        self.shared
            .wait_for(timeout, |s| {
                s.ca_records.iter().skip(skip).find(|r| f(r)).cloned()
            })
            .with_context(|| {
                format!(
                    "no matching certificate request within {timeout:?}; got {:?}",
                    self.ca_records()
                )
            })
    }

    // ---- delta xDS ----

    /// Creates or replaces resource `name` of `type_url` (any bytes: see
    /// [`malformed_any`]) and pushes it to every stream.
    pub fn set_resource(&self, type_url: &str, name: &str, any: Any) {
        self.set_resources(type_url, [(name.to_owned(), any)]);
    }

    /// Creates or replaces several resources of `type_url` in one push (one response per
    /// stream).
    pub fn set_resources(
        &self,
        type_url: &str,
        resources: impl IntoIterator<Item = (String, Any)>,
    ) {
        self.shared.change(|s| {
            for (name, any) in resources {
                s.version += 1;
                let version = format!("v{}", s.version);
                s.resources
                    .entry(type_url.to_owned())
                    .or_default()
                    .insert(name, Stored { version, any });
            }
        });
    }

    /// Removes resource `name` of `type_url` and pushes the removal to every stream.
    pub fn remove_resource(&self, type_url: &str, name: &str) {
        self.remove_resources(type_url, &[name]);
    }

    /// Removes several resources of `type_url` in one push.
    pub fn remove_resources(&self, type_url: &str, names: &[&str]) {
        self.shared.change(|s| {
            if let Some(of_type) = s.resources.get_mut(type_url) {
                for name in names {
                    of_type.remove(*name);
                }
            }
        });
    }

    /// Sets a workload, named by its uid (as istiod names it).
    pub fn set_workload(&self, workload: Workload) {
        let name = workload.uid.clone();
        self.set_resource(ADDRESS_TYPE, &name, workload_any(workload));
    }

    /// Sets a service, named `namespace/hostname` (as istiod names it).
    pub fn set_service(&self, service: Service) {
        let name = format!("{}/{}", service.namespace, service.hostname);
        self.set_resource(ADDRESS_TYPE, &name, service_any(service));
    }

    /// Sets an authorization policy, named `namespace/name` (as istiod names it).
    pub fn set_authorization(&self, policy: &Authorization) {
        let name = format!("{}/{}", policy.namespace, policy.name);
        self.set_resource(AUTHORIZATION_TYPE, &name, authorization_any(policy));
    }

    /// The names of the resources of `type_url` now scripted.
    #[must_use]
    pub fn resource_names(&self, type_url: &str) -> Vec<String> {
        self.shared
            .lock()
            .resources
            .get(type_url)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every ADS stream so far (open or not), in order.
    #[must_use]
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.shared
            .lock()
            .streams
            .values()
            .map(|s| s.info.clone())
            .collect()
    }

    /// ADS streams refused (bad token or cluster ID).
    #[must_use]
    pub fn rejected_streams(&self) -> u64 {
        self.shared.lock().rejected_streams
    }

    /// Waits until at least `n` streams are open and have sent their node.
    pub fn wait_streams(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<StreamInfo>> {
        self.shared
            .wait_for(timeout, |s| {
                let open: Vec<_> = s
                    .streams
                    .values()
                    .filter(|st| st.info.open && !st.info.node_id.is_empty())
                    .map(|st| st.info.clone())
                    .collect();
                (open.len() >= n).then_some(open)
            })
            .with_context(|| {
                format!(
                    "fewer than {n} open ADS streams within {timeout:?}: {:?}",
                    self.streams()
                )
            })
    }

    /// Every ACK and NACK so far, in order.
    #[must_use]
    pub fn acks(&self) -> Vec<Ack> {
        self.shared.lock().acks.clone()
    }

    /// Waits until every open stream subscribed to `type_url` (at least one) has acknowledged the
    /// last response of that type it was sent, and returns those ACKs. Fails at once when one
    /// of them is a NACK.
    pub fn wait_ack(&self, type_url: &str, timeout: Duration) -> anyhow::Result<Vec<Ack>> {
        let mut nacked = None;
        let acks = self.shared.wait_for(timeout, |s| {
            let latest = xds::latest_answers(s, type_url)?;
            if let Some(nack) = latest.iter().flatten().find(|a| a.error.is_some()) {
                nacked = Some(nack.clone());
                return Some(Vec::new());
            }
            latest.into_iter().collect::<Option<Vec<_>>>()
        });
        if let Some(nack) = nacked {
            bail!("{type_url} NACKed: {nack:?}");
        }
        acks.with_context(|| {
            format!(
                "{type_url} not ACKed by every stream within {timeout:?}; answers: {:?}",
                self.acks()
            )
        })
    }

    /// Waits until some open stream has rejected (NACK) the last response of `type_url` it was sent,
    /// and returns that NACK.
    pub fn wait_nack(&self, type_url: &str, timeout: Duration) -> anyhow::Result<Ack> {
        self.shared
            .wait_for(timeout, |s| {
                xds::latest_answers(s, type_url)?
                    .into_iter()
                    .flatten()
                    .find(|a| a.error.is_some())
            })
            .with_context(|| {
                format!(
                    "no NACK of {type_url} within {timeout:?}; answers: {:?}",
                    self.acks()
                )
            })
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The two services on one port, by the gRPC path's service name (tonic's router without its
/// axum dependency).
#[derive(Clone)]
struct Dispatch {
    ca: IstioCertificateServiceServer<ca::CaService>,
    ads: AggregatedDiscoveryServiceServer<xds::AdsService>,
}

impl TowerService<http::Request<tonic::body::Body>> for Dispatch {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let ca = <IstioCertificateServiceServer<ca::CaService> as NamedService>::NAME;
        let path = request.uri().path();
        if path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(ca))
            .is_some_and(|p| p.starts_with('/'))
        {
            self.ca.call(request)
        } else {
            // Every other path, unknown ones included (answered UNIMPLEMENTED).
            self.ads.call(request)
        }
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Binds `addr` inside the network namespace at `netns` (on a thread of its own, so no other
/// thread changes namespace), or in this process's. Retries for a few seconds while the
/// address is still held (a restart right after a stop).
fn bind_in_netns(netns: Option<&Path>, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let netns = netns.map(Path::to_owned);
    std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
        if let Some(netns) = &netns {
            let file = std::fs::File::open(netns)
                .with_context(|| format!("opening {}", netns.display()))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => {
                    l.set_nonblocking(true)?;
                    return Ok(l);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("binding {addr}: {e}"),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_any_does_not_decode() {
        assert!(Address::decode(malformed_any(ADDRESS_TYPE).value.as_slice()).is_err());
        assert!(Authorization::decode(malformed_any(AUTHORIZATION_TYPE).value.as_slice()).is_err());
    }

    #[test]
    fn workloads_on_a_node() {
        let mut state = State::default();
        let w = workload("a", "shop", "sa-a", "node-a", &[]);
        let stored = |any| Stored {
            version: "v1".to_owned(),
            any,
        };
        let of_type = state.resources.entry(ADDRESS_TYPE.to_owned()).or_default();
        of_type.insert("a".to_owned(), stored(workload_any(w.clone())));
        of_type.insert("bad".to_owned(), stored(malformed_any(ADDRESS_TYPE)));
        assert_eq!(state.workloads_on("node-a"), vec![w]);
        assert!(state.workloads_on("node-b").is_empty());
    }
}
