//! The watcher against real files written the ways operators write them, on paused tokio time:
//! every state it publishes is recorded, and none may be a partial one.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::watch;

use super::{Document, SETTLE, Watched, spawn_watcher, start_only_changes};
use crate::{
    config::{Config, ConfigError, Origin},
    metrics::ReloadLabels,
    state::MeshState,
};

const POLL: Duration = Duration::from_millis(250);

/// A configuration with `n` workloads (names w0..), one entry per line group.
fn config(n: usize, extra: &str) -> String {
    let mut text = format!("node: n1\n{extra}workloads:\n");
    for i in 0..n {
        let _ = writeln!(
            text,
            "- name: w{i}\n  node: n1\n  ips: [198.18.0.{}]\n  netns: /run/netns/w{i}",
            i + 1
        );
    }
    text
}

/// A temporary directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("mesh-watch-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log records captured from the watcher (it runs on the test's thread).
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
    fn messages(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        self.messages()
            .into_iter()
            .filter(|r| r["message"] == message)
            .collect()
    }
}

/// A running watcher on `path` and what it did.
struct Run {
    /// Workload counts of every published state, in order.
    published: Arc<Mutex<Vec<usize>>>,
    states: watch::Receiver<Arc<MeshState>>,
    reloads: Family<ReloadLabels, Counter>,
    logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Run {
    fn start(path: &Path) -> Self {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let (document, watched) = Watched::load(path, |_| None).expect("initial file");
        let (tx, states) = watch::channel(Arc::new(document.state));
        let reloads = Family::default();
        let task = spawn_watcher(watched, POLL, tx, reloads.clone());
        let published = Arc::new(Mutex::new(Vec::new()));
        let mut rx = states.clone();
        let record = Arc::clone(&published);
        let recorder = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let n = rx.borrow_and_update().workloads.len();
                record.lock().unwrap().push(n);
            }
        });
        Self {
            published,
            states,
            reloads,
            logs,
            _log_guard: guard,
            tasks: [task, recorder],
        }
    }

    fn count(&self, result: &'static str) -> u64 {
        self.reloads.get_or_create(&ReloadLabels { result }).get()
    }

    fn workloads(&self) -> usize {
        self.states.borrow().workloads.len()
    }

    fn published(&self) -> Vec<usize> {
        self.published.lock().unwrap().clone()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Long enough for any settled change to be read.
async fn settle() {
    tokio::time::sleep(SETTLE + 3 * POLL).await;
}

fn write_in_place(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open for writing");
    file.write_all(text.as_bytes()).expect("write");
}

#[tokio::test(start_paused = true)]
async fn a_truncated_file_is_rejected_and_the_last_good_state_stays() {
    let dir = Dir::new("truncate");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, config(3, "")).unwrap();
    let run = Run::start(&path);

    // `: > file`
    write_in_place(&path, "");
    settle().await;
    assert_eq!(run.workloads(), 3, "the last good state stays");
    assert_eq!((run.count("rejected"), run.count("applied")), (1, 0));
    let rejected = run
        .logs
        .with_message("rejected configuration change; keeping the last good state");
    assert_eq!(rejected.len(), 1, "logged once: {rejected:?}");
    let error = rejected[0]["error"].as_str().unwrap();
    assert!(
        error.contains("mesh.yaml") && error.contains("no configuration"),
        "{error}"
    );
    // Nothing more while the file stays so.
    settle().await;
    assert_eq!(run.count("rejected"), 1);

    // Comments only, then cut inside a line (valid YAML: `node: n` of `node: n1`).
    write_in_place(&path, "# emptied by a script\n\n");
    settle().await;
    let cut = config(3, "");
    let cut = &cut[..cut.rfind("node: n1").unwrap() + "node: n".len()];
    write_in_place(&path, cut);
    settle().await;
    assert_eq!(run.count("rejected"), 3);

    // A good edit applies.
    write_in_place(&path, &config(2, ""));
    settle().await;
    assert_eq!(run.workloads(), 2);
    assert_eq!(run.count("applied"), 1);
    assert_eq!(run.published(), [2], "nothing partial was ever published");
}

#[tokio::test(start_paused = true)]
async fn a_file_written_in_pieces_is_read_once_it_is_complete() {
    let dir = Dir::new("pieces");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, config(3, "")).unwrap();
    let run = Run::start(&path);
    let full = config(4, "");
    // Cut between two workloads: a valid document with one workload only.
    let half = &full[..full.find("- name: w1").unwrap()];
    assert!(Document::parse(half, &Origin::File(path.clone())).is_ok());

    // `echo ... > f; echo ... >> f`: two writes, each closing the file, a pause apart that
    // spans polls but is shorter than the settle time.
    std::fs::write(&path, half).unwrap();
    tokio::time::sleep(SETTLE.saturating_sub(Duration::from_millis(100))).await;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&full.as_bytes()[half.len()..])
        .unwrap();
    settle().await;
    assert_eq!(run.published(), [4], "only the complete file");
    assert_eq!(run.count("rejected"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_writer_is_waited_for_however_long_it_pauses() {
    let dir = Dir::new("slow");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, config(3, "")).unwrap();
    let run = Run::start(&path);
    let full = config(4, "");
    let half = &full[..full.find("- name: w1").unwrap()];

    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    writer.write_all(half.as_bytes()).unwrap();
    // Far longer than the settle time: the open descriptor says the write is not done.
    tokio::time::sleep(SETTLE * 8).await;
    assert_eq!(run.workloads(), 3, "a half-written file is not read");
    writer.write_all(&full.as_bytes()[half.len()..]).unwrap();
    drop(writer);
    settle().await;
    assert_eq!(run.published(), [4]);
    assert_eq!(run.count("rejected"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_configmap_symlink_swap_is_followed_and_checked_like_any_change() {
    let dir = Dir::new("configmap");
    // kubelet's layout: mesh.yaml -> ..data/mesh.yaml, ..data -> ..v1 (a timestamped dir).
    let version = |name: &str, text: &str| {
        let d = dir.0.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("mesh.yaml"), text).unwrap();
    };
    let swap_to = |name: &str| {
        let tmp = dir.0.join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, dir.0.join("..data")).unwrap();
    };
    version("..v1", &config(3, ""));
    std::os::unix::fs::symlink("..v1", dir.0.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/mesh.yaml", dir.0.join("mesh.yaml")).unwrap();
    let run = Run::start(&dir.0.join("mesh.yaml"));

    version("..v2", "");
    swap_to("..v2");
    settle().await;
    assert_eq!((run.workloads(), run.count("rejected")), (3, 1));
    version("..v3", &config(1, ""));
    swap_to("..v3");
    settle().await;
    assert_eq!(run.published(), [1]);
}

#[tokio::test(start_paused = true)]
async fn a_vanished_file_is_a_rejected_change() {
    let dir = Dir::new("vanished");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, config(2, "")).unwrap();
    let run = Run::start(&path);
    std::fs::remove_file(&path).unwrap();
    settle().await;
    assert_eq!((run.workloads(), run.count("rejected")), (2, 1));
    assert_eq!(
        run.logs
            .with_message("cannot read the configuration; keeping the last good state")
            .len(),
        1
    );
    std::fs::write(&path, config(1, "")).unwrap();
    settle().await;
    assert_eq!(run.published(), [1]);
}

#[tokio::test(start_paused = true)]
async fn start_only_fields_changed_at_run_time_are_warned_about_once_per_change() {
    let dir = Dir::new("start-only");
    let path = dir.0.join("mesh.yaml");
    std::fs::write(&path, config(1, "proxy:\n  connectTimeoutMs: 1000\n")).unwrap();
    let run = Run::start(&path);
    let warning = "configuration fields that are read at start only changed; they apply when the daemon restarts";

    write_in_place(
        &path,
        &config(
            2,
            "proxy:\n  connectTimeoutMs: 2000\nlog:\n  format: json\n",
        ),
    );
    settle().await;
    assert_eq!(run.workloads(), 2, "the re-read fields apply");
    // The same start-only difference again, with another workload change: no new warning.
    write_in_place(
        &path,
        &config(
            3,
            "proxy:\n  connectTimeoutMs: 2000\nlog:\n  format: json\n",
        ),
    );
    settle().await;
    let warnings = run.logs.with_message(warning);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["fields"], "log.format, proxy.connectTimeoutMs");
    // Back to the running values, then a new difference: warned again.
    write_in_place(&path, &config(3, "proxy:\n  connectTimeoutMs: 1000\n"));
    settle().await;
    write_in_place(
        &path,
        &config(
            3,
            "redirect:\n  mark: 7\nproxy:\n  connectTimeoutMs: 1000\n",
        ),
    );
    settle().await;
    let warnings = run.logs.with_message(warning);
    assert_eq!(warnings.len(), 2, "warned again for the new change");
    assert_eq!(warnings[1]["fields"], "redirect.mark");
    assert_eq!(run.count("rejected"), 0);
}

#[test]
fn start_only_changes_name_every_field_the_daemon_does_not_reread() {
    let parse = |text: &str| Config::parse(text, &crate::config::Origin::Embedded).unwrap();
    let base = parse("node: a\n");
    assert!(start_only_changes(&base, &base).is_empty());
    let reread = parse(
        "node: a\nzone: z\nrootNamespace: r\nworkloads:\n- {name: w, node: a, ips: [198.18.0.1]}\n",
    );
    assert!(start_only_changes(&base, &reread).is_empty(), "file source");
    let other = parse(
        "node: b\nredirect:\n  excludePorts: [22]\nidentity:\n  trustDomain: td\nmetrics:\n  bindAddress: 127.0.0.1\n",
    );
    assert_eq!(
        start_only_changes(&base, &other),
        [
            "identity.trustDomain",
            "metrics.bindAddress",
            "node",
            "redirect.excludePorts"
        ]
    );
    // With the Kubernetes source the zone and root namespace are taken at start.
    let kube = parse("node: a\nkubernetes:\n  enabled: true\n");
    let kube_zone = parse("node: a\nzone: z\nkubernetes:\n  enabled: true\n");
    assert_eq!(start_only_changes(&kube, &kube_zone), ["zone"]);
}

#[test]
#[rustfmt::skip]
fn invalid_sections_name_the_field_and_its_line() {
    let origin = Origin::File("/etc/mesh.yaml".into());
    let w = |name: &str, ip: &str| format!("- {{name: {name}, node: n, ips: [{ip}]}}\n");
    let a1 = w("a", "198.18.0.1");
    for (text, field, line) in [
        (format!("workloads:\n{a1}{}", w("a", "198.18.0.2")), "workloads[1].name", 3),
        (format!("workloads:\n{a1}{}", w("b", "198.18.0.1")), "workloads[1].ips[0]", 3),
        (
            format!("workloads:\n{a1}- name: b\n  node: n\n  ips:\n  - 198.18.0.2\n  - 198.18.0.1\n"),
            "workloads[1].ips[1]",
            7,
        ),
        ("workloads:\n- {name: a, node: n, ips: []}\n".to_owned(), "workloads[0].ips", 2),
        ("workloads:\n- {name: '', node: n, ips: [198.18.0.1]}\n".to_owned(), "workloads[0].name", 2),
        ("workloads:\n- {name: a, node: '', ips: [198.18.0.1]}\n".to_owned(), "workloads[0].node", 2),
        (
            "workloads:\n- name: a\n  node: n\n  ips: [198.18.0.1]\n  netns: run/a\n".to_owned(),
            "workloads[0].netns",
            5,
        ),
        (
            "workloads:\n- name: a\n  namespace: Shop/x\n  node: n\n  ips: [198.18.0.1]\n".to_owned(),
            "workloads[0].namespace",
            3,
        ),
        (
            "workloads:\n- {name: a, serviceAccount: '..', node: n, ips: [198.18.0.1]}\n".to_owned(),
            "workloads[0].serviceAccount",
            2,
        ),
        (
            "services:\n- {name: s, addresses: [], ports: [{port: 1}]}\n".to_owned(),
            "services[0].addresses",
            2,
        ),
        (
            "services:\n- {name: '', addresses: [198.19.0.1], ports: [{port: 1}]}\n".to_owned(),
            "services[0].name",
            2,
        ),
        (
            "services:\n- name: s\n  addresses: [198.19.0.1]\n  ports: []\n".to_owned(),
            "services[0].ports",
            4,
        ),
        (
            "services:\n- name: s\n  addresses: [198.19.0.1]\n  ports:\n  - {port: 1}\n  - {port: 0}\n".to_owned(),
            "services[0].ports[1]",
            6,
        ),
        (
            "services:\n- {name: s, addresses: [198.19.0.1], ports: [{port: 1}]}\n\
             - {name: t, addresses: [198.19.0.2, 198.19.0.1], ports: [{port: 1}]}\n"
                .to_owned(),
            "services[1].addresses[1]",
            3,
        ),
    ] {
        let err = Document::parse(&text, &origin).unwrap_err();
        let ConfigError::Invalid { field: named, .. } = &err else {
            panic!("{text:?}: not a field error: {err}");
        };
        assert_eq!(named, field, "{text:?}");
        let err = err.to_string();
        assert!(err.contains(&format!("`{field}` at line {line} column")), "{text:?}: {err}");
        assert!(err.starts_with("/etc/mesh.yaml: "), "{err}");
    }
}

#[test]
fn the_sections_take_their_types_and_lines_from_the_text() {
    let origin = Origin::File("/etc/mesh.yaml".into());
    // Not a list: a YAML type error, with its line, from the sections' parse.
    let err = Document::parse(
        "node: a\nworkloads:\n- name: a\n  node: n\n  ips: 198.18.0.1\n",
        &origin,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("workloads[0].ips") && err.contains("line 5"),
        "{err}"
    );
    // The settings refuse unknown top-level fields, the sections unknown workload fields.
    let err = Document::parse("node: a\nworkload: []\n", &origin)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown field `workload`") && err.contains("line 2"),
        "{err}"
    );
    let err = Document::parse(
        "workloads:\n- {name: a, node: n, ips: [198.18.0.1], colour: red}\n",
        &origin,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unknown field `colour`") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn a_document_round_trips_through_yaml() {
    let text = "\
node: n1
zone: z1
rootNamespace: mesh-root
policies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-b, namespace: shop}
  spec:
    action: DENY
    rules:
    - from:
      - source: {principals: [cluster.local/ns/shop/sa/b]}
workloads:
- name: web-1
  namespace: shop
  serviceAccount: web
  labels: {app: web}
  ips: [198.18.1.2]
  node: n1
  netns: /run/netns/web-1
services:
- {name: web, namespace: shop, addresses: [198.19.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: web}, loadBalancing: preferNode}
";
    let document = Document::parse(text, &Origin::Embedded).expect("parse");
    assert_eq!(document.state.workloads.len(), 1);
    assert_eq!(document.state.services.len(), 1);
    assert_eq!(document.state.policies.authorization_policies(), 1);
    assert_eq!(document.state.zone.as_deref(), Some("z1"));
    let again =
        Document::parse(&document.to_yaml().expect("yaml"), &Origin::Embedded).expect("reparse");
    assert_eq!(again.config, document.config);
    assert_eq!(again.state.workloads, document.state.workloads);
    assert_eq!(again.state.services, document.state.services);
    assert_eq!(
        again.state.policies.documents(),
        document.state.policies.documents()
    );
}

#[test]
fn policy_errors_name_the_line_of_the_field() {
    let text = "\
policies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: ns}
- apiVersion: security.istio.io/v1
  kind: PeerAuthentication
  metadata: {name: b, namespace: ns}
  spec:
    portLevelMtls:
      8080: {mode: STRICT}
";
    let err = Document::parse(text, &Origin::Embedded)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("policies[1]")
            && err.contains("portLevelMtls")
            && err.ends_with("at line 9 column 5"),
        "{err}"
    );
    let text = "policies:\n- apiVersion: v2\n  kind: AuthorizationPolicy\n  metadata: {name: a}\n";
    let err = Document::parse(text, &Origin::Embedded)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("apiVersion") && err.ends_with("at line 2 column 3"),
        "{err}"
    );
}

#[test]
fn workload_defaults_apply() {
    let text = "workloads:\n- name: a\n  node: n1\n  ips: [198.18.1.2, fd6d::2]\n";
    let document = Document::parse(text, &Origin::Embedded).expect("parse");
    let w = &document.state.workloads[0];
    assert_eq!(
        (w.namespace.as_str(), w.service_account.as_str()),
        ("default", "default")
    );
    assert!(w.enrolled);
    assert_eq!(w.uid(), "default/a");
}
