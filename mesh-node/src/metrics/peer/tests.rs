//! Peer metadata: Istio's derivation from labels, and the `baggage` header both ways (the
//! format of ztunnel's `baggage.rs`), hostile input included.

use super::{MAX_BAGGAGE_BYTES, MAX_BAGGAGE_ENTRIES, Peer, WorkloadKind};
use crate::{identity::Identity, workload::Workload};

fn workload(name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.to_owned(),
        namespace: "shop".to_owned(),
        service_account: "web".to_owned(),
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
    }
}

/// Labels, and what they make of a workload.
type Labels = &'static [(&'static str, &'static str)];

fn parse(lines: &[&str]) -> Option<Peer> {
    Peer::from_baggage(lines.iter().map(|l| l.as_bytes()))
}

#[test]
fn canonical_names_follow_istios_order() {
    let cases: &[(Labels, &str, &str)] = &[
        (&[], "web-1", "latest"),
        (&[("app", "a"), ("version", "v")], "a", "v"),
        (
            &[
                ("app", "a"),
                ("app.kubernetes.io/name", "k"),
                ("version", "v"),
                ("app.kubernetes.io/version", "kv"),
            ],
            "k",
            "kv",
        ),
        (
            &[
                ("app", "a"),
                ("app.kubernetes.io/name", "k"),
                ("service.istio.io/canonical-name", "c"),
                ("version", "v"),
                ("service.istio.io/canonical-revision", "cv"),
            ],
            "c",
            "cv",
        ),
        // An empty label is no label.
        (&[("app", ""), ("version", "")], "web-1", "latest"),
    ];
    for (labels, service, revision) in cases {
        let peer = Peer::of(&workload("web-1", labels), "Kubernetes");
        assert_eq!(
            peer.canonical_service.as_deref(),
            Some(*service),
            "{labels:?}"
        );
        assert_eq!(
            peer.canonical_revision.as_deref(),
            Some(*revision),
            "{labels:?}"
        );
    }
}

#[test]
fn cluster_and_locality_come_from_topology_labels() {
    let plain = Peer::of(&workload("web-1", &[]), "east");
    assert_eq!(plain.cluster.as_deref(), Some("east"));
    assert_eq!(
        (plain.region, plain.zone, plain.subzone),
        (None, None, None)
    );
    let placed = Peer::of(
        &workload(
            "web-1",
            &[
                ("topology.istio.io/cluster", "west"),
                ("topology.kubernetes.io/region", "eu-1"),
                ("topology.kubernetes.io/zone", "eu-1a"),
                ("topology.istio.io/subzone", "rack4"),
            ],
        ),
        "east",
    );
    assert_eq!(placed.cluster.as_deref(), Some("west"));
    assert_eq!(placed.region.as_deref(), Some("eu-1"));
    assert_eq!(placed.zone.as_deref(), Some("eu-1a"));
    assert_eq!(placed.subzone.as_deref(), Some("rack4"));
    assert_eq!(placed.namespace.as_deref(), Some("shop"));
}

#[test]
fn workload_names_are_the_controllers() {
    let cases: &[(&str, Labels, &str, WorkloadKind)] = &[
        (
            "web-7d4b9c-x2k4q",
            &[("pod-template-hash", "7d4b9c")],
            "web",
            WorkloadKind::Deployment,
        ),
        (
            "my-web-7d4b9c-x2k4q",
            &[("pod-template-hash", "7d4b9c")],
            "my-web",
            WorkloadKind::Deployment,
        ),
        // The hash does not match the name: the pod is its own workload.
        (
            "web-1",
            &[("pod-template-hash", "7d4b9c")],
            "web-1",
            WorkloadKind::Pod,
        ),
        (
            "any",
            &[
                ("service.istio.io/workload-name", "named"),
                ("pod-template-hash", "h"),
            ],
            "named",
            WorkloadKind::Deployment,
        ),
        (
            "backup-28391520-abcde",
            &[("batch.kubernetes.io/job-name", "backup-28391520")],
            "backup",
            WorkloadKind::CronJob,
        ),
        (
            "migrate-abcde",
            &[("job-name", "migrate")],
            "migrate",
            WorkloadKind::Job,
        ),
        ("db-0", &[], "db-0", WorkloadKind::Pod),
    ];
    for (name, labels, expected, kind) in cases {
        let peer = Peer::of(&workload(name, labels), "Kubernetes");
        assert_eq!(
            peer.workload.as_deref(),
            Some(*expected),
            "{name} {labels:?}"
        );
        assert_eq!(peer.kind, *kind, "{name} {labels:?}");
        // With no app label the canonical service is the workload name.
        assert_eq!(peer.canonical_service.as_deref(), Some(*expected));
    }
}

#[test]
fn baggage_has_ztunnels_keys() {
    let peer = Peer::of(
        &workload(
            "web-7d4b9c-x2k4q",
            &[
                ("pod-template-hash", "7d4b9c"),
                ("app", "web"),
                ("version", "v2"),
                ("topology.kubernetes.io/region", "eu-1"),
                ("topology.kubernetes.io/zone", "eu-1a"),
            ],
        ),
        "Kubernetes",
    );
    assert_eq!(
        peer.to_baggage(),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,\
         service.name=web,service.version=v2,cloud.region=eu-1,cloud.availability_zone=eu-1a"
    );
    let pod = Peer::of(&workload("db-0", &[]), "c1");
    assert_eq!(
        pod.to_baggage(),
        "k8s.cluster.name=c1,k8s.namespace.name=shop,k8s.pod.name=db-0,service.name=db-0,\
         service.version=latest"
    );
}

#[test]
fn baggage_round_trips_and_reads_ztunnels() {
    let peer = Peer::of(
        &workload(
            "web-1",
            &[
                ("app", "web"),
                ("topology.kubernetes.io/zone", "z"),
                ("topology.istio.io/cluster", "a cluster, \"quoted\"; 100%"),
            ],
        ),
        "Kubernetes",
    );
    let header = peer.to_baggage();
    assert!(
        http::HeaderValue::from_str(&header).is_ok(),
        "not a header value: {header}"
    );
    assert!(!header.contains(' ') && !header.contains('"'), "{header}");
    let back = parse(&[&header]).expect("baggage");
    // Subzone is not carried in baggage (ztunnel carries none).
    assert_eq!(
        back,
        Peer {
            subzone: None,
            ..peer
        }
    );

    // What ztunnel sends (its own test's header), over one line or several.
    let ztunnel = "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,service.name=N2,service.version=V1";
    let expected = Peer {
        workload: Some("N1".to_owned()),
        kind: WorkloadKind::Deployment,
        namespace: Some("NS1".to_owned()),
        canonical_service: Some("N2".to_owned()),
        canonical_revision: Some("V1".to_owned()),
        cluster: Some("K1".to_owned()),
        ..Peer::default()
    };
    assert_eq!(parse(&[ztunnel]), Some(expected.clone()));
    let lines: Vec<&str> = ztunnel.split(',').collect();
    assert_eq!(parse(&lines), Some(expected));
    // W3C whitespace and properties.
    let spaced = parse(&[" k8s.job.name = j1 ;prop=x , service.name=s"]).expect("baggage");
    assert_eq!(
        (
            spaced.workload.as_deref(),
            spaced.kind,
            spaced.canonical_service.as_deref()
        ),
        (Some("j1"), WorkloadKind::Job, Some("s"))
    );
}

#[test]
fn nothing_useful_is_none() {
    assert_eq!(parse(&[]), None);
    assert_eq!(parse(&[""]), None);
    assert_eq!(parse(&["other=1,more=2"]), None);
    // Empty values, as ztunnel's test sends them.
    assert_eq!(
        parse(&["k8s.cluster.name=,k8s.namespace.name=,k8s.deployment.name=,service.name="]),
        None
    );
}

#[test]
fn hostile_baggage_is_skipped_not_trusted() {
    // Over the size limit, in one line or across lines: ignored entirely.
    let huge = format!("service.name=s,pad={}", "x".repeat(MAX_BAGGAGE_BYTES));
    assert_eq!(parse(&[&huge]), None);
    let half = format!("service.name=s,pad={}", "x".repeat(MAX_BAGGAGE_BYTES / 2));
    assert!(parse(&[&half]).is_some());
    assert_eq!(parse(&[&half, &half, "service.version=v"]), None);

    // Many members: those past the limit are not read.
    let junk = vec!["junk=1"; MAX_BAGGAGE_ENTRIES - 1].join(",");
    let last_read = parse(&[&format!("{junk},service.name=in")]).expect("baggage");
    assert_eq!(last_read.canonical_service.as_deref(), Some("in"));
    assert_eq!(parse(&[&format!("{junk},x=1,service.name=out")]), None);
    let empties = ",".repeat(MAX_BAGGAGE_ENTRIES);
    assert_eq!(parse(&[&empties, "service.name=out"]), None);

    // Missing `=`, bad escapes, invalid UTF-8 (raw or escaped), control characters, overlong
    // values: those members are skipped, the rest is read.
    let peer = parse(&[
        "service.name,k8s.cluster.name=%G1,k8s.namespace.name=%4,service.version=%FF%FE,\
         cloud.region=a%0Ab,cloud.availability_zone=%7",
        "k8s.pod.name=ok",
    ])
    .expect("the valid member");
    assert_eq!(
        peer,
        Peer {
            workload: Some("ok".to_owned()),
            kind: WorkloadKind::Pod,
            ..Peer::default()
        }
    );
    let long = format!("service.name={}", "a".repeat(254));
    assert_eq!(parse(&[&long]), None);
    let escaped = format!("service.name={}", "%41".repeat(254));
    assert_eq!(parse(&[&escaped]), None);
    let fits = format!("service.name={}", "%41".repeat(253));
    assert_eq!(
        parse(&[&fits])
            .and_then(|p| p.canonical_service)
            .map(|s| s.len()),
        Some(253)
    );
    let bytes: &[&[u8]] = &[b"service.name=\xff\xfe", b"service.version=v1"];
    let peer = Peer::from_baggage(bytes.iter().copied()).expect("the UTF-8 line");
    assert_eq!(
        (peer.canonical_service, peer.canonical_revision.as_deref()),
        (None, Some("v1"))
    );
}

#[test]
fn baggage_never_outranks_the_identity() {
    let identity = Identity::new("cluster.local", "shop", "web");
    let honest = parse(&["k8s.namespace.name=shop,service.name=web"]).expect("baggage");
    assert_eq!(
        honest
            .clone()
            .vouched_by(&identity)
            .map(|p| p.canonical_service),
        Some(Some("web".to_owned()))
    );
    // A peer that names another namespace than its certificate's is not believed at all.
    let liar = parse(&["k8s.namespace.name=kube-system,service.name=apiserver"]).expect("baggage");
    assert_eq!(liar.vouched_by(&identity), None);
    // No namespace said: the identity's.
    let quiet = parse(&["service.name=web"]).expect("baggage");
    assert_eq!(
        quiet
            .vouched_by(&identity)
            .and_then(|p| p.namespace)
            .as_deref(),
        Some("shop")
    );
}
