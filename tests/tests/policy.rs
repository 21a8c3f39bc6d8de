//! L4 authorization and peer authentication across two nodes, with Istio's own documents,
//! applied and changed live through the file source.

use std::time::Duration;

use mesh_tests::{
    Daemon, Proc, Testbed,
    helpers::{connects, echo_servers, peer_authentication, two_by_two, two_daemons},
};

mesh_tests::binaries!(APP, DUT);

/// Echo servers on ports 7000 and 7001 of `pod`.
fn servers(bed: &Testbed, pod: &str) -> Vec<Proc> {
    [7000, 7001]
        .into_iter()
        .flat_map(|port| echo_servers(bed, APP, &[pod], port))
        .collect()
}

/// An `AuthorizationPolicy` for `b1` (selector `app: b1`) as a `policies:` list item.
fn authz(name: &str, body: &str) -> String {
    let body: String = body.lines().flat_map(|l| ["    ", l, "\n"]).collect();
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: {name}\n    namespace: default\n  spec:\n    selector:\n      matchLabels: {{app: b1}}\n{body}"
    )
}

/// A `PeerAuthentication` for `b1` (selector `app: b1`) as a `policies:` list item.
fn peer_auth(mode: &str) -> String {
    peer_authentication("default", "b1-mtls", "{app: b1}", mode)
}

/// Daemons on both nodes with a1, a2 and b1 enrolled (b2 stays outside: plaintext).
fn mesh(bed: &Testbed) -> (Daemon, Daemon) {
    two_daemons(bed, DUT, &["a1", "a2", "b1"])
}

/// Applies a policy set on node-b and waits until the daemon reloaded it.
fn apply(bed: &Testbed, b: &mut Daemon, policies: &str) {
    let reloads = b.records("configuration reloaded").len();
    b.set_policies(bed, policies).expect("write policies");
    b.wait_for_records(
        "configuration reloaded",
        reloads + 1,
        Duration::from_secs(2),
    )
    .expect("applied within a second or two");
}

fn denials(b: &Daemon) -> Vec<String> {
    b.records("connection denied by policy")
        .iter()
        .map(|r| r["policy"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn principals_namespaces_ports_and_ip_blocks() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = servers(&bed, "b1");
    let (_a, mut b) = mesh(&bed);
    assert!(
        connects(&bed, APP, "a1", "b1", 7000) && connects(&bed, APP, "a2", "b1", 7000),
        "no policy: all allowed"
    );

    // Allow by principal: only a1's identity.
    apply(
        &bed,
        &mut b,
        &authz(
            "only-a1",
            "action: ALLOW\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/default/sa/a1]",
        ),
    );
    assert!(connects(&bed, APP, "a1", "b1", 7000), "a1 allowed");
    assert!(
        !connects(&bed, APP, "a2", "b1", 7000),
        "a2 denied (HBONE 401)"
    );
    assert!(
        !connects(&bed, APP, "b2", "b1", 7000),
        "plaintext has no principal"
    );
    assert_eq!(
        denials(&b),
        ["no ALLOW policy matched", "no ALLOW policy matched"]
    );
    let a2_admitted = b
        .captured("inbound")
        .iter()
        .filter(|r| r["peer_identity"] == "spiffe://cluster.local/ns/default/sa/a2")
        .count();
    assert_eq!(
        a2_admitted, 1,
        "a2 reached the application only before the policy"
    );

    // Deny by namespace: the mesh identities are in `default`; plaintext has no namespace.
    apply(
        &bed,
        &mut b,
        &authz(
            "no-default",
            "action: DENY\nrules:\n- from:\n  - source:\n      namespaces: [default]",
        ),
    );
    assert!(
        !connects(&bed, APP, "a1", "b1", 7000),
        "default namespace denied"
    );
    assert!(
        connects(&bed, APP, "b2", "b1", 7000),
        "plaintext not in any namespace"
    );
    assert_eq!(
        denials(&b).last().map(String::as_str),
        Some("default/no-default")
    );

    // Port rules.
    apply(
        &bed,
        &mut b,
        &authz(
            "port-7000",
            "action: ALLOW\nrules:\n- to:\n  - operation:\n      ports: [\"7000\"]",
        ),
    );
    assert!(connects(&bed, APP, "a1", "b1", 7000));
    assert!(!connects(&bed, APP, "a1", "b1", 7001), "7001 not allowed");

    // ipBlocks: a1's address only (the daemon sees the source pod's address over HBONE).
    let a1 = bed.pod("a1").ipv4();
    apply(
        &bed,
        &mut b,
        &authz(
            "from-a1-ip",
            &format!("action: ALLOW\nrules:\n- from:\n  - source:\n      ipBlocks: [\"{a1}/32\"]"),
        ),
    );
    assert!(connects(&bed, APP, "a1", "b1", 7000));
    assert!(
        !connects(&bed, APP, "a2", "b1", 7000),
        "a2's address is outside the block"
    );
}

#[test]
fn strict_and_permissive_peer_authentication_and_dry_run() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = servers(&bed, "b1");
    let (_a, mut b) = mesh(&bed);

    apply(&bed, &mut b, &peer_auth("STRICT"));
    assert!(
        !connects(&bed, APP, "b2", "b1", 7000),
        "STRICT refuses plaintext"
    );
    assert!(connects(&bed, APP, "a1", "b1", 7000), "STRICT admits mTLS");
    assert_eq!(
        b.records("plaintext connection refused: PeerAuthentication is STRICT")
            .len(),
        1
    );
    apply(&bed, &mut b, &peer_auth("PERMISSIVE"));
    assert!(
        connects(&bed, APP, "b2", "b1", 7000),
        "PERMISSIVE admits plaintext"
    );

    let dry = "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: would-deny\n    namespace: default\n    annotations:\n      istio.io/dry-run: \"true\"\n  spec:\n    action: DENY\n    rules: [{}]\n";
    apply(&bed, &mut b, dry);
    assert!(
        connects(&bed, APP, "a1", "b1", 7000),
        "dry-run is not enforced"
    );
    let dry_runs = b.records("dry-run policy decision");
    let last = dry_runs.last().expect("dry-run logged");
    assert_eq!(
        (
            last["would"].as_str(),
            last["enforced"].as_str(),
            last["policy"].as_str()
        ),
        (Some("deny"), Some("allow"), Some("default/would-deny"))
    );
}

#[test]
fn a_policy_edit_closes_open_connections_it_no_longer_allows_and_a_broken_edit_changes_nothing() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = servers(&bed, "b1");
    let (_a, mut b) = mesh(&bed);
    let target = bed.pod("b1").addr(false, 7000).to_string();

    // A long connection (8 s) from a1 and one from plaintext b2.
    let mut mtls_conn = bed
        .pod("a1")
        .spawn(&[APP, "trickle", &target, "8"])
        .expect("spawn");
    let mut plain_conn = bed
        .pod("b2")
        .spawn(&[APP, "trickle", &target, "8"])
        .expect("spawn");
    b.wait_for_records("connection captured", 2, Duration::from_secs(5))
        .expect("both open");
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    apply(
        &bed,
        &mut b,
        &authz(
            "deny-a1",
            "action: DENY\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/default/sa/a1]",
        ),
    );
    let status = mtls_conn
        .wait(Duration::from_secs(5))
        .expect("a1's connection ends");
    assert!(!status.success(), "a1's open connection was closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed within the reload, not at the end"
    );
    let closed = b.records("open connection closed: no longer allowed after a policy change");
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0]["policy"], "default/deny-a1");
    assert!(
        plain_conn.is_running(),
        "the plaintext connection is still allowed"
    );

    // A broken edit (bad port) is rejected with document, field and line; the deny stays.
    let broken = authz(
        "deny-a1",
        "action: DENY\nrules:\n- to:\n  - operation:\n      ports: [\"ssh\"]",
    );
    b.set_policies(&bed, &broken).expect("write");
    b.wait_for_records(
        "rejected configuration change; keeping the last good state",
        1,
        Duration::from_secs(2),
    )
    .expect("rejected");
    let error = b.records("rejected configuration change; keeping the last good state")[0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("policies[0]") && error.contains("ports") && error.contains("line"),
        "{error}"
    );
    assert!(
        !connects(&bed, APP, "a1", "b1", 7000),
        "the last good policy is still in force"
    );
    assert!(
        connects(&bed, APP, "a2", "b1", 7000),
        "and still only for a1"
    );
    let status = plain_conn
        .wait(Duration::from_secs(15))
        .expect("plaintext connection finishes");
    assert!(status.success(), "{}", plain_conn.stderr());
}

/// Issue 13, item 6: attributes the node cannot see fail safe, as istiod's ambient translation
/// intends. `remoteIpBlocks` (an L7 proxy's `X-Forwarded-For` client) is not the connection's
/// source address: a DENY on it denies every source, an ALLOW whose only match is on it admits
/// nothing. And where Istio's documentation and istiod disagree on `PeerAuthentication`, the
/// stricter reading holds: a namespace `DISABLE` does not open a mesh-wide `STRICT`, and a
/// root-namespace policy with a selector makes the workloads it selects `STRICT`.
#[test]
fn what_the_node_cannot_see_fails_safe() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = servers(&bed, "b1");
    let (_a, mut b) = mesh(&bed);
    let a1 = bed.pod("a1").ipv4();
    let a2 = bed.pod("a2").ipv4();
    assert!(
        connects(&bed, APP, "a1", "b1", 7000) && connects(&bed, APP, "b2", "b1", 7000),
        "no policy: all allowed"
    );

    // DENY on a2's address as remoteIpBlocks: every source is denied, a1 and plaintext too.
    apply(
        &bed,
        &mut b,
        &authz(
            "deny-remote",
            &format!(
                "action: DENY\nrules:\n- from:\n  - source:\n      remoteIpBlocks: [\"{a2}\"]"
            ),
        ),
    );
    for from in ["a1", "a2", "b2"] {
        assert!(
            !connects(&bed, APP, from, "b1", 7000),
            "{from}: a DENY on remoteIpBlocks denies every source"
        );
    }
    assert_eq!(
        denials(&b),
        [
            "default/deny-remote",
            "default/deny-remote",
            "default/deny-remote"
        ]
    );
    let notes = b.records("policy is enforced at the node as noted");
    assert!(
        notes.iter().any(|r| r["policy"] == "default/deny-remote"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.contains("remoteIpBlocks"))),
        "the policy is reported: {notes:?}"
    );

    // ALLOW whose only match is a1's address as remoteIpBlocks: nothing gets in, a1 neither.
    apply(
        &bed,
        &mut b,
        &authz(
            "allow-remote",
            &format!(
                "action: ALLOW\nrules:\n- from:\n  - source:\n      remoteIpBlocks: [\"{a1}\"]"
            ),
        ),
    );
    for from in ["a1", "a2", "b2"] {
        assert!(
            !connects(&bed, APP, from, "b1", 7000),
            "{from}: an ALLOW on remoteIpBlocks admits nobody"
        );
    }
    assert_eq!(
        denials(&b)[3..],
        [
            "no ALLOW policy matched",
            "no ALLOW policy matched",
            "no ALLOW policy matched"
        ]
    );

    // A mesh-wide STRICT (root namespace) with DISABLE for the namespace: still STRICT.
    let mesh_strict = peer_authentication("istio-system", "mesh", "", "STRICT");
    apply(
        &bed,
        &mut b,
        &format!(
            "{mesh_strict}{}",
            peer_authentication("default", "ns", "", "DISABLE")
        ),
    );
    assert!(
        !connects(&bed, APP, "b2", "b1", 7000),
        "a namespace DISABLE does not open the mesh-wide STRICT"
    );
    assert!(connects(&bed, APP, "a1", "b1", 7000), "mTLS still admitted");

    // A root-namespace policy selecting b1: STRICT for b1 although the namespace is PERMISSIVE.
    apply(
        &bed,
        &mut b,
        &format!(
            "{}{}",
            peer_authentication("default", "ns", "", "PERMISSIVE"),
            peer_authentication("istio-system", "b1-strict", "{app: b1}", "STRICT")
        ),
    );
    assert!(
        !connects(&bed, APP, "b2", "b1", 7000),
        "a root-namespace selector makes b1 STRICT"
    );
    assert_eq!(
        b.records("plaintext connection refused: PeerAuthentication is STRICT")
            .len(),
        2
    );
    apply(
        &bed,
        &mut b,
        &peer_authentication("default", "ns", "", "PERMISSIVE"),
    );
    assert!(
        connects(&bed, APP, "b2", "b1", 7000),
        "PERMISSIVE alone admits plaintext (the checks above were not vacuous)"
    );
}
