//! Workload identities (SPIFFE ids), the certificate sources that sign them, and the
//! certificate manager that keeps one certificate per identity with a workload on this node.

mod ca;
mod manager;

use std::{fmt, str::FromStr};

pub use ca::{CA_CERT_FILE, CA_KEY_FILE, CaError, CertSource, LocalCa};
pub use manager::{CertError, CertManager, CertState, WorkloadCert};

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

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = || BadIdentity {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| !p.is_empty()) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests;
