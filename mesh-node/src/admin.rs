//! The node's HTTP endpoints: Prometheus `/metrics` (15020), `/healthz/ready` and
//! `/healthz/live` (15021), and the admin API on 127.0.0.1:15000 (`/config_dump`, `/logging`).
//!
//! Each endpoint serves at most [`MAX_CONNECTIONS`] connections at once, [`MAX_PER_SOURCE`] of
//! them from one address (so that one pod cannot keep the kubelet's probes out), and closes a
//! connection that does not send a request's headers within [`HEADER_READ_TIMEOUT`] (idle
//! keep-alive ones included): whatever clients do, the endpoints hold a bounded number of
//! descriptors, which the proxy's budget leaves room for (`proxy::descriptors`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{identity::CertManager, logging::LogHandle, metrics::Metrics};

/// Why the node is (not) ready.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
    reason: RwLock<String>,
}

impl Readiness {
    /// Records the current readiness.
    pub fn set(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::Relaxed);
        reason.clone_into(
            &mut self
                .reason
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }

    fn get(&self) -> (bool, String) {
        (
            self.ready.load(Ordering::Relaxed),
            self.reason
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// What `/config_dump` shows; the app replaces `state` on every change.
pub struct AdminState {
    pub config: serde_json::Value,
    pub state: RwLock<serde_json::Value>,
    pub certs: CertManager,
    pub bpffs: PathBuf,
    pub log: LogHandle,
}

/// Connections one endpoint serves at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Connections one endpoint serves at once from one address.
const MAX_PER_SOURCE: usize = 8;
/// Time a client has to send a request's headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", format!("{value:#}\n"))
}

/// The connections an endpoint serves, in total and per source address.
#[derive(Default)]
struct Slots(Mutex<(usize, HashMap<IpAddr, usize>)>);

/// One connection's place in its endpoint's [`Slots`].
struct Slot(Arc<Slots>, IpAddr);

impl Slots {
    /// A place for a connection from `source`, unless the endpoint or the source is full.
    fn take(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let source = source.to_canonical();
        let mut guard = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, sources) = &mut *guard;
        let mine = sources.entry(source).or_default();
        if *total >= MAX_CONNECTIONS || *mine >= MAX_PER_SOURCE {
            if *mine == 0 {
                sources.remove(&source);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot(Arc::clone(self), source))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, sources) = &mut *guard;
        *total -= 1;
        if let Some(mine) = sources.get_mut(&self.1) {
            *mine -= 1;
            if *mine == 0 {
                sources.remove(&self.1);
            }
        }
    }
}

/// Serves `handler` on `listener` until the task is aborted.
async fn serve<F>(listener: TcpListener, name: &'static str, handler: Arc<F>)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let slots = Arc::new(Slots::default());
    loop {
        let (stream, peer) = crate::proxy::accept(&listener, name, None).await;
        let Some(slot) = slots.take(peer.ip()) else {
            if let Some(suppressed) = crate::throttle::allow(name, "busy") {
                warn!(endpoint = name, client = %peer, max = MAX_CONNECTIONS, max_per_source = MAX_PER_SOURCE, suppressed, "endpoint busy; closing the connection");
            }
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = guarded(name, &*handler, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// Runs a handler; a panic (a bug: no input should cause one) answers 500 instead of dropping
/// the connection, and is logged by the panic hook (`logging.rs`).
fn guarded<F>(name: &'static str, handler: &F, req: &Request<Incoming>) -> Response<Full<Bytes>>
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>>,
{
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(req))).unwrap_or_else(|_| {
        warn!(endpoint = name, path = %req.uri().path(), "handler panicked; answered 500");
        respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "internal error\n".to_owned(),
        )
    })
}

fn bind(addr: SocketAddr, name: &str) -> std::io::Result<TcpListener> {
    // SO_REUSEPORT: during an upgrade the new daemon serves beside the old one.
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    let listener = TcpListener::from_std(socket.into())?;
    info!(endpoint = name, address = %addr, "listening");
    Ok(listener)
}

/// Starts the metrics endpoint.
pub fn spawn_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(addr, "metrics")?;
    Ok(tokio::spawn(serve(
        listener,
        "metrics",
        Arc::new(move |req: &Request<Incoming>| match req.uri().path() {
            "/metrics" | "/stats/prometheus" => {
                let openmetrics = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if openmetrics {
                    respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    )
                } else {
                    respond(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        crate::metrics::to_prometheus_text(&metrics.encode()),
                    )
                }
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /metrics\n".to_owned(),
            ),
        }),
    )))
}

/// Starts the readiness endpoint.
pub fn spawn_readiness(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(addr, "readiness")?;
    let succession = Succession::new(&listener, addr.port());
    Ok(tokio::spawn(serve(
        listener,
        "readiness",
        Arc::new(move |req: &Request<Incoming>| {
            match req.uri().path() {
                "/healthz/ready" => {}
                // Liveness: the daemon serves, ready or not (and superseded or not), so that a
                // liveness probe restarts a wedged daemon, never one that is merely waiting.
                "/healthz/live" => {
                    return respond(StatusCode::OK, "text/plain", "alive\n".to_owned());
                }
                _ => {
                    return respond(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "try /healthz/ready or /healthz/live\n".to_owned(),
                    );
                }
            }
            if succession.superseded() {
                return respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "superseded: a newer mesh-node serves this node\n".to_owned(),
                );
            }
            let (ready, reason) = readiness.get();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "text/plain", format!("{reason}\n"))
        }),
    )))
}

/// Which daemon answers a readiness probe is up to the kernel while an old and a new daemon
/// share the port (`SO_REUSEPORT`, during an upgrade): the old one must not answer for the new
/// one. A daemon that sees a listener on its port that was not there when it bound its own
/// (a successor) answers 503; listeners that were there before (a predecessor) don't count.
struct Succession {
    port: u16,
    own: u64,
    predecessors: Vec<u64>,
}

impl Succession {
    fn new(listener: &TcpListener, port: u16) -> Self {
        let own = nix::sys::stat::fstat(listener).map_or(0, |st| st.st_ino);
        let predecessors = listeners_on(port)
            .into_iter()
            .filter(|inode| *inode != own)
            .collect();
        Self {
            port,
            own,
            predecessors,
        }
    }

    fn superseded(&self) -> bool {
        listeners_on(self.port)
            .iter()
            .any(|inode| *inode != self.own && !self.predecessors.contains(inode))
    }
}

/// Socket inodes of the TCP listeners on `port` in this network namespace.
fn listeners_on(port: u16) -> Vec<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|text| parse_listeners(&text, port))
        .collect()
}

/// Parses `/proc/net/tcp{,6}`: `sl local rem st tx:rx tr:when retr uid timeout inode …`,
/// listeners have state `0A`.
fn parse_listeners(text: &str, port: u16) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == "0A")
                .then(|| fields.get(9)?.parse().ok())?
        })
        .collect()
}

/// Starts the admin API.
pub fn spawn_admin(
    addr: SocketAddr,
    admin: Arc<AdminState>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(addr, "admin")?;
    Ok(tokio::spawn(serve(
        listener,
        "admin",
        Arc::new(move |req: &Request<Incoming>| admin_route(&admin, req)),
    )))
}

/// The value of `key` in a URL query string (`a=1&b=x+y%2C`), decoded as HTML forms are
/// (`+` is a space, `%XX` a byte, invalid UTF-8 replaced): the first occurrence wins. Any input
/// is accepted; a malformed escape is kept as it is.
#[must_use]
pub fn query_value(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    query_value(req.uri().query()?, key)
}

fn admin_route(admin: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => {
            let state = admin
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let dump = serde_json::json!({
                "config": admin.config,
                "state": state,
                "certificates": admin.certs.states(),
                "logging": admin.log.current(),
                "bpffs": admin.bpffs,
            });
            json(StatusCode::OK, &dump)
        }
        (&Method::GET, "/logging") => json(
            StatusCode::OK,
            &serde_json::json!({ "filter": admin.log.current() }),
        ),
        (&Method::POST | &Method::PUT, "/logging") => match query(req, "filter") {
            Some(filter) => match admin.log.set(&filter) {
                Ok(()) => {
                    info!(filter = %filter, "log filter changed");
                    json(StatusCode::OK, &serde_json::json!({ "filter": filter }))
                }
                Err(e) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({ "error": crate::error_chain(&e) }),
                ),
            },
            None => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": "use /logging?filter=<directives>" }),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: GET /config_dump, GET /logging, POST /logging?filter=...\n".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_serves_a_bounded_number_of_connections_per_source_and_in_all() {
        let slots = Arc::new(Slots::default());
        let ip = |n: u8| IpAddr::from([198, 18, 2, n]);
        let one: Vec<_> = (0..20).filter_map(|_| slots.take(ip(1))).collect();
        assert_eq!(one.len(), MAX_PER_SOURCE, "one source gets its share only");
        assert!(
            slots.take(ip(2)).is_some(),
            "another source is still served"
        );
        let others: Vec<_> = (3..=200).filter_map(|n| slots.take(ip(n))).collect();
        assert_eq!(others.len(), MAX_CONNECTIONS - MAX_PER_SOURCE);
        assert!(slots.take(ip(201)).is_none(), "full");
        drop(one);
        assert!(slots.take(ip(1)).is_some(), "places come back");

        let slots = Arc::new(Slots::default());
        let v4: Vec<_> = (0..MAX_PER_SOURCE)
            .filter_map(|_| slots.take(ip(1)))
            .collect();
        assert_eq!(v4.len(), MAX_PER_SOURCE);
        assert!(
            slots.take("::ffff:198.18.2.1".parse().unwrap()).is_none(),
            "an IPv4-mapped address is the same source"
        );
    }

    #[test]
    fn query_values_are_decoded_and_hostile_ones_kept_as_they_are() {
        let value = |q: &str| query_value(q, "filter");
        assert_eq!(
            value("filter=info%2Cmesh_node%3Ddebug").as_deref(),
            Some("info,mesh_node=debug")
        );
        assert_eq!(
            value("a=1&filter=x+y&filter=z").as_deref(),
            Some("x y"),
            "first one wins"
        );
        assert_eq!(value("filter").as_deref(), Some(""));
        assert_eq!(value("other=1"), None);
        // Malformed escapes stay as they are; bytes that are not UTF-8 become U+FFFD. The
        // hand-written decoder this replaced sliced `%aé` inside the `é` and panicked.
        for (query, decoded) in [
            ("filter=%", "%"),
            ("filter=%a", "%a"),
            ("filter=%aé", "%aé"),
            ("filter=%é", "%é"),
            ("filter=%zz", "%zz"),
            ("filter=%ff", "\u{fffd}"),
            ("filter=+", " "),
            ("filter=%%%", "%%%"),
        ] {
            assert_eq!(value(query).as_deref(), Some(decoded), "{query}");
        }
        let long = format!("filter={}", "%é%a".repeat(100_000));
        assert_eq!(value(&long).map(|v| v.len()), Some(500_000));
    }

    #[test]
    fn listeners_are_read_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:3AAD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 81234 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:3AAD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 81299 1 0000000000000000 100 0 0 10 0
   2: 0100007F:3AAD 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 90000 1 0000000000000000 20 4 30 10 -1
   3: 00000000:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77777 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_listeners(text, 15021), [81234, 81299]);
        assert_eq!(parse_listeners(text, 15000), [77777]);
        assert!(parse_listeners(text, 15008).is_empty());
    }

    #[tokio::test]
    async fn a_later_listener_supersedes_an_earlier_one() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = bind(addr, "test").expect("bind");
        let port = first.local_addr().unwrap().port();
        let old = Succession::new(&first, port);
        assert!(!old.superseded(), "alone on its port");
        let second = bind(SocketAddr::from(([127, 0, 0, 1], port)), "test").expect("reuseport");
        let new = Succession::new(&second, port);
        assert!(old.superseded(), "a successor appeared");
        assert!(!new.superseded(), "the predecessor does not count");
        drop(second);
        assert!(!old.superseded(), "the successor left");
    }

    /// `GET path` on `port` of 127.0.0.1: the status code.
    async fn get(port: u16, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"))
    }

    #[tokio::test]
    async fn alive_while_not_ready_and_while_superseded() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let readiness = Arc::new(Readiness::default());
        readiness.set(false, "starting");
        let server = spawn_readiness(addr, Arc::clone(&readiness)).expect("serve");
        assert_eq!(get(port, "/healthz/ready").await, 503, "not ready");
        assert_eq!(get(port, "/healthz/live").await, 200, "alive all the same");
        readiness.set(true, "ready");
        assert_eq!(get(port, "/healthz/ready").await, 200);
        assert_eq!(get(port, "/healthz/live").await, 200);
        // A successor on the port (an upgrade next to it): this daemon's readiness now says
        // superseded, but both live. The kernel spreads connections over the two listeners.
        let next = Arc::new(Readiness::default());
        next.set(true, "ready");
        let successor = spawn_readiness(addr, next).expect("reuseport");
        let (mut live, mut ready) = (Vec::new(), std::collections::BTreeSet::new());
        for _ in 0..50 {
            live.push(get(port, "/healthz/live").await);
            ready.insert(get(port, "/healthz/ready").await);
        }
        assert!(live.iter().all(|code| *code == 200), "{live:?}");
        assert_eq!(
            ready,
            std::collections::BTreeSet::from([200, 503]),
            "both daemons answered"
        );
        assert_eq!(get(port, "/nothing").await, 404);
        successor.abort();
        server.abort();
    }
}
