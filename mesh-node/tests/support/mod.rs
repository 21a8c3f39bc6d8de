//! A mesh in one process, on loopback, without root: nodes are [`Proxy`] instances, pods are
//! loopback addresses (`127.<mesh>.<node>.<pod>`) with their listeners bound there and an echo
//! application on port 7000 (and one on 7001 that resets every connection once it has read a
//! byte). The seams are the plain ones: a pod's sockets are bound to its address
//! ([`PlainSockets`]), and the test says where each captured connection was going
//! ([`KnownDestinations`]), as the kernel would have recorded it.
//!
//! Real parts otherwise: the daemon's proxy, HBONE over rustls with certificates from a
//! `LocalCa`, h2, the policy engine, the limits.

#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use mesh_node::{
    hbone::BoxFuture,
    hbone::Liveness,
    identity::{CA_CERT_FILE, CA_KEY_FILE, CaError, CertManager, CertSource, Identity, LocalCa},
    metrics::{Metrics, NodeCollector},
    policy::{PolicyDocument, PolicyStore},
    proxy::{
        KnownDestinations, MaxConnections, MeshTls, PlainSockets, PodListeners, PodServing, Proxy,
        ProxyOptions,
    },
    tls,
    workload::Workload,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

pub const TRUST_DOMAIN: &str = "cluster.local";
/// The echo application's port.
pub const ECHO: u16 = 7000;
/// The port of the application that resets every connection after its first byte.
pub const RESET: u16 = 7001;
/// A port where nothing listens.
pub const CLOSED: u16 = 7999;

/// One pod: its address and what the test tells about its captured connections.
pub struct Pod {
    pub name: String,
    pub ip: IpAddr,
    pub node: usize,
    pub destinations: Arc<KnownDestinations>,
    serving: Option<PodServing>,
}

/// One node: its proxy and the workloads it believes exist.
pub struct Node {
    pub name: String,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
}

/// The mesh.
pub struct Mesh {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub workloads: Vec<Workload>,
    dir: PathBuf,
    /// Where clients outside the mesh connect from.
    pub outside: IpAddr,
    /// The applications (stopped when the mesh is dropped).
    apps: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for app in &self.apps {
            app.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A workload named `name` at `ip` on `node`, with `labels: {app: <name>}` and the service
/// account named after it.
pub fn workload(name: &str, ip: IpAddr, node: &str) -> Workload {
    Workload {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service_account: name.to_owned(),
        labels: [("app".to_owned(), name.to_owned())].into(),
        ips: vec![ip],
        node: node.to_owned(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    }
}

/// The SPIFFE id of a testbed workload.
pub fn principal(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}")
}

impl Mesh {
    /// Nodes named `layout[i].0` with pods `layout[i].1`, numbered `127.<mesh>.<node>.<pod>`
    /// (`mesh` keeps tests running in parallel apart).
    pub async fn new(mesh: u8, layout: &[(&str, &[&str])]) -> Self {
        Self::with_ca(mesh, layout, |ca| Arc::new(ca)).await
    }

    /// As [`Mesh::new`], with each node's certificate source made from the mesh's CA by `ca`.
    pub async fn with_ca(
        mesh: u8,
        layout: &[(&str, &[&str])],
        ca: impl Fn(LocalCa) -> Arc<dyn CertSource>,
    ) -> Self {
        // The daemon's log, when asked for (`RUST_LOG=debug cargo test ...`).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = std::env::temp_dir().join(format!("mesh-direct-{}-{mesh}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::init(&dir, TRUST_DOMAIN).expect("ca init");
        let mut pods = Vec::new();
        let mut workloads = Vec::new();
        for (n, (node, names)) in layout.iter().enumerate() {
            for (p, name) in names.iter().enumerate() {
                let ip = IpAddr::V4(Ipv4Addr::new(127, mesh, octet(n), octet(p)));
                workloads.push(workload(name, ip, node));
                pods.push(Pod {
                    name: (*name).to_owned(),
                    ip,
                    node: n,
                    destinations: Arc::default(),
                    serving: None,
                });
            }
        }
        let nodes = layout
            .iter()
            .map(|(node, _)| {
                let local =
                    LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
                let provider = tls::provider();
                let certs =
                    CertManager::new(ca(local), Duration::from_mins(10), Arc::clone(&provider));
                let metrics = Metrics::new(NodeCollector {
                    bpffs: dir.join("no-bpffs"),
                    certs: certs.clone(),
                });
                let proxy = Arc::new(Proxy::new(
                    options(node, &metrics),
                    MeshTls::new(TRUST_DOMAIN.to_owned(), certs, provider),
                ));
                proxy.set_workloads(&workloads);
                Node {
                    name: (*node).to_owned(),
                    proxy,
                    metrics,
                }
            })
            .collect();
        let mut this = Self {
            nodes,
            pods,
            workloads,
            dir,
            outside: IpAddr::V4(Ipv4Addr::new(127, mesh, 99, 1)),
            apps: Vec::new(),
        };
        for i in 0..this.pods.len() {
            this.serve(i).await;
        }
        this
    }

    /// Starts pod `i`: its applications, its listeners, served by its node's proxy.
    async fn serve(&mut self, i: usize) {
        let ip = self.pods[i].ip;
        self.apps.push(tokio::spawn(echo(
            TcpListener::bind((ip, ECHO)).await.expect("echo"),
        )));
        self.apps.push(tokio::spawn(reset_after_one_byte(
            TcpListener::bind((ip, RESET)).await.expect("reset app"),
        )));
        let bind = |port| std::net::TcpListener::bind((ip, port)).expect("listener");
        let pod = &self.pods[i];
        let node = &self.nodes[pod.node];
        let workload = self
            .workloads
            .iter()
            .find(|w| w.name == pod.name)
            .expect("workload");
        let serving = node
            .proxy
            .serve(PodListeners {
                workload: Arc::new(workload.clone()),
                sockets: Arc::new(PlainSockets { source: Some(ip) }),
                orig_dst: Arc::clone(&pod.destinations) as _,
                outbound: vec![bind(15001)],
                inbound: bind(15006),
                hbone: vec![bind(15008)],
            })
            .expect("serve");
        serving.publish();
        // The application's traffic to the inbound listener was going to the pod's port:
        // `sk_lookup` would have kept that destination.
        pod.destinations
            .inbound_at(SocketAddr::new(ip, 15006), SocketAddr::new(ip, ECHO));
        self.pods[i].serving = Some(serving);
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `from`'s application connects to `to`'s `port`: captured on `from`'s outbound
    /// listener, with that original destination. (A refusal can come before the connect
    /// returns.)
    pub async fn dial(&self, from: &str, to: &str, port: u16) -> std::io::Result<TcpStream> {
        let from = self.pod(from);
        let dst = SocketAddr::new(self.pod(to).ip, port);
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from.ip, 0))?;
        from.destinations.outbound_from(socket.local_addr()?, dst);
        socket.connect(SocketAddr::new(from.ip, 15001)).await
    }

    /// A client outside the mesh connects in plaintext to `to`'s echo application: captured
    /// on `to`'s inbound listener. (A refusal can come before the connect returns.)
    pub async fn plaintext(&self, to: &str) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.outside, 0))?;
        socket
            .connect(SocketAddr::new(self.pod(to).ip, 15006))
            .await
    }

    /// Replaces the policies of `node` (Istio documents, a YAML list).
    pub fn set_policies(&self, node: &str, yaml: &str) {
        let docs: Vec<PolicyDocument> = serde_yaml_ng::from_str(yaml).expect("policy YAML");
        let store = PolicyStore::new("istio-system", &docs).expect("policies");
        self.node(node).proxy.set_policies(Arc::new(store));
    }

    /// `mesh_connection_errors_total{listener,reason}` of `node`.
    pub fn errors(&self, node: &str, listener: &str, reason: &str) -> u64 {
        let text = self.node(node).metrics.encode();
        let needle = format!("listener=\"{listener}\",reason=\"{reason}\"");
        text.lines()
            .filter(|l| l.starts_with("mesh_connection_errors_total") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// A CA that signs for one identity only once its gate opens (`true`); for the others at once.
pub struct GatedCa {
    pub ca: LocalCa,
    pub held: Identity,
    pub gate: tokio::sync::watch::Receiver<bool>,
}

impl CertSource for GatedCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: &'a rustls::pki_types::CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Vec<rustls::pki_types::CertificateDer<'static>>, CaError>> {
        Box::pin(async move {
            if *identity == self.held {
                let mut gate = self.gate.clone();
                let _ = gate.wait_for(|open| *open).await;
            }
            self.ca.sign(identity, csr, lifetime).await
        })
    }

    fn roots(&self) -> Arc<[rustls::pki_types::CertificateDer<'static>]> {
        self.ca.roots()
    }
}

fn octet(i: usize) -> u8 {
    u8::try_from(i + 1).expect("a small mesh")
}

/// The proxy options of the tests' nodes: generous limits, short timeouts.
pub fn options(node: &str, metrics: &Arc<Metrics>) -> ProxyOptions {
    ProxyOptions {
        metrics: Arc::clone(metrics),
        node: node.to_owned(),
        network: String::new(),
        handshake_timeout: Duration::from_secs(5),
        max_connections: MaxConnections {
            total: 10_000,
            per_workload: 5_000,
            per_source: 5_000,
        },
        liveness: Liveness::default(),
        connect_timeout: Duration::from_secs(2),
        reserved_ports: [15001, 15006, 15008],
    }
}

/// Echoes every connection until the client half-closes, then half-closes back.
async fn echo(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        });
    }
}

/// Reads one byte of every connection, then resets it.
async fn reset_after_one_byte(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut byte = [0u8; 1];
            let _ = stream.read_exact(&mut byte).await;
            let _ = stream.set_zero_linger();
        });
    }
}

/// Sends `data` on `stream`, half-closes, and reads everything back (the echo).
pub async fn round_trip(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(data).await?;
    stream.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo in 5 s"))??;
    Ok(back)
}
