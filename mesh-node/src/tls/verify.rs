//! Certificate verification for both ends: a webpki chain check against the mesh roots, then a
//! SPIFFE identity check (trust domain for clients, exact identity for servers) on the one
//! identity of the leaf ([`svid_identity`]: exactly one URI SAN), which is also the identity
//! [`peer_identity`] hands to the authorizer.
//!
//! The roots are read at each handshake from a [`RootStore`] (the certificate source's current
//! set: istiod's roots change during a root rotation), and parsed once per change: a store
//! returns the same `Arc` while its roots are unchanged, and the verifier keeps the parsed
//! anchors of the last `Arc` it saw.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use super::TlsError;
use crate::identity::{CertManager, Identity, svid_identity};

/// Where a verifier reads the mesh roots at each handshake.
pub trait RootStore: Send + Sync + fmt::Debug {
    /// The current roots: the same `Arc` while they are unchanged, a new one when they change.
    fn current_roots(&self) -> Arc<[CertificateDer<'static>]>;
}

/// The certificate source's roots, as they are now.
impl RootStore for CertManager {
    fn current_roots(&self) -> Arc<[CertificateDer<'static>]> {
        self.roots()
    }
}

/// A fixed set of roots.
impl RootStore for Arc<[CertificateDer<'static>]> {
    fn current_roots(&self) -> Arc<[CertificateDer<'static>]> {
        Arc::clone(self)
    }
}

/// The parsed form of one set of roots.
#[derive(Debug)]
struct Anchors {
    roots: Arc<[CertificateDer<'static>]>,
    anchors: Arc<[TrustAnchor<'static>]>,
}

impl Anchors {
    fn parse(roots: Arc<[CertificateDer<'static>]>) -> Result<Self, webpki::Error> {
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<_, _>>()?;
        Ok(Self { roots, anchors })
    }
}

/// What the peer's identity must satisfy.
#[derive(Debug)]
enum Expect {
    /// A client: any workload of these trust domains (the mesh's own and its aliases).
    TrustDomains(Vec<String>),
    /// A server: exactly this workload identity.
    Exactly(Identity),
    /// A server: any one of these workload identities (a service's endpoints behind a
    /// gateway, any of which may answer).
    AnyOf(Vec<Identity>),
}

/// Verifies peer chains against the mesh roots and checks the SPIFFE identity.
#[derive(Debug)]
pub struct PeerVerifier {
    provider: Arc<CryptoProvider>,
    roots: Box<dyn RootStore>,
    /// The anchors of the roots last read from `roots`.
    anchors: Mutex<Anchors>,
    expect: Expect,
}

impl PeerVerifier {
    /// Fails when the current roots are not trust anchors (rather than at every handshake).
    fn new(
        provider: &Arc<CryptoProvider>,
        roots: impl RootStore + 'static,
        expect: Expect,
    ) -> Result<Self, TlsError> {
        let anchors = Anchors::parse(roots.current_roots()).map_err(TlsError::Roots)?;
        Ok(Self {
            provider: Arc::clone(provider),
            roots: Box::new(roots),
            anchors: Mutex::new(anchors),
            expect,
        })
    }

    /// The anchors of the current roots, parsed again only when the roots changed. Roots that
    /// are not trust anchors fail the handshake (no fallback to older roots).
    fn anchors(&self) -> Result<Arc<[TrustAnchor<'static>]>, webpki::Error> {
        let roots = self.roots.current_roots();
        let mut cached = self.anchors.lock().unwrap_or_else(PoisonError::into_inner);
        // The cache holds its `Arc`, so an equal pointer is the same allocation, not a reused
        // address.
        if !Arc::ptr_eq(&cached.roots, &roots) {
            *cached = Anchors::parse(roots)?;
        }
        Ok(Arc::clone(&cached.anchors))
    }

    /// For a server: accept clients of `trust_domains`.
    pub fn client(
        provider: &Arc<CryptoProvider>,
        roots: impl RootStore + 'static,
        trust_domains: &[String],
    ) -> Result<Self, TlsError> {
        Self::new(
            provider,
            roots,
            Expect::TrustDomains(trust_domains.to_vec()),
        )
    }

    /// For a client: accept only a server with `identity`.
    pub fn server(
        provider: &Arc<CryptoProvider>,
        roots: impl RootStore + 'static,
        identity: Identity,
    ) -> Result<Self, TlsError> {
        Self::new(provider, roots, Expect::Exactly(identity))
    }

    /// For a client: accept a server with any one of `identities` (none: no server).
    pub fn server_any_of(
        provider: &Arc<CryptoProvider>,
        roots: impl RootStore + 'static,
        identities: Vec<Identity>,
    ) -> Result<Self, TlsError> {
        Self::new(provider, roots, Expect::AnyOf(identities))
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let anchors = self.anchors().map_err(pki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let id = svid_identity(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        let ok = match &self.expect {
            Expect::TrustDomains(tds) => tds.contains(&id.trust_domain),
            Expect::Exactly(expected) => id == *expected,
            Expect::AnyOf(expected) => expected.contains(&id),
        };
        if ok {
            Ok(())
        } else {
            let wanted = match &self.expect {
                Expect::TrustDomains(tds) => {
                    format!("an identity in trust domain {}", tds.join(" or "))
                }
                Expect::Exactly(id) => id.to_string(),
                Expect::AnyOf(ids) => format!(
                    "one of [{}]",
                    ids.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongIdentity {
                    shown: id.to_string(),
                    wanted,
                })),
            )))
        }
    }
}

/// The handshake-signature checks both trait impls share.
impl PeerVerifier {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The peer presented a valid chain for the wrong identity.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {shown} is not {wanted}")]
pub struct WrongIdentity {
    pub shown: String,
    pub wanted: String,
}

fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    let cert_error = match error {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(cert_error)
}

/// The SPIFFE identity of a verified peer: the one URI SAN of its leaf, as the verifier read it
/// (`None` for a chain that has no leaf or does not name exactly one workload).
#[must_use]
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<Identity> {
    svid_identity(chain.first()?).ok()
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The name is not used: HBONE identifies servers by SPIFFE URI SAN only.
        self.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

#[cfg(test)]
mod tests;
