//! `deploy/gateway`: mesh-node in the east-west gateway role, a `Deployment` of the same image
//! installed next to `deploy/default`. Checked: the configuration it mounts (parsed by the
//! daemon's own code) runs the gateway role on 15008 with the identity of the pods' service
//! account; the pods need nothing of the node (no host namespace, path or capability, not
//! root); the CA and configuration are where the configuration looks; readiness and drain as
//! the daemon's; a `LoadBalancer` `Service` of 15008 selecting them; read-only RBAC on what
//! the Kubernetes source reads, bound to their account.

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};

use super::{
    NAMESPACE, Object, READINESS_PORT, Rendered, check_host_paths, daemon, is_int, mount_of,
};

/// The gateway's `Deployment`, `ServiceAccount` and `Service`.
pub const GATEWAY: &str = "mesh-eastwestgateway";
/// The HBONE port other networks reach it on.
pub const GATEWAY_PORT: i32 = 15008;
/// The CA Secret (the daemon's).
const CA_SECRET: &str = "mesh-ca";

impl Rendered {
    fn deployment(&self, name: &str) -> anyhow::Result<&Deployment> {
        let found: Vec<&Deployment> = self.all(|o| match o {
            Object::Deployment(d) if d.metadata.name.as_deref() == Some(name) => Some(&**d),
            _ => None,
        });
        match found[..] {
            [one] => Ok(one),
            _ => bail!("expected one Deployment {name}, found {}", found.len()),
        }
    }

    /// Every check of `deploy/gateway`.
    pub(super) fn check_gateway(&self) -> anyhow::Result<()> {
        for object in &self.objects {
            let meta = object.metadata();
            ensure!(
                object.cluster_scoped() || meta.namespace.as_deref() == Some(NAMESPACE),
                "{} {} is in {:?}, not {NAMESPACE}",
                object.kind(),
                meta.name.as_deref().unwrap_or("?"),
                meta.namespace
            );
        }
        let deployment = self.deployment(GATEWAY)?;
        let spec = deployment.spec.as_ref().context("Deployment spec")?;
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let selector = spec.selector.match_labels.clone().unwrap_or_default();
        ensure!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "the selector {selector:?} must select the template's labels {labels:?}"
        );
        ensure!(
            spec.replicas.unwrap_or(1) >= 2,
            "at least 2 replicas: other networks always have a gateway to reach"
        );
        let strategy = spec.strategy.as_ref().context("strategy")?;
        let rolling = strategy.rolling_update.as_ref().context("rollingUpdate")?;
        ensure!(
            strategy.type_.as_deref() == Some("RollingUpdate")
                && is_int(rolling.max_surge.as_ref(), 1)
                && is_int(rolling.max_unavailable.as_ref(), 0),
            "strategy must be RollingUpdate with maxSurge 1, maxUnavailable 0: {strategy:?}"
        );
        let pod = spec.template.spec.as_ref().context("pod spec")?;
        ensure!(
            pod.host_network != Some(true) && pod.host_pid != Some(true),
            "the gateway needs no host namespace"
        );
        check_host_paths(pod, &[], false)?;
        let account = pod.service_account_name.as_deref();
        ensure!(
            account == Some(GATEWAY),
            "serviceAccountName {account:?}, expected {GATEWAY}"
        );
        let [container] = pod.containers.as_slice() else {
            bail!("expected one container");
        };
        daemon::check_security_context(pod, container, &[])?;
        let sc = container
            .security_context
            .as_ref()
            .context("securityContext")?;
        ensure!(
            sc.run_as_non_root == Some(true) && sc.run_as_user.is_some_and(|u| u != 0),
            "the gateway must not run as root: {sc:?}"
        );
        daemon::check_field_env(container, "MESH_NODE_NAME", "spec.nodeName")?;
        daemon::check_liveness(container, pod)?;
        self.check_gateway_config(pod, container)?;
        self.check_read_only_role(Some(GATEWAY), deployment.metadata.namespace.as_deref())?;
        self.check_gateway_service(&labels)
    }

    /// The mounted configuration runs the gateway role, with the service account's identity,
    /// its CA where the configuration looks, readiness on 15021 and a drain within the
    /// termination grace period.
    fn check_gateway_config(
        &self,
        pod: &k8s_openapi::api::core::v1::PodSpec,
        container: &k8s_openapi::api::core::v1::Container,
    ) -> anyhow::Result<()> {
        let config = self.mounted_config(pod, container)?;
        let gateway = &config.gateway;
        ensure!(gateway.enabled, "gateway.enabled must be true");
        ensure!(
            i32::from(gateway.listen.port()) == GATEWAY_PORT
                && gateway.listen.ip().is_unspecified(),
            "gateway.listen {} must be every address, port {GATEWAY_PORT}",
            gateway.listen
        );
        ensure!(
            gateway.namespace == NAMESPACE && gateway.service_account == GATEWAY,
            "the gateway's identity ({}/{}) must be its pods' service account {NAMESPACE}/{GATEWAY}",
            gateway.namespace,
            gateway.service_account
        );
        ensure!(
            config.kubernetes.enabled && !config.istio.enabled,
            "the gateway reads its state from the API server (kubernetes.enabled)"
        );
        for file in [&config.identity.ca_cert_file, &config.identity.ca_key_file] {
            let (_, volume) = mount_of(pod, container, file)?;
            let secret = volume.secret.as_ref().map(|s| s.secret_name.as_deref());
            ensure!(
                secret == Some(Some(CA_SECRET)),
                "{} must be on the Secret {CA_SECRET}",
                file.display()
            );
        }
        let probe = container
            .readiness_probe
            .as_ref()
            .context("a readiness probe")?;
        let get = probe.http_get.as_ref().context("an HTTP readiness probe")?;
        ensure!(
            get.path.as_deref() == Some("/healthz/ready")
                && get.port
                    == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                        READINESS_PORT
                    ),
            "the readiness probe must be GET :15021/healthz/ready: {get:?}"
        );
        let grace = pod.termination_grace_period_seconds.unwrap_or(30);
        ensure!(
            u64::try_from(grace).unwrap_or(0) * 1000 > config.proxy.drain_timeout_ms,
            "terminationGracePeriodSeconds ({grace} s) must exceed proxy.drainTimeoutMs ({} ms)",
            config.proxy.drain_timeout_ms
        );
        Ok(())
    }

    /// One `LoadBalancer` `Service` of 15008 that selects the gateway's pods.
    fn check_gateway_service(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let services: Vec<&Service> = self.all(|o| match o {
            Object::Service(s) => Some(&**s),
            _ => None,
        });
        let [service] = services[..] else {
            bail!("expected one Service, found {}", services.len());
        };
        let spec = service.spec.as_ref().context("Service spec")?;
        ensure!(
            spec.type_.as_deref() == Some("LoadBalancer"),
            "the gateway's Service must be a LoadBalancer (other networks reach it from outside)"
        );
        let selector = spec.selector.clone().unwrap_or_default();
        ensure!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "the Service must select the gateway's pods: {selector:?}"
        );
        let ports = spec.ports.clone().unwrap_or_default();
        let [port] = &ports[..] else {
            bail!("expected one port, found {}", ports.len());
        };
        ensure!(
            port.port == GATEWAY_PORT
                && is_int(port.target_port.as_ref(), GATEWAY_PORT)
                && port.protocol.as_deref().is_none_or(|p| p == "TCP"),
            "the Service must expose TCP {GATEWAY_PORT} to the pods' {GATEWAY_PORT}: {port:?}"
        );
        Ok(())
    }
}
