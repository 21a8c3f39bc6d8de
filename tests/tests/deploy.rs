//! The Kubernetes manifests under `deploy/`: every overlay renders with `kubectl kustomize`,
//! every rendered object parses into its Kubernetes type (with no field the type does not know),
//! and the result is what `docs/operations.md` says: the `DaemonSet`'s security settings, mounts,
//! probe and termination against the configuration it embeds (parsed by the daemon's own code),
//! read-only RBAC on exactly what the Kubernetes source reads, Istio's CRDs, the `ServiceMonitor`,
//! and the uninstall `DaemonSet`.
//!
//! Not a namespaced test: it needs `kubectl` (`cargo xtask setup` checks for it) and nothing
//! else, and `cargo xtask test` does not count it among the namespaced ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use mesh_node::config::{Config, Origin};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The namespace everything is installed in.
const NAMESPACE: &str = "mesh-system";
/// The daemon's `DaemonSet`, `ServiceAccount` and container.
const DAEMON: &str = "mesh-node";
/// The file in the configuration `ConfigMap`.
const CONFIG_KEY: &str = "mesh-node.yaml";
/// The capabilities of the daemon, each justified in `deploy/base/daemonset.yaml` and
/// `docs/operations.md`.
const DAEMON_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];
const METRICS_PORT: i32 = 15020;
const READINESS_PORT: i32 = 15021;

/// What each overlay directory must render, by kind (in addition to the checks of those
/// kinds). A new overlay needs an entry here.
fn expected_kinds(overlay: &str) -> Option<Vec<&'static str>> {
    let base = vec![
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Service",
    ];
    let with_crds = || {
        let mut kinds = base.clone();
        kinds.extend(["CustomResourceDefinition", "CustomResourceDefinition"]);
        kinds
    };
    Some(match overlay {
        "base" | "istio" => base,
        "default" => with_crds(),
        "monitoring" => {
            let mut kinds = with_crds();
            kinds.push("ServiceMonitor");
            kinds
        }
        "uninstall" => vec!["Namespace", "ConfigMap", "DaemonSet"],
        _ => return None,
    })
}

/// The label that enrolls namespaces, per overlay that runs the daemon.
fn expected_enroll_label(overlay: &str) -> &'static str {
    if overlay == "istio" {
        "istio.io/dataplane-mode"
    } else {
        "mesh.io/dataplane-mode"
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("deploy")
}

/// Every directory under `deploy/` with a `kustomization.yaml`, by name.
fn overlays() -> Vec<String> {
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
fn render(overlay: &str) -> Vec<Value> {
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

/// A prometheus-operator `ServiceMonitor` (monitoring.coreos.com/v1): the fields the overlay
/// uses, and no other.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<MonitorEndpoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MonitorEndpoint {
    port: String,
    path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    relabelings: Vec<Relabeling>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
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
struct Rendered {
    overlay: String,
    objects: Vec<Object>,
}

impl Rendered {
    fn of(overlay: &str) -> Self {
        Self::from_values(overlay, &render(overlay)).unwrap_or_else(|e| panic!("{overlay}: {e:#}"))
    }

    fn from_values(overlay: &str, values: &[Value]) -> anyhow::Result<Self> {
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
    fn check(&self) -> anyhow::Result<()> {
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
        self.check_namespaces()?;
        match self.overlay.as_str() {
            "uninstall" => self.check_uninstall(),
            overlay => {
                let config = self.check_daemon()?;
                ensure!(
                    config.kubernetes.enroll_label == expected_enroll_label(overlay),
                    "enrollLabel {}, expected {}",
                    config.kubernetes.enroll_label,
                    expected_enroll_label(overlay)
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
        }
    }

    /// Namespaced objects are in mesh-system, which the overlay creates, and which admits the
    /// `DaemonSet` (Pod Security `privileged`).
    fn check_namespaces(&self) -> anyhow::Result<()> {
        for object in &self.objects {
            let meta = object.metadata();
            let name = meta.name.as_deref().unwrap_or("?");
            if object.cluster_scoped() {
                ensure!(meta.namespace.is_none(), "{name} is cluster-scoped");
            } else {
                ensure!(
                    meta.namespace.as_deref() == Some(NAMESPACE),
                    "{} {name} is in {:?}, not {NAMESPACE}",
                    object.kind(),
                    meta.namespace
                );
            }
        }
        let namespaces = self.all(|o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        });
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

    /// The configuration the pod template mounts, parsed by the daemon's own code.
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
        Config::parse(text, &Origin::File(path.to_owned()))
            .map_err(|e| anyhow::anyhow!(mesh_node::error_chain(&e)))
            .with_context(|| format!("the configuration in ConfigMap {name}"))
    }

    /// The daemon's `DaemonSet`; returns the configuration it runs with.
    #[expect(
        clippy::too_many_lines,
        reason = "one checklist, in the order of docs/operations.md"
    )]
    fn check_daemon(&self) -> anyhow::Result<Config> {
        let ds = self.daemonset(DAEMON)?;
        let spec = ds.spec.as_ref().context("DaemonSet spec")?;
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        ensure!(
            !selector.is_empty()
                && selector
                    .iter()
                    .all(|(k, v)| template_labels.get(k) == Some(v)),
            "the selector {selector:?} must select the template's labels {template_labels:?}"
        );

        // Upgrades: the new daemon next to the old one, never a node without one.
        let strategy = spec.update_strategy.as_ref().context("updateStrategy")?;
        let rolling = strategy.rolling_update.as_ref().context("rollingUpdate")?;
        ensure!(
            strategy.type_.as_deref() == Some("RollingUpdate")
                && is_int(rolling.max_surge.as_ref(), 1)
                && is_int(rolling.max_unavailable.as_ref(), 0),
            "updateStrategy must be RollingUpdate with maxSurge 1, maxUnavailable 0: {strategy:?}"
        );

        let pod = spec.template.spec.as_ref().context("pod spec")?;
        ensure!(pod.host_network == Some(true), "hostNetwork must be true");
        ensure!(pod.host_pid == Some(true), "hostPID must be true");
        ensure!(
            pod.dns_policy.as_deref() == Some("ClusterFirstWithHostNet"),
            "dnsPolicy must be ClusterFirstWithHostNet"
        );
        ensure!(
            pod.priority_class_name.as_deref() == Some("system-node-critical"),
            "priorityClassName must be system-node-critical"
        );
        check_tolerates_everything(pod)?;
        let account = pod
            .service_account_name
            .as_deref()
            .context("serviceAccountName")?;
        ensure!(
            account == DAEMON,
            "serviceAccountName {account}, expected {DAEMON}"
        );
        ensure!(
            pod.automount_service_account_token != Some(false),
            "the daemon needs its service account token (in-cluster API access)"
        );
        ensure!(
            self.objects
                .iter()
                .any(|o| matches!(o, Object::ServiceAccount(s)
                if s.metadata.name.as_deref() == Some(account))),
            "no ServiceAccount {account}"
        );
        ensure!(
            pod.init_containers.as_ref().is_none_or(Vec::is_empty),
            "no init containers expected"
        );
        check_host_paths(pod, &["/sys/fs/bpf", "/sys/fs/cgroup", "/proc"])?;

        let annotations = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        for (key, value) in [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "15020"),
            ("prometheus.io/path", "/metrics"),
        ] {
            ensure!(
                annotations.get(key).map(String::as_str) == Some(value),
                "pod annotation {key} must be {value:?}"
            );
        }

        let [container] = &pod.containers[..] else {
            bail!("expected one container, found {}", pod.containers.len());
        };
        ensure!(container.name == DAEMON, "container {}", container.name);
        let image = format!("mesh-node:{}", env!("CARGO_PKG_VERSION"));
        ensure!(
            container.image.as_deref() == Some(image.as_str()),
            "image {:?}, expected {image} (the workspace version; overlays override it with `images:`)",
            container.image
        );
        let args = container.args.clone().unwrap_or_default();
        ensure!(
            args.first().map(String::as_str) == Some("run"),
            "the daemon runs `mesh-node run`: {args:?}"
        );
        ensure!(
            container.ports.as_ref().is_none_or(Vec::is_empty),
            "no container ports: with hostNetwork they are hostPorts, and the old pod's would \
             keep the surge pod of a rolling update from being scheduled"
        );
        let node_env = container
            .env
            .as_ref()
            .and_then(|env| {
                env.iter()
                    .find(|e| e.name == mesh_node::config::ENV_NODE_NAME)
            })
            .context("no MESH_NODE_NAME in env")?;
        let field = node_env
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        ensure!(
            node_env.value.is_none() && field == Some("spec.nodeName"),
            "MESH_NODE_NAME must come from spec.nodeName"
        );

        let probe = container
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .context("an HTTP readiness probe")?;
        ensure!(
            probe.path.as_deref() == Some("/healthz/ready")
                && probe.port == IntOrString::Int(READINESS_PORT),
            "the readiness probe must be GET :15021/healthz/ready: {probe:?}"
        );

        let resources = container.resources.as_ref().context("resources")?;
        let requests = resources.requests.clone().unwrap_or_default();
        ensure!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "cpu and memory requests: {requests:?}"
        );
        ensure!(
            resources
                .limits
                .as_ref()
                .is_some_and(|l| l.contains_key("memory")),
            "a memory limit"
        );

        let config = self.mounted_config(pod, container)?;
        ensure!(config.kubernetes.enabled, "kubernetes.enabled must be true");
        ensure!(
            config.kubernetes.kubeconfig.is_none(),
            "the daemon uses its in-cluster service account, not a kubeconfig"
        );
        let grace_ms = pod
            .termination_grace_period_seconds
            .context("terminationGracePeriodSeconds")?
            .saturating_mul(1000);
        let drain_ms = i64::try_from(config.proxy.drain_timeout_ms)?;
        ensure!(
            grace_ms >= drain_ms + 5_000,
            "terminationGracePeriodSeconds ({grace_ms} ms) must exceed proxy.drainTimeoutMs \
             ({drain_ms} ms) by 5 s at least, or the kubelet kills the draining daemon"
        );

        check_security_context(container, DAEMON_CAPABILITIES)?;
        check_daemon_mounts(pod, container, &config)?;
        Ok(config)
    }

    /// Read-only access to exactly what the Kubernetes source reads, bound to the daemon's
    /// service account.
    fn check_rbac(&self) -> anyhow::Result<()> {
        let roles = self.all(|o| match o {
            Object::ClusterRole(r) => Some(r),
            _ => None,
        });
        let [role] = roles[..] else {
            bail!("expected one ClusterRole, found {}", roles.len());
        };
        let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for rule in role.rules.clone().unwrap_or_default() {
            ensure!(
                rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
                "unexpected resourceNames/nonResourceURLs in {rule:?}"
            );
            for verb in &rule.verbs {
                ensure!(
                    ["get", "list", "watch"].contains(&verb.as_str()),
                    "verb {verb:?} is not read-only"
                );
            }
            for group in rule.api_groups.clone().unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    ensure!(
                        !group.contains('*') && !resource.contains('*'),
                        "wildcards in {rule:?}"
                    );
                    granted
                        .entry((group.clone(), resource))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
        let list_watch = ["list", "watch"];
        let expected: BTreeMap<(String, String), BTreeSet<String>> = [
            ("", "namespaces", &list_watch[..]),
            ("", "pods", &list_watch),
            ("", "services", &list_watch),
            ("discovery.k8s.io", "endpointslices", &list_watch),
            ("security.istio.io", "authorizationpolicies", &list_watch),
            ("security.istio.io", "peerauthentications", &list_watch),
            ("", "nodes", &["get"]),
        ]
        .into_iter()
        .map(|(group, resource, verbs)| {
            (
                (group.to_owned(), resource.to_owned()),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect();
        ensure!(
            granted == expected,
            "the ClusterRole grants {granted:?}, expected exactly {expected:?}"
        );

        let bindings = self.all(|o| match o {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        });
        let [binding] = bindings[..] else {
            bail!("expected one ClusterRoleBinding, found {}", bindings.len());
        };
        ensure!(
            binding.role_ref.kind == "ClusterRole"
                && binding.role_ref.api_group == "rbac.authorization.k8s.io"
                && Some(&binding.role_ref.name) == role.metadata.name.as_ref(),
            "the binding must refer to the ClusterRole: {:?}",
            binding.role_ref
        );
        let ds = self.daemonset(DAEMON)?;
        let account = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.service_account_name.clone());
        let subjects = binding.subjects.clone().unwrap_or_default();
        let [subject] = &subjects[..] else {
            bail!("expected one subject, found {}", subjects.len());
        };
        ensure!(
            subject.kind == "ServiceAccount"
                && Some(&subject.name) == account.as_ref()
                && subject.namespace == ds.metadata.namespace,
            "the binding's subject {subject:?} must be the DaemonSet's service account"
        );
        Ok(())
    }

    /// The headless Service that selects the daemons' pods on the metrics port.
    fn metrics_service(&self) -> anyhow::Result<&Service> {
        let services = self.all(|o| match o {
            Object::Service(s) => Some(s),
            _ => None,
        });
        let [service] = services[..] else {
            bail!("expected one Service, found {}", services.len());
        };
        Ok(service)
    }

    fn check_metrics_service(&self) -> anyhow::Result<()> {
        let service = self.metrics_service()?;
        let spec = service.spec.as_ref().context("Service spec")?;
        ensure!(
            spec.cluster_ip.as_deref() == Some("None"),
            "the metrics Service must be headless"
        );
        let template_labels = self
            .daemonset(DAEMON)?
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let selector = spec.selector.clone().unwrap_or_default();
        ensure!(
            !selector.is_empty()
                && selector
                    .iter()
                    .all(|(k, v)| template_labels.get(k) == Some(v)),
            "the Service selector {selector:?} must select the daemons"
        );
        let ports = spec.ports.clone().unwrap_or_default();
        ensure!(
            ports.iter().any(|p| p.name.as_deref() == Some("metrics")
                && p.port == METRICS_PORT
                && p.target_port == Some(IntOrString::Int(METRICS_PORT))),
            "the Service must expose port `metrics` 15020: {ports:?}"
        );
        Ok(())
    }

    fn check_service_monitor(&self, monitor: &ServiceMonitor) -> anyhow::Result<()> {
        let service = self.metrics_service()?;
        let labels = service.metadata.labels.clone().unwrap_or_default();
        let selector = monitor
            .spec
            .selector
            .match_labels
            .clone()
            .unwrap_or_default();
        ensure!(
            !selector.is_empty()
                && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                && monitor.spec.selector.match_expressions.is_none(),
            "the ServiceMonitor selector {selector:?} must select the metrics Service ({labels:?})"
        );
        ensure!(
            service.metadata.namespace.as_ref().is_some_and(|ns| monitor
                .spec
                .namespace_selector
                .match_names
                .contains(ns)),
            "the ServiceMonitor must look in the Service's namespace"
        );
        let ports = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        ensure!(!monitor.spec.endpoints.is_empty(), "no endpoints");
        for endpoint in &monitor.spec.endpoints {
            let port = ports
                .iter()
                .find(|p| p.name.as_deref() == Some(endpoint.port.as_str()))
                .with_context(|| format!("the Service has no port named {}", endpoint.port))?;
            ensure!(
                port.port == METRICS_PORT && endpoint.path == "/metrics",
                "the ServiceMonitor must scrape 15020/metrics"
            );
        }
        Ok(())
    }

    /// `mesh-node cleanup` on every node with the daemon's bpffs, and nothing of the daemon.
    fn check_uninstall(&self) -> anyhow::Result<()> {
        let ds = self.daemonset("mesh-node-cleanup")?;
        let pod = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("pod spec")?;
        check_tolerates_everything(pod)?;
        ensure!(
            pod.automount_service_account_token == Some(false),
            "cleanup needs no API access"
        );
        check_host_paths(pod, &["/sys/fs/bpf"])?;
        let init = pod.init_containers.clone().unwrap_or_default();
        let [cleanup] = &init[..] else {
            bail!("expected one init container, found {}", init.len());
        };
        let image = format!("mesh-node:{}", env!("CARGO_PKG_VERSION"));
        ensure!(
            cleanup.image.as_deref() == Some(image.as_str()),
            "cleanup image {:?}",
            cleanup.image
        );
        let args = cleanup.args.clone().unwrap_or_default();
        ensure!(
            args.first().map(String::as_str) == Some("cleanup") && cleanup.command.is_none(),
            "the init container must run `mesh-node cleanup`: {args:?}"
        );
        check_security_context(cleanup, &[])?;
        let config = self.mounted_config(pod, cleanup)?;
        // The same bpffs as the installed daemon (the base's configuration).
        let base = Rendered::of("base");
        let base_config = base.check_daemon()?;
        ensure!(
            config == base_config,
            "the uninstall configuration must be the base's (its redirect.bpffs)"
        );
        let (mount, volume) = mount_of(pod, cleanup, &config.redirect.bpffs)?;
        ensure!(
            host_path(volume) == Some("/sys/fs/bpf") && mount.read_only != Some(true),
            "cleanup needs the host's bpffs, writable, at the configured redirect.bpffs"
        );
        for container in &pod.containers {
            check_security_context(container, &[])?;
            ensure!(
                container.volume_mounts.as_ref().is_none_or(Vec::is_empty),
                "the idle container needs no mounts"
            );
        }
        Ok(())
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
/// volume is a `ConfigMap` or a Secret.
fn check_host_paths(pod: &PodSpec, allowed: &[&str]) -> anyhow::Result<()> {
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
            let mut bare = volume.clone();
            bare.config_map = None;
            bare.secret = None;
            ensure!(
                bare == Volume {
                    name: volume.name.clone(),
                    ..Volume::default()
                } && (volume.config_map.is_some() || volume.secret.is_some()),
                "volume {} must be a ConfigMap, a Secret or an allowed hostPath",
                volume.name
            );
        }
    }
    let allowed: BTreeSet<String> = allowed.iter().map(|p| (*p).to_owned()).collect();
    ensure!(seen == allowed, "host paths {seen:?}, expected {allowed:?}");
    Ok(())
}

/// Not privileged, a read-only root, every capability dropped but exactly `add`, and (where
/// Kubernetes allows it: not next to `CAP_SYS_ADMIN`) no privilege escalation.
fn check_security_context(container: &Container, add: &[&str]) -> anyhow::Result<()> {
    let name = &container.name;
    let sc = container
        .security_context
        .as_ref()
        .with_context(|| format!("{name}: securityContext"))?;
    ensure!(
        sc.privileged != Some(true),
        "{name}: must not be privileged"
    );
    ensure!(
        sc.read_only_root_filesystem == Some(true),
        "{name}: readOnlyRootFilesystem must be true"
    );
    let caps = sc.capabilities.clone().unwrap_or_default();
    ensure!(
        caps.drop == Some(vec!["ALL".to_owned()]),
        "{name}: must drop ALL capabilities: {:?}",
        caps.drop
    );
    let added: BTreeSet<String> = caps.add.clone().unwrap_or_default().into_iter().collect();
    let expected: BTreeSet<String> = add.iter().map(|c| (*c).to_owned()).collect();
    ensure!(
        added == expected && caps.add.as_ref().map_or(0, Vec::len) == add.len(),
        "{name}: capabilities {added:?}, expected exactly {expected:?}"
    );
    if added.contains("SYS_ADMIN") {
        ensure!(
            sc.allow_privilege_escalation != Some(false),
            "{name}: the API server refuses allowPrivilegeEscalation: false next to SYS_ADMIN"
        );
    } else {
        ensure!(
            sc.allow_privilege_escalation == Some(false),
            "{name}: allowPrivilegeEscalation must be false"
        );
    }
    ensure!(
        sc.proc_mount.is_none() && sc.windows_options.is_none(),
        "{name}: unexpected procMount/windowsOptions"
    );
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

/// Every path the configuration names is on the right volume.
fn check_daemon_mounts(
    pod: &PodSpec,
    container: &Container,
    config: &Config,
) -> anyhow::Result<()> {
    // bpffs: the host's, writable, so that pins outlive the pod.
    let (mount, volume) = mount_of(pod, container, &config.redirect.bpffs)?;
    ensure!(
        host_path(volume) == Some("/sys/fs/bpf")
            && mount.mount_path == "/sys/fs/bpf"
            && mount.read_only != Some(true),
        "redirect.bpffs {} must be on the host's /sys/fs/bpf, writable",
        config.redirect.bpffs.display()
    );
    ensure!(
        mount.mount_propagation.as_deref() != Some("Bidirectional"),
        "Bidirectional propagation needs a privileged container"
    );
    // The cgroup root: the host's, named explicitly (the container's own /sys/fs/cgroup is
    // its cgroup namespace, where programs would see only the daemon).
    let cgroup = config
        .redirect
        .cgroup
        .as_deref()
        .context("redirect.cgroup must name the mounted host cgroup root")?;
    let (mount, volume) = mount_of(pod, container, cgroup)?;
    ensure!(
        host_path(volume) == Some("/sys/fs/cgroup") && Path::new(&mount.mount_path) == cgroup,
        "redirect.cgroup {} must be the mount of the host's /sys/fs/cgroup",
        cgroup.display()
    );
    ensure!(
        mount.mount_path != "/sys/fs/cgroup",
        "the host cgroup root must not hide the container's own /sys/fs/cgroup"
    );
    // The host's /proc, writable for the pods' sysctls.
    let proc_root = &config.kubernetes.proc_root;
    let (mount, volume) = mount_of(pod, container, proc_root)?;
    ensure!(
        host_path(volume) == Some("/proc")
            && Path::new(&mount.mount_path) == proc_root
            && mount.read_only != Some(true),
        "kubernetes.procRoot {} must be the host's /proc, writable (pod sysctls)",
        proc_root.display()
    );
    // The CA: both files from the mesh-ca Secret, read-only, owner-only.
    for file in [&config.identity.ca_cert_file, &config.identity.ca_key_file] {
        let (mount, volume) = mount_of(pod, container, file)?;
        let secret = volume
            .secret
            .as_ref()
            .with_context(|| format!("{} must come from a Secret", file.display()))?;
        ensure!(
            secret.secret_name.as_deref() == Some("mesh-ca"),
            "the CA Secret must be mesh-ca"
        );
        ensure!(
            mount.read_only == Some(true) && secret.default_mode == Some(0o400),
            "the CA must be mounted read-only, mode 0400"
        );
        let relative = file
            .strip_prefix(&mount.mount_path)
            .context("CA file path")?
            .to_string_lossy()
            .into_owned();
        let provided = match &secret.items {
            Some(items) => items.iter().any(|i| i.path == relative),
            None => true,
        };
        ensure!(
            provided,
            "the mesh-ca volume does not provide {}",
            file.display()
        );
    }
    Ok(())
}

/// An Istio policy CRD: named and versioned as Istio's, with a structural schema that
/// describes the fields mesh-node enforces.
fn check_crd(crd: &CustomResourceDefinition) -> anyhow::Result<()> {
    let spec = &crd.spec;
    let (kind, fields): (&str, &[&str]) = match spec.names.plural.as_str() {
        "authorizationpolicies" => (
            "AuthorizationPolicy",
            &[
                "selector",
                "action",
                "rules",
                "targetRef",
                "targetRefs",
                "provider",
            ],
        ),
        "peerauthentications" => ("PeerAuthentication", &["selector", "mtls", "portLevelMtls"]),
        other => bail!("unexpected CRD {other}"),
    };
    let name = format!("{}.security.istio.io", spec.names.plural);
    ensure!(
        crd.metadata.name.as_deref() == Some(name.as_str()),
        "CRD name {:?}, expected {name}",
        crd.metadata.name
    );
    ensure!(
        spec.group == "security.istio.io"
            && spec.scope == "Namespaced"
            && spec.names.kind == kind
            && spec.names.list_kind.as_deref() == Some(format!("{kind}List").as_str())
            && spec.names.singular.as_deref() == Some(kind.to_lowercase().as_str()),
        "{name}: group, scope and names must be Istio's"
    );
    let versions: BTreeSet<&str> = spec.versions.iter().map(|v| v.name.as_str()).collect();
    ensure!(
        versions == BTreeSet::from(["v1", "v1beta1"]) && spec.versions.iter().all(|v| v.served),
        "{name}: v1 and v1beta1 must be served (as Istio): {versions:?}"
    );
    let storage: Vec<&str> = spec
        .versions
        .iter()
        .filter(|v| v.storage)
        .map(|v| v.name.as_str())
        .collect();
    ensure!(
        storage == ["v1beta1"],
        "{name}: Istio stores v1beta1 (so that installing Istio later needs no migration): {storage:?}"
    );
    for version in &spec.versions {
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .with_context(|| format!("{name} {}: no schema", version.name))?;
        check_structural(schema, &format!("{name} {}", version.name))?;
        let spec_props = schema
            .properties
            .as_ref()
            .and_then(|p| p.get("spec"))
            .and_then(|s| s.properties.as_ref())
            .with_context(|| format!("{name}: the schema must describe spec"))?;
        for field in fields {
            ensure!(
                spec_props.contains_key(*field),
                "{name} {}: the schema lacks spec.{field}",
                version.name
            );
        }
        if kind == "AuthorizationPolicy" {
            let actions = enum_of(&spec_props["action"]);
            ensure!(
                actions == ["ALLOW", "DENY", "AUDIT", "CUSTOM"],
                "{name}: action enum {actions:?}"
            );
        } else {
            let mode = spec_props["mtls"]
                .properties
                .as_ref()
                .and_then(|p| p.get("mode"))
                .context("mtls.mode")?;
            let modes = enum_of(mode);
            ensure!(
                modes == ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"],
                "{name}: mtls.mode enum {modes:?}"
            );
        }
    }
    Ok(())
}

fn enum_of(schema: &JSONSchemaProps) -> Vec<String> {
    schema
        .enum_
        .iter()
        .flatten()
        .filter_map(|v| v.0.as_str().map(str::to_owned))
        .collect()
}

/// The API server accepts only structural schemas: every node has a type (or preserves
/// unknown fields / is int-or-string), and the root is an object.
fn check_structural(schema: &JSONSchemaProps, at: &str) -> anyhow::Result<()> {
    ensure!(
        schema.type_.is_some()
            || schema.x_kubernetes_preserve_unknown_fields == Some(true)
            || schema.x_kubernetes_int_or_string == Some(true),
        "{at}: no type"
    );
    for (key, child) in schema.properties.iter().flatten() {
        check_structural(child, &format!("{at}.{key}"))?;
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &schema.items {
        check_structural(items, &format!("{at}[]"))?;
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = &schema.additional_properties {
        check_structural(values, &format!("{at}{{}}"))?;
    }
    ensure!(
        schema.type_.as_deref() != Some("array") || schema.items.is_some(),
        "{at}: an array without items"
    );
    Ok(())
}

#[test]
fn the_overlays_and_capabilities_are_the_documented_ones() {
    assert_eq!(
        overlays(),
        ["base", "default", "istio", "monitoring", "uninstall"],
        "deploy/ overlays changed: update this test, docs/operations.md and README.md"
    );
    let root = deploy_dir().parent().unwrap().to_owned();
    let operations = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    for overlay in overlays() {
        assert!(
            operations.contains(&format!("`deploy/{overlay}`")),
            "docs/operations.md does not describe deploy/{overlay}"
        );
    }
    for capability in DAEMON_CAPABILITIES {
        assert!(
            operations.contains(&format!("| `CAP_{capability}` |")),
            "docs/operations.md does not justify CAP_{capability}"
        );
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for command in [
        "kubectl apply -k deploy/default",
        "kubectl apply -k deploy/uninstall",
        "kubectl create secret generic mesh-ca",
        "mesh.io/dataplane-mode=ambient",
    ] {
        assert!(readme.contains(command), "README.md lacks `{command}`");
    }
}

#[test]
fn every_overlay_renders_parses_and_passes_its_checks() {
    for overlay in overlays() {
        let rendered = Rendered::of(&overlay);
        if let Err(e) = rendered.check() {
            panic!("deploy/{overlay}: {e:#}");
        }
    }
}

#[test]
fn the_istio_overlay_differs_from_the_base_only_in_the_label() {
    let base = Rendered::of("base").check_daemon().expect("base");
    let istio = Rendered::of("istio").check_daemon().expect("istio");
    assert_eq!(base.kubernetes.enroll_label, "mesh.io/dataplane-mode");
    assert_eq!(istio.kubernetes.enroll_label, "istio.io/dataplane-mode");
    let mut relabelled = base.clone();
    relabelled.kubernetes.enroll_label = istio.kubernetes.enroll_label.clone();
    assert_eq!(
        relabelled, istio,
        "deploy/istio/mesh-node.yaml drifted from the base's"
    );
}

#[test]
fn the_cluster_configuration_is_the_daemons_default_but_for_the_cluster_paths() {
    // Settings the manifests leave alone keep the daemon's defaults, so docs/configuration.md
    // describes the DaemonSet too.
    let config = Rendered::of("base").check_daemon().expect("base");
    let defaults = Config::parse(mesh_node::config::DEFAULT_YAML, &Origin::Embedded).unwrap();
    let mut expected = defaults.clone();
    expected.log.format = mesh_node::config::LogFormat::Json;
    expected.redirect.cgroup = Some("/host/sys/fs/cgroup".into());
    expected.kubernetes.enabled = true;
    expected.kubernetes.proc_root = "/host/proc".into();
    assert_eq!(config, expected);
}

/// The checks are not vacuous: each of these mistakes, made on the rendered default overlay,
/// is caught.
#[test]
#[expect(clippy::too_many_lines, reason = "one list of mistakes")]
fn the_checks_reject_wrong_manifests() {
    type Mutation = fn(&mut Vec<Value>);
    fn object<'a>(values: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
        values
            .iter_mut()
            .find(|v| {
                v["kind"] == kind
                    && v["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(name))
            })
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }
    fn container(values: &mut [Value]) -> &mut Value {
        &mut object(values, "DaemonSet", "mesh-node")["spec"]["template"]["spec"]["containers"][0]
    }
    fn pod(values: &mut [Value]) -> &mut Value {
        &mut object(values, "DaemonSet", "mesh-node")["spec"]["template"]["spec"]
    }
    fn config_text(values: &mut [Value], from: &str, to: &str) {
        let data = &mut object(values, "ConfigMap", "mesh-node-config")["data"][CONFIG_KEY];
        let text = data.as_str().unwrap().to_owned();
        assert!(text.contains(from), "{from}");
        *data = Value::String(text.replace(from, to));
    }
    let mutations: &[(&str, Mutation)] = &[
        ("privileged", |v| {
            container(v)["securityContext"]["privileged"] = true.into();
        }),
        ("an extra capability", |v| {
            container(v)["securityContext"]["capabilities"]["add"]
                .as_array_mut()
                .unwrap()
                .push("SYS_MODULE".into());
        }),
        ("a missing capability", |v| {
            container(v)["securityContext"]["capabilities"]["add"]
                .as_array_mut()
                .unwrap()
                .retain(|c| c != "SYS_PTRACE");
        }),
        ("no drop ALL", |v| {
            container(v)["securityContext"]["capabilities"]["drop"] = serde_json::json!([]);
        }),
        ("a writable root", |v| {
            container(v)["securityContext"]["readOnlyRootFilesystem"] = false.into();
        }),
        ("a typo in a field name", |v| {
            let sc = container(v)["securityContext"].as_object_mut().unwrap();
            let value = sc.remove("readOnlyRootFilesystem").unwrap();
            sc.insert("readOnlyRootFileSystem".into(), value);
        }),
        ("no hostPID", |v| {
            pod(v)["hostPID"] = false.into();
        }),
        ("a hostPort", |v| {
            container(v)["ports"] = serde_json::json!([{"containerPort": 15020}]);
        }),
        ("a grace period shorter than the drain", |v| {
            pod(v)["terminationGracePeriodSeconds"] = 30.into();
        }),
        ("a longer drain in the configuration", |v| {
            config_text(v, "drainTimeoutMs: 30000", "drainTimeoutMs: 60000");
        }),
        ("maxUnavailable 1", |v| {
            object(v, "DaemonSet", "mesh-node")["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] =
                1.into();
        }),
        ("the readiness probe on the metrics port", |v| {
            container(v)["readinessProbe"]["httpGet"]["port"] = 15020.into();
        }),
        ("a node name from elsewhere", |v| {
            container(v)["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] = "metadata.name".into();
        }),
        ("a read-only bpffs", |v| {
            for mount in container(v)["volumeMounts"].as_array_mut().unwrap() {
                if mount["name"] == "bpffs" {
                    mount["readOnly"] = true.into();
                }
            }
        }),
        (
            "the cgroup root at another path than the configuration's",
            |v| {
                config_text(v, "cgroup: /host/sys/fs/cgroup", "cgroup: /sys/fs/cgroup");
            },
        ),
        ("an extra hostPath", |v| {
            pod(v)["volumes"].as_array_mut().unwrap().push(
                serde_json::json!({"name": "root", "hostPath": {"path": "/", "type": "Directory"}}),
            );
        }),
        ("the Kubernetes source disabled", |v| {
            config_text(v, "enabled: true", "enabled: false");
        }),
        ("an invalid configuration", |v| {
            config_text(v, "mark: 0x539", "mark: 0");
        }),
        ("a write verb", |v| {
            object(v, "ClusterRole", "mesh-node")["rules"][0]["verbs"]
                .as_array_mut()
                .unwrap()
                .push("create".into());
        }),
        ("access to secrets", |v| {
            object(v, "ClusterRole", "mesh-node")["rules"][0]["resources"]
                .as_array_mut()
                .unwrap()
                .push("secrets".into());
        }),
        ("a resource the source reads missing", |v| {
            object(v, "ClusterRole", "mesh-node")["rules"][1]["resources"] = serde_json::json!([]);
        }),
        ("the binding to another account", |v| {
            object(v, "ClusterRoleBinding", "mesh-node")["subjects"][0]["name"] = "default".into();
        }),
        ("a CRD stored as v1", |v| {
            let crd = object(v, "CustomResourceDefinition", "peerauthentications");
            crd["spec"]["versions"][0]["storage"] = true.into();
            crd["spec"]["versions"][1]["storage"] = false.into();
        }),
        ("a CRD schema node without a type", |v| {
            let crd = object(v, "CustomResourceDefinition", "authorizationpolicies");
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"]["action"]
                .as_object_mut()
                .unwrap()
                .remove("type");
        }),
        ("an unknown kind", |v| {
            v.push(serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": NAMESPACE}}));
        }),
    ];
    let original = render("default");
    Rendered::from_values("default", &original)
        .and_then(|r| r.check())
        .expect("the unchanged rendering passes");
    for (what, mutate) in mutations {
        let mut values = original.clone();
        mutate(&mut values);
        match Rendered::from_values("default", &values).and_then(|r| r.check()) {
            Ok(()) => panic!("{what} was not caught"),
            Err(e) => eprintln!("{what}: caught: {e:#}"),
        }
    }
}
