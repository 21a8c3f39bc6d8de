//! The file state source: the configuration file's `workloads`, `services`, `policies` and
//! `traffic`,
//! re-read when the file changes. The file's other fields are the daemon's settings
//! ([`Config`]); a [`Document`] is the two together, as one file holds them.
//!
//! The file is polled (every 250 ms by default): cheap for one small file, and robust to the
//! ways editors and Kubernetes `ConfigMap`s replace files (rename, symlink swap), which inotify
//! watches lose. Operators also write the file in place (`cat new > file`, an editor saving in
//! place, a slow copy), and a poll can land in the middle of such a write, so a changed file is
//! read only once
//! - no process has it open for writing (a read lease can be taken, `fcntl(F_SETLEASE)`;
//!   where leases are not available this check is skipped), and
//! - it has stayed the same, stamp and content, for [`SETTLE`].
//!
//! The text is then refused like any bad edit when it is empty (or only comments), when its
//! last line has no line break (cut short), or when it does not parse or validate: the last
//! good state stays in force, the error is logged once with the file and the reason, and the
//! change is counted (`mesh_config_reloads_total{result="rejected"}`). Fields that are read at
//! start only and changed are named in a warning, once per change.

use std::{
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, error, info, warn};

use super::{MeshState, Service, validate_services};
use crate::{
    config::{Config, ConfigError, Origin},
    metrics::ReloadLabels,
    network::{Network, validate_networks},
    policy::{PolicyDocument, PolicyStore},
    traffic::{TrafficDocument, TrafficSet},
    workload::{Workload, validate_workloads},
};

/// The file source's sections of the configuration file (the other fields are [`Config`]'s,
/// which also refuses unknown ones).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct Sections {
    /// Istio `AuthorizationPolicy` and `PeerAuthentication` documents.
    policies: Vec<PolicyDocument>,
    /// The workloads of the mesh. The daemon enrolls the ones placed on its node with
    /// `enrolled: true`.
    workloads: Vec<Workload>,
    /// Services: virtual addresses whose connections are load-balanced across endpoints.
    services: Vec<Service>,
    /// `TCPRoute`, `VirtualService`, `DestinationRule` and `FaultInjection` documents.
    traffic: Vec<TrafficDocument>,
    /// Other networks and their east-west gateways.
    networks: Vec<Network>,
}

/// A configuration file (or the embedded default) as the daemon reads it: its settings, and
/// the state its sections describe.
#[derive(Debug)]
pub struct Document {
    /// The daemon's settings.
    pub config: Config,
    /// The workloads, services and policies of the file (its zone too, from the settings).
    pub state: MeshState,
}

impl Document {
    /// Parses and validates a whole file: the settings ([`Config::parse`]), then the
    /// workloads, services and policies; every error names its field and line.
    pub fn parse(text: &str, origin: &Origin) -> Result<Self, ConfigError> {
        let config = Config::parse(text, origin)?;
        let sections: Sections =
            serde_yaml_ng::from_str(text).map_err(|error| ConfigError::Parse {
                origin: origin.clone(),
                error,
            })?;
        validate_workloads(&sections.workloads)
            .and_then(|()| validate_services(&sections.services))
            .and_then(|()| validate_networks(&sections.networks))
            .map_err(|(field, reason)| ConfigError::invalid(origin, text, field, reason))?;
        let policies = PolicyStore::new(&config.root_namespace, &sections.policies)
            .map_err(|error| ConfigError::policy(origin, text, error))?;
        let traffic = TrafficSet::new(&sections.traffic).map_err(|e| {
            ConfigError::invalid(
                origin,
                text,
                format!("traffic[{}].{}", e.index, e.field),
                format!("{}: {}", e.document, e.reason),
            )
        })?;
        let state = MeshState {
            workloads: sections.workloads,
            services: sections.services,
            policies: Arc::new(policies),
            traffic: Arc::new(traffic),
            networks: sections.networks,
            zone: config.zone.clone(),
            pending: None,
        };
        Ok(Self { config, state })
    }

    /// Reads `file` (the embedded default when `None`), then applies the environment
    /// overrides looked up through `env` to the settings ([`Config::with_overrides`]).
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (origin, text) = crate::config::read(file)?;
        let mut document = Self::parse(&text, &origin)?;
        document.config = document.config.with_overrides(env);
        Ok(document)
    }

    /// The document as one YAML file again: the settings, then the sections.
    pub fn to_yaml(&self) -> Result<String, serde_yaml_ng::Error> {
        let sections = Sections {
            policies: self.state.policies.documents().to_vec(),
            workloads: self.state.workloads.clone(),
            services: self.state.services.clone(),
            traffic: self.state.traffic.documents().to_vec(),
            networks: self.state.networks.clone(),
        };
        let mut text = serde_yaml_ng::to_string(&self.config)?;
        text.push_str(&serde_yaml_ng::to_string(&sections)?);
        Ok(text)
    }
}

/// How long a changed file must stay the same before it is read.
pub const SETTLE: Duration = Duration::from_millis(500);

/// `F_SETSIG` (`fcntl.h`; the libc crate has it for few targets): the signal a lease break
/// sends.
const F_SETSIG: libc::c_int = 10;

/// After this long waiting for a writer to close the file, say so (once per change).
const WRITER_PATIENCE: Duration = Duration::from_secs(10);

/// What identifies a version of the file without reading it (of the file a symlink leads to:
/// a `ConfigMap`'s `..data` swap changes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    let ns = |s: i64, ns: i64| i128::from(s) * 1_000_000_000 + i128::from(ns);
    Some(Stamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
    })
}

/// The configuration file as the daemon started with it: what later versions are compared to.
pub struct Watched {
    path: PathBuf,
    stamp: Option<Stamp>,
    /// The file's configuration as written (without environment or command-line overrides).
    as_written: Config,
}

impl Watched {
    /// Reads the configuration file for the daemon's start: the effective document (with the
    /// overrides `env` gives) and the start of its watch.
    pub fn load(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Document, Self), ConfigError> {
        let origin = Origin::File(path.to_owned());
        // Taken before reading: a write after it shows as a change.
        let stamp = stamp(path);
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        let mut document = Document::parse(&text, &origin)?;
        let as_written = document.config.clone();
        document.config = as_written.clone().with_overrides(env);
        let watched = Self {
            path: path.to_owned(),
            stamp,
            as_written,
        };
        Ok((document, watched))
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A version of the file: its text, or why it could not be read.
#[derive(Debug, PartialEq, Eq)]
enum Content {
    Text(String),
    Unreadable(String),
}

fn read(path: &Path) -> Content {
    match std::fs::read_to_string(path) {
        Ok(text) => Content::Text(text),
        Err(e) => Content::Unreadable(e.to_string()),
    }
}

/// A change seen but not read yet.
struct Pending {
    stamp: Option<Stamp>,
    content: Content,
    since: Instant,
    told_about_writer: bool,
}

/// Whether some process has the file open for writing: a read lease can only be taken on a
/// file nobody writes to. `None` when leases are unavailable here (not the owner and no
/// `CAP_LEASE`, a file system without leases, `fs.leases-enable=0`).
fn open_for_writing(path: &Path) -> Option<bool> {
    let file = std::fs::File::open(path).ok()?;
    let fd = file.as_raw_fd();
    // A writer opening the file while we hold the lease makes the kernel signal us (SIGIO by
    // default, which would end the process): ask for SIGURG instead, ignored by default.
    // SAFETY: fcntl on a descriptor this function owns; no memory is passed.
    if unsafe { libc::fcntl(fd, F_SETSIG, libc::SIGURG) } != 0 {
        return None;
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
        // SAFETY: as above; closing the file would release the lease too.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// The settings the file source applies at run time (besides its own sections); every other
/// setting is read at start.
fn rereadable(kubernetes: bool) -> &'static [&'static str] {
    if kubernetes {
        // The Kubernetes source took the zone and root namespace at its start.
        &[]
    } else {
        &["zone", "rootNamespace"]
    }
}

/// The fields (`proxy.connectTimeoutMs`) that differ between two configurations and that the
/// running daemon does not re-read.
#[must_use]
pub fn start_only_changes(running: &Config, new: &Config) -> Vec<String> {
    fn diff(a: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for key in keys {
                    let sub = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    let null = Value::Null;
                    diff(
                        x.get(key).unwrap_or(&null),
                        y.get(key).unwrap_or(&null),
                        &sub,
                        out,
                    );
                }
            }
            _ if a != b => out.push(path.to_owned()),
            _ => {}
        }
    }
    let (Ok(serde_json::Value::Object(mut a)), Ok(serde_json::Value::Object(mut b))) =
        (serde_json::to_value(running), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    for key in rereadable(running.kubernetes.enabled) {
        a.remove(*key);
        b.remove(*key);
    }
    let mut out = Vec::new();
    diff(&a.into(), &b.into(), "", &mut out);
    out
}

/// The watcher's state between polls.
struct Watcher {
    path: PathBuf,
    origin: Origin,
    start: Config,
    /// The version last read (applied or rejected): not read again.
    evaluated: Option<Stamp>,
    pending: Option<Pending>,
    /// Start-only fields last warned about.
    warned: Vec<String>,
    tx: watch::Sender<Arc<MeshState>>,
    reloads: Family<ReloadLabels, Counter>,
}

impl Watcher {
    fn poll(&mut self) {
        let now = stamp(&self.path);
        let Some(pending) = &mut self.pending else {
            if now != self.evaluated {
                self.pending = Some(Pending {
                    stamp: now,
                    content: read(&self.path),
                    since: Instant::now(),
                    told_about_writer: false,
                });
            }
            return;
        };
        if now != pending.stamp {
            *pending = Pending {
                stamp: now,
                content: read(&self.path),
                since: Instant::now(),
                told_about_writer: false,
            };
            return;
        }
        if pending.since.elapsed() < SETTLE {
            return;
        }
        if now.is_some() && open_for_writing(&self.path) == Some(true) {
            if !pending.told_about_writer && pending.since.elapsed() >= WRITER_PATIENCE {
                pending.told_about_writer = true;
                warn!(file = %self.path.display(), "the configuration file changed and a process still has it open for writing; reading it once it is closed");
            } else {
                debug!(file = %self.path.display(), "configuration file open for writing; waiting");
            }
            return;
        }
        let content = read(&self.path);
        if content != pending.content || stamp(&self.path) != now {
            // Written to again since it was first seen (within the stamp's resolution).
            *pending = Pending {
                stamp: stamp(&self.path),
                content,
                since: Instant::now(),
                told_about_writer: false,
            };
            return;
        }
        self.evaluated = now;
        self.pending = None;
        self.evaluate(&content);
    }

    fn evaluate(&mut self, content: &Content) {
        let file = self.path.display();
        let text = match content {
            Content::Text(text) => text,
            Content::Unreadable(e) => {
                error!(file = %file, error = %e, "cannot read the configuration; keeping the last good state");
                self.count("rejected");
                return;
            }
        };
        match Document::parse(text, &self.origin) {
            Ok(Document { config, state }) => {
                info!(
                    file = %file,
                    workloads = state.workloads.len(),
                    policies = state.policies.authorization_policies(),
                    "configuration reloaded"
                );
                self.tx.send_replace(Arc::new(state));
                self.count("applied");
                let changed = start_only_changes(&self.start, &config);
                if !changed.is_empty() && changed != self.warned {
                    warn!(
                        file = %file,
                        fields = %changed.join(", "),
                        "configuration fields that are read at start only changed; they apply when the daemon restarts"
                    );
                }
                self.warned = changed;
            }
            Err(e) => {
                error!(file = %file, error = %e, "rejected configuration change; keeping the last good state");
                self.count("rejected");
            }
        }
    }

    fn count(&self, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}

#[must_use = "dropping the handle does not stop the watcher; keep it to abort it"]
/// Watches the file and publishes its state on `tx` whenever a change is complete and valid;
/// counts changes in `reloads`.
pub fn spawn_watcher(
    watched: Watched,
    interval: Duration,
    tx: watch::Sender<Arc<MeshState>>,
    reloads: Family<ReloadLabels, Counter>,
) -> tokio::task::JoinHandle<()> {
    let mut state = Watcher {
        origin: Origin::File(watched.path.clone()),
        path: watched.path,
        start: watched.as_written,
        evaluated: watched.stamp,
        pending: None,
        warned: Vec::new(),
        tx,
        reloads,
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            state.poll();
        }
    })
}

#[cfg(test)]
mod tests;
