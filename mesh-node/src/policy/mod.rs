//! L4 authorization and peer authentication with Istio's semantics, from Istio's own documents
//! (`AuthorizationPolicy`, `PeerAuthentication`), so existing manifests work unchanged.
//!
//! - Scope: a policy in the root namespace applies mesh-wide (to the workloads its selector
//!   matches, or all); elsewhere to its namespace's workloads (selector-matched, or all).
//! - Order: any matching DENY denies; with no ALLOW policy for the workload the connection is
//!   allowed; otherwise one ALLOW must match. Policies annotated `istio.io/dry-run: "true"` are
//!   evaluated and logged but never enforced.
//! - Attributes the node cannot see (`remoteIpBlocks`, request principals, methods, paths,
//!   hosts, `when` keys other than the L4 ones), as istiod translates them for ztunnel: an ALLOW
//!   rule that uses them never matches, a DENY rule is enforced without them (it matches more
//!   sources and ports: more restrictive); each such policy is reported once. Where Istio's
//!   documentation and implementation disagree, the stricter reading is taken
//!   (`docs/configuration.md`, "Policies").

mod eval;
mod model;
mod peer_auth;

use std::{collections::HashMap, net::IpAddr, sync::RwLock};

pub use eval::{Applicable, CompiledPolicy};
pub use model::{Action, Kind, MtlsMode, PolicyDocument};

use crate::{identity::Identity, workload::Workload};

/// The annotation that makes a policy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The connection being decided.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo<'a> {
    pub src_ip: IpAddr,
    /// The verified peer identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Trust domains that are aliases of each other (the mesh's own and
    /// `identity.trustDomainAliases`): a peer of one of them matches principals written in
    /// any of them. Empty: the peer's own trust domain only.
    pub trust_aliases: &'a [String],
}

/// The outcome of an authorization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), or why none did.
    pub reason: String,
    /// What a dry-run policy would have done: `(would_allow, policy)`.
    pub dry_run: Option<(bool, String)>,
}

impl Decision {
    /// `"allow"` or `"deny"`, for logs and metrics.
    #[must_use]
    pub fn result(&self) -> &'static str {
        if self.allowed { "allow" } else { "deny" }
    }
}

/// Why a policy set was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("policies[{index}] ({document}): field `{field}`: {reason}")]
pub struct PolicyError {
    pub index: usize,
    /// `Kind namespace/name`.
    pub document: String,
    pub field: String,
    pub reason: String,
}

/// A validated, compiled policy set with a per-workload cache of the applicable policies.
#[derive(Debug, Default)]
pub struct PolicyStore {
    root_namespace: String,
    documents: Vec<PolicyDocument>,
    authz: Vec<std::sync::Arc<CompiledPolicy>>,
    peer_auth: Vec<peer_auth::PeerAuth>,
    cache: RwLock<HashMap<String, std::sync::Arc<Applicable>>>,
}

impl PolicyStore {
    /// Validates and compiles `docs`.
    pub fn new(root_namespace: &str, docs: &[PolicyDocument]) -> Result<Self, PolicyError> {
        let mut authz = Vec::new();
        let mut peer_auth = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (index, doc) in docs.iter().enumerate() {
            let err = |field: &str, reason: &str| PolicyError {
                index,
                document: format!(
                    "{} {}/{}",
                    doc.kind, doc.metadata.namespace, doc.metadata.name
                ),
                field: field.to_owned(),
                reason: reason.to_owned(),
            };
            if !matches!(
                doc.api_version.as_str(),
                "security.istio.io/v1" | "security.istio.io/v1beta1"
            ) {
                return Err(err("apiVersion", "expected security.istio.io/v1"));
            }
            if doc.metadata.name.is_empty() {
                return Err(err("metadata.name", "must not be empty"));
            }
            if !seen.insert((
                doc.kind,
                doc.metadata.namespace.clone(),
                doc.metadata.name.clone(),
            )) {
                return Err(err("metadata.name", "defined twice"));
            }
            let spec = &doc.spec;
            match doc.kind {
                Kind::AuthorizationPolicy => {
                    if spec.mtls.is_some() || spec.port_level_mtls.is_some() {
                        return Err(err("spec.mtls", "belongs to PeerAuthentication"));
                    }
                    let compiled = CompiledPolicy::compile(doc)
                        .map_err(|(field, reason)| err(&field, &reason))?;
                    authz.push(std::sync::Arc::new(compiled));
                }
                Kind::PeerAuthentication => {
                    if spec.action.is_some() || spec.rules.is_some() {
                        return Err(err("spec.rules", "belongs to AuthorizationPolicy"));
                    }
                    let selects = spec
                        .selector
                        .as_ref()
                        .is_some_and(|s| !s.match_labels.is_empty());
                    if spec.port_level_mtls.is_some() && !selects {
                        return Err(err("spec.portLevelMtls", "needs a workload selector"));
                    }
                    peer_auth.push(peer_auth::PeerAuth::from_doc(doc, root_namespace));
                }
            }
        }
        Ok(Self {
            documents: docs.to_vec(),
            root_namespace: root_namespace.to_owned(),
            authz,
            peer_auth,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// `(policy, note)` for each policy the node enforces differently from what it says
    /// (attributes it cannot see, `DISABLE`, a root-namespace `PeerAuthentication` selector).
    #[must_use]
    pub fn notes(&self) -> Vec<(String, String)> {
        let authz = self
            .authz
            .iter()
            .filter_map(|p| p.note.clone().map(|n| (p.name.clone(), n)));
        let peer = self
            .peer_auth
            .iter()
            .filter_map(|p| p.note.clone().map(|n| (p.name.clone(), n)));
        authz.chain(peer).collect()
    }

    /// The documents the store was built from (for the admin dump).
    #[must_use]
    pub fn documents(&self) -> &[PolicyDocument] {
        &self.documents
    }

    /// How many authorization policies are loaded.
    #[must_use]
    pub fn authorization_policies(&self) -> usize {
        self.authz.len()
    }

    /// The policies that apply to `workload` (cached).
    pub fn applicable(&self, workload: &Workload) -> std::sync::Arc<Applicable> {
        let uid = workload.uid();
        if let Some(found) = self
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&uid)
        {
            return std::sync::Arc::clone(found);
        }
        let applicable = std::sync::Arc::new(Applicable::select(
            &self.authz,
            &self.root_namespace,
            workload,
        ));
        self.cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(uid, std::sync::Arc::clone(&applicable));
        applicable
    }

    /// Authorizes a connection to `workload`.
    pub fn authorize(&self, workload: &Workload, conn: &ConnInfo<'_>) -> Decision {
        self.applicable(workload).decide(conn)
    }

    /// The effective mTLS mode for plaintext connections to `workload` on `port`
    /// (`Permissive` when nothing says otherwise).
    #[must_use]
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        peer_auth::effective_mode(&self.peer_auth, &self.root_namespace, workload, port)
    }
}

#[cfg(test)]
mod tests;
