//! TLS for HBONE: TLS 1.3 only, ALPN `h2`, no SNI, no resumption, AES-GCM suites (as ztunnel),
//! mutual authentication with SPIFFE identities.
//!
//! - The server (the destination pod's 15008 listener) presents the pod's certificate and
//!   requires a client certificate that chains to the mesh roots and carries a URI SAN in the
//!   mesh's trust domain; the verified peer identity is handed to the authorizer.
//! - The client presents the source workload's certificate and accepts only a server chain to
//!   the mesh roots whose URI SAN is the destination workload's identity (through a gateway:
//!   one of the identities of the service's endpoints there, [`client_config_any`]).
//!
//! Chains are validated by webpki against the mesh roots (`verify.rs`), the certificate
//! source's current ones at each handshake (a config built before a root rotation trusts the
//! new root too); nothing here accepts a certificate without validating it.

mod verify;

use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig,
    client::{ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

pub use verify::{PeerVerifier, RootStore, peer_identity};

use crate::identity::{CertManager, Identity};

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("trust anchors")]
    Roots(#[source] webpki::Error),
}

/// The crypto provider: aws-lc-rs, restricted to the TLS 1.3 AES-GCM suites HBONE peers use.
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

/// Presents the current certificate of one identity.
#[derive(Debug)]
struct IdentityCert {
    certs: CertManager,
    identity: Identity,
}

impl IdentityCert {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.certs
            .current(&self.identity)
            .map(|c| Arc::clone(&c.key))
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
}

impl ResolvesServerCert for IdentityCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for IdentityCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side of a pod's HBONE listener: presents `identity`, requires a client from one of
/// `trust_domains`.
pub fn server_config(
    provider: &Arc<CryptoProvider>,
    certs: &CertManager,
    identity: &Identity,
    trust_domains: &[String],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = PeerVerifier::client(provider, certs.clone(), trust_domains)?;
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(IdentityCert {
            certs: certs.clone(),
            identity: identity.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of an HBONE connection from `source` to a peer that must be `expected`.
pub fn client_config(
    provider: &Arc<CryptoProvider>,
    certs: &CertManager,
    source: &Identity,
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = PeerVerifier::server(provider, certs.clone(), expected.clone())?;
    client_with(provider, certs, source, verifier)
}

/// Client side of an HBONE connection from `source` to a peer that may be any one of
/// `expected` (the inner connection of double HBONE: whichever endpoint of the service the
/// gateway chose).
pub fn client_config_any(
    provider: &Arc<CryptoProvider>,
    certs: &CertManager,
    source: &Identity,
    expected: &[Identity],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = PeerVerifier::server_any_of(provider, certs.clone(), expected.to_vec())?;
    client_with(provider, certs, source, verifier)
}

fn client_with(
    provider: &Arc<CryptoProvider>,
    certs: &CertManager,
    source: &Identity,
    verifier: PeerVerifier,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(IdentityCert {
            certs: certs.clone(),
            identity: source.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}
