//! Cluster-wide objects of the overlays: RBAC, the metrics `Service` and `ServiceMonitor`, and
//! the CRDs (Istio's policy and networking kinds, the Gateway API's `TCPRoute`, mesh-node's
//! `FaultInjection`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::core::v1::Service,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};

use super::{DAEMON, METRICS_PORT, Object, Rendered};

/// A prometheus-operator `ServiceMonitor` (monitoring.coreos.com/v1): the fields the overlay
/// uses, and no other.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ServiceMonitor {
    api_version: String,
    kind: String,
    pub(super) metadata: ObjectMeta,
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

impl Rendered {
    /// Read-only access to exactly what the Kubernetes source reads, bound to the daemon's
    /// service account; with istiod, no access at all.
    pub(super) fn check_rbac(&self) -> anyhow::Result<()> {
        if !self.istio() {
            let ds = self.daemonset(DAEMON)?;
            let account = ds
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.service_account_name.clone());
            return self.check_read_only_role(account.as_deref(), ds.metadata.namespace.as_deref());
        }
        let rbac: Vec<&str> = self
            .objects
            .iter()
            .filter(|o| matches!(o, Object::ClusterRole(_) | Object::ClusterRoleBinding(_)))
            .map(|o| o.metadata().name.as_deref().unwrap_or("?"))
            .collect();
        ensure!(
            rbac.is_empty(),
            "with istiod the daemon reads nothing from the API server: no RBAC, found {rbac:?}"
        );
        Ok(())
    }

    /// One read-only `ClusterRole` granting exactly what the Kubernetes source reads, bound to
    /// the service account `account` of `namespace` (the pods' that run the source).
    pub(super) fn check_read_only_role(
        &self,
        account: Option<&str>,
        namespace: Option<&str>,
    ) -> anyhow::Result<()> {
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
            ("networking.istio.io", "virtualservices", &list_watch),
            ("networking.istio.io", "destinationrules", &list_watch),
            ("networking.istio.io", "workloadentries", &list_watch),
            ("gateway.networking.k8s.io", "tcproutes", &list_watch),
            ("mesh.io", "faultinjections", &list_watch),
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
        let subjects = binding.subjects.clone().unwrap_or_default();
        let [subject] = &subjects[..] else {
            bail!("expected one subject, found {}", subjects.len());
        };
        ensure!(
            subject.kind == "ServiceAccount"
                && Some(subject.name.as_str()) == account
                && subject.namespace.as_deref() == namespace,
            "the binding's subject {subject:?} must be the pods' service account"
        );
        Ok(())
    }

    /// The headless Service that selects the daemons' pods on the metrics port.
    pub(super) fn metrics_service(&self) -> anyhow::Result<&Service> {
        let services = self.all(|o| match o {
            Object::Service(s) => Some(s),
            _ => None,
        });
        let [service] = services[..] else {
            bail!("expected one Service, found {}", services.len());
        };
        Ok(service)
    }

    pub(super) fn check_metrics_service(&self) -> anyhow::Result<()> {
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

    pub(super) fn check_service_monitor(&self, monitor: &ServiceMonitor) -> anyhow::Result<()> {
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
}

/// What a CRD of the overlays must be.
struct ExpectedCrd {
    group: &'static str,
    kind: &'static str,
    /// Every version served; the daemon lists `listed`.
    versions: &'static [&'static str],
    storage: &'static str,
    listed: &'static str,
    /// The spec fields the schema describes; `None`: the spec is left open
    /// (`x-kubernetes-preserve-unknown-fields`), the daemon checks each object itself.
    fields: Option<&'static [&'static str]>,
}

fn expected_crd(plural: &str) -> Option<ExpectedCrd> {
    // Istio's CRDs keep their storage version (v1beta1 for security, v1alpha3 for networking),
    // so that installing Istio later needs no migration; the daemon lists v1.
    let istio_networking = |kind| ExpectedCrd {
        group: "networking.istio.io",
        kind,
        versions: &["v1", "v1alpha3", "v1beta1"],
        storage: "v1alpha3",
        listed: "v1",
        fields: None,
    };
    Some(match plural {
        "authorizationpolicies" => ExpectedCrd {
            group: "security.istio.io",
            kind: "AuthorizationPolicy",
            versions: &["v1", "v1beta1"],
            storage: "v1beta1",
            listed: "v1",
            fields: Some(&[
                "selector",
                "action",
                "rules",
                "targetRef",
                "targetRefs",
                "provider",
            ]),
        },
        "peerauthentications" => ExpectedCrd {
            group: "security.istio.io",
            kind: "PeerAuthentication",
            versions: &["v1", "v1beta1"],
            storage: "v1beta1",
            listed: "v1",
            fields: Some(&["selector", "mtls", "portLevelMtls"]),
        },
        "virtualservices" => istio_networking("VirtualService"),
        "destinationrules" => istio_networking("DestinationRule"),
        "workloadentries" => istio_networking("WorkloadEntry"),
        "tcproutes" => ExpectedCrd {
            group: "gateway.networking.k8s.io",
            kind: "TCPRoute",
            versions: &["v1alpha2"],
            storage: "v1alpha2",
            listed: "v1alpha2",
            fields: None,
        },
        "faultinjections" => ExpectedCrd {
            group: "mesh.io",
            kind: "FaultInjection",
            versions: &["v1alpha1"],
            storage: "v1alpha1",
            listed: "v1alpha1",
            fields: Some(&["targetRefs", "sources", "abort", "delay"]),
        },
        _ => return None,
    })
}

/// A CRD: named and versioned as its project's (Istio, the Gateway API, mesh-node), serving
/// the version the daemon lists, with a structural schema that describes the fields mesh-node
/// reads or leaves the spec open.
pub(super) fn check_crd(crd: &CustomResourceDefinition) -> anyhow::Result<()> {
    let spec = &crd.spec;
    let plural = spec.names.plural.as_str();
    let expected = expected_crd(plural).with_context(|| format!("unexpected CRD {plural}"))?;
    let kind = expected.kind;
    let name = format!("{plural}.{}", expected.group);
    ensure!(
        crd.metadata.name.as_deref() == Some(name.as_str()),
        "CRD name {:?}, expected {name}",
        crd.metadata.name
    );
    ensure!(
        spec.group == expected.group
            && spec.scope == "Namespaced"
            && spec.names.kind == kind
            && spec.names.list_kind.as_deref() == Some(format!("{kind}List").as_str())
            && spec.names.singular.as_deref() == Some(kind.to_lowercase().as_str()),
        "{name}: group, scope and names must be its project's"
    );
    if expected.group.ends_with(".k8s.io") {
        ensure!(
            crd.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("api-approved.kubernetes.io")),
            "{name}: a CRD in a *.k8s.io group needs api-approved.kubernetes.io (the API server \
             rejects it without)"
        );
    }
    let versions: BTreeSet<&str> = spec.versions.iter().map(|v| v.name.as_str()).collect();
    ensure!(
        versions == expected.versions.iter().copied().collect()
            && spec.versions.iter().all(|v| v.served),
        "{name}: {:?} must be served (as its project does): {versions:?}",
        expected.versions
    );
    ensure!(
        versions.contains(expected.listed),
        "{name}: the daemon lists {}",
        expected.listed
    );
    let storage: Vec<&str> = spec
        .versions
        .iter()
        .filter(|v| v.storage)
        .map(|v| v.name.as_str())
        .collect();
    ensure!(
        storage == [expected.storage],
        "{name}: its project stores {} (so that installing it later needs no migration): {storage:?}",
        expected.storage
    );
    for version in &spec.versions {
        let at = format!("{name} {}", version.name);
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .with_context(|| format!("{at}: no schema"))?;
        check_structural(schema, &at)?;
        let spec_schema = schema
            .properties
            .as_ref()
            .and_then(|p| p.get("spec"))
            .with_context(|| format!("{at}: the schema must describe spec"))?;
        let Some(fields) = expected.fields else {
            ensure!(
                spec_schema.x_kubernetes_preserve_unknown_fields == Some(true),
                "{at}: spec must be left open (x-kubernetes-preserve-unknown-fields)"
            );
            continue;
        };
        let spec_props = spec_schema
            .properties
            .as_ref()
            .with_context(|| format!("{at}: the schema must describe spec's fields"))?;
        for field in fields {
            ensure!(
                spec_props.contains_key(*field),
                "{at}: the schema lacks spec.{field}"
            );
        }
        match kind {
            "AuthorizationPolicy" => {
                let actions = enum_of(&spec_props["action"]);
                ensure!(
                    actions == ["ALLOW", "DENY", "AUDIT", "CUSTOM"],
                    "{name}: action enum {actions:?}"
                );
            }
            "PeerAuthentication" => {
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
            _ => check_fault_schema(spec_props, &at)?,
        }
    }
    Ok(())
}

/// `FaultInjection`'s schema has exactly the fields of its spec in mesh-node's model
/// (`mesh-node/src/traffic/model.rs`), nothing the daemon would reject as unknown.
fn check_fault_schema(spec: &BTreeMap<String, JSONSchemaProps>, at: &str) -> anyhow::Result<()> {
    let fields = |schema: &JSONSchemaProps| -> BTreeSet<String> {
        let schema = match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(items)) => items,
            _ => schema,
        };
        schema
            .properties
            .iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect()
    };
    for (field, expected) in [
        ("targetRefs", &["group", "kind", "name", "port"][..]),
        ("sources", &["labels", "namespace", "serviceAccount"]),
        ("abort", &["percentage"]),
        ("delay", &["fixedDelay", "percentage"]),
    ] {
        let found = fields(&spec[field]);
        let expected: BTreeSet<String> = expected.iter().map(|f| (*f).to_owned()).collect();
        ensure!(
            found == expected,
            "{at}: spec.{field} has {found:?}, the model {expected:?}"
        );
    }
    ensure!(
        spec.len() == 4,
        "{at}: spec has fields the model does not: {:?}",
        spec.keys().collect::<Vec<_>>()
    );
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
