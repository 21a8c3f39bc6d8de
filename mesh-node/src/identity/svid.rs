//! The identity of an X.509 SVID (a workload certificate): exactly one URI SAN, and that URI a
//! SPIFFE id of the mesh's form (the X.509-SVID rule; other SAN types are allowed). Both TLS
//! verifiers and the certificate manager read identities through [`svid_identity`] only, so the
//! identity that was verified is the identity the authorizer sees.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::{BadIdentity, Identity};

/// Why a certificate does not name one workload.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error("not a parsable X.509 certificate")]
    Encoding,
    #[error("malformed subject alternative names")]
    SubjectAltNames,
    #[error("no URI subject alternative name (a workload certificate carries one SPIFFE id)")]
    NoUri,
    #[error("{} URI subject alternative names {uris:?}; a workload certificate carries exactly one", uris.len())]
    SeveralUris { uris: Vec<String> },
    #[error("URI subject alternative name")]
    NotSpiffe(#[source] BadIdentity),
}

/// The one SPIFFE identity of a workload certificate (DER), or why it has none.
pub fn svid_identity(cert: &CertificateDer<'_>) -> Result<Identity, SvidError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|_| SvidError::Encoding)?;
    // A certificate with two SAN extensions is an error here (x509-parser refuses duplicates).
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| SvidError::SubjectAltNames)?
        .ok_or(SvidError::NoUri)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris[..] {
        [] => Err(SvidError::NoUri),
        [uri] => uri.parse().map_err(SvidError::NotSpiffe),
        _ => Err(SvidError::SeveralUris {
            uris: uris.iter().map(|u| (*u).to_owned()).collect(),
        }),
    }
}
