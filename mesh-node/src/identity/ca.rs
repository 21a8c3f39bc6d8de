//! Certificate sources. One trait for every CA the daemon can ask for workload certificates:
//! the local CA (key and certificate files; `mesh-node ca init` makes a development one) today,
//! the Istio CA gRPC API (`IstioCertificateService/CreateCertificate`, istiod or cert-manager
//! istio-csr) later. Both take a CSR and return a chain, so keys never leave the process.

use std::{
    fs,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject as _};

use super::Identity;

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it or choose another directory")]
    Exists { path: PathBuf },
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path}: not a PEM certificate: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: not a PEM private key: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the CA key {key} does not belong to the CA certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the CA returned a certificate for {got} where {requested} was requested")]
    WrongIdentity { requested: String, got: String },
    #[error("the CA returned a certificate that is not a workload certificate")]
    NotSvid(#[source] super::SvidError),
    #[error("the CA is unavailable: {reason}")]
    Unavailable { reason: String },
    /// The CA answered, with an error (a bad token, a refused identity): `code` is its name
    /// (gRPC's, for istiod).
    #[error("the CA refused the request: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("the CA returned an unusable chain: {reason}")]
    BadChain { reason: String },
}

/// Something that signs workload certificates.
pub trait CertSource: Send + Sync {
    /// Signs `csr` for `identity`, valid for `lifetime`; returns the chain, leaf first.
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>>;

    /// The mesh's trust anchors now: the same `Arc` while they are unchanged, a new one when
    /// they change (TLS verifiers read them at each handshake and parse them once per `Arc`).
    fn roots(&self) -> Arc<[CertificateDer<'static>]>;
}

/// File names inside a local CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// A CA whose key is a file on this node.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, the one root (it never changes).
    roots: Arc<[CertificateDer<'static>]>,
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Cert { what, source }
}

impl LocalCa {
    /// Creates a new development root (ECDSA P-256, valid 10 years) in `dir`, refusing to
    /// overwrite an existing one.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<(PathBuf, PathBuf), CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(CaError::Exists { path: path.clone() });
            }
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(cert_err("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh development root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_mins(1)).into();
        params.not_after = (now + Duration::from_hours(10 * 365 * 24)).into();
        let cert = params
            .self_signed(&key)
            .map_err(cert_err("self-signing the CA certificate"))?;
        fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })?;
        write_private(&key_path, &key.serialize_pem())?;
        fs::write(&cert_path, cert.pem()).map_err(|source| CaError::Write {
            path: cert_path.clone(),
            source,
        })?;
        Ok((cert_path, key_path))
    }

    /// Loads a CA from its certificate and key PEM files. The key must be the one of the
    /// certificate: with another key, every certificate the daemon issued would fail to verify
    /// at its peers while the daemon reported ready.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?).map_err(|source| CaError::Key {
            path: key_path.to_owned(),
            source,
        })?;
        let root =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::Pem {
                path: cert_path.to_owned(),
                reason: e.to_string(),
            })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root).map_err(|e| CaError::Pem {
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
        // The subject public key (the BIT STRING of the SubjectPublicKeyInfo) against the
        // key's public half, in the same raw form.
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_err("loading the CA"))?;
        Ok(Self {
            issuer,
            roots: Arc::new([root]),
        })
    }

    /// Signs a leaf certificate for `identity` over `public_key` (no CSR; for tests and for
    /// `mesh-node ca issue`).
    pub fn issue_for_key(
        &self,
        identity: &Identity,
        public_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<rcgen::Certificate, CaError> {
        leaf_params(identity, not_before, not_after)?
            .signed_by(public_key, &self.issuer)
            .map_err(cert_err("signing the workload certificate"))
    }
}

/// Parameters of a workload certificate: one URI SAN, no subject, both TLS usages (a workload
/// is a server on 15008 and a client towards other nodes).
fn leaf_params(
    identity: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(cert_err("the identity is not an IA5 string"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
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
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

impl CertSource for LocalCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        Box::pin(async move {
            // Only the CSR's key is used; the CA decides the identity and the lifetime.
            let request = CertificateSigningRequestParams::from_der(csr)
                .map_err(cert_err("parsing the CSR"))?;
            let now = SystemTime::now();
            // A minute of backdating absorbs clock skew between nodes.
            let leaf = self.issue_for_key(
                identity,
                &request.public_key,
                now - Duration::from_mins(1),
                now + lifetime,
            )?;
            Ok(vec![leaf.der().clone()])
        })
    }

    fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        Arc::clone(&self.roots)
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), CaError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| CaError::Write {
            path: path.to_owned(),
            source,
        })?;
    file.write_all(text.as_bytes())
        .map_err(|source| CaError::Write {
            path: path.to_owned(),
            source,
        })
}
