//! The east-west gateway on loopback, without root: a real `Proxy` serving the gateway role
//! (rustls with a `LocalCa`, h2, the policy engine, the limits), an HBONE client (`hbone::Pool`,
//! as the daemon of another network) sending `CONNECT <service hostname>:<port>`, and plain TCP
//! echoes standing in for the endpoints' 15008 (the gateway forwards bytes unread, so the inner
//! HBONE is not needed to see them round-trip).

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use mesh_node::{
    hbone::{BoxFuture, Dialer, HboneError, Pool, PoolKey},
    identity::{CA_CERT_FILE, CA_KEY_FILE, CertManager, Identity, LocalCa},
    metrics::{Metrics, NodeCollector},
    policy::{PolicyDocument, PolicyStore},
    proxy::{GatewayServing, MeshTls, Proxy, ProxyOptions},
    state::{MeshState, Service},
    tls,
    workload::Workload,
};
use support::{TRUST_DOMAIN, workload};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const HOST: &str = "echo.default.svc.cluster.local";
/// The service port clients name.
const PORT: u16 = 8080;

/// `127.40.<mesh>.<n>`: each test its own addresses.
fn ip(mesh: u8, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 40, mesh, n))
}

/// A gateway, its client, and the endpoints behind it.
struct Setup {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    serving: GatewayServing,
    certs: CertManager,
    client: Identity,
    pool: Pool,
    dir: std::path::PathBuf,
    apps: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for app in &self.apps {
            app.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Dials plain TCP (the client daemon's side of the outer connection).
struct Plain;

impl Dialer for Plain {
    fn dial(&self, address: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(address))
    }
}

/// The gateway workload (as `gateway:`'s defaults make it) on network `east`.
fn gateway_workload() -> Workload {
    Workload {
        name: "istio-eastwestgateway".to_owned(),
        namespace: "istio-system".to_owned(),
        service_account: "istio-eastwestgateway".to_owned(),
        labels: [("istio".to_owned(), "eastwestgateway".to_owned())].into(),
        ips: Vec::new(),
        node: "gateway".to_owned(),
        netns: None,
        enrolled: false,
        network: "east".to_owned(),
        trust_domain: None,
    }
}

/// An endpoint's 15008 stand-in: answers every connection with `tag` and a newline, then
/// echoes until the client half-closes, then half-closes back.
async fn tagged_echo(listener: TcpListener, tag: &'static str) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.write_all(format!("{tag}\n").as_bytes()).await;
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        });
    }
}

impl Setup {
    /// A gateway on network `east` at `127.40.<mesh>.1` with the service `echo` (port 8080)
    /// whose endpoints are `endpoints` (`(n, network, ready)`: the workload `echo-<n>` at
    /// `127.40.<mesh>.<n>`, with a tagged echo on its 15008 when `listening`).
    async fn new(mesh: u8, endpoints: &[(u8, &str, bool)], handshake: Duration) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = std::env::temp_dir().join(format!("mesh-gateway-{}-{mesh}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::init(&dir, TRUST_DOMAIN).expect("ca init");
        let ca = LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
        let provider = tls::provider();
        let certs = CertManager::new(Arc::new(ca), Duration::from_mins(10), Arc::clone(&provider));
        let metrics = Metrics::new(NodeCollector {
            bpffs: dir.join("no-bpffs"),
            certs: certs.clone(),
        });
        let options = ProxyOptions {
            network: "east".to_owned(),
            handshake_timeout: handshake,
            ..support::options("gateway", &metrics)
        };
        let proxy = Arc::new(Proxy::new(
            options,
            MeshTls::new(TRUST_DOMAIN.to_owned(), certs.clone(), provider),
        ));
        let mut apps = Vec::new();
        let mut workloads = Vec::new();
        for (n, network, listening) in endpoints {
            let mut w = workload(&format!("echo-{n}"), ip(mesh, *n), "node-b");
            w.labels = [("app".to_owned(), "echo".to_owned())].into();
            w.network = (*network).to_owned();
            workloads.push(w);
            if *listening {
                let listener = TcpListener::bind((ip(mesh, *n), 15008))
                    .await
                    .expect("endpoint 15008");
                let tag: &'static str = Box::leak(format!("echo-{n}").into_boxed_str());
                apps.push(tokio::spawn(tagged_echo(listener, tag)));
            }
        }
        let services: Vec<Service> = serde_yaml_ng::from_str(&format!(
            "- name: echo\n  addresses: [10.96.{mesh}.10]\n  ports: [{{port: {PORT}, targetPort: 7000}}]\n  selector: {{app: echo}}\n"
        ))
        .expect("services");
        let state = MeshState {
            workloads,
            services,
            policies: Arc::new(PolicyStore::default()),
            traffic: Arc::default(),
            networks: Vec::new(),
            zone: None,
            pending: None,
        };
        proxy.set_workloads(&state.workloads);
        proxy.set_services(&state, "gateway");
        let listener = std::net::TcpListener::bind((ip(mesh, 1), 0)).expect("gateway listener");
        let serving = proxy
            .serve_gateway(gateway_workload(), listener)
            .expect("serve the gateway");
        let client: Identity = support::principal("client").parse().expect("identity");
        certs.acquire(&client);
        certs.get(&client).await.expect("the client's certificate");
        let pool = Pool::new(Arc::clone(&metrics), mesh_node::hbone::Liveness::default());
        Self {
            proxy,
            metrics,
            serving,
            certs,
            client,
            pool,
            dir,
            apps,
        }
    }

    /// `CONNECT authority` through the gateway, as the client daemon sends it.
    async fn connect(&self, authority: &str) -> Result<mesh_node::hbone::Stream, HboneError> {
        let gateway = self.serving.identity().clone();
        let config = tls::client_config(&tls::provider(), &self.certs, &self.client, &gateway)
            .expect("client config");
        let key = PoolKey {
            source: self.client.clone(),
            destination: gateway,
            address: self.serving.local_addr(),
        };
        let headers = http::HeaderMap::new();
        self.pool
            .connect_to(&key, (authority, &headers), &Plain, &config)
            .await
    }

    /// The status the gateway answers `authority` with.
    async fn status(&self, authority: &str) -> StatusCode {
        match self.connect(authority).await {
            Ok(_) => StatusCode::OK,
            Err(HboneError::Status { status, .. }) => status,
            Err(e) => panic!("expected an answer: {}", mesh_node::error_chain(&e)),
        }
    }

    /// `mesh_connection_errors_total{listener="gateway",reason}`.
    fn errors(&self, reason: &str) -> u64 {
        let needle = format!("listener=\"gateway\",reason=\"{reason}\"");
        self.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("mesh_connection_errors_total") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn set_policies(&self, yaml: &str) {
        let docs: Vec<PolicyDocument> = serde_yaml_ng::from_str(yaml).expect("policy YAML");
        let store = PolicyStore::new("istio-system", &docs).expect("policies");
        self.proxy.set_policies(Arc::new(store));
    }
}

/// Sends `data` on the stream and ends it, and reads everything back until the far end ends
/// it (the endpoint's tag line, then the echo).
async fn round_trip(stream: mesh_node::hbone::Stream, data: &[u8]) -> Vec<u8> {
    let mesh_node::hbone::Stream {
        mut send, mut recv, ..
    } = stream;
    send.send_data(Bytes::copy_from_slice(data), true)
        .expect("send");
    let mut back = Vec::new();
    let read = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.expect("stream data");
            let _ = recv.flow_control().release_capacity(chunk.len());
            back.extend_from_slice(&chunk);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the echo within 5 s");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_hostname_reaches_an_endpoint_of_this_network_unread() {
    // echo-2 is this network's, echo-3 another's: only echo-2 may be chosen.
    let setup = Setup::new(
        1,
        &[(2, "", true), (3, "west", true)],
        Duration::from_secs(5),
    )
    .await;
    for _ in 0..4 {
        let stream = setup.connect(&format!("{HOST}:{PORT}")).await.expect("200");
        let back = round_trip(stream, b"opaque inner TLS bytes").await;
        assert_eq!(
            back, b"echo-2\nopaque inner TLS bytes",
            "this network's endpoint"
        );
    }
    // Any case of the hostname names the service.
    let stream = setup
        .connect(&format!("Echo.Default.svc.cluster.local:{PORT}"))
        .await
        .expect("200");
    assert_eq!(round_trip(stream, b"x").await, b"echo-2\nx");
    let text = setup.metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.contains("path=\"gateway\"") && l.starts_with("mesh_connection_duration")),
        "gateway hops are counted under path=\"gateway\""
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_received_bytes_total")
                && l.contains(HOST)
                && !l.ends_with(" 0")),
        "bytes counted against the service"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_malformed_authorities_and_denied_sources_are_refused() {
    let setup = Setup::new(2, &[(2, "", true)], Duration::from_secs(5)).await;
    // A gateway never forwards to an address, not even an endpoint's.
    assert_eq!(
        setup.status(&format!("{}:15008", ip(2, 2))).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(setup.errors("bad_request_address"), 1);
    assert_eq!(setup.status("echo_1.svc:80").await, StatusCode::BAD_REQUEST);
    // An open stream, then a policy that denies its source: the stream is reset.
    let mesh_node::hbone::Stream {
        send: _open_send,
        mut recv,
        ..
    } = setup.connect(&format!("{HOST}:{PORT}")).await.expect("200");
    let tag = recv
        .data()
        .await
        .expect("the endpoint's tag")
        .expect("data");
    assert_eq!(&tag[..], b"echo-2\n");
    // The policies selecting the gateway's workload decide the source identity.
    setup.set_policies(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: no-client, namespace: istio-system}\n  spec:\n    selector: {matchLabels: {istio: eastwestgateway}}\n    action: DENY\n    rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]\n",
    );
    let revoked = tokio::time::timeout(Duration::from_secs(5), recv.data())
        .await
        .expect("revoked within 5 s");
    assert!(
        matches!(revoked, Some(Err(_))),
        "a reset, not a clean end: {revoked:?}"
    );
    assert_eq!(
        setup.status(&format!("{HOST}:{PORT}")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(setup.errors("policy_denied"), 1);
    // A policy selecting other workloads does not apply to the gateway.
    setup.set_policies(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: no-client, namespace: istio-system}\n  spec:\n    selector: {matchLabels: {app: other}}\n    action: DENY\n    rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]}]\n",
    );
    assert_eq!(
        setup.status(&format!("{HOST}:{PORT}")).await,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_no_endpoint_here_or_a_failed_connect_is_503() {
    // echo-2 is this network's but nothing listens on its 15008; echo-3 is another network's.
    let setup = Setup::new(
        3,
        &[(2, "", false), (3, "west", true)],
        Duration::from_secs(5),
    )
    .await;
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    assert_eq!(
        setup
            .status(&format!("nope.default.svc.cluster.local:{PORT}"))
            .await,
        unavailable
    );
    assert_eq!(setup.errors("unknown_service"), 1);
    // A port the service does not have.
    assert_eq!(setup.status(&format!("{HOST}:9")).await, unavailable);
    // echo-2 refuses the connection.
    assert_eq!(setup.status(&format!("{HOST}:{PORT}")).await, unavailable);
    assert_eq!(setup.errors("upstream_connect"), 1);
    // Without echo-2, the service table falls back to the other network's endpoint: the
    // gateway never sends there.
    let only_remote = Setup::new(4, &[(3, "west", true)], Duration::from_secs(5)).await;
    assert_eq!(
        only_remote.status(&format!("{HOST}:{PORT}")).await,
        unavailable
    );
    assert_eq!(only_remote.errors("no_endpoint"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_loses_only_its_own_connection() {
    let setup = Setup::new(5, &[(2, "", true)], Duration::from_millis(500)).await;
    let gateway = setup.serving.local_addr();
    // Garbage instead of a TLS ClientHello: closed.
    let mut garbage = TcpStream::connect(gateway).await.expect("connect");
    garbage
        .write_all(&[0x47; 4096])
        .await
        .expect("write garbage");
    // A handshake that never comes: closed at the deadline.
    let mut silent = TcpStream::connect(gateway).await.expect("connect");
    // Meanwhile a well-behaved client is served.
    let stream = setup.connect(&format!("{HOST}:{PORT}")).await.expect("200");
    assert_eq!(
        round_trip(stream, b"still served").await,
        b"echo-2\nstill served"
    );
    for (what, conn) in [("garbage", &mut garbage), ("silent", &mut silent)] {
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{what}: the gateway closed the connection");
    }
    // And the gateway still serves new connections.
    let stream = setup.connect(&format!("{HOST}:{PORT}")).await.expect("200");
    assert_eq!(round_trip(stream, b"after").await, b"echo-2\nafter");
}
