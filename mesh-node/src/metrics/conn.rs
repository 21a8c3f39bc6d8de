//! One proxied connection's metrics and its access-log line.
//!
//! Bytes are added to the `istio_tcp_*_bytes_total` counters as they are copied (so a scrape
//! sees long connections progress), and one access-log record (target `access`) is written when
//! the connection ends, successfully or not.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::metrics::counter::Counter;

use super::{ConnLabels, Metrics, PathLabels};
use crate::{identity::Identity, state::Workload};

/// One end of a connection as metrics see it.
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    pub workload: Option<Arc<Workload>>,
    pub identity: Option<Identity>,
    pub addr: Option<SocketAddr>,
    /// The service the connection was addressed to (`name.namespace.svc.cluster.local`).
    pub service: Option<Arc<str>>,
}

/// `connection_security_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    MutualTls,
    None,
}

/// Istio's canonical workload name: the `service.istio.io/canonical-name` or `app` label, else
/// the workload name.
fn canonical(w: &Workload) -> String {
    w.labels
        .get("service.istio.io/canonical-name")
        .or_else(|| w.labels.get("app"))
        .cloned()
        .unwrap_or_else(|| w.name.clone())
}

fn principal(id: Option<&Identity>) -> String {
    id.map_or_else(
        || "unknown".to_owned(),
        |id| {
            format!(
                "spiffe://{}/ns/{}/sa/{}",
                id.trust_domain, id.namespace, id.service_account
            )
        },
    )
}

fn label(w: Option<&Arc<Workload>>, f: impl Fn(&Workload) -> Option<String>) -> String {
    w.and_then(|w| f(w)).unwrap_or_else(|| "unknown".to_owned())
}

/// Metrics and access log of one connection.
pub struct ConnRecord {
    metrics: Arc<Metrics>,
    labels: ConnLabels,
    path: PathLabels,
    started: Instant,
    source: Endpoint,
    destination: Endpoint,
    /// Source → destination bytes, and the counter they are added to.
    pub received: ByteCount,
    /// Destination → source bytes.
    pub sent: ByteCount,
    reported_failure: bool,
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
        direction: &'static str,
        path: &'static str,
        source: Endpoint,
        destination: Endpoint,
        security: Security,
    ) -> Self {
        let (src, dst) = (source.workload.as_ref(), destination.workload.as_ref());
        let labels = ConnLabels {
            reporter: if direction == "outbound" {
                "source"
            } else {
                "destination"
            },
            source_workload: label(src, |w| Some(canonical(w))),
            source_workload_namespace: label(src, |w| Some(w.namespace.clone())),
            source_principal: principal(source.identity.as_ref()),
            source_app: label(src, |w| w.labels.get("app").cloned()),
            source_version: label(src, |w| w.labels.get("version").cloned()),
            destination_workload: label(dst, |w| Some(canonical(w))),
            destination_workload_namespace: label(dst, |w| Some(w.namespace.clone())),
            destination_principal: principal(destination.identity.as_ref()),
            destination_service: destination
                .service
                .as_deref()
                .unwrap_or("unknown")
                .to_owned(),
            destination_app: label(dst, |w| w.labels.get("app").cloned()),
            destination_version: label(dst, |w| w.labels.get("version").cloned()),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: match security {
                Security::MutualTls => "mutual_tls",
                Security::None => "none",
            },
        };
        let path = PathLabels { direction, path };
        metrics.opened.get_or_create(&labels).inc();
        metrics.open_connections.get_or_create(&path).inc();
        Self {
            received: ByteCount::new(metrics.received_bytes.get_or_create(&labels).clone()),
            sent: ByteCount::new(metrics.sent_bytes.get_or_create(&labels).clone()),
            metrics: Arc::clone(metrics),
            labels,
            path,
            started: Instant::now(),
            source,
            destination,
            reported_failure: false,
        }
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
        let mut labels = self.labels.clone();
        labels.response_flags = flag;
        // The close is counted under its flag (the open was counted before the outcome was
        // known), so dashboards can break failures down by flag.
        self.metrics.closed.get_or_create(&labels).inc();
        self.labels = labels;
        self.finish(reason);
    }

    fn finish(&mut self, reason: &str) {
        let elapsed = self.started.elapsed();
        if !self.reported_failure {
            self.metrics.closed.get_or_create(&self.labels).inc();
        }
        self.metrics
            .duration_seconds
            .get_or_create(&self.path)
            .observe(elapsed.as_secs_f64());
        self.metrics
            .open_connections
            .get_or_create(&self.path)
            .dec();
        let addr = |e: &Endpoint| e.addr.map(|a| a.to_string()).unwrap_or_default();
        let workload = |e: &Endpoint| e.workload.as_ref().map(|w| w.uid()).unwrap_or_default();
        let identity = |e: &Endpoint| {
            e.identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        tracing::info!(
            target: "access",
            direction = self.path.direction,
            path = self.path.path,
            src_workload = %workload(&self.source),
            src_identity = %identity(&self.source),
            src_addr = %addr(&self.source),
            dst_workload = %workload(&self.destination),
            dst_identity = %identity(&self.destination),
            dst_addr = %addr(&self.destination),
            dst_service = self.destination.service.as_deref().unwrap_or(""),
            bytes_sent = self.sent.get(),
            bytes_received = self.received.get(),
            duration_ms = elapsed.as_millis(),
            response_flags = self.labels.response_flags,
            reason,
            "connection complete"
        );
    }
}
