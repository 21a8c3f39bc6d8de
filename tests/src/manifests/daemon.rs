//! The daemon's `DaemonSet` (and the uninstall one): pod and container settings, security
//! context, probes, and the mounts the embedded configuration names (`istio.rs` has what the
//! `istio:` mode needs instead of the CA Secret and the API token).

use std::{collections::BTreeSet, path::Path};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::core::v1::{Container, PodSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};
use mesh_node::config::Config;

use super::{
    DAEMON, DAEMON_CAPABILITIES, ISTIO_ACCOUNT, METRICS_PORT, Object, READINESS_PORT, Rendered,
    check_host_paths, check_tolerates_everything, host_path, is_int, istio, mount_of,
};

impl Rendered {
    /// The daemon's `DaemonSet`; returns the configuration it runs with.
    #[expect(
        clippy::too_many_lines,
        reason = "one checklist, in the order of docs/operations.md"
    )]
    pub fn check_daemon(&self) -> anyhow::Result<Config> {
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
        ensure!(
            pod.host_network != Some(true),
            "hostNetwork must not be set: the data path is in the pods' namespaces, and the \
             daemon's own endpoints and API client need no more than the pod's own"
        );
        ensure!(pod.host_pid == Some(true), "hostPID must be true");
        ensure!(
            pod.dns_policy
                .as_deref()
                .is_none_or(|p| p == "ClusterFirst"),
            "dnsPolicy must be the default (ClusterFirst): {:?}",
            pod.dns_policy
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
        let expected_account = if self.istio() { ISTIO_ACCOUNT } else { DAEMON };
        ensure!(
            account == expected_account,
            "serviceAccountName {account}, expected {expected_account}"
        );
        if self.istio() {
            ensure!(
                pod.automount_service_account_token == Some(false),
                "with istiod the daemon reads nothing from the API server: \
                 automountServiceAccountToken must be false"
            );
        } else {
            ensure!(
                pod.automount_service_account_token != Some(false),
                "the daemon needs its service account token (in-cluster API access)"
            );
        }
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
        check_host_paths(
            pod,
            &["/sys/fs/bpf", "/sys/fs/cgroup", "/proc"],
            self.istio(),
        )?;

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
        let ports = container.ports.clone().unwrap_or_default();
        ensure!(
            ports
                .iter()
                .all(|p| p.host_port.is_none() && p.host_ip.is_none()),
            "no hostPort: the old pod's would keep the surge pod of a rolling update from being \
             scheduled: {ports:?}"
        );
        for (name, port) in [("metrics", METRICS_PORT), ("health", READINESS_PORT)] {
            ensure!(
                ports
                    .iter()
                    .any(|p| p.name.as_deref() == Some(name) && p.container_port == port),
                "the container must declare port {name} ({port}): {ports:?}"
            );
        }
        check_field_env(container, mesh_node::config::ENV_NODE_NAME, "spec.nodeName")?;

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
        check_liveness(container, pod)?;

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
        if self.istio() {
            ensure!(config.istio.enabled, "istio.enabled must be true");
            ensure!(
                !config.kubernetes.enabled,
                "kubernetes.enabled must be false (istiod is the state source)"
            );
            istio::check_pod(&spec.template, pod, container, &config)?;
        } else {
            ensure!(config.kubernetes.enabled, "kubernetes.enabled must be true");
            ensure!(!config.istio.enabled, "istio.enabled must be false");
            ensure!(
                config.kubernetes.kubeconfig.is_none(),
                "the daemon uses its in-cluster service account, not a kubeconfig"
            );
        }
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

        check_security_context(pod, container, DAEMON_CAPABILITIES)?;
        check_daemon_mounts(pod, container, &config, self.istio())?;
        Ok(config)
    }

    /// `mesh-node cleanup` on every node with the daemon's bpffs, and nothing of the daemon.
    pub(super) fn check_uninstall(&self) -> anyhow::Result<()> {
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
        check_host_paths(pod, &["/sys/fs/bpf"], false)?;
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
        check_security_context(pod, cleanup, &[])?;
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
            check_security_context(pod, container, &[])?;
            ensure!(
                container.volume_mounts.as_ref().is_none_or(Vec::is_empty),
                "the idle container needs no mounts"
            );
        }
        Ok(())
    }
}

/// A liveness probe that a daemon that is merely not ready passes (`/healthz/live`, not the
/// readiness path) and whose failures take longer than the termination grace period (the
/// health port closes when a draining daemon gets SIGTERM).
pub(super) fn check_liveness(container: &Container, pod: &PodSpec) -> anyhow::Result<()> {
    let probe = container
        .liveness_probe
        .as_ref()
        .context("a liveness probe")?;
    let get = probe.http_get.as_ref().context("an HTTP liveness probe")?;
    ensure!(
        get.path.as_deref() == Some("/healthz/live")
            && get.port == IntOrString::Int(READINESS_PORT),
        "the liveness probe must be GET :15021/healthz/live (not the readiness path: a daemon \
         waiting for the API server must not be restarted): {get:?}"
    );
    let period = i64::from(probe.period_seconds.unwrap_or(10));
    let failures = i64::from(probe.failure_threshold.unwrap_or(3));
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    ensure!(
        period * failures > grace,
        "liveness failures ({failures} x {period} s) must outlast terminationGracePeriodSeconds \
         ({grace} s), or a kubelet probing a draining daemon could kill it early"
    );
    Ok(())
}

/// Not privileged, no privilege escalation, the runtime's default seccomp profile (the
/// container's, or the pod's), a read-only root, every capability dropped but exactly `add`,
/// spelled without `CAP_` (the API server refuses `allowPrivilegeEscalation: false` next to
/// `CAP_SYS_ADMIN`).
pub(super) fn check_security_context(
    pod: &PodSpec,
    container: &Container,
    add: &[&str],
) -> anyhow::Result<()> {
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
    ensure!(
        sc.allow_privilege_escalation == Some(false),
        "{name}: allowPrivilegeEscalation must be false"
    );
    let seccomp = sc.seccomp_profile.as_ref().or_else(|| {
        pod.security_context
            .as_ref()
            .and_then(|p| p.seccomp_profile.as_ref())
    });
    ensure!(
        seccomp.is_some_and(|p| p.type_ == "RuntimeDefault" && p.localhost_profile.is_none()),
        "{name}: seccompProfile must be RuntimeDefault: {seccomp:?}"
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
        "{name}: capabilities {added:?}, expected exactly {expected:?} (without `CAP_`)"
    );
    ensure!(
        sc.proc_mount.is_none() && sc.windows_options.is_none(),
        "{name}: unexpected procMount/windowsOptions"
    );
    Ok(())
}

/// `name` in the container's environment, from the downward API's `field` (and only from it).
pub(super) fn check_field_env(
    container: &Container,
    name: &str,
    field: &str,
) -> anyhow::Result<()> {
    let var = container
        .env
        .as_ref()
        .and_then(|env| env.iter().find(|e| e.name == name))
        .with_context(|| format!("no {name} in env"))?;
    let from = var
        .value_from
        .as_ref()
        .and_then(|f| f.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    ensure!(
        var.value.is_none() && from == Some(field),
        "{name} must come from {field}"
    );
    Ok(())
}

/// Every path the configuration names is on the right volume (the CA's only without istiod:
/// `istio::check_pod` checks its token and root certificate).
fn check_daemon_mounts(
    pod: &PodSpec,
    container: &Container,
    config: &Config,
    istio: bool,
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
    let (field, proc_root) = if istio {
        ("istio.procRoot", &config.istio.proc_root)
    } else {
        ("kubernetes.procRoot", &config.kubernetes.proc_root)
    };
    let (mount, volume) = mount_of(pod, container, proc_root)?;
    ensure!(
        host_path(volume) == Some("/proc")
            && Path::new(&mount.mount_path) == proc_root
            && mount.read_only != Some(true),
        "{field} {} must be the host's /proc, writable (pod sysctls)",
        proc_root.display()
    );
    if istio {
        return Ok(());
    }
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
