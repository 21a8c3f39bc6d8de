//! Checks of the Kubernetes manifests under `deploy/`: every overlay renders with
//! `kubectl kustomize`, every rendered object parses into its Kubernetes type (with no field the
//! type does not know), and the result is what `docs/operations.md` says: the `DaemonSet`'s
//! security settings, mounts, probe and termination against the configuration it embeds
//! (parsed by the daemon's own code), read-only RBAC on exactly what the Kubernetes source
//! reads, the CRDs (mesh-node's own `FaultInjection`; Istio's and the Gateway API's stand-ins),
//! the `ServiceMonitor`, and the uninstall `DaemonSet`. `deploy/istio` runs the daemon in
//! ztunnel's place instead: istiod's token and root certificate where the configuration's
//! `istio:` section looks for them, the pod's downward-API variables, and no CA Secret, API
//! token or RBAC.
//!
//! `tests/tests/deploy.rs` runs them on every overlay and on deliberately wrong renderings.

mod cluster;
mod daemon;
mod gateway;
mod istio;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use mesh_node::{
    config::{Config, Origin},
    state::file::Document,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use cluster::{ServiceMonitor, check_crd};

/// The namespace everything is installed in (but by `deploy/istio`).
pub const NAMESPACE: &str = "mesh-system";
/// The daemon's `DaemonSet`, `ServiceAccount` and container.
pub const DAEMON: &str = "mesh-node";
/// `deploy/istio`'s namespace and service account: ztunnel's, which istiod trusts as a node
/// proxy (`CA_TRUSTED_NODE_ACCOUNTS`).
pub const ISTIO_NAMESPACE: &str = "istio-system";
pub const ISTIO_ACCOUNT: &str = "ztunnel";
/// The audience of the token istiod accepts, and the `ConfigMap` it publishes the mesh's root
/// certificate in (in every namespace, under [`ISTIO_ROOT_KEY`]).
pub const ISTIO_AUDIENCE: &str = "istio-ca";
pub const ISTIO_ROOT_CONFIG_MAP: &str = "istio-ca-root-cert";
pub const ISTIO_ROOT_KEY: &str = "root-cert.pem";
/// The file in the configuration `ConfigMap`.
pub const CONFIG_KEY: &str = "mesh-node.yaml";
/// The capabilities of the daemon, each justified in `deploy/base/daemonset.yaml` and
/// `docs/operations.md`.
pub const DAEMON_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];
pub const METRICS_PORT: i32 = 15020;
pub const READINESS_PORT: i32 = 15021;

/// What each overlay directory must render, by kind (in addition to the checks of those
/// kinds). A new overlay needs an entry here.
fn expected_kinds(overlay: &str) -> Option<Vec<&'static str>> {
    // The base has mesh-node's own CRD (FaultInjection); the default overlay adds Istio's
    // two policy CRDs, its VirtualService, DestinationRule and WorkloadEntry, and the Gateway
    // API's TCPRoute.
    let base = vec![
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "CustomResourceDefinition",
    ];
    let with_crds = || {
        let mut kinds = base.clone();
        kinds.extend(["CustomResourceDefinition"; 6]);
        kinds
    };
    Some(match overlay {
        "base" => base,
        // No namespace (Istio's), no RBAC, no CRD.
        "istio" => vec!["ServiceAccount", "ConfigMap", "DaemonSet", "Service"],
        "default" => with_crds(),
        "monitoring" => {
            let mut kinds = with_crds();
            kinds.push("ServiceMonitor");
            kinds
        }
        "uninstall" => vec!["Namespace", "ConfigMap", "DaemonSet"],
        // Installed next to deploy/default: its namespace and CA Secret are the daemon's.
        "gateway" => vec![
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "Service",
        ],
        _ => return None,
    })
}

/// Whether the overlay runs the daemon with istiod as its source (the `istio:` mode) rather
/// than the local CA and the Kubernetes source.
fn istio_mode(overlay: &str) -> bool {
    overlay == "istio"
}

#[must_use]
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("deploy")
}

/// Every directory under `deploy/` with a `kustomization.yaml`, by name.
#[must_use]
pub fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(deploy_dir())
        .expect("reading deploy/")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `kubectl kustomize deploy/<overlay>`, split into documents.
#[must_use]
pub fn render(overlay: &str) -> Vec<Value> {
    let dir = deploy_dir().join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("running kubectl (`cargo xtask setup` says how to install it): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}
/// One rendered object, as its type.
#[derive(Clone, Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    Crd(Box<CustomResourceDefinition>),
    ServiceMonitor(Box<ServiceMonitor>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::Crd(_) => "CustomResourceDefinition",
            Object::ServiceMonitor(_) => "ServiceMonitor",
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Crd(o) => &o.metadata,
            Object::ServiceMonitor(o) => &o.metadata,
        }
    }

    fn cluster_scoped(&self) -> bool {
        matches!(
            self,
            Object::Namespace(_)
                | Object::ClusterRole(_)
                | Object::ClusterRoleBinding(_)
                | Object::Crd(_)
        )
    }
}

/// Parses `value` as `T`, and fails if serializing `T` again loses or changes anything: a
/// field the type does not know (a typo, a field at the wrong level) is an error, as the API
/// server's strict field validation makes it.
fn typed<T: DeserializeOwned + Serialize>(value: &Value) -> anyhow::Result<T> {
    let typed: T = serde_json::from_value(value.clone())?;
    let again = serde_json::to_value(&typed)?;
    let mut lost = Vec::new();
    compare("", value, &again, &mut lost);
    ensure!(
        lost.is_empty(),
        "fields unknown to the type or changed by it: {}",
        lost.join(", ")
    );
    Ok(typed)
}

/// Paths where `original` has something that `again` does not have identically.
fn compare(path: &str, original: &Value, again: &Value, out: &mut Vec<String>) {
    match (original, again) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => compare(&path, value, other, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                compare(&format!("{path}[{i}]"), x, y, out);
            }
        }
        // 2 and 2.0 are the same number to the API server.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        _ => out.push(format!("{path} ({original} became {again})")),
    }
}

fn parse(value: &Value) -> anyhow::Result<Object> {
    let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let object = match (api_version, kind) {
        ("v1", "Namespace") => typed(value).map(Object::Namespace),
        ("v1", "ServiceAccount") => typed(value).map(Object::ServiceAccount),
        ("v1", "ConfigMap") => typed(value).map(Object::ConfigMap),
        ("v1", "Service") => typed(value).map(|s| Object::Service(Box::new(s))),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed(value).map(Object::ClusterRole),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            typed(value).map(Object::ClusterRoleBinding)
        }
        ("apps/v1", "DaemonSet") => typed(value).map(|d| Object::DaemonSet(Box::new(d))),
        ("apps/v1", "Deployment") => typed(value).map(|d| Object::Deployment(Box::new(d))),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            typed(value).map(|c| Object::Crd(Box::new(c)))
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            typed(value).map(|m| Object::ServiceMonitor(Box::new(m)))
        }
        _ => bail!("unexpected kind {api_version}/{kind} ({name})"),
    };
    object.with_context(|| format!("{kind} {name}"))
}

/// A rendered overlay, as typed objects.
pub struct Rendered {
    overlay: String,
    objects: Vec<Object>,
}

impl Rendered {
    #[must_use]
    pub fn of(overlay: &str) -> Self {
        Self::from_values(overlay, &render(overlay)).unwrap_or_else(|e| panic!("{overlay}: {e:#}"))
    }

    pub fn from_values(overlay: &str, values: &[Value]) -> anyhow::Result<Self> {
        let objects = values.iter().map(parse).collect::<anyhow::Result<_>>()?;
        Ok(Self {
            overlay: overlay.to_owned(),
            objects,
        })
    }

    fn all<'a, T>(&'a self, pick: impl Fn(&'a Object) -> Option<&'a T>) -> Vec<&'a T> {
        self.objects.iter().filter_map(pick).collect()
    }

    fn daemonset(&self, name: &str) -> anyhow::Result<&DaemonSet> {
        let found: Vec<&DaemonSet> = self.all(|o| match o {
            Object::DaemonSet(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
            _ => None,
        });
        match found[..] {
            [one] => Ok(one),
            _ => bail!("expected one DaemonSet {name}, found {}", found.len()),
        }
    }

    fn config_map(&self, name: &str) -> anyhow::Result<&ConfigMap> {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::ConfigMap(c) if c.metadata.name.as_deref() == Some(name) => Some(c),
                _ => None,
            })
            .with_context(|| format!("no ConfigMap {name}"))
    }

    /// Every check of this overlay; the first problem found.
    pub fn check(&self) -> anyhow::Result<()> {
        let expected = expected_kinds(&self.overlay).with_context(|| {
            format!(
                "deploy/{} is not a known overlay: add its expectations to tests/tests/deploy.rs",
                self.overlay
            )
        })?;
        let mut kinds: Vec<&str> = self.objects.iter().map(Object::kind).collect();
        kinds.sort_unstable();
        let mut expected = expected;
        expected.sort_unstable();
        ensure!(kinds == expected, "kinds {kinds:?}, expected {expected:?}");
        if self.overlay == "gateway" {
            return self.check_gateway();
        }
        self.check_namespaces()?;
        if self.overlay == "uninstall" {
            return self.check_uninstall();
        }
        let config = self.check_daemon()?;
        // With istiod, enrollment is istiod's (Istio's own label).
        ensure!(
            self.istio() || config.kubernetes.enroll_label == "mesh.io/dataplane-mode",
            "enrollLabel {}, expected mesh.io/dataplane-mode",
            config.kubernetes.enroll_label,
        );
        self.check_rbac()?;
        self.check_metrics_service()?;
        for crd in self.all(|o| match o {
            Object::Crd(c) => Some(&**c),
            _ => None,
        }) {
            check_crd(crd)?;
        }
        for monitor in self.all(|o| match o {
            Object::ServiceMonitor(m) => Some(m),
            _ => None,
        }) {
            self.check_service_monitor(monitor)?;
        }
        Ok(())
    }

    /// Whether this overlay runs the daemon in the `istio:` mode.
    fn istio(&self) -> bool {
        istio_mode(&self.overlay)
    }

    /// The namespace of the overlay's objects.
    fn namespace(&self) -> &'static str {
        if self.istio() {
            ISTIO_NAMESPACE
        } else {
            NAMESPACE
        }
    }

    /// Namespaced objects are in mesh-system, which the overlay creates, and which admits the
    /// `DaemonSet` (Pod Security `privileged`); `deploy/istio`'s are in istio-system, Istio's,
    /// which it neither creates nor (with `kubectl delete -k`) deletes.
    fn check_namespaces(&self) -> anyhow::Result<()> {
        let expected = self.namespace();
        for object in &self.objects {
            let meta = object.metadata();
            let name = meta.name.as_deref().unwrap_or("?");
            if object.cluster_scoped() {
                ensure!(meta.namespace.is_none(), "{name} is cluster-scoped");
            } else {
                ensure!(
                    meta.namespace.as_deref() == Some(expected),
                    "{} {name} is in {:?}, not {expected}",
                    object.kind(),
                    meta.namespace
                );
            }
        }
        let namespaces = self.all(|o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        });
        if self.istio() {
            ensure!(
                namespaces.is_empty(),
                "deploy/{} must not create a namespace: {ISTIO_NAMESPACE} is Istio's (deleting \
                 the overlay would delete it)",
                self.overlay
            );
            return Ok(());
        }
        ensure!(
            namespaces.len() == 1 && namespaces[0].metadata.name.as_deref() == Some(NAMESPACE),
            "the overlay must create exactly the namespace {NAMESPACE}"
        );
        let enforce = namespaces[0]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
        ensure!(
            enforce.map(String::as_str) == Some("privileged"),
            "{NAMESPACE} must allow privileged pods (hostPath, hostNetwork, capabilities), has {enforce:?}"
        );
        Ok(())
    }

    /// The settings of the configuration the pod template mounts, parsed (with its workloads,
    /// services and policies) by the daemon's own code.
    fn mounted_config(&self, pod: &PodSpec, container: &Container) -> anyhow::Result<Config> {
        let args = container.args.clone().unwrap_or_default();
        let path = match args.iter().position(|a| a == "--config") {
            Some(i) => args.get(i + 1).context("--config without a value")?,
            None => bail!("{} does not pass --config: {args:?}", container.name),
        };
        let path = Path::new(path);
        ensure!(
            path.file_name().and_then(|f| f.to_str()) == Some(CONFIG_KEY),
            "--config {} is not {CONFIG_KEY}",
            path.display()
        );
        let dir = path.parent().context("--config path")?;
        let (mount, volume) = mount_of(pod, container, dir)?;
        ensure!(
            mount.mount_path == dir.to_string_lossy() && mount.sub_path.is_none(),
            "--config {} is not directly in a mount",
            path.display()
        );
        ensure!(
            mount.read_only == Some(true),
            "the configuration mount must be read-only"
        );
        let name = volume
            .config_map
            .as_ref()
            .context("--config must be on a ConfigMap volume")?
            .name
            .clone();
        let map = self.config_map(&name)?;
        let text = map
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY))
            .with_context(|| format!("ConfigMap {name} has no {CONFIG_KEY}"))?;
        Document::parse(text, &Origin::File(path.to_owned()))
            .map(|document| document.config)
            .map_err(|e| anyhow::anyhow!(mesh_node::error_chain(&e)))
            .with_context(|| format!("the configuration in ConfigMap {name}"))
    }
}

fn is_int(value: Option<&IntOrString>, expected: i32) -> bool {
    match value {
        Some(IntOrString::Int(n)) => *n == expected,
        Some(IntOrString::String(s)) => s.parse() == Ok(expected),
        None => false,
    }
}

/// One toleration with operator Exists and no key or effect: every taint.
fn check_tolerates_everything(pod: &PodSpec) -> anyhow::Result<()> {
    ensure!(
        pod.tolerations.as_ref().is_some_and(|t| t.iter().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        })),
        "the pods must tolerate every taint (operator: Exists, no key, no effect)"
    );
    Ok(())
}

fn host_path(volume: &Volume) -> Option<&str> {
    volume.host_path.as_ref().map(|h| h.path.as_str())
}

/// The pod's host paths are exactly `allowed`, each a directory that must exist; every other
/// volume is a `ConfigMap` or a Secret, or with `tokens`, a projected volume of service-account
/// tokens only.
fn check_host_paths(pod: &PodSpec, allowed: &[&str], tokens: bool) -> anyhow::Result<()> {
    let kinds = if tokens {
        "a ConfigMap, a Secret, a service-account token"
    } else {
        "a ConfigMap, a Secret"
    };
    let mut seen = BTreeSet::new();
    for volume in pod.volumes.clone().unwrap_or_default() {
        if let Some(host) = &volume.host_path {
            ensure!(
                allowed.contains(&host.path.as_str()),
                "unexpected hostPath {}",
                host.path
            );
            ensure!(
                host.type_.as_deref() == Some("Directory"),
                "hostPath {} must be type Directory (an existing directory)",
                host.path
            );
            seen.insert(host.path.clone());
        } else {
            let token = tokens
                && volume.projected.as_ref().is_some_and(|p| {
                    p.sources.as_ref().is_some_and(|s| {
                        !s.is_empty() && s.iter().all(|s| s.service_account_token.is_some())
                    })
                });
            let mut bare = volume.clone();
            bare.config_map = None;
            bare.secret = None;
            if token {
                bare.projected = None;
            }
            ensure!(
                bare == Volume {
                    name: volume.name.clone(),
                    ..Volume::default()
                } && (volume.config_map.is_some() || volume.secret.is_some() || token),
                "volume {} must be {kinds} or an allowed hostPath",
                volume.name
            );
        }
    }
    let allowed: BTreeSet<String> = allowed.iter().map(|p| (*p).to_owned()).collect();
    ensure!(seen == allowed, "host paths {seen:?}, expected {allowed:?}");
    Ok(())
}

/// The mount of `container` that `path` is under (the longest), with its volume.
fn mount_of<'a>(
    pod: &'a PodSpec,
    container: &'a Container,
    path: &Path,
) -> anyhow::Result<(&'a k8s_openapi::api::core::v1::VolumeMount, &'a Volume)> {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .with_context(|| {
            format!(
                "{}: nothing is mounted at {}",
                container.name,
                path.display()
            )
        })?;
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .with_context(|| format!("no volume {}", mount.name))?;
    Ok((mount, volume))
}
