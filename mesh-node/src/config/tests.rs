//! Parsing and validating the settings: errors name the field and its line.

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn embedded_default_parses() {
    let config = Config::load(None, no_env).expect("embedded default");
    assert_eq!(config.log, LogConfig::default());
    assert_eq!(config.redirect, RedirectConfig::default());
    assert!(
        !config.node.is_empty(),
        "node name defaults to the host name"
    );
}

#[test]
fn env_overrides_apply() {
    let env = |key: &str| match key {
        ENV_NODE_NAME => Some("node-7".to_owned()),
        ENV_LOG => Some("debug".to_owned()),
        ENV_NETWORK => Some("west".to_owned()),
        _ => None,
    };
    let config = Config::load(None, env).expect("config");
    assert_eq!(config.network, "west");
    assert_eq!(config.node, "node-7");
    assert_eq!(config.log.filter, "debug");
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let text = "node: a\nlog:\n  format: text\n  colour: red\n";
    let err = Config::parse(text, &Origin::Embedded)
        .unwrap_err()
        .to_string();
    assert!(err.contains("colour"), "{err}");
    assert!(err.contains("line 4"), "{err}");
}

#[test]
fn bad_enum_value_is_rejected() {
    let err = Config::parse("log:\n  format: xml\n", &Origin::Embedded)
        .unwrap_err()
        .to_string();
    assert!(err.contains("xml") && err.contains("line 2"), "{err}");
}

#[test]
fn invalid_values_name_the_field_and_its_line() {
    let origin = Origin::File("/etc/mesh.yaml".into());
    for (text, field, line) in [
        ("redirect:\n  mark: 0\n".to_owned(), "redirect.mark", 2),
        (
            "redirect:\n  cgroup: relative/dir\n".to_owned(),
            "redirect.cgroup",
            2,
        ),
        (
            "node: x\nlog:\n  filter: \"info,[\"\n".to_owned(),
            "log.filter",
            3,
        ),
        ("redirect:\n  bpffs: pins\n".to_owned(), "redirect.bpffs", 2),
        (
            "redirect:\n  excludePorts: [22, 0]\n".to_owned(),
            "redirect.excludePorts[1]",
            2,
        ),
        (
            "identity:\n  trustDomain: Cluster.Local\n".to_owned(),
            "identity.trustDomain",
            2,
        ),
        (
            "identity:\n  certLifetimeSeconds: 1\n".to_owned(),
            "identity.certLifetimeSeconds",
            2,
        ),
        (
            "proxy:\n  connectTimeoutMs: 0\n".to_owned(),
            "proxy.connectTimeoutMs",
            2,
        ),
        (
            "proxy:\n  handshakeTimeoutMs: 0\n".to_owned(),
            "proxy.handshakeTimeoutMs",
            2,
        ),
        (
            "proxy:\n  maxConnections: 0\n".to_owned(),
            "proxy.maxConnections",
            2,
        ),
        (
            "proxy:\n  maxConnectionsPerWorkload: 0\n".to_owned(),
            "proxy.maxConnectionsPerWorkload",
            2,
        ),
        (
            "kubernetes:\n  procRoot: proc\n".to_owned(),
            "kubernetes.procRoot",
            2,
        ),
        (
            "kubernetes:\n  enrollLabel: ''\n".to_owned(),
            "kubernetes.enrollLabel",
            2,
        ),
        (
            "kubernetes:\n  enrollValue: ''\n".to_owned(),
            "kubernetes.enrollValue",
            2,
        ),
        (
            "kubernetes:\n  rescanIntervalMs: 0\n".to_owned(),
            "kubernetes.rescanIntervalMs",
            2,
        ),
        (
            "proxy:\n  maxConnectionsPerSource: 0\n".to_owned(),
            "proxy.maxConnectionsPerSource",
            2,
        ),
        (
            "proxy:\n  pingTimeoutMs: 0\n".to_owned(),
            "proxy.pingTimeoutMs",
            2,
        ),
        (
            "proxy:\n  tcpKeepaliveTimeMs: 500\n".to_owned(),
            "proxy.tcpKeepaliveTimeMs",
            2,
        ),
    ] {
        let err = Config::parse(&text, &origin).unwrap_err();
        let ConfigError::Invalid { field: named, .. } = &err else {
            panic!("{text:?}: not a field error: {err}");
        };
        assert_eq!(named, field, "{text:?}");
        let err = err.to_string();
        assert!(
            err.contains(&format!("`{field}` at line {line} column")),
            "{text:?}: {err}"
        );
        assert!(err.starts_with("/etc/mesh.yaml: "), "{err}");
    }
}

#[test]
fn an_empty_file_is_not_a_default_configuration() {
    let origin = Origin::File("/etc/mesh.yaml".into());
    for text in [
        "",
        "\n",
        "   \n\n",
        "# nothing but\n# comments\n",
        "---\n",
        "null\n",
    ] {
        let err = Config::parse(text, &origin).unwrap_err();
        assert!(matches!(err, ConfigError::Empty { .. }), "{text:?}: {err}");
        assert!(
            err.to_string().contains("/etc/mesh.yaml: no configuration"),
            "{err}"
        );
    }
    assert!(
        Config::parse("{}\n", &origin).is_ok(),
        "an explicit empty mapping is meant"
    );
}

#[test]
fn a_file_cut_in_the_middle_of_a_line_is_incomplete() {
    let origin = Origin::File("/etc/mesh.yaml".into());
    // Cut inside a value: `node: no` is valid YAML, and would move the workload away.
    let text = "workloads:\n- name: a\n  ips: [198.18.0.1]\n  node: no";
    let err = Config::parse(text, &origin).unwrap_err();
    assert!(matches!(err, ConfigError::Incomplete { .. }), "{err}");
    assert!(Config::parse(&format!("{text}\n"), &origin).is_ok());
}

#[test]
fn bad_cidr_names_its_line() {
    let text = "redirect:\n  excludeCidrs:\n    - 10.0.0.0/33\n";
    let err = Config::parse(text, &Origin::Embedded)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("excludeCidrs") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn round_trips_through_yaml() {
    let config = Config {
        node: "n1".into(),
        zone: Some("z1".into()),
        log: LogConfig {
            format: LogFormat::Json,
            filter: "warn".into(),
        },
        redirect: RedirectConfig {
            cgroup: Some("/sys/fs/cgroup/test".into()),
            mark: 42,
            bpffs: "/sys/fs/bpf/x".into(),
            exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            exclude_ports: vec![22],
        },
        proxy: ProxyConfig {
            connect_timeout_ms: 500,
            drain_timeout_ms: 1000,
            handshake_timeout_ms: 700,
            max_connections: 10,
            max_connections_per_workload: 5,
            max_connections_per_source: 3,
            hbone_idle_timeout_ms: 900,
            ..ProxyConfig::default()
        },
        identity: IdentityConfig {
            trust_domain: "example.org".into(),
            ca_cert_file: "/ca/cert.pem".into(),
            ca_key_file: "/ca/key.pem".into(),
            cert_lifetime_seconds: 60,
            ..IdentityConfig::default()
        },
        kubernetes: KubernetesConfig {
            enabled: true,
            kubeconfig: Some("/etc/kube/config".into()),
            enroll_label: "istio.io/dataplane-mode".into(),
            enroll_value: "ambient".into(),
            opt_out_value: "none".into(),
            proc_root: "/host/proc".into(),
            rescan_interval_ms: 1000,
        },
        metrics: MetricsConfig {
            bind_address: "127.0.0.1".parse().unwrap(),
        },
        root_namespace: "mesh-root".into(),
        ..Config::default()
    };
    let text = serde_yaml_ng::to_string(&config).expect("serialize");
    assert_eq!(
        Config::parse(&text, &Origin::Embedded).expect("parse"),
        config
    );
}

#[test]
fn missing_file_names_the_path() {
    let err = Config::load(Some(Path::new("/nonexistent/mesh.yaml")), no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/mesh.yaml"), "{err}");
}
