//! The evaluator against a table of cases that mirrors Istio's documented examples
//! (istio.io: "Authorization Policy" reference, "Authorization on TCP traffic",
//! "Explicit deny", "Dry run", `PeerAuthentication` reference).

use std::net::IpAddr;

use super::{ConnInfo, MtlsMode, PolicyDocument, PolicyStore};
use crate::{identity::Identity, state::Workload};

fn workload(ns: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        service_account: name.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ips: vec!["10.0.0.9".parse().unwrap()],
        node: "n1".to_owned(),
        netns: None,
        enrolled: true,
    }
}

fn store(yaml: &str) -> PolicyStore {
    let docs: Vec<PolicyDocument> = serde_yaml_ng::from_str(yaml).expect("policy YAML");
    PolicyStore::new("istio-system", &docs).expect("valid policies")
}

/// A connection from `src` ("ns/sa" or "" for plaintext) at `ip` to port `port`.
fn allowed(store: &PolicyStore, w: &Workload, src: &str, ip: &str, port: u16) -> bool {
    let identity = src
        .split_once('/')
        .map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
    let conn = ConnInfo {
        src_ip: ip.parse::<IpAddr>().unwrap(),
        src_identity: identity.as_ref(),
        dst_ip: "10.0.0.9".parse().unwrap(),
        dst_port: port,
    };
    store.authorize(w, &conn).allowed
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().flat_map(|l| ["    ", l, "\n"]).collect();
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: {name}\n    namespace: {ns}\n  spec:\n{spec}"
    )
}

/// One table row: policies, workload, source ("ns/sa" or "" for plaintext), source IP, port,
/// expected, case name.
type Case<'a> = (String, &'a Workload, &'a str, &'a str, u16, bool, &'a str);

#[rustfmt::skip]
fn cases<'a>(web: &'a Workload, db: &'a Workload, other_ns: &'a Workload) -> Vec<Case<'a>> {
    let from = |source: &str| format!("rules:\n- from:\n  - source:\n      {source}");
    let to = |op: &str| format!("rules:\n- to:\n  - operation:\n      {op}");
    let when = |cond: &str| format!("rules:\n- when:\n  - {cond}");
    vec![
        (String::new(), web, "", "10.1.0.1", 80, true, "no policy: allow"),
        (ap("foo", "allow-nothing", "{}"), web, "foo/sleep", "10.1.0.1", 80, false, "allow-nothing"),
        (ap("foo", "allow-all", "action: ALLOW\nrules: [{}]"), web, "", "10.1.0.1", 80, true, "allow-all"),
        (ap("foo", "deny-all", "action: DENY\nrules: [{}]"), web, "foo/sleep", "10.1.0.1", 80, false, "deny-all"),
        (ap("foo", "deny-nothing", "action: DENY"), web, "foo/sleep", "10.1.0.1", 80, true, "DENY without rules matches nothing"),
        // principals: exact, prefix, suffix, presence; plaintext has none
        (ap("foo", "p", &from("principals: [cluster.local/ns/foo/sa/sleep]")), web, "foo/sleep", "10.1.0.1", 80, true, "principal exact"),
        (ap("foo", "p", &from("principals: [cluster.local/ns/foo/sa/sleep]")), web, "foo/other", "10.1.0.1", 80, false, "principal exact, other"),
        (ap("foo", "p", &from("principals: [cluster.local/ns/foo/sa/sleep]")), web, "", "10.1.0.1", 80, false, "principal, plaintext"),
        (ap("foo", "p", &from("principals: [cluster.local/ns/foo/*]")), web, "foo/x", "10.1.0.1", 80, true, "principal prefix"),
        (ap("foo", "p", &from("principals: [\"*/sa/sleep\"]")), web, "bar/sleep", "10.1.0.1", 80, true, "principal suffix"),
        (ap("foo", "p", &from("principals: [\"*\"]")), web, "", "10.1.0.1", 80, false, "principal presence, plaintext"),
        (ap("foo", "p", &from("principals: [\"*\"]")), web, "bar/x", "10.1.0.1", 80, true, "principal presence"),
        (ap("foo", "p", &from("notPrincipals: [cluster.local/ns/foo/sa/sleep]")), web, "foo/sleep", "10.1.0.1", 80, false, "notPrincipals"),
        (ap("foo", "p", &from("notPrincipals: [cluster.local/ns/foo/sa/sleep]")), web, "", "10.1.0.1", 80, true, "notPrincipals, plaintext"),
        // namespaces and service accounts
        (ap("foo", "d", &format!("action: DENY\n{}", from("namespaces: [bar]"))), web, "bar/x", "10.1.0.1", 80, false, "deny by namespace"),
        (ap("foo", "d", &format!("action: DENY\n{}", from("namespaces: [bar]"))), web, "foo/x", "10.1.0.1", 80, true, "deny by namespace, other"),
        (ap("foo", "a", &from("notNamespaces: [bar]")), web, "bar/x", "10.1.0.1", 80, false, "notNamespaces"),
        (ap("foo", "a", &from("notNamespaces: [bar]")), web, "baz/x", "10.1.0.1", 80, true, "notNamespaces, other"),
        (ap("foo", "a", &from("serviceAccounts: [foo/sleep]")), web, "foo/sleep", "10.1.0.1", 80, true, "serviceAccounts"),
        (ap("foo", "a", &from("notServiceAccounts: [foo/sleep]")), web, "foo/sleep", "10.1.0.1", 80, false, "notServiceAccounts"),
        // ports
        (ap("foo", "a", &to("ports: [\"8080\"]")), web, "", "10.1.0.1", 8080, true, "ports"),
        (ap("foo", "a", &to("ports: [\"8080\"]")), web, "", "10.1.0.1", 9090, false, "ports, other"),
        (ap("foo", "a", &to("notPorts: [\"22\"]")), web, "", "10.1.0.1", 22, false, "notPorts"),
        (ap("foo", "a", &to("notPorts: [\"22\"]")), web, "", "10.1.0.1", 80, true, "notPorts, other"),
        // ipBlocks
        (ap("foo", "a", &from("ipBlocks: [10.1.0.0/16, 192.0.2.7]")), web, "", "10.1.2.3", 80, true, "ipBlocks CIDR"),
        (ap("foo", "a", &from("ipBlocks: [10.1.0.0/16, 192.0.2.7]")), web, "", "192.0.2.7", 80, true, "ipBlocks single IP"),
        (ap("foo", "a", &from("ipBlocks: [10.1.0.0/16]")), web, "", "10.2.0.1", 80, false, "ipBlocks, outside"),
        (ap("foo", "d", &format!("action: DENY\n{}", from("notIpBlocks: [10.1.0.0/16]"))), web, "", "10.2.0.1", 80, false, "notIpBlocks deny"),
        (ap("foo", "a", &from("ipBlocks: [\"fd00::/8\"]")), web, "", "fd00::5", 80, true, "ipBlocks IPv6"),
        (ap("foo", "a", &from("ipBlocks: [10.1.0.0/16]")), web, "", "::ffff:10.1.0.1", 80, true, "ipBlocks, v4-mapped source"),
        // when
        (ap("foo", "a", &when("key: source.ip\n    values: [10.1.0.0/16]")), web, "", "10.1.0.1", 80, true, "when source.ip"),
        (ap("foo", "a", &when("key: destination.port\n    notValues: [\"80\"]")), web, "", "10.1.0.1", 80, false, "when destination.port notValues"),
        (ap("foo", "a", &when("key: source.namespace\n    values: [foo]")), web, "foo/x", "10.1.0.1", 80, true, "when source.namespace"),
        (ap("foo", "a", &when("key: source.principal\n    values: [cluster.local/ns/foo/sa/x]")), web, "foo/y", "10.1.0.1", 80, false, "when source.principal"),
        (ap("foo", "a", &when("key: destination.ip\n    values: [10.0.0.0/24]")), web, "", "10.1.0.1", 80, true, "when destination.ip"),
        // AND inside a rule, OR across rules
        (ap("foo", "a", "rules:\n- from:\n  - source:\n      namespaces: [foo]\n  to:\n  - operation:\n      ports: [\"80\"]"), web, "foo/x", "10.1.0.1", 81, false, "from AND to"),
        (ap("foo", "a", "rules:\n- from:\n  - source:\n      namespaces: [bar]\n- to:\n  - operation:\n      ports: [\"81\"]"), web, "foo/x", "10.1.0.1", 81, true, "rule OR rule"),
        // explicit deny wins
        (format!("{}{}", ap("foo", "all", "rules: [{}]"), ap("foo", "no-ssh", &format!("action: DENY\n{}", to("ports: [\"22\"]")))), web, "foo/x", "10.1.0.1", 22, false, "DENY before ALLOW"),
        // scope: selector, namespace, root namespace
        (ap("foo", "web-only", "selector:\n  matchLabels: {app: web}\nrules: []"), db, "foo/x", "10.1.0.1", 80, true, "selector does not match db"),
        (ap("foo", "web-only", "selector:\n  matchLabels: {app: web}\nrules: []"), web, "foo/x", "10.1.0.1", 80, false, "selector matches web"),
        (ap("foo", "ns-wide", "{}"), other_ns, "foo/x", "10.1.0.1", 80, true, "other namespace untouched"),
        (ap("istio-system", "mesh-wide", "{}"), other_ns, "foo/x", "10.1.0.1", 80, false, "root namespace is mesh-wide"),
        (ap("istio-system", "mesh-web", "selector:\n  matchLabels: {app: web}\naction: DENY\nrules: [{}]"), other_ns, "foo/x", "10.1.0.1", 80, false, "root namespace selector, any namespace"),
        (ap("foo", "waypoint", "targetRefs:\n- kind: Gateway\n  name: waypoint\naction: DENY\nrules: [{}]"), web, "foo/x", "10.1.0.1", 80, true, "targetRefs: not for the node"),
        // L7: an ALLOW rule is dropped; a DENY rule keeps its L4 part
        (ap("foo", "l7", &to("methods: [GET]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW with L7 is dropped"),
        (ap("foo", "l7", &format!("action: DENY\n{}", to("methods: [POST]\n      ports: [\"80\"]"))), web, "foo/x", "10.1.0.1", 80, false, "DENY L7 keeps ports"),
        (ap("foo", "l7", &format!("action: DENY\n{}", to("methods: [POST]\n      ports: [\"80\"]"))), web, "foo/x", "10.1.0.1", 81, true, "DENY L7 keeps ports, other port"),
        (ap("foo", "l7", &when("key: request.headers[x-user]\n    values: [a]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW with an L7 when key"),
        (ap("foo", "l7", &from("requestPrincipals: [\"*\"]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW with requestPrincipals"),
    ]
}

#[test]
fn istio_examples() {
    let web = workload("foo", "web", &[("app", "web")]);
    let db = workload("foo", "db", &[("app", "db")]);
    let other_ns = workload("bar", "api", &[("app", "web")]);
    for (yaml, w, src, ip, port, expected, case) in cases(&web, &db, &other_ns) {
        let s = if yaml.is_empty() {
            store("[]")
        } else {
            store(&yaml)
        };
        assert_eq!(allowed(&s, w, src, ip, port), expected, "{case}\n{yaml}");
    }
}

#[test]
fn dry_run_policies_are_reported_not_enforced() {
    let yaml = "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: would-deny\n    namespace: foo\n    annotations:\n      istio.io/dry-run: \"true\"\n  spec:\n    action: DENY\n    rules: [{}]\n";
    let s = store(yaml);
    let w = workload("foo", "web", &[]);
    let conn = ConnInfo {
        src_ip: "10.1.0.1".parse().unwrap(),
        src_identity: None,
        dst_ip: "10.0.0.9".parse().unwrap(),
        dst_port: 80,
    };
    let d = s.authorize(&w, &conn);
    assert!(d.allowed);
    assert_eq!(d.dry_run, Some((false, "foo/would-deny".to_owned())));
}

#[test]
fn l7_content_is_reported_once_per_policy() {
    let s = store(&ap(
        "foo",
        "l7",
        "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [/admin]",
    ));
    let notes = s.l7_notes();
    assert_eq!(notes.len(), 1);
    assert!(notes[0].1.contains("L4 part"), "{notes:?}");
}

#[test]
fn peer_authentication_precedence() {
    let pa = |ns: &str, name: &str, spec: &str| {
        let spec: String = spec.lines().flat_map(|l| ["    ", l, "\n"]).collect();
        format!(
            "- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata:\n    name: {name}\n    namespace: {ns}\n  spec:\n{spec}"
        )
    };
    let web = workload("foo", "web", &[("app", "web")]);
    let db = workload("bar", "db", &[]);
    let mesh = pa("istio-system", "mesh", "mtls: {mode: STRICT}");
    let s = store(&mesh);
    assert_eq!(s.mtls_mode(&web, 80), MtlsMode::Strict, "mesh-wide");
    let s = store(&format!(
        "{mesh}{}",
        pa("foo", "ns", "mtls: {mode: PERMISSIVE}")
    ));
    assert_eq!(
        s.mtls_mode(&web, 80),
        MtlsMode::Permissive,
        "namespace overrides mesh"
    );
    assert_eq!(
        s.mtls_mode(&db, 80),
        MtlsMode::Strict,
        "other namespace keeps mesh"
    );
    let s = store(&format!(
        "{mesh}{}",
        pa(
            "foo",
            "web",
            "selector:\n  matchLabels: {app: web}\nmtls: {mode: UNSET}\nportLevelMtls:\n  8080: {mode: PERMISSIVE}"
        )
    ));
    assert_eq!(s.mtls_mode(&web, 8080), MtlsMode::Permissive, "port level");
    assert_eq!(s.mtls_mode(&web, 80), MtlsMode::Strict, "UNSET inherits");
    assert_eq!(
        store("[]").mtls_mode(&web, 80),
        MtlsMode::Permissive,
        "default"
    );
}

#[test]
fn invalid_policies_name_the_document_and_field() {
    let parse = |yaml: &str| -> String {
        match serde_yaml_ng::from_str::<Vec<PolicyDocument>>(yaml) {
            Err(e) => e.to_string(),
            Ok(docs) => PolicyStore::new("istio-system", &docs)
                .unwrap_err()
                .to_string(),
        }
    };
    for (spec, expected) in [
        ("action: CUSTOM", "unknown variant `CUSTOM`"),
        ("action: AUDIT", "unknown variant `AUDIT`"),
        (
            "rules:\n- to:\n  - operation:\n      ports: [\"http\"]",
            "invalid port `http`",
        ),
        (
            "rules:\n- to:\n  - operation:\n      ports: [\"70000\"]",
            "invalid port `70000`",
        ),
        (
            "rules:\n- from:\n  - source:\n      ipBlocks: [10.0.0.0/33]",
            "invalid IP block `10.0.0.0/33`",
        ),
        (
            "rules:\n- from:\n  - source:\n      principal: [x]",
            "unknown field `principal`",
        ),
    ] {
        let err = parse(&ap("foo", "bad", spec));
        assert!(
            err.contains(expected) && err.contains("line"),
            "{spec}: {err}"
        );
    }
    let err = parse(&ap("foo", "bad", "mtls: {mode: STRICT}"));
    assert!(
        err.contains("AuthorizationPolicy foo/bad") && err.contains("spec.mtls"),
        "{err}"
    );
}
