//! One proxied connection's metrics and its access-log line.
//!
//! Bytes are added to the `istio_tcp_*_bytes_total` counters as they are copied (so a scrape
//! sees long connections progress), and one access-log record (target `access`) is written when
//! the connection ends, successfully or not.

use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hash as _, Hasher as _},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;

use super::{
    ConnLabels, Metrics, PathLabels,
    peer::{Peer, UNKNOWN},
};
use crate::{identity::Identity, workload::Workload};

/// One end of a connection as metrics see it.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    pub workload: Option<Arc<Workload>>,
    pub identity: Option<Identity>,
    pub addr: Option<SocketAddr>,
    /// The service the connection was addressed to (`name.namespace.svc.cluster.local`).
    pub service: Option<Arc<str>>,
    /// What the peer says about itself (the `baggage` of its HBONE request, checked against
    /// its identity): the descriptive labels when `workload` is not known, never the principal.
    pub peer: Option<Arc<Peer>>,
}

/// `connection_security_policy`, and why a connection is not in mutual TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    MutualTls,
    None(NoMtls),
}

/// Why a connection is carried without mutual TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoMtls {
    /// Both ends are pods of this node: the bytes never leave it, and the daemon knows both
    /// identities.
    SameNode,
    /// The destination is not in the mesh (passthrough).
    DestinationNotInMesh,
    /// The peer connected in plaintext (admitted: `PeerAuthentication` is not STRICT).
    PlaintextPeer,
}

impl Security {
    /// The `connection_security_policy` label.
    #[must_use]
    pub fn policy(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None(_) => "none",
        }
    }

    /// Why there is no mutual TLS, as in the access log (empty with mutual TLS).
    #[must_use]
    pub fn no_mtls_reason(self) -> &'static str {
        match self {
            Security::MutualTls => "",
            Security::None(NoMtls::SameNode) => "same_node",
            Security::None(NoMtls::DestinationNotInMesh) => "destination_not_in_mesh",
            Security::None(NoMtls::PlaintextPeer) => "plaintext_peer",
        }
    }
}

/// Which way a connection goes through this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Into a pod of this node.
    Inbound,
    /// Out of a pod of this node.
    Outbound,
}

impl Direction {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How a connection is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// mTLS HBONE between the two pods' nodes.
    Hbone,
    /// Both pods on this node: straight into the destination's netns, no TLS.
    SameNode,
    /// Destination outside the mesh: plaintext, from the source pod's netns.
    Passthrough,
    /// Plaintext into a pod of this node (captured on 15006).
    Plaintext,
    /// Through this east-west gateway: an HBONE stream from another network forwarded, unread,
    /// to an endpoint's 15008.
    Gateway,
    /// To another network through its east-west gateway: an inner HBONE connection to the
    /// destination inside an HBONE stream to the gateway (double HBONE).
    DoubleHbone,
}

impl Path {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Hbone => "hbone",
            Path::SameNode => "same-node",
            Path::Passthrough => "passthrough",
            Path::Plaintext => "plaintext",
            Path::Gateway => "gateway",
            Path::DoubleHbone => "double-hbone",
        }
    }
}

fn principal(id: Option<&Identity>) -> String {
    id.map_or_else(
        || UNKNOWN.to_owned(),
        |id| {
            format!(
                "spiffe://{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        },
    )
}

/// One Istio label set with its counters, shared by every connection that has it: building the
/// 27 labels (two dozen strings) and finding their counters is done once per workload pair, not per
/// connection.
pub struct LabelSet {
    labels: ConnLabels,
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
}

/// What a label set is made from. The workloads are held (not just compared by address) so an
/// address is never reused for another workload while the entry exists.
struct SetKey {
    direction: &'static str,
    security: Security,
    source: Option<Arc<Workload>>,
    destination: Option<Arc<Workload>>,
    source_identity: Option<Identity>,
    destination_identity: Option<Identity>,
    service: Option<Arc<str>>,
    source_peer: Option<Arc<Peer>>,
    destination_peer: Option<Arc<Peer>>,
}

impl SetKey {
    fn matches(
        &self,
        direction: &str,
        security: Security,
        source: &Endpoint,
        destination: &Endpoint,
    ) -> bool {
        let same = |a: Option<&Arc<Workload>>, b: Option<&Arc<Workload>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.direction == direction
            && self.security == security
            && same(self.source.as_ref(), source.workload.as_ref())
            && same(self.destination.as_ref(), destination.workload.as_ref())
            && self.source_identity == source.identity
            && self.destination_identity == destination.identity
            && self.service == destination.service
            && self.source_peer == source.peer
            && self.destination_peer == destination.peer
    }
}

/// The label sets built so far, by a hash of what they are made from. Bounded: past
/// [`MAX_LABEL_SETS`] it starts over (workload updates replace the `Workload` values, so old
/// entries stop matching; this also lets them go).
#[derive(Default)]
pub struct LabelSets {
    sets: Mutex<HashMap<u64, Bucket>>,
    hasher: std::hash::RandomState,
}

const MAX_LABEL_SETS: usize = 4096;

/// Label sets whose inputs hash alike.
type Bucket = Vec<(SetKey, Arc<LabelSet>)>;

impl LabelSets {
    fn hash(
        &self,
        direction: &str,
        security: Security,
        source: &Endpoint,
        destination: &Endpoint,
    ) -> u64 {
        let mut h = self.hasher.build_hasher();
        direction.hash(&mut h);
        security.policy().hash(&mut h);
        source.workload.as_ref().map(Arc::as_ptr).hash(&mut h);
        destination.workload.as_ref().map(Arc::as_ptr).hash(&mut h);
        source.identity.hash(&mut h);
        destination.identity.hash(&mut h);
        destination.service.hash(&mut h);
        source.peer.hash(&mut h);
        destination.peer.hash(&mut h);
        h.finish()
    }

    fn get(
        &self,
        metrics: &Metrics,
        direction: &'static str,
        security: Security,
        source: &Endpoint,
        destination: &Endpoint,
    ) -> Arc<LabelSet> {
        let hash = self.hash(direction, security, source, destination);
        let mut sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, set)) = sets.get(&hash).and_then(|v| {
            v.iter()
                .find(|(k, _)| k.matches(direction, security, source, destination))
        }) {
            return Arc::clone(set);
        }
        if sets.len() >= MAX_LABEL_SETS {
            sets.clear();
        }
        let labels = labels(&metrics.cluster, direction, security, source, destination);
        let set = Arc::new(LabelSet {
            opened: metrics.opened.get_or_create(&labels).clone(),
            closed: metrics.closed.get_or_create(&labels).clone(),
            received: metrics.received_bytes.get_or_create(&labels).clone(),
            sent: metrics.sent_bytes.get_or_create(&labels).clone(),
            labels,
        });
        let key = SetKey {
            direction,
            security,
            source: source.workload.clone(),
            destination: destination.workload.clone(),
            source_identity: source.identity.clone(),
            destination_identity: destination.identity.clone(),
            service: destination.service.clone(),
            source_peer: source.peer.clone(),
            destination_peer: destination.peer.clone(),
        };
        sets.entry(hash).or_default().push((key, Arc::clone(&set)));
        set
    }
}

/// What the labels say about one end: its workload as Istio describes it (in `cluster` unless
/// its labels say otherwise), else what it said about itself, else only the namespace of its
/// verified identity.
fn describe(end: &Endpoint, cluster: &str) -> Peer {
    if let Some(w) = &end.workload {
        return Peer::of(w, cluster);
    }
    if let Some(peer) = &end.peer {
        return Peer::clone(peer);
    }
    Peer {
        namespace: end.identity.as_ref().map(|id| id.namespace.clone()),
        ..Peer::default()
    }
}

fn known(value: Option<String>) -> String {
    value.unwrap_or_else(|| UNKNOWN.to_owned())
}

/// A service's name and namespace from its hostname (`<name>.<namespace>.svc.<domain>`); a
/// host of another shape (a `ServiceEntry`'s) is its own name, in no known namespace.
fn service_parts(hostname: &str) -> (String, String) {
    let mut parts = hostname.splitn(4, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(namespace), Some("svc")) if !name.is_empty() && !namespace.is_empty() => {
            (name.to_owned(), namespace.to_owned())
        }
        _ => (hostname.to_owned(), UNKNOWN.to_owned()),
    }
}

/// Istio's label set of a connection, as ztunnel reports it: `*_app` and `*_version` are the
/// canonical service and revision; the principals are the verified identities.
fn labels(
    cluster: &str,
    direction: &str,
    security: Security,
    source: &Endpoint,
    destination: &Endpoint,
) -> ConnLabels {
    let (src, dst) = (describe(source, cluster), describe(destination, cluster));
    let (service_name, service_namespace) = destination
        .service
        .as_deref()
        .map_or_else(|| (UNKNOWN.to_owned(), UNKNOWN.to_owned()), service_parts);
    ConnLabels {
        reporter: if direction == "outbound" {
            "source"
        } else {
            "destination"
        },
        source_workload: known(src.workload),
        source_canonical_service: known(src.canonical_service.clone()),
        source_canonical_revision: known(src.canonical_revision.clone()),
        source_workload_namespace: known(src.namespace),
        source_principal: principal(source.identity.as_ref()),
        source_app: known(src.canonical_service),
        source_version: known(src.canonical_revision),
        source_cluster: known(src.cluster),
        destination_service: known(destination.service.as_deref().map(str::to_owned)),
        destination_service_namespace: service_namespace,
        destination_service_name: service_name,
        destination_workload: known(dst.workload),
        destination_canonical_service: known(dst.canonical_service.clone()),
        destination_canonical_revision: known(dst.canonical_revision.clone()),
        destination_workload_namespace: known(dst.namespace),
        destination_principal: principal(destination.identity.as_ref()),
        destination_app: known(dst.canonical_service),
        destination_version: known(dst.canonical_revision),
        destination_cluster: known(dst.cluster),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: security.policy(),
        source_region: known(src.region),
        source_zone: known(src.zone),
        destination_region: known(dst.region),
        destination_zone: known(dst.zone),
    }
}

/// What traffic management did with a connection, for its access-log line.
#[derive(Clone, Debug, Default)]
pub struct TrafficNote {
    /// The route that split it (`TCPRoute namespace/name`).
    pub route: Option<Arc<str>>,
    /// The destination it was sent to (the backend service, with `/subset`).
    pub backend: Option<Arc<str>>,
    /// Endpoints tried (more than 1 after a failover).
    pub attempts: u32,
    /// The injected fault (`delay 200ms FaultInjection ns/name`).
    pub fault: Option<String>,
}

/// Metrics and access log of one connection.
pub struct ConnRecord {
    metrics: Arc<Metrics>,
    set: Arc<LabelSet>,
    /// Istio's response flag of how it ended (`-` unless it failed).
    flags: &'static str,
    path: PathLabels,
    started: Instant,
    source: Endpoint,
    destination: Endpoint,
    security: Security,
    /// Source → destination bytes, and the counter they are added to.
    pub received: ByteCount,
    /// Destination → source bytes.
    pub sent: ByteCount,
    reported_failure: bool,
    traffic: Option<Box<TrafficNote>>,
    /// The network the destination was reached on, when the connection crossed networks.
    network: Option<Arc<str>>,
    /// The east-west gateway the connection went through (double HBONE).
    gateway: Option<Box<GatewayHop>>,
}

/// The east-west gateway a connection crossed to its destination's network.
#[derive(Clone, Debug)]
pub struct GatewayHop {
    pub address: SocketAddr,
    /// The identity the gateway's certificate showed.
    pub identity: Identity,
}

/// A byte count that also feeds a Prometheus counter.
#[derive(Clone, Debug)]
pub struct ByteCount {
    total: Arc<AtomicU64>,
    counter: Counter,
}

impl ByteCount {
    fn new(counter: Counter) -> Self {
        Self {
            total: Arc::new(AtomicU64::new(0)),
            counter,
        }
    }

    /// Adds `n` bytes.
    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        self.counter.inc_by(n);
    }

    #[must_use]
    pub fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

impl ConnRecord {
    /// Starts recording a connection (counts it opened).
    #[must_use]
    pub fn open(
        metrics: &Arc<Metrics>,
        (direction, path): (Direction, Path),
        source: Endpoint,
        destination: Endpoint,
        security: Security,
    ) -> Self {
        let (direction, path) = (direction.as_str(), path.as_str());
        let set = metrics
            .label_sets
            .get(metrics, direction, security, &source, &destination);
        let path = PathLabels { direction, path };
        set.opened.inc();
        metrics.open_connections.get_or_create(&path).inc();
        Self {
            received: ByteCount::new(set.received.clone()),
            sent: ByteCount::new(set.sent.clone()),
            metrics: Arc::clone(metrics),
            set,
            flags: "-",
            path,
            started: Instant::now(),
            source,
            destination,
            security,
            reported_failure: false,
            traffic: None,
            network: None,
            gateway: None,
        }
    }

    /// Counts the setup from `started` (the connection was accepted before the record could be
    /// opened: its endpoint was not known until a connect succeeded).
    #[must_use]
    pub fn started_at(mut self, started: Instant) -> Self {
        self.started = started.min(self.started);
        self
    }

    /// Notes what traffic management did, for the access log.
    #[must_use]
    pub fn with_traffic(mut self, note: TrafficNote) -> Self {
        self.traffic = Some(Box::new(note));
        self
    }

    /// Notes the network the destination is reached on, for the access log.
    #[must_use]
    pub fn with_network(mut self, network: Arc<str>) -> Self {
        self.network = Some(network);
        self
    }

    /// Notes the east-west gateway the connection goes through, for the access log.
    #[must_use]
    pub fn with_gateway(mut self, hop: GatewayHop) -> Self {
        self.gateway = Some(Box::new(hop));
        self
    }

    /// The destination is connected (records the setup time).
    pub fn connected(&self) {
        self.metrics
            .setup_seconds
            .get_or_create(&self.path)
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Ends the record: closed counter, duration, access log. `reason` says how it ended.
    pub fn close(mut self, reason: &str) {
        self.finish(reason);
    }

    /// Ends a connection that failed before carrying data (`flag` is Istio's response flag,
    /// e.g. `UF` for an upstream connect failure, `DENY` for a policy denial).
    pub fn fail(mut self, flag: &'static str, reason: &str) {
        self.reported_failure = true;
        let mut labels = self.set.labels.clone();
        labels.response_flags = flag;
        // The close is counted under its flag (the open was counted before the outcome was
        // known), so dashboards can break failures down by flag.
        self.metrics.closed.get_or_create(&labels).inc();
        self.flags = flag;
        self.finish(reason);
    }

    fn finish(&mut self, reason: &str) {
        let elapsed = self.started.elapsed();
        if !self.reported_failure {
            self.set.closed.inc();
        }
        self.metrics
            .duration_seconds
            .get_or_create(&self.path)
            .observe(elapsed.as_secs_f64());
        self.metrics
            .open_connections
            .get_or_create(&self.path)
            .dec();
        access_line(&AccessLine {
            path: &self.path,
            source: &self.source,
            destination: &self.destination,
            bytes: (self.sent.get(), self.received.get()),
            elapsed,
            security: Some(self.security),
            flags: self.flags,
            traffic: self.traffic.as_deref(),
            network: self.network.as_deref(),
            gateway: self.gateway.as_deref(),
            reason,
        });
    }

    /// The access-log line of a connection the traffic rules refused before it went anywhere
    /// (an injected abort, a rate or pool limit: `flag` says which). Only the line: the
    /// connection counters are Istio's and count connections that were carried or tried, and
    /// `mesh_traffic_decisions` counts the refusal.
    pub fn refused(
        source: &Endpoint,
        destination: &Endpoint,
        (flag, reason): (&'static str, &str),
        traffic: &TrafficNote,
        started: Instant,
    ) {
        access_line(&AccessLine {
            path: &PathLabels {
                direction: Direction::Outbound.as_str(),
                path: "",
            },
            source,
            destination,
            bytes: (0, 0),
            elapsed: started.elapsed(),
            security: None,
            flags: flag,
            traffic: Some(traffic),
            network: None,
            gateway: None,
            reason,
        });
    }
}

/// What one access-log line says.
struct AccessLine<'a> {
    path: &'a PathLabels,
    source: &'a Endpoint,
    destination: &'a Endpoint,
    /// `(sent, received)`.
    bytes: (u64, u64),
    elapsed: std::time::Duration,
    /// `None`: not carried.
    security: Option<Security>,
    flags: &'static str,
    traffic: Option<&'a TrafficNote>,
    /// The destination's network, when the connection crossed networks.
    network: Option<&'a str>,
    gateway: Option<&'a GatewayHop>,
    reason: &'a str,
}

fn access_line(line: &AccessLine<'_>) {
    let addr = |e: &Endpoint| e.addr.map(|a| a.to_string()).unwrap_or_default();
    let workload = |e: &Endpoint| e.workload.as_ref().map(|w| w.uid()).unwrap_or_default();
    let identity = |e: &Endpoint| {
        e.identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    let traffic = line.traffic;
    let text = |f: fn(&TrafficNote) -> Option<&str>| traffic.and_then(f).unwrap_or("");
    tracing::info!(
        target: "access",
        direction = line.path.direction,
        path = line.path.path,
        src_workload = %workload(line.source),
        src_identity = %identity(line.source),
        src_addr = %addr(line.source),
        dst_workload = %workload(line.destination),
        dst_identity = %identity(line.destination),
        dst_addr = %addr(line.destination),
        dst_service = line.destination.service.as_deref().unwrap_or(""),
        bytes_sent = line.bytes.0,
        bytes_received = line.bytes.1,
        duration_ms = line.elapsed.as_millis(),
        security = line.security.map_or("", Security::policy),
        no_mtls_reason = line.security.map_or("", Security::no_mtls_reason),
        response_flags = line.flags,
        route = text(|t| t.route.as_deref()),
        backend = text(|t| t.backend.as_deref()),
        attempts = traffic.map_or(1, |t| t.attempts),
        fault = text(|t| t.fault.as_deref()),
        network = line.network.unwrap_or(""),
        gateway = %line.gateway.map(|g| g.address.to_string()).unwrap_or_default(),
        gateway_identity = %line.gateway.map(|g| g.identity.to_string()).unwrap_or_default(),
        reason = line.reason,
        "connection complete"
    );
}

#[cfg(test)]
mod tests;
