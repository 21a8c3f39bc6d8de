//! The Kubernetes state source: namespaces (opt-in label), pods (all nodes: identities and
//! addresses; this node's: enrollment, with their network namespaces found in `/proc`),
//! services with their `EndpointSlice`s, Istio's `WorkloadEntry` (VMs: see [`entry`]),
//! `AuthorizationPolicy` and `PeerAuthentication`, and the traffic kinds (`TCPRoute`, `VirtualService`,
//! `DestinationRule`, `FaultInjection`: see [`traffic`]), from the API server.
//!
//! Each kind is mirrored by a kube-runtime reflector (list, then watch with bookmarks; on
//! `410 Gone` a relist whose result replaces the mirror at once; on any error a retry with
//! backoff). A mirror keeps what it knows while the API server is away, so a restart or a
//! partition changes nothing until the server answers again. The state is rebuilt from the
//! mirrors (batched, at most every [`BATCH`]) and published only after every kind was listed
//! once: until then the daemon neither enrolls nor unenrolls and reports not ready. A kind
//! the API server does not serve (its CRD not installed) counts as listed, and empty.
//!
//! A policy or traffic object that does not parse is reported with its name and the field,
//! and its last good version (if any) stays in force; the other objects are unaffected.

mod convert;
mod entry;
pub mod netns;
mod traffic;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service as KubeService},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use super::{MeshState, Service};
use crate::{
    config::KubernetesConfig,
    policy::{Kind, PolicyDocument, PolicyStore},
    traffic::TrafficKind,
    workload::Workload,
};

/// Changes arriving within this time are applied together.
const BATCH: Duration = Duration::from_millis(50);

/// Label of a Node naming its zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading the kubeconfig {path}")]
    Kubeconfig {
        path: std::path::PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes API configuration (no kubeconfig and not in a cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client for the configured API server (nothing is requested yet).
pub async fn client(config: &KubernetesConfig) -> Result<Client, KubeError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            })?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    Client::try_from(kube_config).map_err(KubeError::Client)
}

/// The mirrors of the API objects the source reads.
struct Mirrors {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    authorization: Store<DynamicObject>,
    peer_authentication: Store<DynamicObject>,
    /// Istio `WorkloadEntry`s, with the flag set while the API server does not know the kind.
    entries: (Store<DynamicObject>, Arc<AtomicBool>),
    /// Set when the API server does not know a policy kind (no Istio CRDs installed).
    absent: [Arc<AtomicBool>; 2],
    /// The traffic kinds, each with its flag set while the API server does not know it.
    traffic: Vec<(TrafficKind, Store<DynamicObject>, Arc<AtomicBool>)>,
}

/// What turns the mirrors into a state.
struct Builder {
    config: KubernetesConfig,
    node: String,
    root_namespace: String,
    zone: Option<String>,
    /// Pod UID → where its network namespace was found.
    netns: HashMap<String, netns::PodNetns>,
    /// (uid, resourceVersion) of policy objects already checked → their document or error.
    checked: HashMap<(String, String), Result<PolicyDocument, String>>,
    /// Policy uid → last good document.
    last_good: HashMap<String, PolicyDocument>,
    last_policies: Option<Arc<PolicyStore>>,
    traffic: traffic::TrafficBuilder,
    /// (uid, resourceVersion) of Services whose rate-limit annotations were checked.
    annotations_checked: HashSet<(String, String)>,
    entries: entry::EntryBuilder,
}

/// Starts the source: publishes on `tx` the file's state (`file`, re-read by the file
/// watcher) merged with the cluster's, once the cluster's is synced and after every change.
#[must_use = "dropping the handle does not stop the source; keep it to abort it"]
pub fn spawn(
    client: Client,
    config: KubernetesConfig,
    node: String,
    root_namespace: String,
    zone: Option<String>,
    mut file: watch::Receiver<Arc<MeshState>>,
    tx: watch::Sender<Arc<MeshState>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let changed = Arc::new(Notify::new());
        let mirrors = start_mirrors(&client, &changed);
        wait_for_sync(&mirrors, &changed).await;
        let zone = match zone {
            Some(zone) => Some(zone),
            None => node_zone(&client, &node).await,
        };
        info!(
            namespaces = mirrors.namespaces.state().len(),
            pods = mirrors.pods.state().len(),
            services = mirrors.services.state().len(),
            zone = zone.as_deref().unwrap_or(""),
            "Kubernetes state synced"
        );
        let mut builder = Builder {
            config,
            node,
            root_namespace,
            zone,
            netns: HashMap::new(),
            checked: HashMap::new(),
            last_good: HashMap::new(),
            last_policies: None,
            traffic: traffic::TrafficBuilder::default(),
            annotations_checked: HashSet::new(),
            entries: entry::EntryBuilder::default(),
        };
        let mut rescan =
            tokio::time::interval(Duration::from_millis(builder.config.rescan_interval_ms));
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut file_open = true;
        loop {
            let state = builder.build(&mirrors, &file.borrow_and_update());
            let publish = tx.borrow().workloads != state.workloads
                || tx.borrow().services != state.services
                || tx.borrow().pending.is_some()
                || !Arc::ptr_eq(&tx.borrow().policies, &state.policies)
                || !Arc::ptr_eq(&tx.borrow().traffic, &state.traffic);
            if publish {
                tx.send_replace(Arc::new(state));
            }
            tokio::select! {
                () = changed.notified() => tokio::time::sleep(BATCH).await,
                r = file.changed(), if file_open => file_open = r.is_ok(),
                _ = rescan.tick() => {}
            }
        }
    })
}

fn start_mirrors(client: &Client, changed: &Arc<Notify>) -> Mirrors {
    let namespaces = mirror(Api::<Namespace>::all(client.clone()), &(), changed, None);
    let pods = mirror(Api::<Pod>::all(client.clone()), &(), changed, None);
    let services = mirror(Api::<KubeService>::all(client.clone()), &(), changed, None);
    let slices = mirror(
        Api::<EndpointSlice>::all(client.clone()),
        &(),
        changed,
        None,
    );
    let absent = [
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    ];
    let policy_api = |kind: &str, plural: &str| {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("security.istio.io", "v1", kind),
            plural,
        );
        (
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            resource,
        )
    };
    let (api, resource) = policy_api("AuthorizationPolicy", "authorizationpolicies");
    let authorization = mirror(api, &resource, changed, Some(Arc::clone(&absent[0])));
    let (api, resource) = policy_api("PeerAuthentication", "peerauthentications");
    let peer_authentication = mirror(api, &resource, changed, Some(Arc::clone(&absent[1])));
    let entries = {
        let (group, version, kind, plural) = entry::API;
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let absent = Arc::new(AtomicBool::new(false));
        let store = mirror(api, &resource, changed, Some(Arc::clone(&absent)));
        (store, absent)
    };
    let traffic = traffic::KINDS
        .iter()
        .map(|&(kind, group, version, plural)| {
            let resource = traffic::resource(group, version, kind, plural);
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            let absent = Arc::new(AtomicBool::new(false));
            let store = mirror(api, &resource, changed, Some(Arc::clone(&absent)));
            (kind, store, absent)
        })
        .collect();
    Mirrors {
        namespaces,
        pods,
        services,
        slices,
        authorization,
        peer_authentication,
        entries,
        absent,
        traffic,
    }
}

/// Mirrors one kind: a reflector driven by its own task, which wakes `changed` after every
/// event. `absent` (for optional kinds) is set while the API server answers 404.
fn mirror<K>(
    api: Api<K>,
    dyntype: &K::DynamicType,
    changed: &Arc<Notify>,
    absent: Option<Arc<AtomicBool>>,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype.clone());
    let reader = writer.as_reader();
    let kind = K::kind(dyntype).into_owned();
    let changed = Arc::clone(changed);
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .boxed();
        let mut failing = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        info!(kind = %kind, "Kubernetes API reachable again");
                        failing = false;
                    }
                    if let Some(absent) = &absent {
                        absent.store(false, Ordering::Relaxed);
                    }
                    if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        continue;
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    let not_found = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404
                    );
                    if let (true, Some(absent)) = (not_found, &absent) {
                        if !absent.swap(true, Ordering::Relaxed) {
                            warn!(kind = %kind, "the API server does not serve this kind (CRD not installed?); none apply");
                            changed.notify_one();
                        }
                    } else if !failing {
                        warn!(kind = %kind, error = %crate::error_chain(&e), "Kubernetes watch failed; keeping the known state and retrying");
                        failing = true;
                    } else {
                        debug!(kind = %kind, error = %e, "Kubernetes watch still failing");
                    }
                }
            }
        }
    });
    reader
}

/// Returns once every kind was listed (policy and traffic kinds the API server does not
/// serve count as listed).
async fn wait_for_sync(mirrors: &Mirrors, changed: &Notify) {
    let _ = mirrors.namespaces.wait_until_ready().await;
    let _ = mirrors.pods.wait_until_ready().await;
    let _ = mirrors.services.wait_until_ready().await;
    let _ = mirrors.slices.wait_until_ready().await;
    let optional = [
        (&mirrors.authorization, &mirrors.absent[0]),
        (&mirrors.peer_authentication, &mirrors.absent[1]),
        (&mirrors.entries.0, &mirrors.entries.1),
    ]
    .into_iter()
    .chain(
        mirrors
            .traffic
            .iter()
            .map(|(_, store, absent)| (store, absent)),
    );
    for (store, absent) in optional {
        loop {
            if absent.load(Ordering::Relaxed) {
                break;
            }
            tokio::select! {
                _ = store.wait_until_ready() => break,
                () = changed.notified() => {}
            }
        }
    }
}

/// This node's zone label, if the Node can be read.
async fn node_zone(client: &Client, node: &str) -> Option<String> {
    match Api::<Node>::all(client.clone()).get(node).await {
        Ok(n) => n.labels().get(ZONE_LABEL).cloned(),
        Err(e) => {
            warn!(node, error = %e, "cannot read this node's zone; locality preferences fall back to any endpoint");
            None
        }
    }
}

impl Builder {
    /// The cluster's state merged with the file's.
    fn build(&mut self, mirrors: &Mirrors, file: &MeshState) -> MeshState {
        let enrolled_ns = convert::enrolled_namespaces(
            mirrors.namespaces.state().iter().map(AsRef::as_ref),
            &self.config,
        );
        let pods = mirrors.pods.state();
        let mut workloads: Vec<(String, Workload)> = pods
            .iter()
            .filter_map(|pod| {
                let w = convert::workload(pod, &enrolled_ns, &self.config)?;
                Some((pod.uid().unwrap_or_default(), w))
            })
            .collect();
        self.attach_netns(&mut workloads);
        let mut workloads: Vec<Workload> = workloads.into_iter().map(|(_, w)| w).collect();
        let entry_objects = mirrors.entries.0.state();
        let entries = self.entries.build(
            entry_objects.iter().map(AsRef::as_ref),
            &enrolled_ns,
            &self.config,
        );
        workloads.extend(entries.iter().map(|e| e.workload.clone()));
        merge_by(&mut workloads, &file.workloads, Workload::uid);
        workloads.sort_by_key(Workload::uid);

        let slices = mirrors.slices.state();
        let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &slices {
            if let Some(name) = slice.labels().get(convert::SERVICE_NAME_LABEL) {
                by_service
                    .entry((slice.namespace().unwrap_or_default(), name.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        let kube_services = mirrors.services.state();
        self.check_annotations(&kube_services);
        let mut services: Vec<Service> = kube_services
            .iter()
            .filter_map(|svc| {
                let key = (svc.namespace().unwrap_or_default(), svc.name_any());
                let mut service =
                    convert::service(svc, by_service.get(&key).map_or(&[][..], Vec::as_slice))?;
                if let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) {
                    entry::add_endpoints(&mut service, selector, &entries);
                }
                Some(service)
            })
            .collect();
        merge_by(&mut services, &file.services, |s| {
            format!("{}/{}", s.namespace, s.name)
        });
        services.sort_by_key(|s| format!("{}/{}", s.namespace, s.name));

        let policies = self.policies(mirrors, file);
        let traffic_stores: Vec<(TrafficKind, Store<DynamicObject>)> = mirrors
            .traffic
            .iter()
            .map(|(kind, store, _)| (*kind, store.clone()))
            .collect();
        let traffic = self.traffic.build(&traffic_stores, &file.traffic);
        MeshState {
            workloads,
            services,
            policies,
            traffic,
            networks: file.networks.clone(),
            zone: self.zone.clone(),
            pending: None,
        }
    }

    /// Warns once per Service version about rate-limit annotations it ignores.
    fn check_annotations(&mut self, services: &[Arc<KubeService>]) {
        let mut live = HashSet::new();
        for svc in services {
            let key = (
                svc.uid().unwrap_or_else(|| {
                    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
                }),
                svc.resource_version().unwrap_or_default(),
            );
            live.insert(key.clone());
            if self.annotations_checked.insert(key) {
                for bad in convert::rate_limit(svc).1 {
                    warn!(
                        namespace = %svc.namespace().unwrap_or_default(),
                        service = %svc.name_any(),
                        annotation = bad.annotation,
                        value = %bad.value,
                        reason = bad.reason,
                        "ignored a connection rate-limit annotation"
                    );
                }
            }
        }
        self.annotations_checked.retain(|key| live.contains(key));
    }

    /// Finds the network namespaces of this node's enrolled pods; a pod whose namespace is not
    /// found (yet) is not enrolled until it is.
    fn attach_netns(&mut self, workloads: &mut [(String, Workload)]) {
        let wanted: HashSet<String> = workloads
            .iter()
            .filter(|(_, w)| w.node == self.node && w.enrolled)
            .map(|(uid, _)| uid.clone())
            .collect();
        let found = netns::scan(&self.config.proc_root, &wanted, &self.netns);
        for (uid, w) in workloads.iter_mut() {
            if !wanted.contains(uid) {
                continue;
            }
            if let Some(ns) = found.get(uid) {
                w.netns = Some(ns.path.clone());
            } else {
                debug!(workload = %w.uid(), pod_uid = %uid, "no network namespace found for the pod (yet); not enrolled");
                w.enrolled = false;
            }
        }
        for (uid, ns) in &found {
            match self.netns.get(uid) {
                Some(old) if old.inode != ns.inode => {
                    info!(pod_uid = %uid, pid = ns.pid, "pod sandbox replaced; enrolling its new network namespace");
                }
                _ => {}
            }
        }
        self.netns = found;
    }

    /// The cluster's policy objects (each checked alone; a bad one keeps its last good
    /// version) plus the file's.
    fn policies(&mut self, mirrors: &Mirrors, file: &MeshState) -> Arc<PolicyStore> {
        let mut docs: Vec<PolicyDocument> = Vec::new();
        let mut live = HashSet::new();
        for (store, kind) in [
            (&mirrors.authorization, Kind::AuthorizationPolicy),
            (&mirrors.peer_authentication, Kind::PeerAuthentication),
        ] {
            for obj in store.state() {
                let uid = convert::object_uid(&obj, &kind);
                live.insert(uid.clone());
                let key = (uid.clone(), obj.resource_version().unwrap_or_default());
                let checked = self.checked.entry(key).or_insert_with(|| {
                    let result = convert::policy(&obj, &kind.to_string()).and_then(|doc| {
                        PolicyStore::new(&self.root_namespace, std::slice::from_ref(&doc))
                            .map(|_| doc)
                            .map_err(|e| crate::error_chain(&e))
                    });
                    if let Err(e) = &result {
                        error!(
                            kind = %kind,
                            namespace = %obj.namespace().unwrap_or_default(),
                            name = %obj.name_any(),
                            error = %e,
                            "rejected policy object; its last good version stays in force, or, \
                             without one, it is enforced as the strictest policy of its kind for \
                             what it selects"
                        );
                    }
                    result
                });
                match checked {
                    Ok(doc) => {
                        self.last_good.insert(uid, doc.clone());
                        docs.push(doc.clone());
                    }
                    Err(_) => docs.push(
                        self.last_good
                            .get(&uid)
                            .cloned()
                            .unwrap_or_else(|| convert::fail_closed_policy(&obj, kind)),
                    ),
                }
            }
        }
        self.last_good.retain(|uid, _| live.contains(uid));
        self.checked.retain(|(uid, _), _| live.contains(uid));
        merge_by(&mut docs, file.policies.documents(), |d| {
            format!("{}/{}/{}", d.kind, d.metadata.namespace, d.metadata.name)
        });
        if let Some(last) = &self.last_policies
            && last.documents() == docs.as_slice()
        {
            return Arc::clone(last);
        }
        let store = match PolicyStore::new(&self.root_namespace, &docs) {
            Ok(store) => Arc::new(store),
            Err(e) => {
                error!(error = %crate::error_chain(&e), "rejected the cluster's policies; keeping the last good set");
                return self
                    .last_policies
                    .clone()
                    .unwrap_or_else(|| Arc::clone(&file.policies));
            }
        };
        self.last_policies = Some(Arc::clone(&store));
        store
    }
}

/// Appends the items of `extra` whose key is not in `items` already (the cluster's objects
/// win over the file's).
fn merge_by<T: Clone>(items: &mut Vec<T>, extra: &[T], key: impl Fn(&T) -> String) {
    let known: HashSet<String> = items.iter().map(&key).collect();
    items.extend(extra.iter().filter(|x| !known.contains(&key(x))).cloned());
}
