//! `PeerAuthentication`: whether plaintext (no peer identity) is admitted.
//!
//! The most specific policy that sets a mode wins: a selector-matched policy in the workload's
//! namespace (its port-level mode first), then the namespace-wide one, then the mesh-wide one
//! (root namespace, no selector). `UNSET` inherits; nothing at all means `PERMISSIVE`.

use std::collections::BTreeMap;

use super::model::{MtlsMode, PolicyDocument};
use crate::state::Workload;

#[derive(Clone, Debug)]
pub(super) struct PeerAuth {
    namespace: String,
    selector: Option<BTreeMap<String, String>>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

impl PeerAuth {
    pub(super) fn from_doc(doc: &PolicyDocument) -> Self {
        Self {
            namespace: doc.metadata.namespace.clone(),
            selector: doc.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            mode: doc.spec.mtls.map(|m| m.mode).unwrap_or_default(),
            ports: doc
                .spec
                .port_level_mtls
                .iter()
                .flatten()
                .map(|(port, m)| (port.0, m.mode))
                .collect(),
        }
    }
}

pub(super) fn effective_mode(
    all: &[PeerAuth],
    root: &str,
    workload: &Workload,
    port: u16,
) -> MtlsMode {
    let selected = all.iter().find(|p| {
        p.namespace == workload.namespace
            && p.selector.as_ref().is_some_and(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
            })
    });
    let namespace = all
        .iter()
        .find(|p| p.namespace == workload.namespace && p.selector.is_none());
    let mesh = all
        .iter()
        .find(|p| p.namespace == root && p.selector.is_none());
    let candidates = [
        selected.and_then(|p| p.ports.get(&port).copied()),
        selected.map(|p| p.mode),
        namespace.map(|p| p.mode),
        mesh.map(|p| p.mode),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|m| *m != MtlsMode::Unset)
        .unwrap_or(MtlsMode::Permissive)
}
