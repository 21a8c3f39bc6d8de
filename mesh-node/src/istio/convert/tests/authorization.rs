//! Authorizations, decided by the policy engine.

use super::*;

fn exact(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Exact(s.to_owned())),
    }
}
fn prefix(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Prefix(s.to_owned())),
    }
}
fn suffix(s: &str) -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Suffix(s.to_owned())),
    }
}
fn presence() -> sec::StringMatch {
    sec::StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}
fn cidr(ip: &str, length: u32) -> sec::Address {
    sec::Address {
        address: octets(ip),
        length,
    }
}
fn clause(matches: Vec<sec::Match>) -> sec::Clause {
    sec::Clause { matches }
}

fn auth(
    scope: sec::Scope,
    action: sec::Action,
    rules: Vec<Vec<sec::Clause>>,
) -> sec::Authorization {
    sec::Authorization {
        name: "p".to_owned(),
        namespace: "shop".to_owned(),
        scope: scope as i32,
        action: action as i32,
        rules: rules
            .into_iter()
            .map(|clauses| sec::Rule { clauses })
            .collect(),
    }
}

fn store_of(auths: &[sec::Authorization]) -> PolicyStore {
    let docs: Vec<PolicyDocument> = auths
        .iter()
        .map(|a| authorization(&a.encode_to_vec(), ROOT).expect("converts"))
        .collect();
    PolicyStore::new(ROOT, &docs).expect("the converted documents form a store")
}

fn target(ns: &str, policies: &[&str]) -> Workload {
    // Distinct names: a store caches what applies by workload name.
    let name = format!("dst-{}", policies.join("-").replace('/', "."));
    let mut w = xds_workload(&name, ns, &["10.9.0.1"]);
    w.authorization_policies = policies.iter().map(|p| (*p).to_owned()).collect();
    convert_workload(w).workload
}

/// A connection from `src` (`ns/sa`, or `""` for plaintext) at `ip` to the target at
/// `dst_ip:port`.
fn allowed(
    store: &PolicyStore,
    w: &Workload,
    src: &str,
    ip: &str,
    dst_ip: &str,
    port: u16,
) -> bool {
    let identity = src
        .split_once('/')
        .map(|(ns, sa)| Identity::new("cluster.local", ns, sa));
    store
        .authorize(
            w,
            &ConnInfo {
                src_ip: ip.parse().unwrap(),
                src_identity: identity.as_ref(),
                dst_ip: dst_ip.parse().unwrap(),
                dst_port: port,
                trust_aliases: &[],
            },
        )
        .allowed
}

#[test]
fn clauses_and_matches_combine_exactly() {
    // ALLOW when (namespace `front` AND port 80, OR principal prefix `cluster.local/ns/ops/`)
    //        AND (source in 10.0.0.0/8 but not 10.6.0.0/16)
    //   OR when the destination is 10.9.0.1 on a port other than 22.
    let rule1 = vec![
        clause(vec![
            sec::Match {
                namespaces: vec![exact("front")],
                destination_ports: vec![80],
                ..sec::Match::default()
            },
            sec::Match {
                principals: vec![prefix("cluster.local/ns/ops/")],
                ..sec::Match::default()
            },
        ]),
        clause(vec![sec::Match {
            source_ips: vec![cidr("10.0.0.0", 8)],
            not_source_ips: vec![cidr("10.6.0.0", 16)],
            ..sec::Match::default()
        }]),
    ];
    let rule2 = vec![clause(vec![sec::Match {
        destination_ips: vec![cidr("10.9.0.1", 32)],
        not_destination_ports: vec![22],
        ..sec::Match::default()
    }])];
    let s = store_of(&[auth(
        sec::Scope::Namespace,
        sec::Action::Allow,
        vec![rule1, rule2],
    )]);
    let w = target("shop", &[]);
    let at = |src, ip, dst, port| allowed(&s, &w, src, ip, dst, port);
    assert!(
        at("front/a", "10.1.1.1", "10.9.0.2", 80),
        "rule 1, first match"
    );
    assert!(
        !at("front/a", "10.1.1.1", "10.9.0.2", 81),
        "kinds of a match are AND-ed"
    );
    assert!(
        at("ops/x", "10.1.1.1", "10.9.0.2", 5432),
        "rule 1, second match (OR)"
    );
    assert!(!at("front/a", "10.6.1.1", "10.9.0.2", 80), "not_source_ips");
    assert!(
        !at("front/a", "192.168.0.1", "10.9.0.2", 80),
        "clauses are AND-ed"
    );
    assert!(
        !at("", "10.1.1.1", "10.9.0.2", 80),
        "plaintext has no namespace"
    );
    assert!(
        at("any/one", "192.168.0.1", "10.9.0.1", 443),
        "rule 2 (rules OR-ed)"
    );
    assert!(
        !at("any/one", "192.168.0.1", "10.9.0.1", 22),
        "not_destination_ports"
    );
    assert!(
        at("", "192.168.0.1", "10.9.0.1", 443),
        "rule 2 needs no identity"
    );
}

#[test]
fn string_matches_and_negations() {
    let rule = |m: sec::Match| vec![clause(vec![m])];
    let s = store_of(&[auth(
        sec::Scope::Namespace,
        sec::Action::Allow,
        vec![
            rule(sec::Match {
                namespaces: vec![exact("a"), prefix("team-"), suffix("-prod")],
                not_namespaces: vec![exact("team-blocked")],
                ..sec::Match::default()
            }),
            rule(sec::Match {
                principals: vec![presence()],
                destination_ports: vec![9000],
                ..sec::Match::default()
            }),
            rule(sec::Match {
                not_principals: vec![suffix("/sa/bad")],
                destination_ports: vec![9001],
                ..sec::Match::default()
            }),
        ],
    )]);
    let w = target("shop", &[]);
    let at = |src, port| allowed(&s, &w, src, "10.1.1.1", "10.9.0.1", port);
    assert!(at("a/x", 1), "exact");
    assert!(!at("ab/x", 1), "exact is not a prefix");
    assert!(at("team-blue/x", 1), "prefix");
    assert!(at("shop-prod/x", 1), "suffix");
    assert!(!at("team-blocked/x", 1), "not_namespaces");
    assert!(!at("other/x", 1));
    assert!(at("other/x", 9000), "presence: any identity");
    assert!(!at("", 9000), "presence: plaintext has none");
    assert!(at("other/x", 9001), "not_principals");
    assert!(at("", 9001), "a not_ kind matches what has no value");
    assert!(!at("other/bad", 9001), "not_principals excludes");
}

#[test]
fn empty_rules_clauses_and_matches() {
    let w = target("shop", &[]);
    let decide = |rules: Vec<Vec<sec::Clause>>, action| {
        let s = store_of(&[auth(sec::Scope::Namespace, action, rules)]);
        allowed(&s, &w, "x/y", "10.1.1.1", "10.9.0.1", 80)
    };
    assert!(
        !decide(vec![], sec::Action::Allow),
        "no rules: the ALLOW matches nothing"
    );
    assert!(
        decide(vec![vec![]], sec::Action::Allow),
        "a rule without clauses matches all"
    );
    assert!(
        decide(vec![vec![clause(vec![])]], sec::Action::Allow),
        "a clause without matches holds"
    );
    assert!(
        !decide(
            vec![vec![clause(vec![sec::Match::default()])]],
            sec::Action::Allow
        ),
        "an empty match never matches (as in ztunnel)"
    );
    assert!(
        !decide(vec![vec![]], sec::Action::Deny),
        "a DENY rule without clauses denies all"
    );
    assert!(
        decide(vec![], sec::Action::Deny),
        "a DENY without rules denies nothing"
    );
}

#[test]
fn scopes() {
    let deny_all = |scope, namespace: &str| {
        let mut a = auth(scope, sec::Action::Deny, vec![vec![]]);
        namespace.clone_into(&mut a.namespace);
        a
    };
    let conn = |s: &PolicyStore, w: &Workload| allowed(s, w, "x/y", "10.1.1.1", "10.9.0.1", 80);
    let shop = target("shop", &[]);
    let other = target("other", &[]);
    let root = target(ROOT, &[]);

    let global = store_of(&[deny_all(sec::Scope::Global, ROOT)]);
    assert!(!conn(&global, &shop) && !conn(&global, &other) && !conn(&global, &root));

    let namespace = store_of(&[deny_all(sec::Scope::Namespace, "shop")]);
    assert!(!conn(&namespace, &shop));
    assert!(conn(&namespace, &other), "another namespace");

    let in_root = store_of(&[deny_all(sec::Scope::Namespace, ROOT)]);
    assert!(!conn(&in_root, &root));
    assert!(
        conn(&in_root, &shop),
        "a NAMESPACE policy in the root namespace is not global"
    );

    let selected = store_of(&[deny_all(sec::Scope::WorkloadSelector, "shop")]);
    assert!(!conn(&selected, &target("shop", &["shop/p"])), "listed");
    assert!(conn(&selected, &shop), "not listed");
    assert!(
        conn(&selected, &target("shop", &["shop/q"])),
        "another policy listed"
    );
    assert!(
        !conn(&selected, &target("other", &["shop/p"])),
        "exactly the workloads listing it"
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn what_cannot_be_converted_exactly_is_an_error() {
    let with_match = |m: sec::Match| {
        auth(
            sec::Scope::Namespace,
            sec::Action::Allow,
            vec![vec![clause(vec![m])]],
        )
    };
    let cases: Vec<(sec::Authorization, &str)> = vec![
        (
            with_match(sec::Match {
                namespaces: vec![exact("a*")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].namespaces[0]",
        ),
        (
            with_match(sec::Match {
                principals: vec![exact("")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].principals[0]",
        ),
        (
            with_match(sec::Match {
                not_namespaces: vec![suffix("x*")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].not_namespaces[0]",
        ),
        (
            with_match(sec::Match {
                namespaces: vec![prefix("")],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].namespaces[0]",
        ),
        (
            with_match(sec::Match {
                principals: vec![sec::StringMatch { match_type: None }],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].principals[0].match_type",
        ),
        (
            with_match(sec::Match {
                destination_ports: vec![0],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].destination_ports[0]",
        ),
        (
            with_match(sec::Match {
                not_destination_ports: vec![65_536],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].not_destination_ports[0]",
        ),
        (
            with_match(sec::Match {
                source_ips: vec![cidr("10.0.0.0", 33)],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].source_ips[0].length",
        ),
        (
            with_match(sec::Match {
                destination_ips: vec![sec::Address {
                    address: vec![10, 0, 0],
                    length: 8,
                }],
                ..sec::Match::default()
            }),
            "rules[0].clauses[0].matches[0].destination_ips[0].address",
        ),
        (
            sec::Authorization {
                scope: 3,
                ..auth(sec::Scope::Global, sec::Action::Allow, vec![])
            },
            "scope",
        ),
        (
            sec::Authorization {
                action: 2,
                ..auth(sec::Scope::Global, sec::Action::Allow, vec![])
            },
            "action",
        ),
        (
            sec::Authorization {
                name: String::new(),
                ..auth(sec::Scope::Global, sec::Action::Allow, vec![])
            },
            "name",
        ),
    ];
    for (a, field) in cases {
        let e = authorization(&a.encode_to_vec(), ROOT).unwrap_err();
        assert!(
            e.to_string().contains(&format!("`{field}`")),
            "{field}: {e}"
        );
    }

    // 33 clauses of two matches each: 2^33 rules in normal form.
    let wide = clause(vec![
        sec::Match {
            destination_ports: vec![1],
            ..sec::Match::default()
        },
        sec::Match {
            destination_ports: vec![2],
            ..sec::Match::default()
        },
    ]);
    let a = auth(
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![vec![wide.clone(); 33]],
    );
    assert!(matches!(
        authorization(&a.encode_to_vec(), ROOT),
        Err(ConvertError::Inexact { .. })
    ));
    // Ten such clauses (1024 rules) are still exact.
    let a = auth(
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![vec![wide; 10]],
    );
    assert_eq!(
        authorization(&a.encode_to_vec(), ROOT)
            .unwrap()
            .spec
            .rules
            .map(|r| r.len()),
        Some(1024)
    );
}

#[test]
fn unknown_fields_are_detected() {
    let a = auth(sec::Scope::Namespace, sec::Action::Allow, vec![vec![]]);
    let mut bytes = a.encode_to_vec();
    assert!(authorization(&bytes, ROOT).is_ok());
    // Field 6 (`dry_run` in newer istiod), varint 1: silently dropped by prost.
    bytes.extend_from_slice(&[6 << 3, 1]);
    assert_eq!(
        authorization(&bytes, ROOT),
        Err(ConvertError::UnknownFields {
            received: bytes.len(),
            understood: bytes.len() - 2
        })
    );
    // An unknown field inside a match is found too.
    let mut m = sec::Match {
        destination_ports: vec![80],
        ..sec::Match::default()
    }
    .encode_to_vec();
    m.extend_from_slice(&[11 << 3 | 2, 0]);
    let clause_bytes = [&[2 << 3 | 2, u8::try_from(m.len()).unwrap()][..], &m].concat();
    let rule_bytes = [
        &[1 << 3 | 2, u8::try_from(clause_bytes.len()).unwrap()][..],
        &clause_bytes,
    ]
    .concat();
    let mut nested = auth(sec::Scope::Namespace, sec::Action::Allow, vec![]).encode_to_vec();
    nested.extend_from_slice(&[5 << 3 | 2, u8::try_from(rule_bytes.len()).unwrap()]);
    nested.extend_from_slice(&rule_bytes);
    assert!(
        sec::Authorization::decode(&nested[..]).unwrap().rules[0].clauses[0].matches[0]
            .destination_ports
            == [80],
        "the test message decodes"
    );
    assert!(matches!(
        authorization(&nested, ROOT),
        Err(ConvertError::UnknownFields { .. })
    ));
}

#[test]
fn strictest_of_its_kind_on_its_scope() {
    let shop = target("shop", &[]);
    let other = target("other", &[]);
    let listed = target("shop", &["shop/p"]);
    let conn = |s: &PolicyStore, w: &Workload| allowed(s, w, "x/y", "10.1.1.1", "10.9.0.1", 80);
    let store = |doc: PolicyDocument| PolicyStore::new(ROOT, &[doc]).expect("a valid stand-in");

    // An ALLOW that cannot be converted allows nothing on its scope.
    let mut bad_allow = auth(sec::Scope::Namespace, sec::Action::Allow, vec![vec![]]);
    bad_allow.rules[0].clauses = vec![clause(vec![sec::Match {
        destination_ports: vec![0],
        ..sec::Match::default()
    }])];
    let bytes = bad_allow.encode_to_vec();
    assert!(authorization(&bytes, ROOT).is_err());
    let s = store(strictest_authorization(&bytes, "shop/p", ROOT));
    assert!(!conn(&s, &shop), "its namespace: nothing allowed");
    assert!(conn(&s, &other), "other namespaces unaffected");

    // A DENY denies everything on its scope.
    let mut bad_deny = bad_allow.clone();
    bad_deny.action = sec::Action::Deny as i32;
    bad_deny.scope = sec::Scope::WorkloadSelector as i32;
    let s = store(strictest_authorization(
        &bad_deny.encode_to_vec(),
        "shop/p",
        ROOT,
    ));
    assert!(!conn(&s, &listed), "the selected workload");
    assert!(conn(&s, &shop), "only the selected workloads");

    // An unknown action: denied; an unknown scope: the namespace.
    let mut unknown = bad_allow.clone();
    unknown.action = 9;
    unknown.scope = 9;
    let s = store(strictest_authorization(
        &unknown.encode_to_vec(),
        "shop/p",
        ROOT,
    ));
    assert!(!conn(&s, &shop) && conn(&s, &other));

    // Nothing decodes: DENY on the namespace of the resource name.
    let s = store(strictest_authorization(b"\xff\xff\xff", "shop/p", ROOT));
    assert!(!conn(&s, &shop) && conn(&s, &other));
    let s = store(strictest_authorization(b"\xff\xff\xff", "garbage", ROOT));
    assert!(
        !conn(&s, &shop) && !conn(&s, &other),
        "no namespace: mesh-wide"
    );
}

#[test]
fn document_names_say_where_they_come_from() {
    let a = auth(sec::Scope::WorkloadSelector, sec::Action::Allow, vec![]);
    let doc = authorization(&a.encode_to_vec(), ROOT).unwrap();
    assert_eq!(doc.metadata.namespace, ROOT);
    assert_eq!(doc.metadata.name, "shop.p");
    let a = auth(sec::Scope::Namespace, sec::Action::Allow, vec![]);
    let doc = authorization(&a.encode_to_vec(), ROOT).unwrap();
    assert_eq!(
        (doc.metadata.namespace.as_str(), doc.metadata.name.as_str()),
        ("shop", "p")
    );
}
