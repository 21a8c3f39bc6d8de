//! The evaluator against a table of cases that mirrors Istio's documented examples
//! (istio.io: "Authorization Policy" reference, "Authorization on TCP traffic",
//! "Explicit deny", "Dry run", `PeerAuthentication` reference).

use std::net::IpAddr;

use super::{ConnInfo, MtlsMode, PolicyDocument, PolicyStore};
use crate::{identity::Identity, workload::Workload};

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
        network: String::new(),
        trust_domain: None,
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
        trust_aliases: &[],
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
        // Attributes the node cannot see (issue 13, item 6): an ALLOW rule that uses one never
        // matches; a DENY rule is enforced without it, so it matches more (istiod's ambient
        // translation, taken as documented).
        (ap("foo", "r", &from("remoteIpBlocks: [10.1.0.1]")), web, "", "10.1.0.1", 80, false, "ALLOW remoteIpBlocks: not even the listed address"),
        (ap("foo", "r", &from("remoteIpBlocks: [10.1.0.1]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW remoteIpBlocks, mTLS"),
        (ap("foo", "r", &from("notRemoteIpBlocks: [10.9.0.0/16]")), web, "", "10.1.0.1", 80, false, "ALLOW notRemoteIpBlocks"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("remoteIpBlocks: [10.9.9.9]"))), web, "", "10.1.0.1", 80, false, "DENY remoteIpBlocks: every source"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("remoteIpBlocks: [10.9.9.9]"))), web, "foo/x", "10.1.0.1", 80, false, "DENY remoteIpBlocks: every source, mTLS"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("notRemoteIpBlocks: [10.1.0.0/16]"))), web, "", "10.1.0.1", 80, false, "DENY notRemoteIpBlocks: the excluded address too"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("namespaces: [bar]\n      remoteIpBlocks: [10.9.9.9]"))), web, "bar/x", "10.1.0.1", 80, false, "DENY remoteIpBlocks keeps namespaces"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("namespaces: [bar]\n      remoteIpBlocks: [10.9.9.9]"))), web, "foo/x", "10.1.0.1", 80, true, "DENY remoteIpBlocks keeps namespaces, other"),
        (ap("foo", "r", "rules:\n- from:\n  - source:\n      remoteIpBlocks: [10.1.0.1]\n- from:\n  - source:\n      namespaces: [foo]"), web, "foo/x", "10.1.0.1", 80, true, "ALLOW: the other rule still matches"),
        (ap("foo", "r", "rules:\n- from:\n  - source:\n      remoteIpBlocks: [10.1.0.1]\n- from:\n  - source:\n      namespaces: [foo]"), web, "", "10.1.0.1", 80, false, "ALLOW: the remoteIpBlocks rule is gone"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("requestPrincipals: [\"*\"]"))), web, "foo/x", "10.1.0.1", 80, false, "DENY requestPrincipals: every source"),
        (ap("foo", "r", &format!("action: DENY\n{}", from("notRequestPrincipals: [\"*\"]"))), web, "", "10.1.0.1", 80, false, "DENY notRequestPrincipals: every source"),
        (ap("foo", "r", &from("notRequestPrincipals: [\"*\"]")), web, "", "10.1.0.1", 80, false, "ALLOW notRequestPrincipals"),
        (ap("foo", "r", &to("hosts: [web.foo]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW hosts"),
        (ap("foo", "r", &to("notPaths: [/admin]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW notPaths"),
        (ap("foo", "r", &format!("action: DENY\n{}", to("paths: [/admin]"))), web, "foo/x", "10.1.0.1", 8080, false, "DENY paths: every port"),
        (ap("foo", "r", &format!("action: DENY\n{}", to("notHosts: [web.foo]"))), web, "", "10.1.0.1", 80, false, "DENY notHosts: every port"),
        (ap("foo", "r", &format!("action: DENY\n{}", when("key: request.headers[x-user]\n    values: [a]"))), web, "foo/x", "10.1.0.1", 80, false, "DENY with an L7 when key: every connection"),
        (ap("foo", "r", &format!("action: DENY\n{}", when("key: remote.ip\n    values: [10.9.9.9]"))), web, "", "10.1.0.1", 80, false, "DENY when remote.ip: every source"),
        (ap("foo", "r", &when("key: remote.ip\n    values: [10.1.0.1]")), web, "", "10.1.0.1", 80, false, "ALLOW when remote.ip"),
        (ap("foo", "r", &when("key: connection.sni\n    values: [web.foo]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW when connection.sni"),
        (ap("foo", "r", &when("key: request.auth.claims[iss]\n    values: [x]")), web, "foo/x", "10.1.0.1", 80, false, "ALLOW when request.auth.claims"),
        (ap("foo", "r", "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"22\"]\n  when:\n  - key: request.auth.claims[iss]\n    values: [x]"), web, "foo/x", "10.1.0.1", 80, true, "DENY L7 when keeps ports, other port"),
        (ap("foo", "r", "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"22\"]\n  when:\n  - key: request.auth.claims[iss]\n    values: [x]"), web, "foo/x", "10.1.0.1", 22, false, "DENY L7 when keeps ports"),
        // serviceAccounts: exact; a bare name is in the policy's namespace (Istio)
        (ap("foo", "a", &from("serviceAccounts: [sleep]")), web, "foo/sleep", "10.1.0.1", 80, true, "serviceAccounts bare name"),
        (ap("foo", "a", &from("serviceAccounts: [sleep]")), web, "bar/sleep", "10.1.0.1", 80, false, "serviceAccounts bare name, other namespace"),
        (ap("foo", "d", &format!("action: DENY\n{}", from("serviceAccounts: [sleep]"))), web, "foo/sleep", "10.1.0.1", 80, false, "DENY serviceAccounts bare name"),
        (ap("foo", "a", &from("notServiceAccounts: [sleep]")), web, "foo/sleep", "10.1.0.1", 80, false, "notServiceAccounts bare name"),
        (ap("foo", "a", &from("notServiceAccounts: [sleep]")), web, "", "10.1.0.1", 80, true, "notServiceAccounts, plaintext"),
        (ap("foo", "a", &from("serviceAccounts: [foo/sleep]")), web, "", "10.1.0.1", 80, false, "serviceAccounts, plaintext"),
        (ap("istio-system", "a", &from("serviceAccounts: [sleep]")), web, "istio-system/sleep", "10.1.0.1", 80, true, "serviceAccounts bare name in the root namespace"),
        // the other L4 attributes, positive and negative
        (ap("foo", "a", &from("notIpBlocks: [10.1.0.0/16]")), web, "", "10.1.0.1", 80, false, "notIpBlocks"),
        (ap("foo", "a", &from("notIpBlocks: [10.1.0.0/16]")), web, "", "10.2.0.1", 80, true, "notIpBlocks, other"),
        (ap("foo", "a", &when("key: source.serviceAccount\n    values: [foo/sleep]")), web, "foo/sleep", "10.1.0.1", 80, true, "when source.serviceAccount"),
        (ap("foo", "a", &when("key: source.serviceAccount\n    values: [sleep]")), web, "foo/x", "10.1.0.1", 80, false, "when source.serviceAccount, other"),
        (ap("foo", "a", &when("key: source.ip\n    notValues: [10.1.0.0/16]")), web, "", "10.1.0.1", 80, false, "when source.ip notValues"),
        (ap("foo", "a", &when("key: source.namespace\n    notValues: [foo]")), web, "", "10.1.0.1", 80, true, "when source.namespace notValues, plaintext"),
        (ap("foo", "a", &when("key: source.principal\n    notValues: [cluster.local/ns/foo/sa/x]")), web, "foo/x", "10.1.0.1", 80, false, "when source.principal notValues"),
        (ap("foo", "a", &when("key: destination.ip\n    notValues: [10.0.0.9]")), web, "", "10.1.0.1", 80, false, "when destination.ip notValues"),
        (ap("foo", "a", &when("key: destination.port\n    values: [\"80\"]")), web, "", "10.1.0.1", 80, true, "when destination.port"),
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
        trust_aliases: &[],
    };
    let d = s.authorize(&w, &conn);
    assert!(d.allowed);
    assert_eq!(d.dry_run, Some((false, "foo/would-deny".to_owned())));
}

#[test]
fn what_the_node_cannot_see_is_reported_once_per_policy() {
    let s = store(&format!(
        "{}{}",
        ap(
            "foo",
            "l7",
            "action: DENY\nrules:\n- to:\n  - operation:\n      paths: [/admin]\n- from:\n  - source:\n      remoteIpBlocks: [10.0.0.1]\n      notRemoteIpBlocks: [10.0.0.2]",
        ),
        ap(
            "foo",
            "allow",
            "rules:\n- when:\n  - key: remote.ip\n    values: [10.0.0.1]",
        )
    ));
    let notes = s.notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(notes[0].0, "foo/l7");
    assert!(
        notes[0].1.contains("DENY rule 0 uses paths")
            && notes[0]
                .1
                .contains("DENY rule 1 uses remoteIpBlocks, notRemoteIpBlocks")
            && notes[0].1.contains("more restrictive"),
        "{notes:?}"
    );
    assert!(
        notes[1].1.contains("ALLOW rule 0 uses when `remote.ip`")
            && notes[1].1.contains("never matches"),
        "{notes:?}"
    );
    assert!(store(&ap("foo", "plain", "rules: [{}]")).notes().is_empty());
}

#[test]
fn peer_authentication_precedence() {
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

fn pa(ns: &str, name: &str, spec: &str) -> String {
    let spec: String = spec.lines().flat_map(|l| ["    ", l, "\n"]).collect();
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata:\n    name: {name}\n    namespace: {ns}\n  spec:\n{spec}"
    )
}

/// Where Istio's documentation and istiod disagree, the stricter reading (issue 13, item 6):
/// `DISABLE` is ignored (as the ambient docs say; istiod reads it as PERMISSIVE), a
/// root-namespace policy with a selector only tightens (the API reference applies it to
/// matching workloads everywhere; istiod ignores it), and of several policies at one level
/// the strictest counts (istiod takes the oldest).
#[test]
fn peer_authentication_where_istio_disagrees_with_itself() {
    let web = workload("foo", "web", &[("app", "web")]);
    let db = workload("foo", "db", &[("app", "db")]);
    let root_web = workload("istio-system", "web", &[("app", "web")]);
    let mesh_strict = pa("istio-system", "mesh", "mtls: {mode: STRICT}");
    let mesh_permissive = pa("istio-system", "mesh", "mtls: {mode: PERMISSIVE}");
    let root_selected = |mode: &str| {
        pa(
            "istio-system",
            "web",
            &format!("selector:\n  matchLabels: {{app: web}}\nmtls: {{mode: {mode}}}"),
        )
    };
    let web_policy = |ns: &str, name: &str, rest: &str| {
        pa(
            ns,
            name,
            &format!("selector:\n  matchLabels: {{app: web}}\n{rest}"),
        )
    };
    #[rustfmt::skip]
    let cases: Vec<(String, &Workload, u16, MtlsMode, &str)> = vec![
        (format!("{mesh_strict}{}", pa("foo", "ns", "mtls: {mode: DISABLE}")), &web, 80, MtlsMode::Strict, "mesh STRICT, namespace DISABLE: ignored"),
        (format!("{mesh_strict}{}", web_policy("foo", "w", "mtls: {mode: DISABLE}")), &web, 80, MtlsMode::Strict, "mesh STRICT, workload DISABLE: ignored"),
        (web_policy("foo", "w", "mtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: DISABLE}"), &web, 8080, MtlsMode::Strict, "port DISABLE inherits the workload's STRICT"),
        (web_policy("foo", "w", "mtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: PERMISSIVE}"), &web, 8080, MtlsMode::Permissive, "port PERMISSIVE under the workload's STRICT"),
        (pa("foo", "ns", "mtls: {mode: DISABLE}"), &web, 80, MtlsMode::Permissive, "DISABLE alone: the default"),
        (root_selected("STRICT"), &web, 80, MtlsMode::Strict, "root-namespace selector STRICT applies in every namespace"),
        (format!("{mesh_permissive}{}{}", pa("foo", "ns", "mtls: {mode: PERMISSIVE}"), root_selected("STRICT")), &web, 80, MtlsMode::Strict, "root-namespace selector STRICT over a namespace PERMISSIVE"),
        (root_selected("STRICT"), &db, 80, MtlsMode::Permissive, "root-namespace selector, not matching"),
        (format!("{mesh_strict}{}", root_selected("PERMISSIVE")), &web, 80, MtlsMode::Strict, "root-namespace selector PERMISSIVE does not loosen"),
        (format!("{mesh_strict}{}", root_selected("PERMISSIVE")), &root_web, 80, MtlsMode::Strict, "nor for a workload of the root namespace"),
        (format!("{mesh_permissive}{}", web_policy("istio-system", "web", "portLevelMtls:\n  8080: {mode: STRICT}")), &web, 8080, MtlsMode::Strict, "root-namespace selector, port level"),
        (format!("{mesh_permissive}{}", web_policy("istio-system", "web", "portLevelMtls:\n  8080: {mode: STRICT}")), &web, 80, MtlsMode::Permissive, "root-namespace selector, other port"),
        (format!("{}{}", pa("foo", "a", "mtls: {mode: PERMISSIVE}"), pa("foo", "b", "mtls: {mode: STRICT}")), &web, 80, MtlsMode::Strict, "two namespace policies: the stricter"),
        (format!("{}{}", pa("foo", "b", "mtls: {mode: STRICT}"), pa("foo", "a", "mtls: {mode: PERMISSIVE}")), &web, 80, MtlsMode::Strict, "two namespace policies, other order"),
        (format!("{}{}{}", pa("foo", "ns", "mtls: {mode: STRICT}"), web_policy("foo", "a", "mtls: {mode: PERMISSIVE}"), web_policy("foo", "b", "mtls: {mode: UNSET}")), &web, 80, MtlsMode::Strict, "two workload policies, one inherits STRICT"),
        (format!("{mesh_strict}{}", pa("foo", "ns", "selector:\n  matchLabels: {}\nmtls: {mode: PERMISSIVE}")), &web, 80, MtlsMode::Permissive, "an empty selector is namespace-wide"),
    ];
    for (yaml, w, port, expected, case) in cases {
        assert_eq!(store(&yaml).mtls_mode(w, port), expected, "{case}\n{yaml}");
    }
    let notes = store(&format!(
        "{}{}",
        pa("foo", "ns", "mtls: {mode: DISABLE}"),
        root_selected("STRICT")
    ))
    .notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].1.contains("DISABLE is read as UNSET"), "{notes:?}");
    assert!(notes[1].1.contains("only tightens"), "{notes:?}");
}

/// Values the node would otherwise drop silently (an ALLOW `when` on a bad address matched
/// every source) are errors naming the field, as Istio's validation makes them.
#[test]
fn bad_values_are_errors_naming_the_field() {
    #[rustfmt::skip]
    let cases = [
        ("rules:\n- when:\n  - key: source.ip\n    values: [10.0.0.0/33]", "spec.rules[0].when[0].values", "invalid IP block `10.0.0.0/33`"),
        ("rules:\n- when:\n  - key: destination.ip\n    notValues: [nowhere]", "spec.rules[0].when[0].notValues", "invalid IP block `nowhere`"),
        ("rules:\n- when:\n  - key: destination.port\n    values: [http]", "spec.rules[0].when[0].values", "invalid port `http`"),
        ("rules:\n- when:\n  - key: source.principal", "spec.rules[0].when[0].values", "one of values or notValues"),
        ("rules:\n- when:\n  - key: source.ips\n    values: [10.0.0.1]", "spec.rules[0].when[0].key", "unknown attribute `source.ips`"),
        ("rules:\n- when:\n  - key: destination.labels[app]\n    values: [a]", "spec.rules[0].when[0].key", "workload selector"),
        ("rules:\n- when:\n  - key: source.namespace\n    values: [\"\"]", "spec.rules[0].when[0].values", "empty value"),
        ("rules:\n- from:\n  - source:\n      serviceAccounts: [\"foo/*\"]", "spec.rules[0].from[0].source.serviceAccounts", "without wildcards"),
        ("rules:\n- from:\n  - source:\n      serviceAccounts: [a/b/c]", "spec.rules[0].from[0].source.serviceAccounts", "`a/b/c`"),
        ("rules:\n- from:\n  - source:\n      serviceAccounts: [sleep]\n      namespaces: [foo]", "spec.rules[0].from[0].source.serviceAccounts", "cannot be combined"),
        ("rules:\n- {}\n- from:\n  - source:\n      principals: [\"\"]", "spec.rules[1].from[0].source.principals", "empty value"),
        ("rules:\n- when:\n  - key: source.serviceAccount\n    values: [\"*\"]", "spec.rules[0].when[0].values", "without wildcards"),
    ];
    for (spec, field, reason) in cases {
        let docs: Vec<PolicyDocument> =
            serde_yaml_ng::from_str(&ap("foo", "bad", spec)).expect("parses");
        let err = PolicyStore::new("istio-system", &docs)
            .expect_err(spec)
            .to_string();
        assert!(
            err.contains("policies[0] (AuthorizationPolicy foo/bad)")
                && err.contains(&format!("field `{field}`"))
                && err.contains(reason),
            "{spec}: {err}"
        );
    }
    let docs: Vec<PolicyDocument> = serde_yaml_ng::from_str(&pa(
        "foo",
        "bad",
        "selector:\n  matchLabels: {}\nportLevelMtls:\n  8080: {mode: STRICT}",
    ))
    .expect("parses");
    let err = PolicyStore::new("istio-system", &docs)
        .expect_err("portLevelMtls without labels")
        .to_string();
    assert!(err.contains("spec.portLevelMtls"), "{err}");
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

#[test]
fn principals_match_across_trust_domain_aliases_only() {
    let web = workload("shop", "web", &[("app", "web")]);
    let deny = store(&ap(
        "shop",
        "deny-client",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]",
    ));
    let allow_not = store(&ap(
        "shop",
        "allow-not-client",
        "selector: {matchLabels: {app: web}}\naction: ALLOW\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/client]}}]}]",
    ));
    let decide = |store: &PolicyStore, td: &str, aliases: &[String]| {
        let identity = Identity::new(td, "shop", "client");
        let conn = ConnInfo {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: Some(&identity),
            dst_ip: "10.0.0.9".parse().unwrap(),
            dst_port: 80,
            trust_aliases: aliases,
        };
        store.authorize(&web, &conn).allowed
    };
    let aliases = ["cluster.local".to_owned(), "west.example".to_owned()];
    // The same workload in an alias trust domain is the same principal, for DENY and for
    // notPrincipals alike.
    assert!(!decide(&deny, "west.example", &aliases));
    assert!(!decide(&allow_not, "west.example", &aliases));
    assert!(!decide(&deny, "cluster.local", &aliases));
    // A trust domain that is not an alias is another principal.
    assert!(decide(&deny, "east.example", &aliases));
    assert!(decide(&allow_not, "east.example", &aliases));
    // Without aliases, only the exact trust domain matches.
    assert!(decide(&deny, "west.example", &[]));
}
