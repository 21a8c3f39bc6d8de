//! Certificate manager behaviour against a local CA that can be switched off.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

use super::{CaError, CertManager, CertSource, Identity, LocalCa, ca::BoxFuture};

/// A local CA that counts requests and fails while `down` is set.
struct FlakyCa {
    ca: LocalCa,
    down: AtomicBool,
    requests: AtomicUsize,
}

impl CertSource for FlakyCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(CaError::Unavailable {
                    reason: "switched off by the test".to_owned(),
                })
            });
        }
        self.ca.sign(identity, csr, lifetime)
    }

    fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        self.ca.roots()
    }
}

fn flaky_ca() -> (Arc<FlakyCa>, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let (cert, key) = LocalCa::init(dir.path(), "test.local").expect("init");
    let ca = LocalCa::load(&cert, &key).expect("load");
    let flaky = Arc::new(FlakyCa {
        ca,
        down: AtomicBool::new(false),
        requests: AtomicUsize::new(0),
    });
    (flaky, dir)
}

/// A temporary directory removed on drop (keeps the dev-dependencies at none).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Self {
            static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path =
                std::env::temp_dir().join(format!("mesh-ca-test-{}-{n}", std::process::id()));
            Self(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn manager(ca: &Arc<FlakyCa>, lifetime: Duration) -> CertManager {
    CertManager::new(Arc::clone(ca) as Arc<dyn CertSource>, lifetime, provider())
}

#[tokio::test]
async fn issues_on_acquire_renews_at_half_life_and_drops_on_release() {
    let (ca, _dir) = flaky_ca();
    let certs = manager(&ca, Duration::from_secs(2));
    let id = Identity::new("test.local", "ns", "sa");
    certs.acquire(&id);
    certs.acquire(&id);
    let first = certs.get(&id).await.expect("first certificate");
    assert_eq!(first.identity, id);
    // Renewed every second (half of 2 s), not more often.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = certs.current(&id).expect("still served");
    assert!(later.not_after > first.not_after, "renewed");
    let requests = ca.requests.load(Ordering::SeqCst);
    assert!(
        (3..=4).contains(&requests),
        "initial + 2 renewals, got {requests}"
    );
    certs.release(&id);
    assert!(certs.current(&id).is_some(), "one workload still uses it");
    certs.release(&id);
    assert!(
        certs.current(&id).is_none(),
        "dropped with the last workload"
    );
    assert!(certs.states().is_empty());
}

#[tokio::test]
async fn keeps_serving_a_valid_certificate_while_the_ca_is_down() {
    let (ca, _dir) = flaky_ca();
    // X.509 times have whole seconds: a 6 s certificate is valid for at least 5 s.
    let certs = manager(&ca, Duration::from_secs(6));
    let id = Identity::new("test.local", "ns", "web");
    certs.acquire(&id);
    let before = certs.get(&id).await.expect("issued");
    ca.down.store(true, Ordering::SeqCst);
    // Renewal is due after about 3 s; it fails and is retried with backoff (0.2 s, 0.4 s, ...).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let requests = ca.requests.load(Ordering::SeqCst);
    assert!(requests >= 3, "retried: {requests} requests");
    let current = certs
        .current(&id)
        .expect("the valid certificate keeps serving");
    assert_eq!(current.not_after, before.not_after);
    ca.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(certs.current(&id).expect("renewed").not_after > before.not_after);
}

#[test]
fn parses_and_prints_spiffe_ids() {
    let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    for bad in [
        "spiffe://cluster.local/ns/shop",
        "spiffe://cluster.local/ns//sa/web",
        "https://cluster.local/ns/a/sa/b",
        "spiffe://td/ns/a/sa/b/extra",
        "spiffe://td/namespace/a/sa/b",
    ] {
        assert!(bad.parse::<Identity>().is_err(), "{bad}");
    }
}

#[test]
fn a_ca_key_that_is_not_the_certificates_key_is_refused_naming_both_files() {
    let (a, b) = (tempdir::Dir::new(), tempdir::Dir::new());
    let (cert, _) = LocalCa::init(a.path(), "test.local").expect("init a");
    let (_, other_key) = LocalCa::init(b.path(), "test.local").expect("init b");
    let Err(err) = LocalCa::load(&cert, &other_key) else {
        panic!("a mismatched key must not load");
    };
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&*cert.to_string_lossy())
            && message.contains(&*other_key.to_string_lossy()),
        "{message}"
    );
}

/// A CA that signs a certificate for another identity than the one asked for.
struct LyingCa {
    ca: LocalCa,
    instead: Identity,
    requests: AtomicUsize,
}

impl CertSource for LyingCa {
    fn sign<'a>(
        &'a self,
        _identity: &'a Identity,
        csr: &'a CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.ca.sign(&self.instead, csr, lifetime)
    }

    fn roots(&self) -> Arc<[CertificateDer<'static>]> {
        self.ca.roots()
    }
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_is_never_served() {
    let dir = tempdir::Dir::new();
    let (cert, key) = LocalCa::init(dir.path(), "test.local").expect("init");
    let lying = Arc::new(LyingCa {
        ca: LocalCa::load(&cert, &key).expect("load"),
        instead: Identity::new("test.local", "ns", "admin"),
        requests: AtomicUsize::new(0),
    });
    let certs = CertManager::new(
        Arc::clone(&lying) as Arc<dyn CertSource>,
        Duration::from_mins(1),
        provider(),
    );
    let id = Identity::new("test.local", "ns", "web");
    certs.acquire(&id);
    let got = certs.get(&id).await;
    assert!(got.is_err(), "served a certificate of another identity");
    assert!(certs.current(&id).is_none());
    assert!(
        lying.requests.load(Ordering::SeqCst) >= 2,
        "asked, refused, asked again"
    );
}

#[test]
fn spiffe_ids_follow_the_spiffe_character_rules() {
    for bad in [
        "spiffe://Cluster.local/ns/a/sa/b",
        "spiffe://cluster.local:8080/ns/a/sa/b",
        "spiffe://cluster.local/ns/a%2Fb/sa/c",
        "spiffe://cluster.local/ns/./sa/b",
        "spiffe://cluster.local/ns/a/sa/..",
        "spiffe://cluster.local/ns/a/sa/b?x",
        "spiffe://cluster.local/ns/a/sa/b#f",
        "spiffe://cluster.local/ns/a b/sa/c",
        "SPIFFE://cluster.local/ns/a/sa/b",
    ] {
        assert!(bad.parse::<Identity>().is_err(), "{bad}");
    }
    let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(2048));
    assert!(long.parse::<Identity>().is_err(), "longer than 2048 bytes");
    for good in [
        "spiffe://cluster.local/ns/kube-system/sa/coredns",
        "spiffe://td_1.example-2/ns/A.b_c/sa/x-Y.z",
    ] {
        assert_eq!(good.parse::<Identity>().expect(good).to_string(), good);
    }
}

/// The crypto provider the managers check keys with (the mesh's TLS module narrows its cipher
/// suites; key checks do not depend on them).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
