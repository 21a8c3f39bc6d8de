//! The state from istiod's delta xDS: one `DeltaAggregatedResources` stream subscribed to
//! every `istio.workload.Address` and `istio.security.Authorization` (wildcard), as ztunnel
//! subscribes.
//!
//! Each response is applied resource by resource: a resource that converts replaces its
//! earlier version; one that does not is reported in the NACK (with its name and the field)
//! while the rest of the response applies, and its last good version stays in force (an
//! Authorization without one is enforced as the strictest policy of its kind on its scope:
//! leaving it out would fail open). A response whose resources all convert gets an ACK.
//!
//! When the stream ends or fails, it is opened again after a backoff (200 ms doubling to
//! 30 s, with jitter; reset by a response) with the versions it holds as
//! `initial_resource_versions`, so istiod sends only what changed meanwhile; the last state
//! stays in force in between. The state is published after both kinds had their first
//! response (until then it is `pending`, so the daemon neither enrolls nor unenrolls), and
//! then after every change, batched (at most every [`BATCH`]), merged with the file's state as
//! the Kubernetes source merges it (istiod's objects win over the file's of the same name).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use prost_types::{Struct, Value, value::Kind as ValueKind};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::StreamExt as _;
use tonic::codegen::{Body, Bytes, StdError};
use tracing::{debug, info, warn};

use super::{
    channel,
    convert::{self, Address, Context, MeshService, MeshWorkload},
    netns,
    proto::{
        ADDRESS_TYPE, AUTHORIZATION_TYPE,
        discovery::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
};
use crate::{
    config::IstioConfig,
    policy::{PolicyDocument, PolicyStore},
    state::{MeshState, Service},
    workload::Workload,
};

/// Changes arriving within this time are applied together.
pub const BATCH: Duration = Duration::from_millis(50);
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// `google.rpc.Code.INVALID_ARGUMENT`, the NACK's code.
const INVALID_ARGUMENT: i32 = 3;
/// Largest response accepted (istiod sends every workload of the mesh at once).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// What the xDS source needs besides the `istio:` section.
#[derive(Clone, Debug)]
pub struct XdsSettings {
    pub config: IstioConfig,
    /// This node's name (its workloads are enrolled).
    pub node: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Policies in this namespace apply mesh-wide.
    pub root_namespace: String,
    /// This node's zone, when known.
    pub zone: Option<String>,
    /// The cgroup v2 subtree whose processes' network namespaces are enrolled (that of
    /// `redirect.cgroup`, [`netns::cgroup_scope`]); `None`: every process.
    pub cgroup: Option<String>,
}

/// The two kinds subscribed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Address,
    Authorization,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Address, Kind::Authorization];

    fn type_url(self) -> &'static str {
        match self {
            Kind::Address => ADDRESS_TYPE,
            Kind::Authorization => AUTHORIZATION_TYPE,
        }
    }

    fn of(type_url: &str) -> Option<Self> {
        Kind::ALL.into_iter().find(|k| k.type_url() == type_url)
    }
}

/// One resource as the source holds it.
#[derive(Debug)]
struct Held<T> {
    /// Version of `good` (sent back as an initial version on a new stream): empty when the
    /// resource has never converted, so that istiod sends it again.
    version: String,
    /// The last version that converted.
    good: Option<T>,
    /// What applies while the current version does not convert and there is no good one.
    fallback: Option<T>,
}

impl<T> Held<T> {
    fn effective(&self) -> Option<&T> {
        self.good.as_ref().or(self.fallback.as_ref())
    }
}

/// Starts the source: publishes on `tx` the file's state (`file`, re-read by the file
/// watcher) merged with istiod's, once istiod's is synced and after every change.
#[must_use = "dropping the handle does not stop the source; keep it to abort it"]
pub fn spawn(
    settings: XdsSettings,
    file: watch::Receiver<Arc<MeshState>>,
    tx: watch::Sender<Arc<MeshState>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = settings.config.clone();
        let connect = move || {
            channel::connect(&config, &config.address).map(AggregatedDiscoveryServiceClient::new)
        };
        run(connect, settings, file, tx).await;
    })
}

/// The source over any gRPC transport: `connect` makes the client for each new stream.
pub async fn run<T, E>(
    mut connect: impl FnMut() -> Result<AggregatedDiscoveryServiceClient<T>, E>,
    settings: XdsSettings,
    file: watch::Receiver<Arc<MeshState>>,
    tx: watch::Sender<Arc<MeshState>>,
) where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    E: std::error::Error,
{
    let mut source = Source::new(settings, file, tx);
    source.publish();
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match connect() {
            Ok(client) => {
                let (responded, end) = source.session(client).await;
                if responded {
                    backoff = INITIAL_BACKOFF;
                }
                if let Err(e) = end {
                    warn!(error = %e, "xDS stream to istiod failed; keeping the known state and reconnecting");
                } else {
                    info!("istiod ended the xDS stream; reconnecting");
                }
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "cannot reach istiod; keeping the known state and retrying");
            }
        }
        // Half to all of the backoff, so that a restarted istiod is not met by every node at once.
        let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        let deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                () = source.housekeeping() => {}
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("istiod answered {0}")]
    Status(#[from] tonic::Status),
    #[error("the request stream closed")]
    Requests,
}

/// The source's state between streams.
struct Source {
    settings: XdsSettings,
    addresses: BTreeMap<String, Held<Address>>,
    authorizations: BTreeMap<String, Held<PolicyDocument>>,
    /// Kinds that have had a first response.
    synced: HashSet<&'static str>,
    netns: HashMap<IpAddr, netns::Found>,
    last_policies: Option<Arc<PolicyStore>>,
    file: watch::Receiver<Arc<MeshState>>,
    file_open: bool,
    tx: watch::Sender<Arc<MeshState>>,
    rescan: tokio::time::Interval,
    /// When the pending changes are to be published.
    due: Option<Instant>,
}

impl Source {
    fn new(
        settings: XdsSettings,
        file: watch::Receiver<Arc<MeshState>>,
        tx: watch::Sender<Arc<MeshState>>,
    ) -> Self {
        let mut rescan = tokio::time::interval(Duration::from_millis(
            settings.config.rescan_interval_ms.max(1),
        ));
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            settings,
            addresses: BTreeMap::new(),
            authorizations: BTreeMap::new(),
            synced: HashSet::new(),
            netns: HashMap::new(),
            last_policies: None,
            file,
            file_open: true,
            tx,
            rescan,
            due: None,
        }
    }

    /// One stream: subscribes, applies the responses and answers each, while publishing.
    /// Returns whether istiod responded at all, and how the stream ended.
    async fn session<T>(
        &mut self,
        client: AggregatedDiscoveryServiceClient<T>,
    ) -> (bool, Result<(), StreamError>)
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<StdError>,
        T::ResponseBody: Body<Data = Bytes> + Send + 'static,
        <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    {
        let (requests, outbound) = mpsc::channel(16);
        for kind in Kind::ALL {
            // The channel is new and larger than two: this cannot fail.
            let _ = requests.try_send(self.subscription(kind));
        }
        let mut client = client.max_decoding_message_size(MAX_MESSAGE);
        let call = client
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(outbound));
        tokio::pin!(call);
        let mut responses = loop {
            tokio::select! {
                r = &mut call => match r {
                    Ok(r) => break r.into_inner(),
                    Err(e) => return (false, Err(e.into())),
                },
                () = self.housekeeping() => {}
            }
        };
        info!(address = %self.settings.config.address, "xDS stream to istiod open");
        let mut responded = false;
        loop {
            tokio::select! {
                r = responses.next() => match r {
                    Some(Ok(response)) => {
                        responded = true;
                        let answer = self.apply(response);
                        if requests.send(answer).await.is_err() {
                            return (responded, Err(StreamError::Requests));
                        }
                    }
                    Some(Err(status)) => return (responded, Err(status.into())),
                    None => return (responded, Ok(())),
                },
                () = self.housekeeping() => {}
            }
        }
    }

    /// The first request for `kind` on a stream: the node, a wildcard subscription and the
    /// versions held.
    fn subscription(&self, kind: Kind) -> DeltaDiscoveryRequest {
        let versions = match kind {
            Kind::Address => versions(&self.addresses),
            Kind::Authorization => versions(&self.authorizations),
        };
        DeltaDiscoveryRequest {
            node: Some(node(&self.settings)),
            type_url: kind.type_url().to_owned(),
            initial_resource_versions: versions,
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// Applies a response; returns its ACK or NACK.
    fn apply(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let mut errors = Vec::new();
        let kind = Kind::of(&response.type_url);
        match kind {
            None => errors.push(format!("unknown type {:?}", response.type_url)),
            Some(kind) => {
                let cx = Context {
                    node: &self.settings.node,
                    trust_domain: &self.settings.trust_domain,
                    root_namespace: &self.settings.root_namespace,
                };
                for resource in response.resources {
                    let name = resource.name;
                    let Some(any) = resource.resource else {
                        errors.push(format!("{name}: no resource"));
                        continue;
                    };
                    if name.is_empty() {
                        errors.push("a resource without a name".to_owned());
                        continue;
                    }
                    if any.type_url != kind.type_url() {
                        errors.push(format!(
                            "{name}: type {:?} in a {:?} response",
                            any.type_url,
                            kind.type_url()
                        ));
                        continue;
                    }
                    let bytes = any.value;
                    match kind {
                        Kind::Address => {
                            let result = convert::address(&bytes, &cx);
                            let held = self.addresses.entry(name.clone()).or_insert(Held {
                                version: String::new(),
                                good: None,
                                fallback: None,
                            });
                            match result {
                                Ok(address) => {
                                    if let Address::Workload(w) = &address
                                        && let Some(td) = &w.foreign_trust_domain
                                    {
                                        debug!(workload = %w.workload.uid(), trust_domain = %td, "istiod names a trust domain other than the mesh's: the workload is accepted as a peer only if identity.trustDomainAliases lists it");
                                    }
                                    held.version = resource.version;
                                    held.good = Some(address);
                                }
                                Err(e) => errors.push(format!("{name}: {e}")),
                            }
                        }
                        Kind::Authorization => {
                            let result = convert::authorization(&bytes, cx.root_namespace);
                            let held = self.authorizations.entry(name.clone()).or_insert(Held {
                                version: String::new(),
                                good: None,
                                fallback: None,
                            });
                            match result {
                                Ok(doc) => {
                                    held.version = resource.version;
                                    held.good = Some(doc);
                                    held.fallback = None;
                                }
                                Err(e) => {
                                    errors.push(format!("{name}: {e}"));
                                    held.fallback = Some(convert::strictest_authorization(
                                        &bytes,
                                        &name,
                                        cx.root_namespace,
                                    ));
                                }
                            }
                        }
                    }
                }
                for name in &response.removed_resources {
                    match kind {
                        Kind::Address => self.addresses.remove(name).is_some(),
                        Kind::Authorization => self.authorizations.remove(name).is_some(),
                    };
                }
                if self.synced.insert(kind.type_url()) {
                    info!(type_url = kind.type_url(), "first xDS response from istiod");
                }
                self.changed();
            }
        }
        let error_detail = (!errors.is_empty()).then(|| {
            warn!(
                type_url = %response.type_url,
                nonce = %response.nonce,
                errors = %errors.join("; "),
                "rejected xDS resources (NACK); their last good versions stay in force, an \
                 authorization without one is enforced as the strictest of its kind"
            );
            Status {
                code: INVALID_ARGUMENT,
                message: errors.join("; "),
                details: Vec::new(),
            }
        });
        if error_detail.is_none() {
            debug!(type_url = %response.type_url, nonce = %response.nonce, "ACK");
        }
        DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            error_detail,
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// Something changed: publish within [`BATCH`].
    fn changed(&mut self) {
        if self.due.is_none() {
            self.due = Some(Instant::now() + BATCH);
        }
    }

    /// Waits for one event besides the stream (a file change, a rescan, the batch's end) and
    /// handles it. Cancel-safe.
    async fn housekeeping(&mut self) {
        let due = self.due;
        tokio::select! {
            r = self.file.changed(), if self.file_open => {
                self.file_open = r.is_ok();
                self.changed();
            }
            _ = self.rescan.tick() => self.changed(),
            () = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                self.due = None;
                self.publish();
            }
        }
    }

    /// Builds the state and publishes it if it differs from the last.
    fn publish(&mut self) {
        let file = Arc::clone(&self.file.borrow_and_update());
        let state = self.build(&file);
        let publish = {
            let last = self.tx.borrow();
            last.workloads != state.workloads
                || last.services != state.services
                || last.pending != state.pending
                || last.zone != state.zone
                || last.networks != state.networks
                || !Arc::ptr_eq(&last.policies, &state.policies)
                || !Arc::ptr_eq(&last.traffic, &state.traffic)
        };
        if publish {
            self.tx.send_replace(Arc::new(state));
        }
    }

    fn build(&mut self, file: &MeshState) -> MeshState {
        let mut seen = HashSet::new();
        let mut mesh_workloads: Vec<&MeshWorkload> = Vec::new();
        let mut mesh_services: Vec<&MeshService> = Vec::new();
        for held in self.addresses.values() {
            match held.effective() {
                Some(Address::Workload(w)) => {
                    if seen.insert(w.workload.uid()) {
                        mesh_workloads.push(w);
                    } else {
                        debug!(workload = %w.workload.uid(), "a second workload of this name; the first is kept");
                    }
                }
                Some(Address::Service(s)) => mesh_services.push(s),
                Some(Address::Skipped(_)) | None => {}
            }
        }
        let services = convert::services_with_endpoints(mesh_services, &mesh_workloads);
        let networks = convert::networks(&mesh_workloads, &file.networks);
        let mut workloads: Vec<Workload> =
            mesh_workloads.iter().map(|w| w.workload.clone()).collect();
        self.netns = attach_netns(
            &self.settings.config.proc_root,
            &self.settings.node,
            self.settings.cgroup.as_deref(),
            &mut workloads,
            &self.netns,
        );
        merge_by(&mut workloads, &file.workloads, Workload::uid);
        workloads.sort_by_key(Workload::uid);
        let mut services: Vec<Service> = services;
        merge_by(&mut services, &file.services, |s| {
            format!("{}/{}", s.namespace, s.name)
        });
        services.sort_by_key(|s| format!("{}/{}", s.namespace, s.name));
        // A store caches which policies apply to a workload: a workload that changed (its
        // labels name the policies istiod selected for it) needs a new store.
        let workloads_changed = self.tx.borrow().workloads != workloads;
        let policies = self.policies(file, workloads_changed);
        let pending = Kind::ALL
            .iter()
            .find(|k| !self.synced.contains(k.type_url()))
            .map(|k| format!("waiting for istiod's first {} response", k.type_url()));
        MeshState {
            workloads,
            services,
            policies,
            traffic: Arc::clone(&file.traffic),
            networks,
            zone: self.settings.zone.clone().or_else(|| file.zone.clone()),
            pending,
        }
    }

    /// istiod's authorizations (each resource's last good version, or the strictest stand-in)
    /// plus the file's policies.
    fn policies(&mut self, file: &MeshState, workloads_changed: bool) -> Arc<PolicyStore> {
        let mut used = HashSet::new();
        let mut docs: Vec<PolicyDocument> = Vec::new();
        for held in self.authorizations.values() {
            let Some(doc) = held.effective() else {
                continue;
            };
            let mut doc = doc.clone();
            // Names are unique per namespace in the store; istiod's need not be here.
            let base = doc.metadata.name.clone();
            let mut n = 1;
            while !used.insert((doc.metadata.namespace.clone(), doc.metadata.name.clone())) {
                doc.metadata.name = format!("{base}~{n}");
                n += 1;
            }
            docs.push(doc);
        }
        merge_by(&mut docs, file.policies.documents(), |d| {
            format!("{}/{}/{}", d.kind, d.metadata.namespace, d.metadata.name)
        });
        if let Some(last) = &self.last_policies
            && !workloads_changed
            && last.documents() == docs.as_slice()
        {
            return Arc::clone(last);
        }
        match PolicyStore::new(&self.settings.root_namespace, &docs) {
            Ok(store) => {
                let store = Arc::new(store);
                self.last_policies = Some(Arc::clone(&store));
                store
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "rejected istiod's policies with the file's; keeping the last good set");
                self.last_policies
                    .clone()
                    .unwrap_or_else(|| Arc::clone(&file.policies))
            }
        }
    }
}

/// Finds the network namespaces of the workloads to enroll; one whose namespace is not found
/// (yet), or whose addresses are in different namespaces, is not enrolled until it is.
fn attach_netns(
    proc_root: &std::path::Path,
    node: &str,
    cgroup: Option<&str>,
    workloads: &mut [Workload],
    previous: &HashMap<IpAddr, netns::Found>,
) -> HashMap<IpAddr, netns::Found> {
    let wanted: HashSet<IpAddr> = workloads
        .iter()
        .filter(|w| w.enrolled && w.node == node)
        .flat_map(|w| w.ips.iter().copied())
        .collect();
    if wanted.is_empty() {
        return HashMap::new();
    }
    let found = netns::scan(proc_root, cgroup, &wanted, previous);
    for w in workloads
        .iter_mut()
        .filter(|w| w.enrolled && w.node == node)
    {
        let mut namespaces = w.ips.iter().filter_map(|ip| found.get(ip));
        let first = namespaces.next();
        match first {
            Some(ns) if namespaces.all(|other| other.id == ns.id) => {
                w.netns = Some(ns.path.clone());
            }
            Some(_) => {
                warn!(workload = %w.uid(), "the workload's addresses are in different network namespaces; not enrolled");
                w.enrolled = false;
            }
            None => {
                debug!(workload = %w.uid(), "no network namespace found for the workload's addresses (yet); not enrolled");
                w.enrolled = false;
            }
        }
    }
    found
}

fn versions<T>(held: &BTreeMap<String, Held<T>>) -> HashMap<String, String> {
    held.iter()
        .filter(|(_, h)| h.good.is_some())
        .map(|(name, h)| (name.clone(), h.version.clone()))
        .collect()
}

/// The node as istiod needs it to serve a node proxy: its id and the metadata istiod reads
/// (namespace, node name, pod name, cluster).
fn node(settings: &XdsSettings) -> Node {
    let text = |s: &str| Value {
        kind: Some(ValueKind::StringValue(s.to_owned())),
    };
    let config = &settings.config;
    let fields = [
        ("NAMESPACE", config.pod_namespace.as_str()),
        ("NODE_NAME", settings.node.as_str()),
        ("NAME", config.pod_name.as_str()),
        ("CLUSTER_ID", config.cluster_id.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), text(v)))
    .collect();
    Node {
        id: config.node_id(),
        cluster: String::new(),
        metadata: Some(Struct { fields }),
    }
}

/// Appends the items of `extra` whose key is not in `items` already (istiod's objects win
/// over the file's).
fn merge_by<T: Clone>(items: &mut Vec<T>, extra: &[T], key: impl Fn(&T) -> String) {
    let known: HashSet<String> = items.iter().map(&key).collect();
    items.extend(extra.iter().filter(|x| !known.contains(&key(x))).cloned());
}

#[cfg(test)]
mod tests;
