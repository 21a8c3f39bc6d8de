//! Double HBONE without root (the rootless tier): a client's daemon reaches a service endpoint
//! on another network through an east-west gateway. The gateway here is the smallest one the
//! wire allows, built in the test from `hbone::serve_connection`: it accepts the outer
//! `CONNECT` and forwards its bytes, unread, over TCP to the destination's 15008, keeping a
//! copy of everything it forwarded. Real parts otherwise (`support`).

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use mesh_node::{
    hbone::{self, Incoming, ServerError, ServerSettings},
    identity::Identity,
    network::{Network, NetworkGateway},
    policy::PolicyStore,
    state::{MeshState, service::Service},
    tls,
    traffic::TrafficSet,
};
use support::{ECHO, Mesh, RESET, TRUST_DOMAIN, principal, round_trip};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

/// The service port of the test services (target port: the echo application's).
const PORT: u16 = 8080;
/// Bytes the application sends, which must never appear in what the gateway forwarded.
const SECRET: &[u8] = b"the-application-bytes-stay-inside-the-inner-tls";

/// What the in-test gateway saw.
#[derive(Default)]
struct Seen {
    /// Every byte forwarded, both ways.
    bytes: Vec<u8>,
    /// The outer `CONNECT`s' authorities and the peer identities.
    requests: Vec<(String, String)>,
}

/// A minimal east-west gateway: each outer stream is forwarded to `to` (the destination's
/// HBONE listener), from the gateway's own address.
struct Gateway {
    ip: IpAddr,
    to: SocketAddr,
    seen: Mutex<Seen>,
}

impl hbone::Handler for Gateway {
    fn stream(self: &Arc<Self>, stream: Incoming) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let authority = stream.authority().unwrap_or_default().to_owned();
            this.lock()
                .requests
                .push((authority, stream.identity.to_string()));
            let socket = TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(this.ip, 0)).expect("bind");
            let Ok(tcp) = socket.connect(this.to).await else {
                return stream.reject(http::StatusCode::SERVICE_UNAVAILABLE);
            };
            let Ok(tunnel) = stream.accept() else { return };
            this.forward(tunnel, tcp).await;
        });
    }

    fn error(&self, _peer: SocketAddr, _identity: Option<&Identity>, _error: &ServerError) {}
}

impl Gateway {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Copies both ways, keeping a copy; half-closes pass through.
    async fn forward(&self, tunnel: hbone::Tunnel, tcp: TcpStream) {
        let hbone::Tunnel {
            mut send,
            mut recv,
            slot,
        } = tunnel;
        let (mut read, mut write) = tcp.into_split();
        let down = async {
            while let Some(Ok(data)) = recv.data().await {
                self.lock().bytes.extend_from_slice(&data);
                let _ = recv.flow_control().release_capacity(data.len());
                if write.write_all(&data).await.is_err() {
                    return;
                }
            }
            let _ = write.shutdown().await;
        };
        let up = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                self.lock().bytes.extend_from_slice(&buf[..n]);
                let mut chunk = Bytes::copy_from_slice(&buf[..n]);
                while !chunk.is_empty() {
                    send.reserve_capacity(chunk.len());
                    let Some(Ok(granted)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                    else {
                        return;
                    };
                    let part = chunk.split_to(granted.min(chunk.len()));
                    if send.send_data(part, false).is_err() {
                        return;
                    }
                }
            }
            let _ = send.send_data(Bytes::new(), true);
        };
        tokio::join!(down, up);
        drop(slot);
    }
}

/// The gateway's identity (the default of `networks[].gateways[]`).
fn gateway_identity() -> Identity {
    format!("spiffe://{TRUST_DOMAIN}/ns/istio-system/sa/istio-eastwestgateway")
        .parse()
        .unwrap()
}

/// Starts a gateway at `ip:15008` forwarding to `to`, with its certificate from `mesh`'s CA.
async fn start_gateway(
    mesh: &Mesh,
    ip: IpAddr,
    to: SocketAddr,
) -> (Arc<Gateway>, tokio::task::JoinHandle<()>) {
    let node = &mesh.nodes[0];
    let certs = node.proxy.certs().clone();
    let identity = gateway_identity();
    certs.acquire(&identity);
    certs
        .get(&identity)
        .await
        .expect("the gateway's certificate");
    let server = tls::server_config(&tls::provider(), &certs, &identity, &[TRUST_DOMAIN.into()])
        .expect("server config");
    let (draining, watch) = tokio::sync::watch::channel(false);
    let settings = Arc::new(ServerSettings {
        handshake_timeout: Duration::from_secs(5),
        liveness: hbone::Liveness::default(),
        draining: watch,
        metrics: Arc::clone(&node.metrics),
    });
    let gateway = Arc::new(Gateway {
        ip,
        to,
        seen: Mutex::default(),
    });
    let listener = TcpListener::bind((ip, hbone::PORT)).await.expect("bind");
    let handler = Arc::clone(&gateway);
    let task = tokio::spawn(async move {
        let _draining = draining;
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&server));
            let (settings, handler) = (Arc::clone(&settings), Arc::clone(&handler));
            tokio::spawn(async move {
                hbone::serve_connection(acceptor, tcp, peer, &settings, handler).await;
            });
        }
    });
    (gateway, task)
}

fn ip(mesh: u8, node: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, mesh, node, host))
}

fn network(name: &str, gateway: IpAddr) -> Network {
    Network {
        name: name.to_owned(),
        gateways: vec![NetworkGateway {
            address: SocketAddr::new(gateway, hbone::PORT),
            namespace: "istio-system".to_owned(),
            service_account: "istio-eastwestgateway".to_owned(),
            trust_domain: None,
        }],
    }
}

/// A service at `vip:8080` (target port: `target`) with these endpoints listed.
fn service(name: &str, (vip, target): (IpAddr, u16), endpoints: &[IpAddr]) -> Service {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{address: '{e}'}}"))
        .collect();
    serde_yaml_ng::from_str(&format!(
        "{{name: {name}, addresses: ['{vip}'], ports: [{{port: {PORT}, targetPort: {target}}}], endpoints: [{}]}}",
        endpoints.join(", ")
    ))
    .expect("service YAML")
}

/// `from`'s application connects to `vip:8080`.
async fn dial_service(mesh: &Mesh, from: &str, vip: IpAddr) -> std::io::Result<TcpStream> {
    let pod = mesh.pod(from);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(pod.ip, 0))?;
    pod.destinations
        .outbound_from(socket.local_addr()?, SocketAddr::new(vip, PORT));
    socket.connect(SocketAddr::new(pod.ip, 15001)).await
}

async fn echoes(stream: std::io::Result<TcpStream>, data: &[u8]) -> bool {
    let Ok(mut stream) = stream else {
        return false;
    };
    round_trip(&mut stream, data)
        .await
        .is_ok_and(|back| back == data)
}

fn deny_a1() -> String {
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {{name: deny-a1, namespace: default}}\n  spec:\n    selector: {{matchLabels: {{app: b1}}}}\n    action: DENY\n    rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n",
        principal("a1").trim_start_matches("spiffe://")
    )
}

/// `value` of the first exposition line of `metric` containing all of `labels`.
fn metric(mesh: &Mesh, node: &str, metric: &str, labels: &[&str]) -> u64 {
    mesh.node(node)
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(metric) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The services of the tests (`vip:8080`).
struct Vips {
    /// `b1` on network west, behind the live gateway.
    west: IpAddr,
    /// `b1` (west) and `c1` (east, whose gateway is dead).
    both: IpAddr,
    /// `b1`'s application that resets every connection.
    resets: IpAddr,
    /// `c1` only.
    east: IpAddr,
    /// `c1` and `a2` (this network, on the client's node).
    mixed: IpAddr,
}

/// Nodes a (`a1`, `a2`: the clients' network), b (`b1`, network west, behind a live
/// gateway) and c (`c1`, network east, whose gateway is dead: nothing listens there).
struct Fixture {
    mesh: Mesh,
    gateway: Arc<Gateway>,
    vips: Vips,
    /// The state every node has.
    state: MeshState,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn fixture(id: u8) -> Fixture {
    let mut mesh = Mesh::new(
        id,
        &[
            ("node-a", &["a1", "a2"]),
            ("node-b", &["b1"]),
            ("node-c", &["c1"]),
        ],
    )
    .await;
    let (b1, c1) = (mesh.pod("b1").ip, mesh.pod("c1").ip);
    for w in &mut mesh.workloads {
        match w.name.as_str() {
            "b1" => "west".clone_into(&mut w.network),
            "c1" => "east".clone_into(&mut w.network),
            _ => {}
        }
    }
    let (west_gw, east_gw) = (ip(id, 90, 1), ip(id, 91, 1));
    let (gateway, task) = start_gateway(&mesh, west_gw, SocketAddr::new(b1, hbone::PORT)).await;
    let vip = |host| ip(id, 50, host);
    let (west, both, resets, east, mixed) = (vip(1), vip(2), vip(3), vip(4), vip(5));
    let a2 = mesh.pod("a2").ip;
    let state = MeshState {
        workloads: mesh.workloads.clone(),
        services: vec![
            service("echo-west", (west, ECHO), &[b1]),
            service("echo-both", (both, ECHO), &[b1, c1]),
            service("reset-west", (resets, RESET), &[b1]),
            service("echo-east", (east, ECHO), &[c1]),
            service("echo-mixed", (mixed, ECHO), &[c1, a2]),
        ],
        policies: Arc::new(PolicyStore::default()),
        traffic: Arc::new(TrafficSet::default()),
        // East's gateway is dead: nothing listens there.
        networks: vec![network("west", west_gw), network("east", east_gw)],
        zone: None,
        pending: None,
    };
    for node in &mesh.nodes {
        node.proxy.set_workloads(&state.workloads);
        node.proxy.set_services(&state, &node.name);
    }

    Fixture {
        mesh,
        gateway,
        vips: Vips {
            west,
            both,
            resets,
            east,
            mixed,
        },
        state,
        _task: AbortOnDrop(task),
    }
}

/// Client → outer (to the gateway) → inner (to b1) → the application, and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_both_tunnels_and_the_gateway_sees_only_ciphertext() {
    let fixture = fixture(41).await;
    let (mesh, gateway) = (&fixture.mesh, &fixture.gateway);
    let Vips { west, resets, .. } = fixture.vips;
    // Client → outer (to the gateway) → inner (to b1) → the application, and back.
    let data: Vec<u8> = SECRET.iter().copied().cycle().take(256 * 1024).collect();
    assert!(
        echoes(dial_service(mesh, "a1", west).await, &data).await,
        "256 KiB through the gateway, half-closed both ways"
    );
    {
        let seen = gateway.lock();
        assert_eq!(
            seen.requests,
            [(
                format!("echo-west.default.svc.cluster.local:{PORT}"),
                principal("a1")
            )],
            "one outer CONNECT, to the service hostname, from a1"
        );
        assert!(
            seen.bytes.len() > data.len() * 2,
            "the gateway forwarded the inner connection ({} bytes)",
            seen.bytes.len()
        );
        assert!(
            !seen.bytes.windows(SECRET.len()).any(|w| w == SECRET),
            "the gateway saw the application's bytes: the inner TLS is not end to end"
        );
    }

    // Counted as carried: the application's bytes, not the tunnels' (the inner TLS, the
    // gateway's framing).
    let carried = |metric_name| {
        metric(
            mesh,
            "node-a",
            metric_name,
            &[
                "destination_workload=\"b1\"",
                "connection_security_policy=\"mutual_tls\"",
            ],
        )
    };
    let size = u64::try_from(data.len()).unwrap();
    assert_eq!(
        (
            carried("istio_tcp_received_bytes_total"),
            carried("istio_tcp_sent_bytes_total")
        ),
        (size, size)
    );
    // The application's reset reaches the client as a reset, through both tunnels.
    let mut stream = dial_service(mesh, "a1", resets).await.expect("connect");
    stream.write_all(b"x").await.expect("write");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(
        matches!(&read, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "reset, not a clean end: {read:?}"
    );
}

/// The destination's policies see the client's identity; an IP of another network is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_authorizes_the_original_client_and_addresses_do_not_cross() {
    let fixture = fixture(42).await;
    let mesh = &fixture.mesh;
    let west = fixture.vips.west;
    // The destination authorizes the original client: a DENY on a1 holds, a2 passes.
    mesh.set_policies("node-b", &deny_a1());
    assert!(!echoes(dial_service(mesh, "a1", west).await, SECRET).await);
    assert!(echoes(dial_service(mesh, "a2", west).await, SECRET).await);
    assert_eq!(mesh.errors("node-b", "hbone", "policy_denied"), 1);
    assert_eq!(mesh.errors("node-a", "outbound", "hbone_denied"), 1);
    mesh.set_policies("node-b", "[]");

    // A workload of another network addressed by its IP: refused, never passed through.
    assert!(!echoes(mesh.dial("a1", "b1", ECHO).await, SECRET).await);
    assert_eq!(
        mesh.errors("node-a", "outbound", "remote_network_address"),
        1
    );
    // Not enrolled either: still not passed through (c1's application would answer).
    let mut workloads = fixture.state.workloads.clone();
    for w in workloads.iter_mut().filter(|w| w.name == "c1") {
        w.enrolled = false;
    }
    mesh.node("node-a").proxy.set_workloads(&workloads);
    assert!(!echoes(mesh.dial("a1", "c1", ECHO).await, SECRET).await);
    assert_eq!(
        mesh.errors("node-a", "outbound", "remote_network_address"),
        2
    );
}

/// Endpoints behind a dead gateway fail and others are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateway_fails_its_endpoints_over() {
    let fixture = fixture(43).await;
    let mesh = &fixture.mesh;
    let Vips {
        both, east, mixed, ..
    } = fixture.vips;
    // East's gateway is down: its endpoint fails and the connection goes to the other one.
    for _ in 0..4 {
        assert!(echoes(dial_service(mesh, "a2", both).await, SECRET).await);
    }
    assert!(
        metric(
            mesh,
            "node-a",
            "mesh_traffic_decisions",
            &["decision=\"retry\"", "echo-both"]
        ) >= 1,
        "the dead gateway's endpoint was tried and another one taken"
    );
    // With a ready endpoint on this network, the dead gateway's is not used at all.
    let failed = mesh.errors("node-a", "outbound", "hbone_connect");
    for _ in 0..4 {
        assert!(echoes(dial_service(mesh, "a1", mixed).await, SECRET).await);
    }
    assert_eq!(mesh.errors("node-a", "outbound", "hbone_connect"), failed);
    assert_eq!(
        metric(
            mesh,
            "node-a",
            "mesh_traffic_decisions",
            &["decision=\"retry\"", "echo-mixed"]
        ),
        0
    );
    // Only behind the dead gateway: refused, the client's connection reset.
    assert!(!echoes(dial_service(mesh, "a2", east).await, SECRET).await);
    assert!(mesh.errors("node-a", "outbound", "hbone_connect") >= 1);
    // A network the state names no gateway for: refused as well, never passed through.
    let all = &fixture.state;
    let state = MeshState {
        workloads: all.workloads.clone(),
        services: all.services.clone(),
        policies: Arc::clone(&all.policies),
        traffic: Arc::clone(&all.traffic),
        networks: all
            .networks
            .iter()
            .filter(|n| n.name != "east")
            .cloned()
            .collect(),
        zone: None,
        pending: None,
    };
    mesh.node("node-a").proxy.set_services(&state, "node-a");
    assert!(!echoes(dial_service(mesh, "a2", east).await, SECRET).await);
    assert_eq!(mesh.errors("node-a", "outbound", "no_gateway"), 1);
}

/// The daemon's own gateway role (`Proxy::serve_gateway`) in the middle: node b's proxy
/// serves it besides b1, on network west as b's state sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_gateway_role_carries_double_hbone() {
    let mesh = Mesh::new(44, &[("node-a", &["a1"]), ("node-b", &["b1"])]).await;
    let b1 = mesh.pod("b1").ip;
    let (gateway, vip) = (ip(44, 90, 1), ip(44, 50, 1));
    let state = |b1_network: &str| {
        let mut workloads = mesh.workloads.clone();
        for w in &mut workloads {
            if w.name == "b1" {
                b1_network.clone_into(&mut w.network);
            }
        }
        MeshState {
            workloads,
            services: vec![service("echo-west", (vip, ECHO), &[b1])],
            policies: Arc::new(PolicyStore::default()),
            traffic: Arc::new(TrafficSet::default()),
            networks: vec![network("west", gateway)],
            zone: None,
            pending: None,
        }
    };
    // To node a, b1 is on network west; to node b (and its gateway), on its own network.
    for (node, view) in [("node-a", state("west")), ("node-b", state(""))] {
        let proxy = &mesh.node(node).proxy;
        proxy.set_workloads(&view.workloads);
        proxy.set_services(&view, node);
    }
    let role = mesh_node::workload::Workload {
        name: "istio-eastwestgateway".to_owned(),
        namespace: "istio-system".to_owned(),
        service_account: "istio-eastwestgateway".to_owned(),
        labels: [("istio".to_owned(), "eastwestgateway".to_owned())].into(),
        ips: vec![gateway],
        node: "node-b".to_owned(),
        netns: None,
        enrolled: false,
        network: String::new(),
        trust_domain: None,
    };
    let listener = std::net::TcpListener::bind((gateway, hbone::PORT)).expect("bind");
    let serving = mesh
        .node("node-b")
        .proxy
        .serve_gateway(role, listener)
        .expect("gateway role");
    assert_eq!(serving.identity(), &gateway_identity());
    let data: Vec<u8> = SECRET.iter().copied().cycle().take(64 * 1024).collect();
    assert!(
        echoes(dial_service(&mesh, "a1", vip).await, &data).await,
        "through the daemon's gateway"
    );
    assert_eq!(mesh.node("node-a").proxy.hbone_connections_opened(), 1);
    assert!(
        metric(
            &mesh,
            "node-b",
            "istio_tcp_connections_opened_total",
            &["destination_workload=\"b1\"", "source_workload=\"a1\""]
        ) >= 1,
        "b1's inbound saw a1 (the inner connection's identity)"
    );
}
