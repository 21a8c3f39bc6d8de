//! The stand-in's CA: its roots (the mesh's roots, which also sign istiod's serving
//! certificate) and `CreateCertificate` with istiod's rule for node proxies: a proxy may get a
//! certificate for another identity (`ImpersonatedIdentity`) only when a workload with that
//! identity runs on the proxy's node.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use mesh_node::istio::proto::auth::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::Shared;

/// The metadata key a node proxy sets to the identity it asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// A root of the mesh.
pub(super) struct Root {
    pub(super) pem: String,
    pub(super) der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// Every root so far; the last one signs.
pub(super) struct Roots(Vec<Root>);

impl Roots {
    pub(super) fn new(trust_domain: &str) -> anyhow::Result<Self> {
        Ok(Self(vec![new_root(trust_domain, 1)?]))
    }

    pub(super) fn rotate(&mut self, trust_domain: &str) -> anyhow::Result<()> {
        let root = new_root(trust_domain, self.0.len() + 1)?;
        self.0.push(root);
        Ok(())
    }

    pub(super) fn current(&self) -> &Root {
        self.0.last().expect("at least one root")
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &Root> {
        self.0.iter()
    }

    /// A serving certificate for istiod (`istiod.<namespace>.svc` and its longer forms),
    /// signed by the current root, with its key.
    pub(super) fn serving_identity(
        &self,
        namespace: &str,
    ) -> anyhow::Result<tonic::transport::Identity> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![
            format!("istiod.{namespace}.svc"),
            format!("istiod.{namespace}.svc.cluster.local"),
        ])?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_mins(1)).into();
        params.not_after = (now + Duration::from_hours(24)).into();
        let cert = params.signed_by(&key, &self.current().issuer)?;
        Ok(tonic::transport::Identity::from_pem(
            cert.pem(),
            key.serialize_pem(),
        ))
    }
}

/// A self-signed ECDSA P-256 root, as istiod's self-signed CA makes it.
fn new_root(trust_domain: &str, generation: usize) -> anyhow::Result<Root> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(
        DnType::CommonName,
        format!("istiod stand-in root {generation}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_mins(1)).into();
    params.not_after = (now + Duration::from_hours(10 * 24)).into();
    let cert = params.self_signed(&key).context("self-signing a root")?;
    Ok(Root {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    })
}

/// How a certificate request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaOutcome {
    /// Signed, with this lifetime; the chain returned (leaf PEM, root PEM).
    Issued {
        lifetime: Duration,
        chain: Vec<String>,
    },
    /// The CA was made unavailable ([`super::Istiod::set_ca_available`]).
    Unavailable,
    /// No token, or one the stand-in did not issue.
    BadToken,
    /// `clusterid` missing or not the configured cluster.
    WrongCluster,
    /// No workload with the identity on the token's node.
    PermissionDenied,
    /// The CSR did not parse or verify.
    BadCsr,
}

/// One certificate request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaRecord {
    /// The node of the token, when it was valid.
    pub node: Option<String>,
    /// `ImpersonatedIdentity`, when set.
    pub identity: Option<String>,
    /// `validity_duration`, in seconds.
    pub requested_secs: i64,
    pub outcome: CaOutcome,
}

impl CaRecord {
    #[must_use]
    pub fn issued(&self) -> bool {
        matches!(self.outcome, CaOutcome::Issued { .. })
    }
}

/// The node a request's `authorization` token was issued for, after checking `clusterid`.
pub(super) fn authenticate(
    shared: &Shared,
    metadata: &MetadataMap,
) -> Result<String, (CaOutcome, Status)> {
    let node = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| shared.lock().tokens.get(token.trim()).cloned())
        .ok_or_else(|| {
            (
                CaOutcome::BadToken,
                Status::unauthenticated("authentication failure: no valid bearer token"),
            )
        })?;
    let cluster = metadata.get("clusterid").and_then(|v| v.to_str().ok());
    if cluster != Some(shared.options.cluster_id.as_str()) {
        return Err((
            CaOutcome::WrongCluster,
            Status::unauthenticated(format!(
                "authentication failure: cluster {cluster:?} is not {}",
                shared.options.cluster_id
            )),
        ));
    }
    Ok(node)
}

/// `IstioCertificateService`.
pub(super) struct CaService(pub(super) Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let shared = &self.0;
        let (metadata, _, request) = request.into_parts();
        let identity = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        let mut record = CaRecord {
            node: None,
            identity: identity.clone(),
            requested_secs: request.validity_duration,
            outcome: CaOutcome::Unavailable,
        };
        let result = sign(
            shared,
            &metadata,
            &request,
            identity.as_deref(),
            &mut record,
        );
        shared.update(|s| s.ca_records.push(record));
        result.map(Response::new)
    }
}

fn sign(
    shared: &Shared,
    metadata: &MetadataMap,
    request: &IstioCertificateRequest,
    identity: Option<&str>,
    record: &mut CaRecord,
) -> Result<IstioCertificateResponse, Status> {
    if shared.lock().ca_unavailable {
        record.outcome = CaOutcome::Unavailable;
        return Err(Status::unavailable("the CA is not available"));
    }
    let node = authenticate(shared, metadata).map_err(|(outcome, status)| {
        record.outcome = outcome;
        status
    })?;
    record.node = Some(node.clone());
    let allowed = identity.is_some_and(|id| {
        shared
            .lock()
            .workloads_on(&node)
            .iter()
            .any(|w| spiffe_id(&shared.options.trust_domain, w) == id)
    });
    let Some(identity) = identity.filter(|_| allowed) else {
        record.outcome = CaOutcome::PermissionDenied;
        return Err(Status::permission_denied(format!(
            "no workload with identity {identity:?} on node {node}"
        )));
    };
    let bad_csr = |e: rcgen::Error| Status::invalid_argument(format!("the CSR: {e}"));
    let csr = CertificateSigningRequestParams::from_pem(&request.csr).map_err(|e| {
        record.outcome = CaOutcome::BadCsr;
        bad_csr(e)
    })?;
    let cap = shared.options.max_cert_lifetime;
    let lifetime = u64::try_from(request.validity_duration)
        .ok()
        .filter(|&s| s > 0)
        .map_or(cap, |s| Duration::from_secs(s).min(cap));
    let roots = shared.roots();
    let root = roots.current();
    let leaf = leaf_params(identity, lifetime)
        .and_then(|params| {
            CertificateSigningRequestParams {
                params,
                public_key: csr.public_key,
            }
            .signed_by(&root.issuer)
        })
        .map_err(|e| Status::internal(format!("signing: {e}")))?;
    let chain = vec![leaf.pem(), root.pem.clone()];
    record.outcome = CaOutcome::Issued {
        lifetime,
        chain: chain.clone(),
    };
    Ok(IstioCertificateResponse { cert_chain: chain })
}

/// A workload's SPIFFE id (an empty trust domain is the mesh's, an empty service account
/// `default`), as istiod derives it.
fn spiffe_id(mesh_trust_domain: &str, w: &mesh_node::istio::proto::workload::Workload) -> String {
    let td = if w.trust_domain.is_empty() {
        mesh_trust_domain
    } else {
        &w.trust_domain
    };
    let sa = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    format!("spiffe://{td}/ns/{}/sa/{sa}", w.namespace)
}

/// A workload certificate: the identity as the only (URI) SAN, whatever the CSR asked for.
fn leaf_params(identity: &str, lifetime: Duration) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    // istiod backdates by a minute too (clock skew between nodes).
    params.not_before = (now - Duration::from_mins(1)).into();
    params.not_after = (now + lifetime).into();
    Ok(params)
}
