//! Node-level Prometheus metrics: Istio's standard TCP metrics with Istio's labels (so existing
//! dashboards work), plus what ztunnel lacks: setup, TLS handshake and duration histograms,
//! policy decisions, certificates, enrolled workloads, open connections, the kernel programs'
//! run counts and time (`bpf_stats`), the kernel counters, and process metrics.
//!
//! The Istio labels are ztunnel's (`peer` says how each is derived). Label cardinality is
//! bounded: workloads are named by their workload (controller) and canonical names, never by
//! address or port.

mod collect;
mod conn;
pub mod peer;

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use collect::NodeCollector;
pub use conn::{
    ByteCount, ConnRecord, Direction, Endpoint, GatewayHop, NoMtls, Path, Security, TrafficNote,
};

/// The `OpenMetrics` exposition in the Prometheus text format (0.0.4), for scrapers and tools
/// that do not ask for `OpenMetrics`: counters are described under their `_total` sample name,
/// and the OpenMetrics-only lines (`# UNIT`, `# EOF`) are dropped.
#[must_use]
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Istio's standard labels of the `istio_tcp_*` metrics, the set (and order) ztunnel reports.
/// Unknown values are `unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `source` (the outbound side) or `destination` (inbound).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    /// The canonical service (as ztunnel reports it).
    pub source_app: String,
    /// The canonical revision.
    pub source_version: String,
    pub source_cluster: String,
    /// The service's hostname (`name.namespace.svc.cluster.local`).
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

/// Direction and path of a connection through this node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub direction: &'static str,
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

/// Which part of an enrolled pod's kernel state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub result: &'static str,
    pub policy: String,
}

/// Every metric the daemon updates as it goes; scrape-time values come from
/// [`NodeCollector`].
pub struct Metrics {
    pub registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent_bytes: Family<ConnLabels, Counter>,
    pub received_bytes: Family<ConnLabels, Counter>,
    pub setup_seconds: Family<PathLabels, Histogram>,
    pub duration_seconds: Family<PathLabels, Histogram>,
    pub tls_handshake_seconds: Family<RoleLabels, Histogram>,
    pub open_connections: Family<PathLabels, Gauge>,
    pub policy_decisions: Family<DecisionLabels, Counter>,
    pub hbone_connections: Counter,
    pub enrolled_workloads: Gauge,
    pub connection_errors: Family<ErrorLabels, Counter>,
    pub kernel_repairs: Family<StateLabels, Counter>,
    /// HBONE connections open now, by role and state (handshakes in progress included).
    pub open_hbone: Family<HboneLabels, Gauge>,
    /// The file descriptor budget (see `proxy::limits`).
    pub descriptors: Family<DescriptorLabels, Gauge>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub traffic_decisions: Family<TrafficLabels, Counter>,
    /// Istio label sets (and their counters) already built, shared by connections between the
    /// same workloads (`conn.rs`).
    label_sets: conn::LabelSets,
    /// The cluster of workloads whose labels name none (`istio.clusterId`).
    cluster: Arc<str>,
}

/// What became of a change of the configuration file.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `rejected` (the last good state stays).
    pub result: &'static str,
}

/// A traffic-management decision: `decision` is `split` (the route sent the connection to
/// `target`, a backend), `retry` (a connect to an endpoint of the destination `target` failed,
/// another was tried), `ejected` / `returned` (outlier detection took an endpoint of `target`
/// out or let it back; the log names the endpoint), `pool_limit` (the pool of `target` was
/// full), `rate_limit`, `fault_abort` and `fault_delay` (`target` names the
/// `FaultInjection`). `target` is a destination (`host` or `host/subset`) or a document, never
/// an address.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub destination_service: String,
    pub decision: &'static str,
    pub target: String,
}

/// Why a connection was refused or cut short by the daemon.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub listener: &'static str,
    pub reason: &'static str,
}

/// An HBONE connection's side (`server`: accepted on 15008, `client`: dialled by the pool) and
/// state (`handshake`: TLS or HTTP/2 setup in progress, `established`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HboneLabels {
    pub role: &'static str,
    pub state: &'static str,
}

/// A part of the file descriptor budget: `limit` (`RLIMIT_NOFILE`), `reserved` (kept for the
/// node's endpoints and everything else), `base` (open, not connections), `connections`
/// (charged to open connections).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DescriptorLabels {
    pub kind: &'static str,
}

fn buckets() -> impl Iterator<Item = f64> {
    // 50 µs .. ~100 s
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.5, 16)
}

impl Metrics {
    /// Registers every metric, for a node of the default cluster (`Kubernetes`). `collector`
    /// adds the scrape-time ones.
    #[must_use]
    pub fn new(collector: NodeCollector) -> Arc<Self> {
        Self::in_cluster(collector, peer::DEFAULT_CLUSTER)
    }

    /// Registers every metric, for a node of `cluster` (the `source_cluster` and
    /// `destination_cluster` of workloads whose labels name none).
    #[must_use]
    pub fn in_cluster(collector: NodeCollector, cluster: &str) -> Arc<Self> {
        let mut registry = Registry::default();
        let histogram =
            || Family::<PathLabels, Histogram>::new_with_constructor(|| Histogram::new(buckets()));
        let metrics = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            setup_seconds: histogram(),
            duration_seconds: histogram(),
            tls_handshake_seconds: Family::new_with_constructor(|| Histogram::new(buckets())),
            open_connections: Family::default(),
            policy_decisions: Family::default(),
            hbone_connections: Counter::default(),
            enrolled_workloads: Gauge::default(),
            connection_errors: Family::default(),
            kernel_repairs: Family::default(),
            open_hbone: Family::default(),
            descriptors: Family::default(),
            config_reloads: Family::default(),
            traffic_decisions: Family::default(),
            label_sets: conn::LabelSets::default(),
            cluster: Arc::from(cluster),
            registry: Registry::default(),
        };
        metrics.register_istio(&mut registry);
        registry.register(
            "mesh_connection_setup_seconds",
            "From accepting a connection to the destination being connected",
            metrics.setup_seconds.clone(),
        );
        registry.register(
            "mesh_connection_duration_seconds",
            "Lifetime of proxied connections",
            metrics.duration_seconds.clone(),
        );
        registry.register(
            "mesh_tls_handshake_seconds",
            "TLS handshake time of HBONE connections, by role",
            metrics.tls_handshake_seconds.clone(),
        );
        registry.register(
            "mesh_open_connections",
            "Connections currently proxied, by direction and path",
            metrics.open_connections.clone(),
        );
        registry.register(
            "mesh_policy_decisions",
            "Authorization decisions by result and deciding policy",
            metrics.policy_decisions.clone(),
        );
        registry.register(
            "mesh_hbone_connections_opened",
            "Pooled HBONE (HTTP/2 over mTLS) connections dialled",
            metrics.hbone_connections.clone(),
        );
        registry.register(
            "mesh_enrolled_workloads",
            "Workloads enrolled on this node",
            metrics.enrolled_workloads.clone(),
        );
        registry.register(
            "mesh_connection_errors",
            "Connections refused or ended by the daemon, by listener and reason (TLS handshake, \
             handshake timeout, HTTP/2 protocol, limits)",
            metrics.connection_errors.clone(),
        );
        registry.register(
            "mesh_kernel_state_restored",
            "Kernel state of enrolled pods found missing and restored, by part (e.g. after \
             another daemon of the node removed it)",
            metrics.kernel_repairs.clone(),
        );
        registry.register(
            "mesh_open_hbone_connections",
            "HBONE connections open now, by role (server, client) and state (handshake, \
             established)",
            metrics.open_hbone.clone(),
        );
        registry.register(
            "mesh_file_descriptors",
            "The file descriptor budget: the limit, the reserve for the node's endpoints, the \
             descriptors not used by connections, and those charged to connections",
            metrics.descriptors.clone(),
        );
        registry.register(
            "mesh_config_reloads",
            "Changes of the configuration file read by the daemon, by result: applied, or \
             rejected (empty, cut short, invalid; the last good state stays)",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "mesh_traffic_decisions",
            "Traffic management decisions by service: splits by backend, retries and ejections \
             by endpoint, pool and rate limits, injected faults",
            metrics.traffic_decisions.clone(),
        );
        registry.register_collector(Box::new(collector));
        Arc::new(Self {
            registry,
            ..metrics
        })
    }

    /// Registers Istio's standard metrics.
    fn register_istio(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (Istio standard metric)",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed (Istio standard metric)",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from destination to source, counted while the connection is open",
            self.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from source by destination, counted while the connection is open",
            self.received_bytes.clone(),
        );
    }

    /// Counts a connection error, and says whether to log it now: `Some(n)` at most once per
    /// listener and reason every few seconds, with `n` the errors of the kind not logged since
    /// the last line (see `throttle`); `None` means the caller logs nothing.
    pub fn error(&self, listener: &'static str, reason: &'static str) -> Option<u64> {
        self.connection_errors
            .get_or_create(&ErrorLabels { listener, reason })
            .inc();
        crate::throttle::allow(listener, reason)
    }

    /// What telemetry says about `workload`, a workload of this node's cluster unless its
    /// labels say otherwise (what the `baggage` of its HBONE requests carries).
    #[must_use]
    pub fn peer(&self, workload: &crate::workload::Workload) -> peer::Peer {
        peer::Peer::of(workload, &self.cluster)
    }

    /// Counts a traffic-management decision (see [`TrafficLabels`]).
    pub fn traffic(&self, service: &str, decision: &'static str, target: &str) {
        self.traffic_decisions
            .get_or_create(&TrafficLabels {
                destination_service: service.to_owned(),
                decision,
                target: target.to_owned(),
            })
            .inc();
    }

    /// The exposition (Prometheus text format).
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let om = "# HELP a_things Things.\n# TYPE a_things counter\na_things_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let text = super::to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total{x=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
