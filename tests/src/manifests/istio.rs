//! What `deploy/istio` needs in ztunnel's place, beside the base's checks: the pod's name,
//! namespace and address for its node id, the projected token (audience `istio-ca`) where
//! `istio.tokenFile` points and istiod's root certificate where `istio.rootCertFile` points,
//! both kept current by the kubelet; no Secret (no local CA); a pod never enrolled itself.

use std::path::Path;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec, VolumeMount};
use mesh_node::config::{Config, ENV_INSTANCE_IP, ENV_POD_NAME, ENV_POD_NAMESPACE};

use super::{
    ISTIO_AUDIENCE, ISTIO_ROOT_CONFIG_MAP, ISTIO_ROOT_KEY, daemon::check_field_env, mount_of,
};

/// ztunnel's token lifetime (12 h); the kubelet renews it at 80 %.
const TOKEN_EXPIRATION_SECONDS: i64 = 43_200;

pub(super) fn check_pod(
    template: &PodTemplateSpec,
    pod: &PodSpec,
    container: &Container,
    config: &Config,
) -> anyhow::Result<()> {
    for (name, field) in [
        (ENV_POD_NAME, "metadata.name"),
        (ENV_POD_NAMESPACE, "metadata.namespace"),
        (ENV_INSTANCE_IP, "status.podIP"),
    ] {
        check_field_env(container, name, field)?;
    }
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    ensure!(
        labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("none"),
        "the daemon's pods must carry istio.io/dataplane-mode=none (never enrolled themselves)"
    );
    if let Some(secret) = pod.volumes.iter().flatten().find(|v| v.secret.is_some()) {
        bail!(
            "volume {}: no Secret with istiod (its CA signs; the local CA is unused)",
            secret.name
        );
    }

    // The bearer token istiod checks: the pod's service account, for istiod's audience.
    let token_file = &config.istio.token_file;
    let (mount, volume) = mount_of(pod, container, token_file)?;
    check_live_mount(mount, token_file, "istio.tokenFile")?;
    let sources = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.clone())
        .unwrap_or_default();
    let [source] = &sources[..] else {
        bail!(
            "istio.tokenFile {} must be on a projected volume of one service-account token",
            token_file.display()
        );
    };
    let token = source
        .service_account_token
        .as_ref()
        .with_context(|| format!("{}: not a service-account token", volume.name))?;
    ensure!(
        token.audience.as_deref() == Some(ISTIO_AUDIENCE),
        "the token's audience must be {ISTIO_AUDIENCE} (istiod refuses others): {:?}",
        token.audience
    );
    ensure!(
        token.expiration_seconds == Some(TOKEN_EXPIRATION_SECONDS),
        "the token's expirationSeconds must be {TOKEN_EXPIRATION_SECONDS} (ztunnel's): {:?}",
        token.expiration_seconds
    );
    ensure!(
        Some(Path::new(&token.path)) == relative(token_file, mount),
        "the token is at {}/{}, istio.tokenFile is {}",
        mount.mount_path,
        token.path,
        token_file.display()
    );

    // istiod's root certificate: the ConfigMap istiod publishes in every namespace.
    let root_file = &config.istio.root_cert_file;
    let (mount, volume) = mount_of(pod, container, root_file)?;
    check_live_mount(mount, root_file, "istio.rootCertFile")?;
    let map = volume.config_map.as_ref().with_context(|| {
        format!(
            "istio.rootCertFile {} must come from the ConfigMap {ISTIO_ROOT_CONFIG_MAP}",
            root_file.display()
        )
    })?;
    ensure!(
        map.name == ISTIO_ROOT_CONFIG_MAP,
        "istio.rootCertFile must come from the ConfigMap {ISTIO_ROOT_CONFIG_MAP}, not {}",
        map.name
    );
    ensure!(
        map.optional != Some(true),
        "{ISTIO_ROOT_CONFIG_MAP} must not be optional (the daemon cannot reach istiod without)"
    );
    let relative = relative(root_file, mount).context("istio.rootCertFile path")?;
    let provided = match &map.items {
        Some(items) => items
            .iter()
            .any(|i| i.key == ISTIO_ROOT_KEY && Path::new(&i.path) == relative),
        None => relative == Path::new(ISTIO_ROOT_KEY),
    };
    ensure!(
        provided,
        "{ISTIO_ROOT_CONFIG_MAP}'s {ISTIO_ROOT_KEY} is not at istio.rootCertFile {}",
        root_file.display()
    );
    Ok(())
}

/// A read-only mount of a directory the kubelet keeps current (a `subPath` mount never sees
/// the renewed token or a new root).
fn check_live_mount(mount: &VolumeMount, file: &Path, field: &str) -> anyhow::Result<()> {
    ensure!(
        mount.read_only == Some(true),
        "{field} {}: the mount must be read-only",
        file.display()
    );
    ensure!(
        mount.sub_path.is_none() && mount.sub_path_expr.is_none(),
        "{field} {}: no subPath (it would never be updated)",
        file.display()
    );
    Ok(())
}

fn relative<'a>(file: &'a Path, mount: &VolumeMount) -> Option<&'a Path> {
    file.strip_prefix(&mount.mount_path).ok()
}
