//! The Istio label set as it comes out of the exposition: ztunnel's names, Istio's values.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::{ConnRecord, Direction, Endpoint, Path, Security};
use crate::{
    identity::{CA_CERT_FILE, CA_KEY_FILE, CertManager, Identity, LocalCa},
    metrics::{Metrics, NodeCollector, peer::Peer},
    workload::Workload,
};

fn metrics(test: &str, cluster: &str) -> Arc<Metrics> {
    let dir = std::env::temp_dir().join(format!("mesh-conn-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCa::init(&dir, "cluster.local").expect("ca init");
    let ca = LocalCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE)).expect("ca");
    let certs = CertManager::new(Arc::new(ca), Duration::from_mins(1), crate::tls::provider());
    let metrics = Metrics::in_cluster(
        NodeCollector {
            bpffs: dir.join("no-bpffs"),
            certs,
        },
        cluster,
    );
    let _ = std::fs::remove_dir_all(&dir);
    metrics
}

fn workload(name: &str, namespace: &str, labels: &[(&str, &str)]) -> Arc<Workload> {
    Arc::new(Workload {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ips: vec!["10.0.0.9".parse().unwrap()],
        node: "n1".to_owned(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    })
}

/// The labels of the one `istio_tcp_connections_opened_total` sample, in exposition order.
fn opened_labels(metrics: &Metrics) -> Vec<(String, String)> {
    let text = metrics.encode();
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .collect();
    assert_eq!(samples.len(), 1, "{text}");
    let inner = samples[0]
        .strip_prefix("istio_tcp_connections_opened_total{")
        .and_then(|l| l.rsplit_once("} "))
        .map(|(labels, _)| labels)
        .expect("a sample with labels");
    // Values hold no `",` in these tests.
    inner
        .split("\",")
        .map(|pair| {
            let (k, v) = pair.split_once("=\"").expect("name=\"value\"");
            (k.to_owned(), v.trim_end_matches('"').to_owned())
        })
        .collect()
}

/// Every label Istio documents for the TCP metrics, as ztunnel names and orders them.
const ZTUNNEL_LABELS: [&str; 27] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
];

#[test]
fn outbound_labels_have_ztunnels_names_and_istios_values() {
    let metrics = metrics("outbound", "east");
    let source = workload(
        "web-7d4b9c-x2k4q",
        "shop",
        &[
            ("pod-template-hash", "7d4b9c"),
            ("app", "web"),
            ("version", "v1"),
            ("topology.kubernetes.io/region", "eu-1"),
            ("topology.kubernetes.io/zone", "eu-1a"),
        ],
    );
    let destination = workload(
        "db-0",
        "data",
        &[
            ("service.istio.io/canonical-name", "database"),
            ("app.kubernetes.io/version", "15"),
            ("topology.istio.io/cluster", "west"),
        ],
    );
    let record = ConnRecord::open(
        &metrics,
        (Direction::Outbound, Path::Hbone),
        Endpoint {
            identity: Some(Identity::new("cluster.local", "shop", "web")),
            workload: Some(source),
            ..Endpoint::default()
        },
        Endpoint {
            identity: Some(Identity::new("cluster.local", "data", "db")),
            workload: Some(destination),
            service: Some(Arc::from("db.data.svc.cluster.local")),
            ..Endpoint::default()
        },
        Security::MutualTls,
    );
    let labels = opened_labels(&metrics);
    record.close("completed");
    let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ZTUNNEL_LABELS);
    let values: BTreeMap<&str, &str> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let expected = [
        ("reporter", "source"),
        ("source_workload", "web"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "v1"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
        ("source_app", "web"),
        ("source_version", "v1"),
        ("source_cluster", "east"),
        ("destination_service", "db.data.svc.cluster.local"),
        ("destination_service_namespace", "data"),
        ("destination_service_name", "db"),
        ("destination_workload", "db-0"),
        ("destination_canonical_service", "database"),
        ("destination_canonical_revision", "15"),
        ("destination_workload_namespace", "data"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/data/sa/db",
        ),
        ("destination_app", "database"),
        ("destination_version", "15"),
        ("destination_cluster", "west"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
        ("source_region", "eu-1"),
        ("source_zone", "eu-1a"),
        ("destination_region", "unknown"),
        ("destination_zone", "unknown"),
    ];
    assert_eq!(values, expected.into_iter().collect(), "{labels:?}");
}

#[test]
fn an_unknown_peer_is_described_by_its_baggage_but_named_by_its_certificate() {
    let metrics = metrics("baggage", "Kubernetes");
    let said = Peer::from_baggage([b"k8s.cluster.name=remote,k8s.namespace.name=shop,\
        k8s.deployment.name=web,service.name=web-svc,service.version=v9,cloud.region=r"
        .as_slice()])
    .expect("baggage");
    let record = ConnRecord::open(
        &metrics,
        (Direction::Inbound, Path::Hbone),
        Endpoint {
            identity: Some(Identity::new("cluster.local", "shop", "web")),
            peer: Some(Arc::new(said)),
            ..Endpoint::default()
        },
        Endpoint {
            identity: Some(Identity::new("cluster.local", "data", "db")),
            workload: Some(workload("db-0", "data", &[])),
            ..Endpoint::default()
        },
        Security::MutualTls,
    );
    let labels: BTreeMap<String, String> = opened_labels(&metrics).into_iter().collect();
    record.close("completed");
    let label = |k: &str| labels.get(k).map(String::as_str);
    assert_eq!(label("reporter"), Some("destination"));
    assert_eq!(label("source_workload"), Some("web"));
    assert_eq!(label("source_canonical_service"), Some("web-svc"));
    assert_eq!(label("source_app"), Some("web-svc"));
    assert_eq!(label("source_canonical_revision"), Some("v9"));
    assert_eq!(label("source_version"), Some("v9"));
    assert_eq!(label("source_cluster"), Some("remote"));
    assert_eq!(label("source_region"), Some("r"));
    assert_eq!(label("source_zone"), Some("unknown"));
    assert_eq!(label("source_workload_namespace"), Some("shop"));
    assert_eq!(
        label("source_principal"),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    // The destination: no labels, a pod of the node's cluster; no service addressed.
    assert_eq!(label("destination_workload"), Some("db-0"));
    assert_eq!(label("destination_canonical_service"), Some("db-0"));
    assert_eq!(label("destination_canonical_revision"), Some("latest"));
    assert_eq!(label("destination_cluster"), Some("Kubernetes"));
    assert_eq!(label("destination_service"), Some("unknown"));
    assert_eq!(label("destination_service_name"), Some("unknown"));
    assert_eq!(label("destination_service_namespace"), Some("unknown"));
}

#[test]
fn nothing_known_is_unknown_except_the_verified_namespace() {
    let metrics = metrics("unknown", "Kubernetes");
    let record = ConnRecord::open(
        &metrics,
        (Direction::Inbound, Path::Hbone),
        Endpoint {
            identity: Some(Identity::new("cluster.local", "shop", "web")),
            ..Endpoint::default()
        },
        Endpoint {
            service: Some(Arc::from("example.com")),
            ..Endpoint::default()
        },
        Security::MutualTls,
    );
    let labels = opened_labels(&metrics);
    record.close("completed");
    for (name, value) in &labels {
        let expected = match name.as_str() {
            "reporter" => "destination",
            "source_workload_namespace" => "shop",
            "source_principal" => "spiffe://cluster.local/ns/shop/sa/web",
            "destination_service" | "destination_service_name" => "example.com",
            "request_protocol" => "tcp",
            "response_flags" => "-",
            "connection_security_policy" => "mutual_tls",
            _ => "unknown",
        };
        assert_eq!(value, expected, "{name}");
    }
}

#[test]
fn connections_with_different_baggage_get_their_own_label_sets() {
    let metrics = metrics("sets", "Kubernetes");
    let open = |service: &[u8]| {
        ConnRecord::open(
            &metrics,
            (Direction::Inbound, Path::Hbone),
            Endpoint {
                identity: Some(Identity::new("cluster.local", "shop", "web")),
                peer: Peer::from_baggage([service]).map(Arc::new),
                ..Endpoint::default()
            },
            Endpoint::default(),
            Security::MutualTls,
        )
    };
    let (a, b, again) = (
        open(b"service.name=a"),
        open(b"service.name=b"),
        open(b"service.name=a"),
    );
    let text = metrics.encode();
    let count = |service: &str| {
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .find(|l| l.contains(&format!("source_canonical_service=\"{service}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(count("a").as_deref(), Some("2"), "{text}");
    assert_eq!(count("b").as_deref(), Some("1"), "{text}");
    for record in [a, b, again] {
        record.close("completed");
    }
}

/// Collects what a log subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The access-log lines `f` writes.
fn access_lines(f: impl FnOnce()) -> String {
    let capture = Capture::default();
    let buffer = Arc::clone(&capture.0);
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || capture.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buffer.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn a_connection_through_a_gateway_names_the_network_and_the_hop() {
    let metrics = metrics("gateway-hop", "east");
    let gateway = Identity::new("cluster.local", "istio-system", "istio-eastwestgateway");
    let line = access_lines(|| {
        ConnRecord::open(
            &metrics,
            (Direction::Outbound, Path::DoubleHbone),
            Endpoint::default(),
            Endpoint {
                service: Some(Arc::from("echo.default.svc.cluster.local")),
                ..Endpoint::default()
            },
            Security::MutualTls,
        )
        .with_network(Arc::from("west"))
        .with_gateway(super::GatewayHop {
            address: "198.51.100.7:15008".parse().unwrap(),
            identity: gateway.clone(),
        })
        .close("completed");
    });
    for field in [
        "path=\"double-hbone\"",
        "network=\"west\"",
        "gateway=198.51.100.7:15008",
        &format!("gateway_identity={gateway}"),
        "dst_service=\"echo.default.svc.cluster.local\"",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    let text = metrics.encode();
    assert!(
        text.contains("direction=\"outbound\",path=\"double-hbone\""),
        "the path label: {text}"
    );
    // Without a gateway, the fields are there and empty.
    let direct = access_lines(|| {
        ConnRecord::open(
            &metrics,
            (Direction::Outbound, Path::Hbone),
            Endpoint::default(),
            Endpoint::default(),
            Security::MutualTls,
        )
        .close("completed");
    });
    assert!(direct.contains("gateway= "), "{direct}");
}
