//! Workload identities (SPIFFE ids), the certificate sources that sign them, and the
//! certificate manager that keeps one certificate per identity with a workload on this node.

mod ca;
mod manager;
pub(crate) mod roots;
mod svid;

use std::{fmt, str::FromStr};

pub use ca::{BoxFuture, CA_CERT_FILE, CA_KEY_FILE, CaError, CertSource, LocalCa};
pub use manager::{CertError, CertManager, CertState, WorkloadCert};
pub use roots::TrustBundle;
pub use svid::{SvidError, svid_identity};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{uri}` is not a SPIFFE workload id (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")]
pub struct BadIdentity {
    pub uri: String,
}

impl Identity {
    #[must_use]
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

/// Whether `td` is a SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`.
#[must_use]
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
}

/// Whether `segment` is a SPIFFE path segment: letters, digits, `.`, `-`, `_`, and not `.` or
/// `..`.
#[must_use]
pub fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = BadIdentity;

    /// Parses a SPIFFE id with the SPIFFE character rules: a trust domain of lowercase
    /// letters, digits, `.`, `-` and `_`; path segments of letters, digits, `.`, `-` and `_`
    /// that are not `.` or `..` (so no percent-encoding, query or fragment); at most 2048 bytes.
    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = || BadIdentity {
            uri: uri.to_owned(),
        };
        if uri.len() > 2048 {
            return Err(bad());
        }
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            [td, "ns", ns, "sa", sa]
                if valid_trust_domain(td) && valid_segment(ns) && valid_segment(sa) =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests;
