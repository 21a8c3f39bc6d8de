//! [`IstioCa`] against an in-process `IstioCertificateService` over TLS on loopback, with a TLS
//! root for istiod's serving certificate (the root file) and workload roots that sign the
//! certificates and can be rotated.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName};
use tonic::{Request, Response, Status};

use super::{IstioCa, parse_chain, pem};
use crate::{
    config::IstioConfig,
    identity::{CaError, CertManager, CertSource, Identity},
    istio::proto::auth::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
    tls,
};

const TRUST_DOMAIN: &str = "cluster.local";

/// A self-signed CA.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

fn test_ca(name: &str) -> Arc<TestCa> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("self-signed");
    Arc::new(TestCa {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    })
}

/// What the stand-in saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    token: String,
    cluster: String,
    identity: String,
    validity: i64,
}

/// istiod's CA, as far as a node proxy sees it.
struct Istiod {
    /// The workload root signing now.
    signer: Mutex<Arc<TestCa>>,
    /// Accepted bearer tokens.
    tokens: Vec<String>,
    seen: Mutex<Vec<Seen>>,
    /// Answer with one element holding the whole chain, rather than one per certificate.
    joined: AtomicBool,
}

impl Istiod {
    fn new(signer: &Arc<TestCa>, tokens: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            signer: Mutex::new(Arc::clone(signer)),
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
            seen: Mutex::new(Vec::new()),
            joined: AtomicBool::new(false),
        })
    }

    fn rotate_to(&self, signer: &Arc<TestCa>) {
        *self.signer.lock().unwrap() = Arc::clone(signer);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

struct Service(Arc<Istiod>);

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let token = header("authorization")
            .strip_prefix("Bearer ")
            .unwrap_or_default()
            .to_owned();
        let cluster = header("clusterid");
        let body = request.into_inner();
        let identity = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        self.0.seen.lock().unwrap().push(Seen {
            token: token.clone(),
            cluster,
            identity: identity.clone(),
            validity: body.validity_duration,
        });
        if !self.0.tokens.contains(&token) {
            return Err(Status::unauthenticated(
                "authentication failed: the bearer token is not valid",
            ));
        }
        let csr = CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let signer = Arc::clone(&self.0.signer.lock().unwrap());
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .try_into()
                .map_err(|_| Status::invalid_argument("identity"))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_mins(1)).into();
        params.not_after =
            (now + Duration::from_secs(body.validity_duration.unsigned_abs())).into();
        let leaf = params
            .signed_by(&csr.public_key, &signer.issuer)
            .map_err(|e| Status::internal(e.to_string()))?;
        let cert_chain = if self.0.joined.load(Ordering::SeqCst) {
            vec![format!("{}{}", leaf.pem(), signer.pem)]
        } else {
            vec![leaf.pem(), signer.pem.clone()]
        };
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// The stand-in serving on loopback with a certificate for `istiod.istio-system.svc` from
/// `tls_root`; stops (and closes its port) when dropped or [`Running::stop`]ped.
struct Running {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(istiod: &Arc<Istiod>, tls_root: &TestCa) -> Running {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params =
        CertificateParams::new(vec!["istiod.istio-system.svc".to_owned()]).expect("params");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &tls_root.issuer)
        .expect("serving cert");
    let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .expect("server TLS");
    let service = IstioCertificateServiceServer::new(Service(Arc::clone(istiod)));
    let task = tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(
                service,
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("serve");
    });
    Running {
        address,
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A directory with the root file and the token file, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new(roots: &[&TestCa], token: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("mesh-istio-ca-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test directory");
        let files = Self(dir);
        files.set_roots(roots);
        files.set_token(token);
        files
    }

    fn roots(&self) -> PathBuf {
        self.0.join("root-cert.pem")
    }

    fn token(&self) -> PathBuf {
        self.0.join("istio-token")
    }

    fn set_roots(&self, roots: &[&TestCa]) {
        let pem: String = roots.iter().map(|r| r.pem.as_str()).collect();
        write_atomically(&self.roots(), &pem);
    }

    fn set_token(&self, token: &str) {
        write_atomically(&self.token(), token);
    }

    fn config(&self, running: &Running) -> IstioConfig {
        IstioConfig {
            enabled: true,
            ca_address: Some(format!("https://{}", running.address)),
            root_cert_file: self.roots(),
            token_file: self.token(),
            ..IstioConfig::default()
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// As the kubelet updates a mounted `ConfigMap` or token: a new file renamed over the old.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn id(sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, "default", sa)
}

fn csr(identity: &Identity) -> CertificateSigningRequestDer<'static> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().expect("IA5"))];
    params.serialize_request(&key).expect("CSR").der().clone()
}

async fn sign(ca: &IstioCa, identity: &Identity) -> Result<Vec<CertificateDer<'static>>, CaError> {
    ca.sign(identity, &csr(identity), Duration::from_hours(1))
        .await
}

fn has(roots: &[CertificateDer<'_>], ca: &TestCa) -> bool {
    roots.contains(&ca.der)
}

fn manager(ca: &Arc<IstioCa>, lifetime: Duration) -> CertManager {
    CertManager::new(
        Arc::clone(ca) as Arc<dyn CertSource>,
        lifetime,
        tls::provider(),
    )
}

#[tokio::test]
async fn a_certificate_for_the_impersonated_identity_is_issued_and_served() {
    let (tls_root, workload_root) = (test_ca("istiod TLS root"), test_ca("workload root"));
    let istiod = Istiod::new(&workload_root, &["t1"]);
    // The whole chain in one element: each element may hold several certificates.
    istiod.joined.store(true, Ordering::SeqCst);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "t1\n");
    let ca = Arc::new(IstioCa::new(&files.config(&running)).expect("IstioCa"));
    assert!(!has(&ca.roots(), &workload_root), "not served yet");
    let certs = manager(&ca, Duration::from_hours(1));
    let web = id("web");
    certs.acquire(&web);
    let cert = certs.get(&web).await.expect("issued and accepted");
    assert_eq!(cert.identity, web);
    assert_eq!(
        cert.key.cert.len(),
        1,
        "the leaf is presented, the root is not"
    );
    let seen = istiod.seen();
    let [seen] = seen.as_slice() else {
        panic!("one request: {seen:?}");
    };
    assert_eq!(seen.identity, web.to_string(), "ImpersonatedIdentity");
    assert_eq!(seen.validity, 3600, "the lifetime in seconds");
    assert_eq!(seen.token, "t1", "the token, trimmed");
    assert_eq!(seen.cluster, "Kubernetes");
    let roots = ca.roots();
    assert!(has(&roots, &tls_root) && has(&roots, &workload_root));
    assert!(
        Arc::ptr_eq(&roots, &ca.roots()),
        "unchanged roots are the same Arc"
    );
}

#[tokio::test]
async fn the_token_is_read_again_for_every_request() {
    let (tls_root, workload_root) = (test_ca("istiod TLS root"), test_ca("workload root"));
    let istiod = Istiod::new(&workload_root, &["first", "second"]);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "first");
    let ca = IstioCa::new(&files.config(&running)).expect("IstioCa");
    sign(&ca, &id("web")).await.expect("first request");
    files.set_token("second");
    sign(&ca, &id("web")).await.expect("second request");
    let tokens: Vec<String> = istiod.seen().into_iter().map(|s| s.token).collect();
    assert_eq!(tokens, ["first", "second"]);
}

#[tokio::test]
async fn a_refused_token_is_an_error_that_says_so() {
    let (tls_root, workload_root) = (test_ca("istiod TLS root"), test_ca("workload root"));
    let istiod = Istiod::new(&workload_root, &["good"]);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "stolen");
    let ca = IstioCa::new(&files.config(&running)).expect("IstioCa");
    let err = sign(&ca, &id("web")).await.expect_err("a bad token");
    let CaError::Refused { code, message } = &err else {
        panic!("refused, not {err}");
    };
    assert_eq!(code, "Unauthenticated");
    assert!(message.contains("bearer token is not valid"), "{message}");
    assert!(
        err.to_string().contains("Unauthenticated"),
        "{}",
        crate::error_chain(&err)
    );
    assert_eq!(istiod.seen()[0].token, "stolen");
}

#[tokio::test]
async fn while_the_ca_is_down_requests_are_unavailable_and_the_certificate_keeps_serving() {
    let (tls_root, workload_root) = (test_ca("istiod TLS root"), test_ca("workload root"));
    let istiod = Istiod::new(&workload_root, &["t"]);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "t");
    let ca = Arc::new(IstioCa::new(&files.config(&running)).expect("IstioCa"));
    // X.509 times have whole seconds: a 6 s certificate is valid for at least 5 s, renewed
    // after about 3 s.
    let certs = manager(&ca, Duration::from_secs(6));
    let web = id("web");
    certs.acquire(&web);
    let before = certs.get(&web).await.expect("issued");
    running.stop().await;
    let err = sign(&ca, &id("web")).await.expect_err("the CA is down");
    assert!(
        matches!(err, CaError::Unavailable { .. }),
        "{}",
        crate::error_chain(&err)
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let requests = istiod.seen().len();
    assert_eq!(requests, 1, "no request reached the stopped CA");
    let current = certs
        .current(&web)
        .expect("the valid certificate keeps serving");
    assert_eq!(current.not_after, before.not_after, "not renewed");
}

#[tokio::test]
async fn during_a_root_rotation_both_roots_are_trusted_while_both_are_served() {
    let tls_root = test_ca("istiod TLS root");
    let (old, new) = (test_ca("old workload root"), test_ca("new workload root"));
    let istiod = Istiod::new(&old, &["t"]);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "t");
    let ca = IstioCa::new(&files.config(&running)).expect("IstioCa");
    let (web, db) = (id("web"), id("db"));
    sign(&ca, &web).await.expect("web, old root");
    let roots = ca.roots();
    assert!(has(&roots, &tls_root) && has(&roots, &old) && !has(&roots, &new));
    istiod.rotate_to(&new);
    sign(&ca, &db).await.expect("db, new root");
    let roots = ca.roots();
    assert!(
        has(&roots, &tls_root) && has(&roots, &old) && has(&roots, &new),
        "both served: both trusted"
    );
    assert_eq!(roots.len(), 3, "deduplicated");
    sign(&ca, &db).await.expect("db again");
    assert_eq!(ca.roots().len(), 3, "the same root twice is one root");
    sign(&ca, &web)
        .await
        .expect("web, renewed with the new root");
    let roots = ca.roots();
    assert!(
        has(&roots, &tls_root) && has(&roots, &new) && !has(&roots, &old),
        "the old root is served by no current certificate: dropped"
    );
    // A root added to the file is trusted once the file is looked at again.
    files.set_roots(&[&tls_root, &old]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let roots = ca.roots();
    assert!(
        has(&roots, &old) && has(&roots, &new),
        "the file's roots count"
    );
}

#[tokio::test]
async fn a_changed_root_file_is_used_for_the_next_connection_to_the_ca() {
    let (tls_root, workload_root) = (test_ca("istiod TLS root"), test_ca("workload root"));
    let istiod = Istiod::new(&workload_root, &["t"]);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "t");
    let ca = IstioCa::new(&files.config(&running)).expect("IstioCa");
    sign(&ca, &id("web")).await.expect("istiod verified");
    // Another root: istiod's certificate no longer verifies, so the channel was rebuilt.
    let stranger = test_ca("another root");
    files.set_roots(&[&stranger]);
    let err = sign(&ca, &id("web"))
        .await
        .expect_err("istiod's certificate is untrusted");
    assert!(
        matches!(err, CaError::Unavailable { .. }),
        "{}",
        crate::error_chain(&err)
    );
    files.set_roots(&[&stranger, &tls_root]);
    sign(&ca, &id("web")).await.expect("verified again");
    assert_eq!(
        istiod.seen().len(),
        2,
        "the untrusted server saw no request"
    );
}

#[tokio::test]
async fn a_tls_server_built_before_a_root_was_added_accepts_a_client_of_that_root() {
    let tls_root = test_ca("istiod TLS root");
    let (old, new) = (test_ca("old workload root"), test_ca("new workload root"));
    let istiod = Istiod::new(&old, &["t"]);
    let running = serve(&istiod, &tls_root).await;
    let files = Files::new(&[&tls_root], "t");
    let ca = Arc::new(IstioCa::new(&files.config(&running)).expect("IstioCa"));
    let certs = manager(&ca, Duration::from_hours(1));
    let provider = tls::provider();
    let (server_id, client_id) = (id("server"), id("client"));
    certs.acquire(&server_id);
    certs.get(&server_id).await.expect("server certificate");
    let server = tls::server_config(&provider, &certs, &server_id, &[TRUST_DOMAIN.to_owned()])
        .expect("server");
    // The rotation starts after the server's config was built: the client's chain ends at a
    // root the config did not know.
    istiod.rotate_to(&new);
    certs.acquire(&client_id);
    certs.get(&client_id).await.expect("client certificate");
    assert!(has(&certs.roots(), &new));
    let client =
        tls::client_config(&provider, &certs, &client_id, &server_id).expect("client config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let stream = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(tls::peer_identity(
            stream.get_ref().1.peer_certificates().unwrap_or_default(),
        ))
    });
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = ServerName::try_from("mesh.invalid").expect("name");
    let _client = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .expect("the client accepts the server (old root, still served)");
    let peer = accept
        .await
        .expect("accept task")
        .unwrap_or_else(|e| panic!("the server refused the client of the new root: {e}"));
    assert_eq!(peer, Some(client_id));
}

#[test]
fn pem_is_base64_in_lines_of_64_with_padding() {
    assert_eq!(pem("X", b"f"), "-----BEGIN X-----\nZg==\n-----END X-----\n");
    assert_eq!(
        pem("X", b"fo"),
        "-----BEGIN X-----\nZm8=\n-----END X-----\n"
    );
    assert_eq!(
        pem("X", b"foo"),
        "-----BEGIN X-----\nZm9v\n-----END X-----\n"
    );
    let long = pem("X", &[0xff; 49]);
    let lines: Vec<&str> = long.lines().collect();
    assert_eq!(lines[1], "/".repeat(64));
    assert_eq!(lines[2], "/w==");
    let ca = test_ca("root");
    let der = ca.der.as_ref();
    let parsed = parse_chain(&[pem("CERTIFICATE", der)]).expect("round trip");
    assert_eq!(parsed, std::slice::from_ref(&ca.der));
}

#[test]
fn a_chain_element_without_certificates_is_refused() {
    let ca = test_ca("root");
    for chain in [
        vec![String::new()],
        vec![ca.pem.clone(), "garbage".to_owned()],
    ] {
        let Err(err) = parse_chain(&chain) else {
            panic!("accepted {chain:?}");
        };
        assert!(matches!(err, CaError::BadChain { .. }), "{err}");
    }
    let broken = ca.pem.replace('M', "*");
    assert!(parse_chain(&[broken]).is_err(), "not base64");
}
