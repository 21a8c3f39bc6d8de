//! A Kubernetes API server stand-in: the real list/watch protocol over HTTP, for the kinds the
//! mesh reads, so that the daemon's Kubernetes source is driven through a kubeconfig exactly as
//! against a cluster.
//!
//! What it speaks: `GET` of cluster-wide collections (`/api/v1/pods`,
//! `/apis/discovery.k8s.io/v1/endpointslices`, ...) as `<Kind>List` with the collection's
//! `resourceVersion`; `?watch=true&resourceVersion=N` as a chunked stream of JSON watch events
//! after N (from its history), with `BOOKMARK` events when `allowWatchBookmarks` is set, ended
//! after `timeoutSeconds` (capped by the server); a watch from a compacted resource version gets
//! an `ERROR` event with a `410 Gone` status, as etcd compaction causes; `GET` of one node;
//! `404` for kinds it is told not to serve (CRDs not installed); `401` without the bearer
//! token. Objects are changed by the test through [`ApiServer::apply`] and
//! [`ApiServer::delete`]; [`ApiServer::stop`] and [`ApiServer::start`] take it down and bring
//! it back on the same address, as an API server restart would.

use std::{
    collections::{BTreeMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// The bearer token the stand-in requires (written into the kubeconfig).
const TOKEN: &str = "mesh-test-token";

/// A kind the stand-in serves.
struct Resource {
    plural: &'static str,
    api_version: &'static str,
    kind: &'static str,
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: &'static str,
}

const RESOURCES: [Resource; 12] = [
    Resource {
        plural: "namespaces",
        api_version: "v1",
        kind: "Namespace",
        prefix: "/api/v1",
    },
    Resource {
        plural: "nodes",
        api_version: "v1",
        kind: "Node",
        prefix: "/api/v1",
    },
    Resource {
        plural: "pods",
        api_version: "v1",
        kind: "Pod",
        prefix: "/api/v1",
    },
    Resource {
        plural: "services",
        api_version: "v1",
        kind: "Service",
        prefix: "/api/v1",
    },
    Resource {
        plural: "endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        prefix: "/apis/discovery.k8s.io/v1",
    },
    Resource {
        plural: "authorizationpolicies",
        api_version: "security.istio.io/v1",
        kind: "AuthorizationPolicy",
        prefix: "/apis/security.istio.io/v1",
    },
    Resource {
        plural: "peerauthentications",
        api_version: "security.istio.io/v1",
        kind: "PeerAuthentication",
        prefix: "/apis/security.istio.io/v1",
    },
    Resource {
        plural: "workloadentries",
        api_version: "networking.istio.io/v1",
        kind: "WorkloadEntry",
        prefix: "/apis/networking.istio.io/v1",
    },
    Resource {
        plural: "virtualservices",
        api_version: "networking.istio.io/v1",
        kind: "VirtualService",
        prefix: "/apis/networking.istio.io/v1",
    },
    Resource {
        plural: "destinationrules",
        api_version: "networking.istio.io/v1",
        kind: "DestinationRule",
        prefix: "/apis/networking.istio.io/v1",
    },
    Resource {
        plural: "tcproutes",
        api_version: "gateway.networking.k8s.io/v1alpha2",
        kind: "TCPRoute",
        prefix: "/apis/gateway.networking.k8s.io/v1alpha2",
    },
    Resource {
        plural: "faultinjections",
        api_version: "mesh.io/v1alpha1",
        kind: "FaultInjection",
        prefix: "/apis/mesh.io/v1alpha1",
    },
];

fn resource_of_kind(kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.kind == kind)
}

/// One change, as a watch event.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resource version below this get `410 Gone`.
    compacted: u64,
    unserved: HashSet<&'static str>,
}

/// What the stand-in counts, for assertions.
#[derive(Debug, Default)]
pub struct Counts {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    pub bookmarks: AtomicU64,
    pub gone: AtomicU64,
    pub unauthorized: AtomicU64,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    counts: Counts,
    watch_cap: Duration,
    bookmark_every: Duration,
}

/// The running stand-in.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    netns: PathBuf,
    addr: SocketAddr,
    /// Sends `true` to stop the current incarnation (listener and every connection).
    stop: Option<watch::Sender<bool>>,
}

impl ApiServer {
    /// Starts serving on `addr` inside the network namespace at `netns` (e.g. a testbed node's).
    /// Watches end after at most `watch_cap` (clients then watch again from their last resource
    /// version), bookmarks come every `bookmark_every`.
    pub fn start_in(
        netns: &Path,
        addr: SocketAddr,
        watch_cap: Duration,
        bookmark_every: Duration,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut server = Self {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                changes: broadcast::channel(4096).0,
                counts: Counts::default(),
                watch_cap,
                bookmark_every,
            }),
            runtime,
            netns: netns.to_owned(),
            addr,
            stop: None,
        };
        server.start()?;
        Ok(server)
    }

    /// (Re)starts listening.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.stop.is_some() {
            return Ok(());
        }
        let listener = bind_in_netns(&self.netns, self.addr)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::clone(&self.shared);
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        self.runtime.spawn(accept_loop(listener, shared, stop_rx));
        self.stop = Some(stop_tx);
        Ok(())
    }

    /// Stops listening and cuts every open connection (watches end mid-stream).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        // Let the accept loop drop its listener before a restart binds the address again.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// The address clients reach.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig pointing at the stand-in.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: test\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: test\ncurrent-context: test\n",
            addr = self.addr
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces an object (`kind` and `metadata.name` required; `metadata.uid` is
    /// kept or made up). Returns its new resource version.
    pub fn apply(&self, mut object: Value) -> anyhow::Result<u64> {
        let kind = object["kind"]
            .as_str()
            .context("object without kind")?
            .to_owned();
        let resource = resource_of_kind(&kind).with_context(|| format!("unknown kind {kind}"))?;
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without name")?
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        object["apiVersion"] = json!(resource.api_version);
        let mut store = self.lock();
        store.rv += 1;
        let rv = store.rv;
        let key = (resource.plural, namespace, name);
        let previous = store.objects.get(&key);
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let uid = previous
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
            .or_else(|| object["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| made_up_uid(rv));
        object["metadata"]["uid"] = json!(uid);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        store.objects.insert(key, object.clone());
        self.record(
            &mut store,
            Change {
                rv,
                plural: resource.plural,
                kind: event,
                object,
            },
        );
        Ok(rv)
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let resource = resource_of_kind(kind).with_context(|| format!("unknown kind {kind}"))?;
        let mut store = self.lock();
        let key = (resource.plural, namespace.to_owned(), name.to_owned());
        let Some(mut object) = store.objects.remove(&key) else {
            return Ok(false);
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut store,
            Change {
                rv,
                plural: resource.plural,
                kind: "DELETED",
                object,
            },
        );
        Ok(true)
    }

    /// The current object, if any.
    #[must_use]
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource_of_kind(kind)?;
        self.lock()
            .objects
            .get(&(resource.plural, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets the history up to now: a watch from an older resource version gets `410 Gone`
    /// and the client has to list again.
    pub fn compact(&self) {
        let mut store = self.lock();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// Serves a kind or answers `404` for it (as without its CRD).
    pub fn set_served(&self, kind: &str, served: bool) -> anyhow::Result<()> {
        let resource = resource_of_kind(kind).with_context(|| format!("unknown kind {kind}"))?;
        let mut store = self.lock();
        if served {
            store.unserved.remove(resource.plural);
        } else {
            store.unserved.insert(resource.plural);
        }
        Ok(())
    }

    /// Request and event counters.
    #[must_use]
    pub fn counts(&self) -> &Counts {
        &self.shared.counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, store: &mut Store, change: Change) {
        store.history.push(change.clone());
        let _ = self.shared.changes.send(change);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// A UID in the Kubernetes (UUID) layout.
#[must_use]
pub fn made_up_uid(seed: u64) -> String {
    let pid = u64::from(std::process::id());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        pid & 0xffff_ffff,
        (seed >> 16) & 0xffff,
        seed & 0xfff,
        (seed >> 12) & 0xfff,
        seed
    )
}

/// A listening socket bound inside another network namespace (from a short-lived thread, so
/// that the caller's namespace is untouched; the socket stays in the namespace it was made in).
fn bind_in_netns(netns: &Path, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let netns = netns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
        let file =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => {
                    l.set_nonblocking(true)?;
                    return Ok(l);
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => bail!("binding {addr}: {e}"),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = Arc::clone(&shared);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(shared: &Arc<Shared>, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        shared.counts.unauthorized.fetch_add(1, Ordering::Relaxed);
        return full(
            StatusCode::UNAUTHORIZED,
            &status(401, "Unauthorized", "Unauthorized"),
        );
    }
    if req.method() != hyper::Method::GET {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "the stand-in only reads"),
        );
    }
    let path = req.uri().path();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let Some((resource, name)) = RESOURCES.iter().find_map(|r| {
        let rest = path.strip_prefix(r.prefix)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(r.plural)?;
        match rest {
            "" => Some((r, None)),
            _ => Some((r, Some(rest.strip_prefix('/')?.to_owned()))),
        }
    }) else {
        return full(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    let store = shared.store.lock().unwrap_or_else(PoisonError::into_inner);
    if store.unserved.contains(resource.plural) {
        return full(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    if let Some(name) = name {
        return match store
            .objects
            .get(&(resource.plural, String::new(), name.clone()))
        {
            Some(object) => full(StatusCode::OK, object),
            None => full(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", resource.plural),
                ),
            ),
        };
    }
    if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(store.rv);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(shared.watch_cap, Duration::from_secs)
            .min(shared.watch_cap);
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        shared.counts.watches.fetch_add(1, Ordering::Relaxed);
        if from < store.compacted {
            shared.counts.gone.fetch_add(1, Ordering::Relaxed);
            let line = json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from} ({})", store.compacted))});
            return full(StatusCode::OK, &line);
        }
        let backlog: Vec<Change> = store
            .history
            .iter()
            .filter(|c| c.plural == resource.plural && c.rv > from)
            .cloned()
            .collect();
        // Subscribed under the store lock: no change falls between backlog and live events.
        let live = shared.changes.subscribe();
        drop(store);
        return watch_response(shared, resource, from, backlog, live, timeout, bookmarks);
    }
    shared.counts.lists.fetch_add(1, Ordering::Relaxed);
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((plural, _, _), _)| *plural == resource.plural)
        .map(|(_, o)| {
            let mut o = o.clone();
            o["kind"] = json!(resource.kind);
            o
        })
        .collect();
    full(
        StatusCode::OK,
        &json!({"apiVersion": resource.api_version, "kind": format!("{}List", resource.kind),
                "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

/// A chunked stream of watch events: the backlog, then live changes, bookmarks meanwhile,
/// until `timeout`.
fn watch_response(
    shared: &Arc<Shared>,
    resource: &'static Resource,
    from: u64,
    backlog: Vec<Change>,
    mut live: broadcast::Receiver<Change>,
    timeout: Duration,
    bookmarks: bool,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let shared = Arc::clone(shared);
    let event = move |change: &Change| {
        let mut object = change.object.clone();
        object["kind"] = json!(resource.kind);
        Bytes::from(format!(
            "{}\n",
            json!({"type": change.kind, "object": object})
        ))
    };
    tokio::spawn(async move {
        // `last`: newest change sent on this stream; `seen`: newest change of any kind seen
        // (changes arrive in resource-version order, so everything up to it was handled).
        let mut last = from;
        let mut seen = from;
        for change in &backlog {
            last = change.rv;
            if tx.send(event(change)).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut ticker = tokio::time::interval(shared.bookmark_every);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = &mut end => return,
                _ = ticker.tick(), if bookmarks => {
                    let rv = last.max(seen);
                    let bookmark = json!({"type": "BOOKMARK", "object": {"kind": resource.kind,
                        "apiVersion": resource.api_version, "metadata": {"resourceVersion": rv.to_string()}}});
                    shared.counts.bookmarks.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Bytes::from(format!("{bookmark}\n"))).await.is_err() {
                        return;
                    }
                }
                change = live.recv() => match change {
                    Ok(change) => {
                        seen = seen.max(change.rv);
                        if change.plural == resource.plural && change.rv > last {
                            last = change.rv;
                            if tx.send(event(&change)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Lagged or closed: end the watch; the client resumes from its last version.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    response
}
