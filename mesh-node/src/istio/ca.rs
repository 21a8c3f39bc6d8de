//! istiod's CA as the certificate source (`IstioCertificateService/CreateCertificate`, as
//! ztunnel asks it): the node proxy sends each workload's CSR with the workload's identity as
//! `ImpersonatedIdentity`, authenticated by its own service-account token.
//!
//! The mesh's roots are the union of the root file (the `istio-ca-root-cert` `ConfigMap`) and the
//! root that ends each current response: during a root rotation istiod signs new certificates
//! with the new root while the old ones are still served, and both must verify. A root that no
//! current certificate ends with and the file does not hold drops out.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tracing::info;

use super::{
    channel::{self, IstiodChannel},
    proto::auth::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
};
use crate::{
    config::IstioConfig,
    identity::{
        BoxFuture, CaError, CertSource, Identity,
        roots::{ROOT_FILE_RECHECK, RootFile, parse_pem},
        svid_identity,
    },
};

/// How long one certificate request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The metadata key istiod reads the identity a node proxy asks for from.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Workload certificates from istiod's CA.
pub struct IstioCa {
    config: IstioConfig,
    state: Mutex<State>,
}

struct State {
    file: RootFile,
    /// The channel, with the root file content it was built with.
    channel: Option<(Vec<u8>, IstiodChannel)>,
    /// Per identity, the root its latest certificate ends with, until that certificate expires.
    served: HashMap<Identity, Served>,
    /// The union handed out: a new `Arc` only when its content changes.
    roots: Arc<[CertificateDer<'static>]>,
}

struct Served {
    root: CertificateDer<'static>,
    not_after: SystemTime,
}

impl IstioCa {
    /// Reads the root file now: without roots nothing could be verified, so the daemon must not
    /// start. The channel is built at the first request (it needs the runtime).
    pub fn new(config: &IstioConfig) -> Result<Self, CaError> {
        let file = RootFile::read(&config.root_cert_file)?;
        let roots = file.certs.clone().into();
        Ok(Self {
            config: config.clone(),
            state: Mutex::new(State {
                file,
                channel: None,
                served: HashMap::new(),
                roots,
            }),
        })
    }

    /// The channel to the CA, built again when the root file's content changed (istiod's
    /// serving certificate chains to the new root after a rotation).
    fn channel(&self) -> Result<IstiodChannel, CaError> {
        let mut state = self.lock();
        state.refresh(Instant::now(), true);
        if let Some((pem, channel)) = &state.channel
            && *pem == state.file.pem
        {
            return Ok(channel.clone());
        }
        let channel = channel::connect(&self.config, self.config.ca_address()).map_err(|e| {
            CaError::Unavailable {
                reason: crate::error_chain(&e),
            }
        })?;
        if state.channel.is_some() {
            info!(
                file = %self.config.root_cert_file.display(),
                "the root certificates changed: reconnecting to the CA"
            );
        }
        state.channel = Some((state.file.pem.clone(), channel.clone()));
        Ok(channel)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn create(
        &self,
        identity: &Identity,
        csr: &CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let mut client = IstioCertificateServiceClient::new(self.channel()?);
        let mut request = tonic::Request::new(request(identity, csr, lifetime));
        // Both ends: istiod gives up (grpc-timeout), and so do we if it never answers.
        request.set_timeout(REQUEST_TIMEOUT);
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(request))
            .await
            .map_err(|_| CaError::Unavailable {
                reason: format!(
                    "{} did not answer within {REQUEST_TIMEOUT:?}",
                    self.config.ca_address()
                ),
            })?
            .map_err(|status| status_error(&status))?;
        let mut chain = parse_chain(&answer.into_inner().cert_chain)?;
        let leaf = chain.first().ok_or_else(|| CaError::BadChain {
            reason: "no certificate".to_owned(),
        })?;
        let got = svid_identity(leaf).map_err(CaError::NotSvid)?;
        if got != *identity {
            return Err(CaError::WrongIdentity {
                requested: identity.to_string(),
                got: got.to_string(),
            });
        }
        let not_after = not_after(leaf)?;
        // The last certificate of a longer chain is the root: trusted, not presented (peers
        // hold it already, as for the local CA).
        let root = if chain.len() > 1 { chain.pop() } else { None };
        if let Some(root) = root {
            webpki::anchor_from_trusted_cert(&root).map_err(|e| CaError::BadChain {
                reason: format!("the last certificate is not a trust anchor: {e}"),
            })?;
            let mut state = self.lock();
            state
                .served
                .insert(identity.clone(), Served { root, not_after });
            state.update_roots(SystemTime::now());
        }
        Ok(chain)
    }
}

impl CertSource for IstioCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        Box::pin(self.create(identity, csr, lifetime))
    }

    fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        let mut state = self.lock();
        state.refresh(Instant::now(), false);
        Arc::clone(&state.roots)
    }
}

impl State {
    /// Reads the root file again (if `force`, or once per [`ROOT_FILE_RECHECK`]), drops the
    /// roots of expired certificates, and recomputes the union.
    fn refresh(&mut self, now: Instant, force: bool) {
        if !force && now.duration_since(self.file.checked_at) < ROOT_FILE_RECHECK {
            return;
        }
        self.file.reread(now);
        self.update_roots(SystemTime::now());
    }

    fn update_roots(&mut self, now: SystemTime) {
        self.served.retain(|_, s| s.not_after > now);
        let mut roots = self.file.certs.clone();
        // Sorted, so the same set is the same slice (and the verifiers' cache holds).
        let served: BTreeSet<&[u8]> = self.served.values().map(|s| s.root.as_ref()).collect();
        for root in served {
            if !roots.iter().any(|r| r.as_ref() == root) {
                roots.push(CertificateDer::from(root.to_vec()));
            }
        }
        if *self.roots != *roots {
            self.roots = roots.into();
        }
    }
}

/// The request for `identity`: the CSR as PEM, the lifetime in seconds, the identity.
fn request(
    identity: &Identity,
    csr: &CertificateSigningRequestDer<'_>,
    lifetime: Duration,
) -> IstioCertificateRequest {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
    };
    IstioCertificateRequest {
        csr: pem("CERTIFICATE REQUEST", csr.as_ref()),
        validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
        metadata: Some(prost_types::Struct {
            fields: [(IMPERSONATED_IDENTITY.to_owned(), value)].into(),
        }),
    }
}

/// A gRPC error: one the CA answered with (`Refused`), or no answer (`Unavailable`).
fn status_error(status: &tonic::Status) -> CaError {
    use tonic::Code;
    let code = format!("{:?}", status.code());
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Unknown => CaError::Unavailable {
            reason: format!("{code}: {message}"),
        },
        _ => CaError::Refused { code, message },
    }
}

/// Every certificate of the response, in order; each element may hold several.
fn parse_chain(elements: &[String]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let mut chain = Vec::new();
    for (i, element) in elements.iter().enumerate() {
        let certs = parse_pem(element.as_bytes()).map_err(|reason| CaError::BadChain {
            reason: format!("element {i}: {reason}"),
        })?;
        chain.extend(certs);
    }
    Ok(chain)
}

fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, CaError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| CaError::BadChain {
        reason: format!("the leaf does not parse: {e}"),
    })?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// `der` as a PEM block with `label` (RFC 7468: base64 in lines of 64).
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests;
