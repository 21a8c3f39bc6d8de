//! The data path without root (the rootless tier): outbound → HBONE (real rustls with a
//! `LocalCa`, real h2) → inbound → an echo application, all on loopback in one process, with
//! the plain seams in place of the kernel (`support`). `cargo xtask test` runs this binary as
//! an unprivileged user.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::StatusCode;
use mesh_node::{
    hbone::{BoxFuture, Dialer, HboneError, Pool, PoolKey},
    identity::Identity,
};
use support::{CLOSED, ECHO, GatedCa, Mesh, RESET, principal, round_trip};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn deny_from(name: &str, target: &str, principal: &str) -> String {
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {{name: {name}, namespace: default}}\n  spec:\n    selector: {{matchLabels: {{app: {target}}}}}\n    action: DENY\n    rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n",
        principal.trim_start_matches("spiffe://")
    )
}

fn peer_auth(target: &str, mode: &str) -> String {
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata: {{name: {target}-mtls, namespace: default}}\n  spec:\n    selector: {{matchLabels: {{app: {target}}}}}\n    mtls: {{mode: {mode}}}\n"
    )
}

/// Whether `stream` carries an echo.
async fn echoes(stream: std::io::Result<TcpStream>) -> bool {
    let Ok(mut stream) = stream else {
        return false;
    };
    round_trip(&mut stream, b"hello through the mesh")
        .await
        .is_ok_and(|back| back == b"hello through the mesh")
}

/// Whether the application's reset reaches the client as a reset.
async fn reset_reaches_client(mut stream: TcpStream) -> Result<(), String> {
    stream.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_to_another_node_goes_over_hbone_and_the_same_node_path_skips_it() {
    let mesh = Mesh::new(11, &[("node-a", &["a1", "a2"]), ("node-b", &["b1"])]).await;
    // Across nodes: HBONE. Half-close both ways: all of 1 MiB comes back after the client's
    // FIN, then the application's.
    let mut stream = mesh.dial("a1", "b1", ECHO).await.expect("connect");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let back = round_trip(&mut stream, &data)
        .await
        .expect("echo over HBONE");
    assert_eq!(back, data, "1 MiB intact, half-closed both ways");
    let proxy_a = &mesh.node("node-a").proxy;
    assert_eq!(proxy_a.hbone_connections_opened(), 1);
    // Same node: no HBONE connection dialled.
    assert!(echoes(mesh.dial("a1", "a2", ECHO).await).await);
    assert_eq!(proxy_a.hbone_connections_opened(), 1, "same node: no TLS");
    // Outside the mesh (nothing there): the client's connection is reset.
    assert!(!echoes(mesh.dial("a1", "b1", CLOSED).await).await);
    assert_eq!(mesh.errors("node-b", "hbone", "upstream_connect"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_carry_up_to_100_streams_each() {
    let mesh = Mesh::new(12, &[("node-a", &["a1"]), ("node-b", &["b1"])]).await;
    let mut open = Vec::new();
    for _ in 0..120 {
        let mut stream = mesh.dial("a1", "b1", ECHO).await.expect("connect");
        stream.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut byte))
            .await
            .expect("echo in time")
            .expect("echo");
        open.push(stream);
    }
    assert_eq!(
        mesh.node("node-a").proxy.hbone_connections_opened(),
        2,
        "120 concurrent streams: 100 on the first connection, 20 on a second"
    );
    drop(open);
    // Closed streams free their slots: new ones reuse the pooled connections.
    for _ in 0..5 {
        assert!(echoes(mesh.dial("a1", "b1", ECHO).await).await);
    }
    assert_eq!(mesh.node("node-a").proxy.hbone_connections_opened(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_either_side_resets_the_other() {
    let mesh = Mesh::new(13, &[("node-a", &["a1", "a2"]), ("node-b", &["b1"])]).await;
    // The application resets: the client sees a reset, not a clean end of stream, over
    // HBONE and on the same-node path.
    reset_reaches_client(mesh.dial("a1", "b1", RESET).await.expect("connect"))
        .await
        .expect("over HBONE");
    reset_reaches_client(mesh.dial("a1", "a2", RESET).await.expect("connect"))
        .await
        .expect("on the same node");
    // The client resets: the stream is reset, and the mesh keeps serving.
    let stream = mesh.dial("a1", "b1", ECHO).await.expect("connect");
    stream.set_zero_linger().expect("linger");
    drop(stream);
    assert!(echoes(mesh.dial("a1", "b1", ECHO).await).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_permissive_admits_it_and_policies_decide_mtls() {
    let mesh = Mesh::new(14, &[("node-a", &["a1", "a2"]), ("node-b", &["b1"])]).await;
    assert!(
        echoes(mesh.plaintext("b1").await).await,
        "PERMISSIVE by default"
    );
    mesh.set_policies("node-b", &peer_auth("b1", "STRICT"));
    assert!(
        !echoes(mesh.plaintext("b1").await).await,
        "STRICT refuses plaintext"
    );
    assert!(
        echoes(mesh.dial("a1", "b1", ECHO).await).await,
        "STRICT admits mTLS"
    );
    assert_eq!(mesh.errors("node-b", "inbound", "strict_mtls"), 1);
    assert_eq!(
        mesh.errors("node-b", "inbound", "policy_denied"),
        0,
        "a STRICT refusal is not a policy denial"
    );
    // A DENY on a1's principal: a1 is refused (401 inside HBONE, a reset for the
    // application), a2 is not.
    mesh.set_policies("node-b", &deny_from("deny-a1", "b1", &principal("a1")));
    assert!(!echoes(mesh.dial("a1", "b1", ECHO).await).await);
    assert!(echoes(mesh.dial("a2", "b1", ECHO).await).await);
    assert_eq!(mesh.errors("node-b", "hbone", "policy_denied"), 1);
    assert_eq!(mesh.errors("node-a", "outbound", "hbone_denied"), 1);
    // The same node: the same admission, in process.
    mesh.set_policies("node-a", &deny_from("deny-a1", "a2", &principal("a1")));
    assert!(!echoes(mesh.dial("a1", "a2", ECHO).await).await);
    assert_eq!(mesh.errors("node-a", "outbound", "policy_denied"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_revokes_an_open_stream() {
    let mesh = Mesh::new(15, &[("node-a", &["a1"]), ("node-b", &["b1"])]).await;
    let mut stream = mesh.dial("a1", "b1", ECHO).await.expect("connect");
    stream.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.expect("echo before");
    mesh.set_policies("node-b", &deny_from("deny-a1", "b1", &principal("a1")));
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the open stream ends within 5 s");
    assert!(
        matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "revoked: reset, not a clean end: {ended:?}"
    );
}

/// Dials plain TCP (for a pool used directly, as a foreign HBONE client would).
struct Plain;

impl Dialer for Plain {
    fn dial(&self, address: SocketAddr) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(TcpStream::connect(address))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hbone_server_answers_400_401_and_503_and_checks_identities() {
    let mesh = Mesh::new(16, &[("node-a", &["a1"]), ("node-b", &["b1"])]).await;
    let b1 = mesh.pod("b1").ip;
    let node_a = mesh.node("node-a");
    let certs = node_a.proxy.certs().clone();
    let a1: Identity = principal("a1").parse().unwrap();
    let b1_id: Identity = principal("b1").parse().unwrap();
    certs.acquire(&a1);
    certs.get(&a1).await.expect("a1's certificate");
    let pool = Pool::new(
        Arc::clone(&node_a.metrics),
        mesh_node::hbone::Liveness::default(),
    );
    let key = |destination: &Identity| PoolKey {
        source: a1.clone(),
        destination: destination.clone(),
        address: SocketAddr::new(b1, 15008),
    };
    let config = |expected: &Identity| {
        mesh_node::tls::client_config(&mesh_node::tls::provider(), &certs, &a1, expected)
            .expect("client config")
    };
    let status = |result: Result<mesh_node::hbone::Stream, HboneError>| match result {
        Ok(_) => StatusCode::OK,
        Err(HboneError::Status { status, .. }) => status,
        Err(e) => panic!("expected an answer: {}", mesh_node::error_chain(&e)),
    };
    let connect = |authority: SocketAddr| {
        let (pool, key, config) = (&pool, key(&b1_id), config(&b1_id));
        async move {
            let headers = http::HeaderMap::new();
            pool.connect(&key, (authority, &headers), &Plain, &config)
                .await
        }
    };
    assert_eq!(
        status(connect(SocketAddr::new(b1, ECHO)).await),
        StatusCode::OK
    );
    let elsewhere = SocketAddr::new(mesh.outside, ECHO);
    assert_eq!(status(connect(elsewhere).await), StatusCode::BAD_REQUEST);
    assert_eq!(
        status(connect(SocketAddr::new(b1, 15006)).await),
        StatusCode::BAD_REQUEST,
        "reserved port"
    );
    assert_eq!(
        status(connect(SocketAddr::new(b1, CLOSED)).await),
        StatusCode::SERVICE_UNAVAILABLE
    );
    mesh.set_policies("node-b", &deny_from("deny-a1", "b1", &principal("a1")));
    assert_eq!(
        status(connect(SocketAddr::new(b1, ECHO)).await),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(mesh.errors("node-b", "hbone", "bad_request_workload"), 1);
    assert_eq!(mesh.errors("node-b", "hbone", "reserved_port"), 1);
    assert_eq!(mesh.errors("node-b", "hbone", "upstream_connect"), 1);
    // The client's verifier: b1 presents b1's identity, not the one expected.
    let wrong: Identity = principal("someone-else").parse().unwrap();
    let err = pool
        .connect(
            &key(&wrong),
            (SocketAddr::new(b1, ECHO), &http::HeaderMap::new()),
            &Plain,
            &config(&wrong),
        )
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, HboneError::Tls { .. }),
        "{}",
        mesh_node::error_chain(&err)
    );
    // The server's verifier: a client of another trust domain is refused at TLS.
    let stranger: Identity = "spiffe://elsewhere.local/ns/default/sa/a1".parse().unwrap();
    certs.acquire(&stranger);
    certs
        .get(&stranger)
        .await
        .expect("certificate of another trust domain");
    let stranger_key = PoolKey {
        source: stranger.clone(),
        ..key(&b1_id)
    };
    let stranger_config =
        mesh_node::tls::client_config(&mesh_node::tls::provider(), &certs, &stranger, &b1_id)
            .expect("config");
    let err = pool
        .connect(
            &stranger_key,
            (SocketAddr::new(b1, ECHO), &http::HeaderMap::new()),
            &Plain,
            &stranger_config,
        )
        .await
        .err()
        .expect("refused");
    assert!(
        !matches!(err, HboneError::Status { .. }),
        "refused before any request: {}",
        mesh_node::error_chain(&err)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        mesh.errors("node-b", "hbone", "tls_certificate_identity") >= 1,
        "counted as an identity failure: {}",
        mesh.node("node-b").metrics.encode()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_its_certificate_serves_no_hbone_until_it_has_one() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let held: Identity = principal("b1").parse().unwrap();
    let mesh = Mesh::with_ca(17, &[("node-a", &["a1"]), ("node-b", &["b1"])], |ca| {
        Arc::new(GatedCa {
            ca,
            held: held.clone(),
            gate: gate.clone(),
        })
    })
    .await;
    // b1's node waits for b1's certificate within the handshake deadline, then drops the
    // connection: nothing reaches b1, and the refusal is counted with its reason.
    assert!(!echoes(mesh.dial("a1", "b1", ECHO).await).await);
    // The client's own deadline can end its attempt just before the server's wait does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mesh.errors("node-b", "hbone", "no_certificate") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mesh.errors("node-b", "hbone", "no_certificate"), 1);
    // Once the CA answers, the pod is served.
    open.send_replace(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !echoes(mesh.dial("a1", "b1", ECHO).await).await {
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mesh.errors("node-b", "hbone", "no_certificate"), 1);
}

/// The `istio_tcp_connections_opened_total` sample of `node` with `reporter`.
fn opened(mesh: &Mesh, node: &str, reporter: &str) -> String {
    let text = mesh.node(node).metrics.encode();
    let needle = format!("reporter=\"{reporter}\"");
    text.lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.contains(&needle))
        .unwrap_or_else(|| panic!("no {reporter} sample on {node}:\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_the_state_does_not_know_is_described_by_its_baggage() {
    let mesh = Mesh::new(18, &[("node-a", &["a1"]), ("node-b", &["b1"])]).await;
    // node-b knows only its own pod (as when a1 is a ztunnel's workload of another cluster):
    // what it says of a1 comes from the baggage node-a's outbound sends.
    let b1: Vec<_> = mesh
        .workloads
        .iter()
        .filter(|w| w.name == "b1")
        .cloned()
        .collect();
    mesh.node("node-b").proxy.set_workloads(&b1);
    let mut stream = mesh.dial("a1", "b1", ECHO).await.expect("connect");
    let back = round_trip(&mut stream, b"baggage").await.expect("echo");
    assert_eq!(back, b"baggage");
    let inbound = opened(&mesh, "node-b", "destination");
    let a1 = principal("a1");
    for label in [
        "source_workload=\"a1\"",
        "source_canonical_service=\"a1\"",
        "source_canonical_revision=\"latest\"",
        "source_workload_namespace=\"default\"",
        "source_app=\"a1\"",
        "source_cluster=\"Kubernetes\"",
        &format!("source_principal=\"{a1}\""),
        "destination_workload=\"b1\"",
    ] {
        assert!(inbound.contains(label), "{label} not in {inbound}");
    }

    // A client that lies about its namespace is not believed: its certificate names it, the
    // rest is unknown. (The pool dials from 127.0.0.1, an address no node knows.)
    let node_a = mesh.node("node-a");
    let certs = node_a.proxy.certs().clone();
    let a1_id: Identity = a1.parse().unwrap();
    let b1_id: Identity = principal("b1").parse().unwrap();
    let pool = Pool::new(
        Arc::clone(&node_a.metrics),
        mesh_node::hbone::Liveness::default(),
    );
    let target = mesh.pod("b1").ip;
    let key = PoolKey {
        source: a1_id.clone(),
        destination: b1_id.clone(),
        address: SocketAddr::new(target, 15008),
    };
    let config = mesh_node::tls::client_config(&mesh_node::tls::provider(), &certs, &a1_id, &b1_id)
        .expect("client config");
    let headers = mesh_node::hbone::connect_headers(
        "127.0.0.1:5555".parse().unwrap(),
        Some("k8s.namespace.name=kube-system,k8s.deployment.name=apiserver,service.name=apiserver"),
    );
    let lied = pool
        .connect(
            &key,
            (SocketAddr::new(target, ECHO), &headers),
            &Plain,
            &config,
        )
        .await
        .expect("connected");
    drop(lied);
    let text = mesh.node("node-b").metrics.encode();
    assert!(!text.contains("apiserver"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("source_workload=\"unknown\"")
                && l.contains(&format!("source_principal=\"{a1}\""))),
        "{text}"
    );
}
