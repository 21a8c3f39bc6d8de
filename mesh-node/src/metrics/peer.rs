//! What telemetry says about a workload (Istio's peer metadata): its workload name and kind,
//! namespace, canonical service and revision, cluster and locality. Derived from the workload's
//! labels as Istio derives them, or, for a peer the state does not know, read from the `baggage`
//! header of its HBONE request (the format ztunnel sends and reads, W3C baggage with
//! OpenTelemetry resource keys).
//!
//! Baggage is descriptive only: it fills labels, never an identity (the principal is always the
//! verified peer certificate's), and it is read with bounds on size, entries and value length;
//! anything malformed is skipped.

use crate::{identity::Identity, workload::Workload};

/// The workload name reported in telemetry (Istio's override label; istiod's `workload_name`).
pub const WORKLOAD_NAME: &str = "service.istio.io/workload-name";
/// Istio's canonical service label.
pub const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
/// Istio's canonical revision label.
pub const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
/// The workload's cluster (istiod's `cluster_id`).
pub const CLUSTER: &str = "topology.istio.io/cluster";
/// Locality: region and zone (Kubernetes' well-known labels), subzone (Istio's).
pub const REGION: &str = "topology.kubernetes.io/region";
pub const ZONE: &str = "topology.kubernetes.io/zone";
pub const SUBZONE: &str = "topology.istio.io/subzone";

/// What Istio reports when a value is not known.
pub const UNKNOWN: &str = "unknown";

/// The cluster Istio names a single cluster by default (`global.multiCluster.clusterName`).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// Largest `baggage` accepted, all header lines together (W3C baggage's limit); more and the
/// header is ignored.
pub const MAX_BAGGAGE_BYTES: usize = 8192;
/// List members read from `baggage` (W3C asks receivers to take at least 64); the rest are
/// ignored.
pub const MAX_BAGGAGE_ENTRIES: usize = 64;
/// Longest value kept (a DNS name; Kubernetes label values are at most 63).
const MAX_VALUE_BYTES: usize = 253;

/// The kind of a workload's controller, as ztunnel names it in the baggage key
/// `k8s.<kind>.name`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    /// A Deployment, or a workload named by [`WORKLOAD_NAME`] (istiod's default type).
    #[default]
    Deployment,
    CronJob,
    Job,
    /// A pod without a controller the name could be traced to.
    Pod,
}

impl WorkloadKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::CronJob => "cronjob",
            WorkloadKind::Job => "job",
            WorkloadKind::Pod => "pod",
        }
    }
}

/// A workload as telemetry describes it; `None` fields are reported as [`UNKNOWN`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The workload name: the controller's (a Deployment's), not the pod's.
    pub workload: Option<String>,
    pub kind: WorkloadKind,
    pub namespace: Option<String>,
    pub canonical_service: Option<String>,
    pub canonical_revision: Option<String>,
    pub cluster: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub subzone: Option<String>,
}

impl Peer {
    /// What Istio says about `w`, a workload of `cluster` unless its labels say another.
    /// Canonical service: the canonical-name label, else `app.kubernetes.io/name`, else
    /// `app`, else the workload name; canonical revision: the canonical-revision label, else
    /// `app.kubernetes.io/version`, else `version`, else `latest`.
    #[must_use]
    pub fn of(w: &Workload, cluster: &str) -> Self {
        let label = |key: &str| w.labels.get(key).filter(|v| !v.is_empty()).cloned();
        let first = |keys: &[&str]| keys.iter().find_map(|k| label(k));
        let (workload, kind) = workload_name(w);
        Self {
            canonical_service: Some(
                first(&[CANONICAL_NAME, "app.kubernetes.io/name", "app"])
                    .unwrap_or_else(|| workload.clone()),
            ),
            canonical_revision: Some(
                first(&[CANONICAL_REVISION, "app.kubernetes.io/version", "version"])
                    .unwrap_or_else(|| "latest".to_owned()),
            ),
            cluster: Some(label(CLUSTER).unwrap_or_else(|| cluster.to_owned())),
            region: label(REGION),
            zone: label(ZONE),
            subzone: label(SUBZONE),
            namespace: Some(w.namespace.clone()),
            workload: Some(workload),
            kind,
        }
    }

    /// The `baggage` header value ztunnel sends for its source workload:
    /// `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name`, `service.name`,
    /// `service.version`, `cloud.region`, `cloud.availability_zone` (those known). Values are
    /// percent-encoded where W3C baggage requires it, so the result is always a valid header.
    #[must_use]
    pub fn to_baggage(&self) -> String {
        let kind_key = format!("k8s.{}.name", self.kind.as_str());
        let members = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (kind_key.as_str(), &self.workload),
            ("service.name", &self.canonical_service),
            ("service.version", &self.canonical_revision),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ];
        let mut out = String::new();
        for (key, value) in members {
            let Some(value) = value else { continue };
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(key);
            out.push('=');
            encode_value(value, &mut out);
        }
        out
    }

    /// Reads the `baggage` header lines of a request. `None` when there is nothing to use, or
    /// when the header is over [`MAX_BAGGAGE_BYTES`]. Past [`MAX_BAGGAGE_ENTRIES`] members
    /// the rest is ignored; a line that is not UTF-8, a member without `=`, a value that does
    /// not decode, holds control characters or is too long is skipped. Unknown keys and
    /// properties (`;...`) are ignored.
    pub fn from_baggage<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Option<Self> {
        let mut peer = Self::default();
        let mut found = false;
        let (mut bytes, mut entries) = (0usize, 0usize);
        'lines: for line in lines {
            bytes = bytes.saturating_add(line.len());
            if bytes > MAX_BAGGAGE_BYTES {
                return None;
            }
            let Ok(text) = std::str::from_utf8(line) else {
                continue;
            };
            for member in text.split(',') {
                entries += 1;
                if entries > MAX_BAGGAGE_ENTRIES {
                    break 'lines;
                }
                let member = member.split(';').next().unwrap_or_default();
                let Some((key, value)) = member.split_once('=') else {
                    continue;
                };
                let Some(value) = decode_value(value.trim()) else {
                    continue;
                };
                let value = (!value.is_empty()).then_some(value);
                let field = match key.trim() {
                    "k8s.cluster.name" => &mut peer.cluster,
                    "k8s.namespace.name" => &mut peer.namespace,
                    "k8s.deployment.name" => peer.set_kind(WorkloadKind::Deployment),
                    "k8s.cronjob.name" => peer.set_kind(WorkloadKind::CronJob),
                    "k8s.job.name" => peer.set_kind(WorkloadKind::Job),
                    "k8s.pod.name" => peer.set_kind(WorkloadKind::Pod),
                    "service.name" => &mut peer.canonical_service,
                    "service.version" => &mut peer.canonical_revision,
                    "cloud.region" => &mut peer.region,
                    "cloud.availability_zone" => &mut peer.zone,
                    _ => continue,
                };
                found |= value.is_some();
                *field = value;
            }
        }
        found.then_some(peer)
    }

    fn set_kind(&mut self, kind: WorkloadKind) -> &mut Option<String> {
        self.kind = kind;
        &mut self.workload
    }

    /// The baggage of a peer whose certificate says `identity`, if it agrees with it: a
    /// namespace other than the identity's means the peer is confused or lying, and nothing it
    /// says is used. The namespace is the identity's (verified) from then on.
    #[must_use]
    pub fn vouched_by(mut self, identity: &Identity) -> Option<Self> {
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != identity.namespace)
        {
            return None;
        }
        self.namespace = Some(identity.namespace.clone());
        Some(self)
    }
}

/// The workload name Istio reports for `w` and its kind: [`WORKLOAD_NAME`] if set, else the
/// Deployment (a pod named `<deployment>-<pod-template-hash>-<suffix>`), the `CronJob` or Job
/// (the `job-name` label; a `CronJob`'s Jobs are named `<cronjob>-<schedule time>`), else the
/// pod's own name.
fn workload_name(w: &Workload) -> (String, WorkloadKind) {
    let label = |key: &str| w.labels.get(key).filter(|v| !v.is_empty());
    if let Some(name) = label(WORKLOAD_NAME) {
        return (name.clone(), WorkloadKind::Deployment);
    }
    if let Some(hash) = label("pod-template-hash")
        && let Some((replica_set, suffix)) = w.name.rsplit_once('-')
        && !suffix.is_empty()
        && let Some(deployment) = replica_set.strip_suffix(hash.as_str())
        && let Some(deployment) = deployment.strip_suffix('-')
        && !deployment.is_empty()
    {
        return (deployment.to_owned(), WorkloadKind::Deployment);
    }
    if let Some(job) = label("batch.kubernetes.io/job-name").or_else(|| label("job-name")) {
        if let Some((cron, time)) = job.rsplit_once('-')
            && (8..=10).contains(&time.len())
            && time.bytes().all(|b| b.is_ascii_digit())
            && !cron.is_empty()
        {
            return (cron.to_owned(), WorkloadKind::CronJob);
        }
        return (job.clone(), WorkloadKind::Job);
    }
    (w.name.clone(), WorkloadKind::Pod)
}

/// Whether W3C baggage allows `b` unencoded in a value (`baggage-octet`, minus `%`, which
/// starts an escape).
fn baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E) && b != b'%'
}

fn encode_value(value: &str, out: &mut String) {
    use std::fmt::Write as _;
    for b in value.bytes() {
        if baggage_octet(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// A value with its percent escapes decoded; `None` if an escape is malformed, the result is
/// not UTF-8, holds control characters, or is longer than [`MAX_VALUE_BYTES`].
fn decode_value(value: &str) -> Option<String> {
    if value.len() > 3 * MAX_VALUE_BYTES {
        return None;
    }
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let (&[high, low], tail) = tail.split_first_chunk::<2>()?;
            bytes.push(hex(high)? << 4 | hex(low)?);
            rest = tail;
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    let text = String::from_utf8(bytes).ok()?;
    (text.len() <= MAX_VALUE_BYTES && !text.chars().any(char::is_control)).then_some(text)
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests;
