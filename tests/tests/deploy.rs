//! The Kubernetes manifests under `deploy/` against what `docs/operations.md` says, with the
//! checks of `mesh_tests::manifests`: every overlay renders, parses into its Kubernetes types
//! and passes its checks, and the checks catch deliberately wrong renderings.
//!
//! Not a namespaced test: it needs `kubectl` (`cargo xtask setup` checks for it) and nothing
//! else, and `cargo xtask test` does not count it among the namespaced ones.

use mesh_node::config::{Config, IstioConfig, KubernetesConfig, Origin};
use mesh_tests::manifests::{
    CONFIG_KEY, DAEMON_CAPABILITIES, ISTIO_NAMESPACE, NAMESPACE, Rendered, deploy_dir, overlays,
    render,
};
use serde_json::Value;

/// A mistake made on a rendering.
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

fn pod(values: &mut [Value]) -> &mut Value {
    &mut object(values, "DaemonSet", "mesh-node")["spec"]["template"]["spec"]
}

fn container(values: &mut [Value]) -> &mut Value {
    &mut pod(values)["containers"][0]
}

/// The pod's volume or the container's mount called `name`.
fn named<'a>(list: &'a mut Value, name: &str) -> &'a mut Value {
    list.as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name}"))
}

fn config_text(values: &mut [Value], from: &str, to: &str) {
    let data = &mut object(values, "ConfigMap", "mesh-node-config")["data"][CONFIG_KEY];
    let text = data.as_str().unwrap().to_owned();
    assert!(text.contains(from), "{from}");
    *data = Value::String(text.replace(from, to));
}

/// Each mistake, made on the rendering of `overlay` (which passes unchanged), is caught.
fn assert_caught(overlay: &str, mutations: &[(&str, Mutation)]) {
    let original = render(overlay);
    Rendered::from_values(overlay, &original)
        .and_then(|r| r.check())
        .expect("the unchanged rendering passes");
    for (what, mutate) in mutations {
        let mut values = original.clone();
        mutate(&mut values);
        match Rendered::from_values(overlay, &values).and_then(|r| r.check()) {
            Ok(()) => panic!("deploy/{overlay}: {what} was not caught"),
            Err(e) => eprintln!("deploy/{overlay}: {what}: caught: {e:#}"),
        }
    }
}

#[test]
fn the_overlays_and_capabilities_are_the_documented_ones() {
    assert_eq!(
        overlays(),
        [
            "base",
            "default",
            "gateway",
            "istio",
            "monitoring",
            "uninstall"
        ],
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
fn the_istio_overlay_is_the_base_with_istiod_as_its_source() {
    // The differences deploy/istio/kustomization.yaml documents: istiod on, the Kubernetes
    // source off (its other settings unused, left to their defaults), the local CA unnamed
    // (its paths are unused; their defaults stay). Everything else is the base's.
    let base = Rendered::of("base").check_daemon().expect("base");
    let istio = Rendered::of("istio").check_daemon().expect("istio");
    let mut expected = base.clone();
    expected.kubernetes = KubernetesConfig::default();
    expected.istio = IstioConfig {
        enabled: true,
        proc_root: base.kubernetes.proc_root.clone(),
        ..IstioConfig::default()
    };
    assert_eq!(
        istio, expected,
        "deploy/istio/mesh-node.yaml drifted from the base's"
    );
    // What the DaemonSet and docs/operations.md rely on, spelled out (not just the defaults).
    let settings = &istio.istio;
    assert_eq!(settings.address, "https://istiod.istio-system.svc:15012");
    assert_eq!(settings.istiod_san(), "istiod.istio-system.svc");
    assert_eq!(settings.cluster_id, "Kubernetes");
    assert_eq!(
        settings.token_file.to_str(),
        Some("/var/run/secrets/tokens/istio-token")
    );
    assert_eq!(
        settings.root_cert_file.to_str(),
        Some("/var/run/secrets/istio/root-cert.pem")
    );
    assert_eq!(settings.proc_root.to_str(), Some("/host/proc"));
    assert!(!istio.kubernetes.enabled);
    // The pod's name, namespace and address come from the environment (the DaemonSet's).
    assert!(settings.pod_name.is_empty() && settings.pod_namespace.is_empty());
    assert_eq!(settings.pod_ip, None);
}

/// The istio overlay's own requirements are checked: each of these mistakes, made on its
/// rendering, is caught.
#[test]
#[expect(clippy::too_many_lines, reason = "one list of mistakes")]
fn the_istio_checks_reject_wrong_manifests() {
    fn token(values: &mut [Value]) -> &mut Value {
        &mut named(&mut pod(values)["volumes"], "istio-token")["projected"]["sources"][0]["serviceAccountToken"]
    }
    let mutations: &[(&str, Mutation)] = &[
        ("a token for another audience", |v| {
            token(v)["audience"] = "kubernetes.default.svc".into();
        }),
        ("a token without an audience", |v| {
            token(v).as_object_mut().unwrap().remove("audience");
        }),
        ("a token with another lifetime", |v| {
            token(v)["expirationSeconds"] = 3_600.into();
        }),
        ("the token at another path than istio.tokenFile", |v| {
            token(v)["path"] = "token".into();
        }),
        ("istio.tokenFile elsewhere", |v| {
            config_text(
                v,
                "tokenFile: /var/run/secrets/tokens/istio-token",
                "tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token",
            );
        }),
        ("no token mount", |v| {
            container(v)["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .retain(|m| m["name"] != "istio-token");
        }),
        ("a writable token mount", |v| {
            named(&mut container(v)["volumeMounts"], "istio-token")["readOnly"] = false.into();
        }),
        ("no root certificate mount", |v| {
            container(v)["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .retain(|m| m["name"] != "istiod-ca-cert");
        }),
        ("the root certificate from another ConfigMap", |v| {
            named(&mut pod(v)["volumes"], "istiod-ca-cert")["configMap"]["name"] =
                "istio-root".into();
        }),
        ("an optional root certificate", |v| {
            named(&mut pod(v)["volumes"], "istiod-ca-cert")["configMap"]["optional"] = true.into();
        }),
        ("istio.rootCertFile elsewhere", |v| {
            config_text(
                v,
                "rootCertFile: /var/run/secrets/istio/root-cert.pem",
                "rootCertFile: /var/run/secrets/istio/ca.crt",
            );
        }),
        ("the root certificate through a subPath", |v| {
            let mount = named(&mut container(v)["volumeMounts"], "istiod-ca-cert");
            mount["mountPath"] = "/var/run/secrets/istio/root-cert.pem".into();
            mount["subPath"] = "root-cert.pem".into();
        }),
        ("the CA Secret back", |v| {
            pod(v)["volumes"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "name": "ca", "secret": {"secretName": "mesh-ca", "defaultMode": 0o400}
                }));
        }),
        ("the API token mounted", |v| {
            pod(v)["automountServiceAccountToken"] = true.into();
        }),
        ("the base's service account", |v| {
            pod(v)["serviceAccountName"] = "mesh-node".into();
            object(v, "ServiceAccount", "ztunnel")["metadata"]["name"] = "mesh-node".into();
        }),
        ("no POD_NAME", |v| {
            container(v)["env"]
                .as_array_mut()
                .unwrap()
                .retain(|e| e["name"] != "POD_NAME");
        }),
        ("POD_NAMESPACE from another field", |v| {
            named(&mut container(v)["env"], "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"] =
                "metadata.name".into();
        }),
        ("INSTANCE_IP from the host's address", |v| {
            named(&mut container(v)["env"], "INSTANCE_IP")["valueFrom"]["fieldRef"]["fieldPath"] =
                "status.hostIP".into();
        }),
        ("no MESH_NODE_NAME", |v| {
            container(v)["env"]
                .as_array_mut()
                .unwrap()
                .retain(|e| e["name"] != "MESH_NODE_NAME");
        }),
        ("a daemon pod that could be enrolled", |v| {
            object(v, "DaemonSet", "mesh-node")["spec"]["template"]["metadata"]["labels"]
                .as_object_mut()
                .unwrap()
                .remove("istio.io/dataplane-mode");
        }),
        ("istiod off", |v| {
            config_text(v, "istio:\n  enabled: true", "istio:\n  enabled: false");
        }),
        ("istio.procRoot not the host's /proc", |v| {
            config_text(v, "procRoot: /host/proc", "procRoot: /proc");
        }),
        ("a ClusterRole", |v| {
            v.push(serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "mesh-node"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
            }));
        }),
        ("the namespace created", |v| {
            v.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ISTIO_NAMESPACE}
            }));
        }),
        ("objects in mesh-system", |v| {
            for value in v.iter_mut() {
                value["metadata"]["namespace"] = NAMESPACE.into();
            }
        }),
    ];
    assert_caught("istio", mutations);
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
            container(v)["ports"][0]["hostPort"] = 15020.into();
        }),
        ("hostNetwork", |v| {
            pod(v)["hostNetwork"] = true.into();
        }),
        ("no metrics port", |v| {
            container(v)["ports"].as_array_mut().unwrap().remove(0);
        }),
        ("no allowPrivilegeEscalation", |v| {
            container(v)["securityContext"]
                .as_object_mut()
                .unwrap()
                .remove("allowPrivilegeEscalation");
        }),
        ("allowPrivilegeEscalation true", |v| {
            container(v)["securityContext"]["allowPrivilegeEscalation"] = true.into();
        }),
        ("a capability spelled CAP_SYS_ADMIN", |v| {
            for cap in container(v)["securityContext"]["capabilities"]["add"]
                .as_array_mut()
                .unwrap()
            {
                if cap == "SYS_ADMIN" {
                    *cap = "CAP_SYS_ADMIN".into();
                }
            }
        }),
        ("no seccomp profile", |v| {
            container(v)["securityContext"]
                .as_object_mut()
                .unwrap()
                .remove("seccompProfile");
        }),
        ("an unconfined seccomp profile", |v| {
            container(v)["securityContext"]["seccompProfile"]["type"] = "Unconfined".into();
        }),
        ("no liveness probe", |v| {
            container(v)
                .as_object_mut()
                .unwrap()
                .remove("livenessProbe");
        }),
        ("the liveness probe on the readiness path", |v| {
            container(v)["livenessProbe"]["httpGet"]["path"] = "/healthz/ready".into();
        }),
        (
            "a liveness probe that gives up within the grace period",
            |v| {
                container(v)["livenessProbe"]["failureThreshold"] = 3.into();
            },
        ),
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
        ("no access to the traffic kinds", |v| {
            object(v, "ClusterRole", "mesh-node")["rules"]
                .as_array_mut()
                .unwrap()
                .retain(|r| r["apiGroups"][0] != "mesh.io");
        }),
        ("a FaultInjection schema without delay.fixedDelay", |v| {
            let crd = object(v, "CustomResourceDefinition", "faultinjections");
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"]["delay"]["properties"]
                .as_object_mut()
                .unwrap()
                .remove("fixedDelay");
        }),
        ("a FaultInjection schema field the daemon rejects", |v| {
            let crd = object(v, "CustomResourceDefinition", "faultinjections");
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["abort"]["properties"]["httpStatus"] = serde_json::json!({"type": "integer"});
        }),
        ("a TCPRoute CRD without the version the daemon lists", |v| {
            let crd = object(v, "CustomResourceDefinition", "tcproutes");
            crd["spec"]["versions"][0]["name"] = "v1".into();
        }),
        ("a TCPRoute CRD without its API approval", |v| {
            let crd = object(v, "CustomResourceDefinition", "tcproutes");
            crd["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("annotations");
        }),
        ("a VirtualService CRD stored as v1", |v| {
            let crd = object(v, "CustomResourceDefinition", "virtualservices");
            for version in crd["spec"]["versions"].as_array_mut().unwrap() {
                version["storage"] = (version["name"] == "v1").into();
            }
        }),
        ("a DestinationRule CRD with a closed spec", |v| {
            let crd = object(v, "CustomResourceDefinition", "destinationrules");
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                .as_object_mut()
                .unwrap()
                .remove("x-kubernetes-preserve-unknown-fields");
        }),
        ("an unknown kind", |v| {
            v.push(serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": NAMESPACE}}));
        }),
    ];
    assert_caught("default", mutations);
}

/// The gateway overlay's requirements are checked: each of these mistakes, made on its
/// rendering, is caught.
#[test]
fn the_gateway_checks_reject_wrong_manifests() {
    fn gateway_pod(values: &mut [Value]) -> &mut Value {
        &mut object(values, "Deployment", "mesh-eastwestgateway")["spec"]["template"]["spec"]
    }
    fn gateway_config(values: &mut [Value], from: &str, to: &str) {
        let map = object(values, "ConfigMap", "mesh-eastwestgateway-config");
        let data = &mut map["data"][CONFIG_KEY];
        let text = data.as_str().unwrap().to_owned();
        assert!(text.contains(from), "{from}");
        *data = Value::String(text.replace(from, to));
    }
    let mutations: &[(&str, Mutation)] = &[
        ("the node role instead of the gateway's", |v| {
            gateway_config(v, "enabled: true\n  listen", "enabled: false\n  listen");
        }),
        ("an identity other than the pods' service account", |v| {
            gateway_config(
                v,
                "serviceAccount: mesh-eastwestgateway",
                "serviceAccount: istio-eastwestgateway",
            );
        }),
        ("another listen port", |v| {
            gateway_config(v, "[::]:15008", "[::]:15009");
        }),
        ("a ClusterIP Service", |v| {
            object(v, "Service", "mesh-eastwestgateway")["spec"]["type"] = "ClusterIP".into();
        }),
        ("the Service on another port", |v| {
            object(v, "Service", "mesh-eastwestgateway")["spec"]["ports"][0]["targetPort"] =
                15009.into();
        }),
        ("running as root", |v| {
            gateway_pod(v)["containers"][0]["securityContext"]["runAsUser"] = 0.into();
        }),
        ("a capability", |v| {
            gateway_pod(v)["containers"][0]["securityContext"]["capabilities"]["add"] =
                serde_json::json!(["NET_ADMIN"]);
        }),
        ("the host's PID namespace", |v| {
            gateway_pod(v)["hostPID"] = true.into();
        }),
        ("a host path", |v| {
            gateway_pod(v)["volumes"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"name": "proc", "hostPath": {"path": "/proc", "type": "Directory"}}));
        }),
        ("the CA from another Secret", |v| {
            named(&mut gateway_pod(v)["volumes"], "ca")["secret"]["secretName"] = "other".into();
        }),
        ("a single replica", |v| {
            object(v, "Deployment", "mesh-eastwestgateway")["spec"]["replicas"] = 1.into();
        }),
        ("a grace period shorter than the drain", |v| {
            gateway_pod(v)["terminationGracePeriodSeconds"] = 10.into();
        }),
        ("the role bound to another account", |v| {
            object(v, "ClusterRoleBinding", "mesh-eastwestgateway")["subjects"][0]["name"] =
                "mesh-node".into();
        }),
        ("write access", |v| {
            object(v, "ClusterRole", "mesh-eastwestgateway")["rules"][0]["verbs"] =
                serde_json::json!(["list", "watch", "update"]);
        }),
    ];
    assert_caught("gateway", mutations);
}
