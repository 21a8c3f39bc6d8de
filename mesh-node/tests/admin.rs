//! The admin API in process, on loopback: hostile query strings (malformed percent escapes,
//! bytes that are not UTF-8, a split character, a very long value) get an answer and never a
//! panic; a panic, should one ever happen, is one log record in the configured format.

use std::{
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

use mesh_node::{
    admin::{self, AdminState},
    config::{LogConfig, LogFormat},
    identity::{CA_CERT_FILE, CA_KEY_FILE, CertManager, LocalCa},
    logging::{self, LogHandle},
    tls,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The process's log, captured (the logger is global: installed once for this test binary).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn records(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

fn logging() -> &'static (Logs, LogHandle) {
    static LOG: OnceLock<(Logs, LogHandle)> = OnceLock::new();
    LOG.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let config = LogConfig {
            format: LogFormat::Json,
            filter: "info".to_owned(),
        };
        // The test harness's hook prints a failing test's panic: keep it after ours.
        let harness = std::panic::take_hook();
        let handle =
            logging::init_with_writer(&config, move || writer.clone(), false).expect("logger");
        let ours = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            ours(info);
            harness(info);
        }));
        (logs, handle)
    })
}

/// Serves the admin API on a free loopback port; returns the port.
fn serve_admin(dir: &std::path::Path) -> u16 {
    let _ = std::fs::remove_dir_all(dir);
    LocalCa::init(dir, "cluster.local").expect("ca init");
    let ca = LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
    let certs = CertManager::new(Arc::new(ca), Duration::from_mins(1), tls::provider());
    let state = Arc::new(AdminState {
        config: serde_json::json!({}),
        state: RwLock::new(serde_json::Value::Null),
        certs,
        bpffs: dir.join("bpffs"),
        log: logging().1.clone(),
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let _server = admin::spawn_admin(([127, 0, 0, 1], port).into(), state).expect("admin");
    port
}

/// Sends one raw HTTP/1.1 request; returns the status code.
async fn request(port: u16, method: &str, target: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(
        b" HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    stream.write_all(&req).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&response);
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no HTTP status for {:?}: {head:?}",
                String::from_utf8_lossy(target)
            )
        })
}

#[tokio::test]
async fn hostile_queries_get_an_answer_and_a_panic_would_be_logged_as_json() {
    let (logs, handle) = logging();
    let dir = std::env::temp_dir().join(format!("mesh-admin-test-{}", std::process::id()));
    let port = serve_admin(&dir);
    let long = format!("/logging?filter={}", "%zz%".repeat(4000));
    let targets: Vec<Vec<u8>> = [
        &b"/logging?filter=%"[..],
        b"/logging?filter=%a",
        "/logging?filter=%aé".as_bytes(),
        "/logging?filter=%é".as_bytes(),
        b"/logging?filter=%zz",
        b"/logging?filter=%ff",
        b"/logging?filter=%ff%fe%00",
        b"/logging?filter=+",
        b"/logging?filter",
        b"/logging?=&&=&filter=&",
        b"/logging?%=%&filter=%%%",
        long.as_bytes(),
    ]
    .iter()
    .map(|t| t.to_vec())
    .collect();
    for target in &targets {
        let status = request(port, "POST", target).await;
        assert!(
            status == 200 || status == 400,
            "{:?}: {status}",
            String::from_utf8_lossy(target)
        );
    }
    // A good change still works, decoded (`+` and `%2C`).
    assert_eq!(
        request(port, "POST", b"/logging?filter=info%2Cmesh_node=debug").await,
        200
    );
    assert_eq!(handle.current(), "info,mesh_node=debug");
    assert_eq!(request(port, "GET", b"/config_dump").await, 200);
    let panics: Vec<_> = logs
        .records()
        .into_iter()
        .filter(|r| r["message"] == "panic")
        .collect();
    assert!(panics.is_empty(), "{panics:?}");
    let _ = std::fs::remove_dir_all(&dir);

    // Should a panic ever happen, it is one log record in the configured format (JSON here),
    // not plain text between the JSON lines. (In this test, so that no filter set above is in
    // force meanwhile.)
    let thread = std::thread::Builder::new()
        .name("doomed".to_owned())
        .spawn(|| panic!("boom: a test panic"))
        .expect("thread");
    assert!(thread.join().is_err());
    let records = logs.records();
    let panic = records
        .iter()
        .find(|r| r["message"] == "panic" && r["thread"] == "doomed")
        .unwrap_or_else(|| panic!("no panic record: {records:?}"));
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["panic"], "boom: a test panic");
    assert!(
        panic["location"]
            .as_str()
            .unwrap_or_default()
            .contains("admin.rs"),
        "{panic}"
    );
}
