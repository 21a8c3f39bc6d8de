//! Root certificates from files, and the trust bundle: the certificate source's roots plus
//! other clusters' roots (`identity.trustBundleFiles`), trusted together.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject as _};
use tracing::{info, warn};

use super::{BoxFuture, CaError, CertSource, Identity};

/// How often root files are read again.
pub(crate) const ROOT_FILE_RECHECK: Duration = Duration::from_secs(1);

/// A root file as last read successfully.
pub(crate) struct RootFile {
    path: PathBuf,
    pub(crate) pem: Vec<u8>,
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) checked_at: Instant,
    /// Whether the last read failed (logged once, not at every check).
    failing: bool,
}

impl RootFile {
    pub(crate) fn read(path: &Path) -> Result<Self, CaError> {
        let pem = std::fs::read(path).map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })?;
        let certs = parse_pem(&pem).map_err(|reason| CaError::Pem {
            path: path.to_owned(),
            reason,
        })?;
        Ok(Self {
            path: path.to_owned(),
            pem,
            certs,
            checked_at: Instant::now(),
            failing: false,
        })
    }

    /// Keeps the last good content when the file cannot be read or holds no certificate (a
    /// `ConfigMap` update swaps a symlink; a half-written file must not empty the trust store).
    pub(crate) fn reread(&mut self, now: Instant) {
        self.checked_at = now;
        match Self::read(&self.path) {
            Ok(new) => {
                if self.failing {
                    info!(file = %self.path.display(), "root certificates readable again");
                }
                if new.pem != self.pem {
                    info!(
                        file = %self.path.display(),
                        roots = new.certs.len(),
                        "root certificates changed"
                    );
                }
                self.pem = new.pem;
                self.certs = new.certs;
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        error = %crate::error_chain(&e),
                        "keeping the last root certificates read"
                    );
                }
                self.failing = true;
            }
        }
    }
}

/// The certificates of a PEM text; at least one.
pub(crate) fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate".to_owned());
    }
    Ok(certs)
}

/// A certificate source whose roots are its inner source's plus the bundle files' (each
/// re-read once per [`ROOT_FILE_RECHECK`], keeping its last good roots when it cannot be read).
/// Signing is the inner source's.
pub struct TrustBundle {
    inner: Arc<dyn CertSource>,
    state: Mutex<Bundle>,
}

struct Bundle {
    files: Vec<RootFile>,
    /// The inner roots the union was made with.
    inner: Arc<[CertificateDer<'static>]>,
    /// The union handed out: a new `Arc` only when its content changes.
    roots: Arc<[CertificateDer<'static>]>,
}

impl TrustBundle {
    /// `inner` with the roots of `files`, which must be readable now (a bundle that cannot be
    /// read at start is a configuration error, not a smaller trust store).
    pub fn new(inner: Arc<dyn CertSource>, files: &[PathBuf]) -> Result<Self, CaError> {
        let files = files
            .iter()
            .map(|f| RootFile::read(f))
            .collect::<Result<Vec<_>, _>>()?;
        let roots = inner.roots();
        let mut bundle = Bundle {
            files,
            inner: Arc::clone(&roots),
            roots,
        };
        bundle.union();
        Ok(Self {
            inner,
            state: Mutex::new(bundle),
        })
    }
}

impl Bundle {
    fn union(&mut self) {
        let mut roots: Vec<CertificateDer<'static>> = self.inner.to_vec();
        for cert in self.files.iter().flat_map(|f| f.certs.iter()) {
            if !roots.iter().any(|r| r.as_ref() == cert.as_ref()) {
                roots.push(cert.clone());
            }
        }
        if *self.roots != *roots {
            self.roots = roots.into();
        }
    }
}

impl CertSource for TrustBundle {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        self.inner.sign(identity, csr, lifetime)
    }

    fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        let inner = self.inner.roots();
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changed = !Arc::ptr_eq(&state.inner, &inner);
        for file in &mut state.files {
            if now.duration_since(file.checked_at) >= ROOT_FILE_RECHECK {
                let before = file.certs.clone();
                file.reread(now);
                changed |= file.certs != before;
            }
        }
        if changed {
            state.inner = inner;
            state.union();
        }
        Arc::clone(&state.roots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    fn ca(dir: &Path) -> (LocalCa, PathBuf) {
        let (cert, key) = LocalCa::init(dir, "cluster.local").expect("init");
        (LocalCa::load(&cert, &key).expect("load"), cert)
    }

    #[test]
    fn the_bundle_adds_other_roots_and_keeps_them_through_a_bad_read() {
        let dir = std::env::temp_dir().join(format!("mesh-bundle-{}", std::process::id()));
        let (own, _) = ca(&dir.join("own"));
        let (_, other_cert) = ca(&dir.join("other"));
        let own_roots = own.roots();
        let bundle =
            TrustBundle::new(Arc::new(own), std::slice::from_ref(&other_cert)).expect("bundle");
        let roots = bundle.roots();
        assert_eq!(roots.len(), 2, "own root and the other cluster's");
        assert_eq!(roots[0], own_roots[0]);
        // The same set is the same Arc (verifiers parse once per Arc).
        assert!(Arc::ptr_eq(&roots, &bundle.roots()));
        // A half-written bundle file keeps the last good roots.
        std::fs::write(&other_cert, "-----BEGIN CERT").expect("write");
        bundle.state.lock().unwrap().files[0].checked_at -= ROOT_FILE_RECHECK;
        assert_eq!(bundle.roots().len(), 2);
        // A bundle file missing at start is an error.
        let missing = TrustBundle::new(Arc::new(ca(&dir.join("third")).0), &[dir.join("nope")]);
        assert!(missing.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
