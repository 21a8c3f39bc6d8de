//! The certificate manager: one certificate per identity that has a workload on this node.
//!
//! A certificate is requested as soon as the first workload with that identity is enrolled
//! (prefetch), renewed at half its lifetime, and dropped when the last such workload leaves. If
//! the CA cannot be reached, the current certificate keeps serving while it is valid and the
//! request is retried with exponential backoff (logged). Keys are generated here and never leave
//! the process: the CA only sees a CSR.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::{CaError, CertSource, Identity};

/// A workload certificate and its key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What the manager holds for one identity (for logs and the admin dump; no key material).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertState {
    pub identity: String,
    pub workloads: usize,
    /// Seconds since the epoch; absent while the first certificate is pending.
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no workload with identity {identity} is enrolled on this node")]
    NotManaged { identity: String },
    #[error("no certificate for {identity} yet (the CA has not answered within {waited:?})")]
    Pending { identity: String, waited: Duration },
}

struct Entry {
    workloads: usize,
    current: watch::Receiver<Option<Arc<WorkloadCert>>>,
    task: JoinHandle<()>,
}

struct Inner {
    source: Arc<dyn CertSource>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

/// Shared handle to the certificate manager.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

/// How long a connection waits for a pending first certificate.
const FIRST_CERT_WAIT: Duration = Duration::from_secs(10);
/// Retry backoff bounds when the CA fails.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl CertManager {
    #[must_use]
    pub fn new(
        source: Arc<dyn CertSource>,
        lifetime: Duration,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                lifetime,
                provider,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The mesh's trust anchors now (see [`CertSource::roots`]).
    #[must_use]
    pub fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        self.inner.source.roots()
    }

    /// A workload with `identity` was enrolled: start (or keep) its certificate.
    pub fn acquire(&self, identity: &Identity) {
        let mut entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(identity) {
            entry.workloads += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(Arc::clone(&self.inner).keep_fresh(identity.clone(), tx));
        entries.insert(
            identity.clone(),
            Entry {
                workloads: 1,
                current: rx,
                task,
            },
        );
    }

    /// A workload with `identity` left: drop the certificate when it was the last.
    pub fn release(&self, identity: &Identity) {
        let mut entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = entries.get_mut(identity) else {
            return;
        };
        entry.workloads -= 1;
        if entry.workloads == 0
            && let Some(entry) = entries.remove(identity)
        {
            entry.task.abort();
            info!(identity = %identity, "certificate dropped: no workload with this identity left");
        }
    }

    /// The current certificate, without waiting.
    #[must_use]
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        let entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        entries.get(identity)?.current.borrow().clone()
    }

    /// The current certificate, waiting (bounded) for the first one.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let mut rx = {
            let entries = self
                .inner
                .entries
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = entries.get(identity).ok_or_else(|| CertError::NotManaged {
                identity: identity.to_string(),
            })?;
            entry.current.clone()
        };
        let pending = || CertError::Pending {
            identity: identity.to_string(),
            waited: FIRST_CERT_WAIT,
        };
        let waited = tokio::time::timeout(FIRST_CERT_WAIT, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(cert)) => cert.clone().ok_or_else(pending),
            _ => Err(pending()),
        }
    }

    /// Every managed identity and its certificate's validity.
    #[must_use]
    pub fn states(&self) -> Vec<CertState> {
        let entries = self
            .inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        };
        let mut states: Vec<CertState> = entries
            .iter()
            .map(|(id, e)| {
                let cert = e.current.borrow().clone();
                CertState {
                    identity: id.to_string(),
                    workloads: e.workloads,
                    not_before: cert.as_ref().and_then(|c| secs(c.not_before)),
                    not_after: cert.as_ref().and_then(|c| secs(c.not_after)),
                }
            })
            .collect();
        states.sort_by(|a, b| a.identity.cmp(&b.identity));
        states
    }
}

impl Inner {
    /// Issues a certificate for `identity`, then renews it at half-life, forever.
    async fn keep_fresh(
        self: Arc<Self>,
        identity: Identity,
        tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    ) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.issue(&identity).await {
                Ok(cert) => {
                    backoff = BACKOFF_MIN;
                    // Half of the lifetime that remains from now: the CA backdates
                    // certificates (clock skew), which must not pull renewal forward.
                    let issued_at = SystemTime::now().max(cert.not_before);
                    let renew_at = issued_at
                        + cert.not_after.duration_since(issued_at).unwrap_or_default() / 2;
                    info!(
                        identity = %identity,
                        valid_for_s = cert.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                        "certificate issued"
                    );
                    tx.send_replace(Some(Arc::new(cert)));
                    let wait = renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    let still_valid = tx
                        .borrow()
                        .as_ref()
                        .is_some_and(|c| c.not_after > SystemTime::now());
                    warn!(
                        identity = %identity,
                        error = %crate::error_chain(&e),
                        retry_in_ms = backoff.as_millis(),
                        serving_current = still_valid,
                        "certificate request failed"
                    );
                    if !still_valid {
                        tx.send_replace(None);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn issue(&self, identity: &Identity) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            CaError::Cert {
                what: "generating a workload key",
                source,
            }
        })?;
        let mut params = CertificateParams::default();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|source| CaError::Cert {
                what: "the identity is not an IA5 string",
                source,
            })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .map_err(|source| CaError::Cert {
                what: "building the CSR",
                source,
            })?;
        let chain = self
            .source
            .sign(identity, &csr.der().clone(), self.lifetime)
            .await?;
        let leaf = chain.first().ok_or_else(|| CaError::Unavailable {
            reason: "the CA returned an empty chain".to_owned(),
        })?;
        // The CA decides what it signs: serve only a leaf that names exactly the identity asked
        // for, read as the peers' verifiers will read it.
        let got = super::svid_identity(leaf).map_err(CaError::NotSvid)?;
        if got != *identity {
            return Err(CaError::WrongIdentity {
                requested: identity.to_string(),
                got: got.to_string(),
            });
        }
        let (not_before, not_after) = validity(leaf)?;
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| CaError::Unavailable {
                reason: format!("loading the workload key: {e}"),
            })?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            key: Arc::new(CertifiedKey::new(chain, signing_key)),
            not_before,
            not_after,
        })
    }
}

/// A certificate's validity period.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), CaError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| CaError::Unavailable {
            reason: format!("the CA returned an unparsable certificate: {e}"),
        })?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    };
    Ok((
        at(parsed.validity().not_before),
        at(parsed.validity().not_after),
    ))
}
