//! `PeerAuthentication`: whether plaintext (no peer identity) is admitted.
//!
//! The most specific policy that sets a mode wins: a selector-matched policy in the workload's
//! namespace (its port-level mode first), then the namespace-wide one, then the mesh-wide one
//! (root namespace, no selector); `UNSET` inherits; nothing at all means `PERMISSIVE`. Where
//! Istio's documentation and istiod's implementation disagree, the stricter reading is taken
//! (`docs/configuration.md`, "Policies"):
//!
//! - `DISABLE` counts as `UNSET` (Istio's ambient documentation: such policies are ignored;
//!   istiod treats it as `PERMISSIVE`, so a namespace `DISABLE` would open a mesh-wide
//!   `STRICT`). HBONE is always mTLS; a port that should admit plaintext says `PERMISSIVE`.
//! - A policy in the root namespace with a selector can only tighten: where it matches and says
//!   `STRICT` the port is `STRICT` (the API reference applies it to matching workloads of every
//!   namespace; istiod ignores it), and it is ignored otherwise.
//! - Several policies at one level (Istio picks the oldest; documents have no creation time):
//!   the result is `STRICT` if any choice among them would make it so.

use std::collections::BTreeMap;

use super::model::{MtlsMode, PolicyDocument};
use crate::workload::Workload;

#[derive(Clone, Debug)]
pub(super) struct PeerAuth {
    /// `namespace/name`.
    pub(super) name: String,
    namespace: String,
    /// `None` for no selector or an empty one (namespace- or mesh-wide, as Istio reads it).
    selector: Option<BTreeMap<String, String>>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
    /// What the node reads differently from what the document says, if anything.
    pub(super) note: Option<String>,
}

/// `DISABLE` is read as `UNSET` (see the module documentation).
fn effective(mode: MtlsMode) -> MtlsMode {
    match mode {
        MtlsMode::Disable => MtlsMode::Unset,
        other => other,
    }
}

impl PeerAuth {
    pub(super) fn from_doc(doc: &PolicyDocument, root: &str) -> Self {
        let spec = &doc.spec;
        let selector = spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())
            .map(|s| s.match_labels.clone());
        let mode = spec.mtls.map(|m| m.mode).unwrap_or_default();
        let ports: BTreeMap<u16, MtlsMode> = spec
            .port_level_mtls
            .iter()
            .flatten()
            .map(|(port, m)| (port.0, m.mode))
            .collect();
        let mut notes = Vec::new();
        if mode == MtlsMode::Disable || ports.values().any(|m| *m == MtlsMode::Disable) {
            notes.push(
                "DISABLE is read as UNSET (inherit): HBONE is always mTLS; use PERMISSIVE to \
                 admit plaintext",
            );
        }
        if doc.metadata.namespace == root && selector.is_some() {
            notes.push(
                "a root-namespace policy with a selector only tightens: it applies where it \
                 makes a port STRICT and is ignored otherwise",
            );
        }
        Self {
            name: format!("{}/{}", doc.metadata.namespace, doc.metadata.name),
            namespace: doc.metadata.namespace.clone(),
            selector,
            mode,
            ports,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }
    }

    fn selects(&self, workload: &Workload) -> bool {
        self.selector.as_ref().is_some_and(|labels| {
            labels
                .iter()
                .all(|(k, v)| workload.labels.get(k) == Some(v))
        })
    }

    /// This policy's mode for `port`: its port-level mode, else its own.
    fn mode_for(&self, port: u16) -> MtlsMode {
        match self.ports.get(&port).copied().map(effective) {
            Some(MtlsMode::Unset) | None => effective(self.mode),
            Some(mode) => mode,
        }
    }
}

pub(super) fn effective_mode(
    all: &[PeerAuth],
    root: &str,
    workload: &Workload,
    port: u16,
) -> MtlsMode {
    let modes = |pick: &dyn Fn(&PeerAuth) -> bool| -> Vec<MtlsMode> {
        all.iter()
            .filter(|p| pick(p))
            .map(|p| p.mode_for(port))
            .collect()
    };
    let in_own = workload.namespace != root;
    // Tighten-only: a root-namespace selector policy that matches and says STRICT.
    if modes(&|p| p.namespace == root && p.selects(workload)).contains(&MtlsMode::Strict) {
        return MtlsMode::Strict;
    }
    let levels = [
        modes(&|p| in_own && p.namespace == workload.namespace && p.selects(workload)),
        modes(&|p| in_own && p.namespace == workload.namespace && p.selector.is_none()),
        modes(&|p| p.namespace == root && p.selector.is_none()),
    ];
    for level in levels {
        if level.contains(&MtlsMode::Strict) {
            return MtlsMode::Strict;
        }
        // Some choice at this level inherits (or there is none): the next level decides.
        if level.is_empty() || level.contains(&MtlsMode::Unset) {
            continue;
        }
        return MtlsMode::Permissive;
    }
    MtlsMode::Permissive
}
