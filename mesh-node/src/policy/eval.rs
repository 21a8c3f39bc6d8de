//! Compiled authorization policies and their evaluation.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::{
    ConnInfo, DRY_RUN_ANNOTATION, Decision,
    model::{Action, Condition, IpBlock, PolicyDocument, Rule, Source, parse_block},
};
use crate::state::Workload;

/// A string pattern: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    fn new(text: &str) -> Self {
        if text == "*" {
            Pattern::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else {
            Pattern::Exact(text.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(p) => value.starts_with(p.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
            Pattern::Any => !value.is_empty(),
        }
    }
}

/// A list constraint: empty = no constraint; otherwise the value must (or, negated, must not)
/// match one entry. An absent value (plaintext: no principal) matches no positive entry and so
/// satisfies every negative list.
#[derive(Clone, Debug, Default)]
struct Patterns {
    any_of: Vec<Pattern>,
    none_of: Vec<Pattern>,
}

impl Patterns {
    fn new(positive: &[String], negative: &[String]) -> Self {
        Self {
            any_of: positive.iter().map(|p| Pattern::new(p)).collect(),
            none_of: negative.iter().map(|p| Pattern::new(p)).collect(),
        }
    }

    fn matches(&self, value: Option<&str>) -> bool {
        let hit = |list: &[Pattern]| value.is_some_and(|v| list.iter().any(|p| p.matches(v)));
        (self.any_of.is_empty() || hit(&self.any_of)) && !hit(&self.none_of)
    }
}

#[derive(Clone, Debug, Default)]
struct Blocks {
    any_of: Vec<IpBlock>,
    none_of: Vec<IpBlock>,
}

impl Blocks {
    fn matches(&self, ip: IpAddr) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(|b| b.contains(ip)))
            && !self.none_of.iter().any(|b| b.contains(ip))
    }
}

#[derive(Clone, Debug, Default)]
struct Ports {
    any_of: Vec<u16>,
    none_of: Vec<u16>,
}

impl Ports {
    fn matches(&self, port: u16) -> bool {
        (self.any_of.is_empty() || self.any_of.contains(&port)) && !self.none_of.contains(&port)
    }
}

#[derive(Clone, Debug, Default)]
struct CompiledSource {
    principals: Patterns,
    namespaces: Patterns,
    service_accounts: Patterns,
    ips: Blocks,
}

/// A `when` condition on an L4 attribute.
#[derive(Clone, Debug)]
enum When {
    SourceIp(Blocks),
    SourceNamespace(Patterns),
    SourcePrincipal(Patterns),
    DestinationIp(Blocks),
    DestinationPort(Ports),
}

#[derive(Clone, Debug, Default)]
struct CompiledRule {
    /// Any source may match (empty: any connection).
    from: Vec<CompiledSource>,
    /// Any operation may match (empty: any port).
    to: Vec<Ports>,
    /// All conditions must hold.
    when: Vec<When>,
}

/// An `AuthorizationPolicy` ready for evaluation.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub dry_run: bool,
    /// Bound to a gateway or waypoint (`targetRef(s)`): never applies at the node.
    pub targets_waypoint: bool,
    rules: Vec<CompiledRule>,
    /// What L7 content was dropped or ignored, if any.
    pub l7_note: Option<String>,
}

fn blocks(any: &[IpBlock], any2: &[IpBlock], none: &[IpBlock], none2: &[IpBlock]) -> Blocks {
    Blocks {
        any_of: any.iter().chain(any2).copied().collect(),
        none_of: none.iter().chain(none2).copied().collect(),
    }
}

fn source_has_l7(s: &Source) -> bool {
    !s.request_principals.is_empty() || !s.not_request_principals.is_empty()
}

fn compile_source(s: &Source) -> CompiledSource {
    CompiledSource {
        principals: Patterns::new(&s.principals, &s.not_principals),
        namespaces: Patterns::new(&s.namespaces, &s.not_namespaces),
        service_accounts: Patterns::new(&s.service_accounts, &s.not_service_accounts),
        ips: blocks(
            &s.ip_blocks,
            &s.remote_ip_blocks,
            &s.not_ip_blocks,
            &s.not_remote_ip_blocks,
        ),
    }
}

/// `source.ip` etc. as an L4 condition; `None` for keys only an L7 proxy can evaluate.
fn compile_when(c: &Condition) -> Option<When> {
    let parse_blocks = |v: &[String]| {
        v.iter()
            .filter_map(|s| parse_block(s))
            .map(IpBlock)
            .collect()
    };
    let parse_ports = |v: &[String]| v.iter().filter_map(|s| s.parse().ok()).collect();
    Some(match c.key.as_str() {
        "source.ip" => When::SourceIp(Blocks {
            any_of: parse_blocks(&c.values),
            none_of: parse_blocks(&c.not_values),
        }),
        "source.namespace" => When::SourceNamespace(Patterns::new(&c.values, &c.not_values)),
        "source.principal" => When::SourcePrincipal(Patterns::new(&c.values, &c.not_values)),
        "destination.ip" => When::DestinationIp(Blocks {
            any_of: parse_blocks(&c.values),
            none_of: parse_blocks(&c.not_values),
        }),
        "destination.port" => When::DestinationPort(Ports {
            any_of: parse_ports(&c.values),
            none_of: parse_ports(&c.not_values),
        }),
        _ => return None,
    })
}

impl CompiledPolicy {
    /// Compiles an `AuthorizationPolicy` document (already validated by the store).
    #[must_use]
    pub fn compile(doc: &PolicyDocument) -> Self {
        let spec = &doc.spec;
        let action = spec.action.unwrap_or(Action::Allow);
        let mut l7 = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            let (compiled, has_l7) = compile_rule(rule);
            match (has_l7, action) {
                (false, _) => rules.push(compiled),
                (true, Action::Allow) => {
                    l7.push(format!("ALLOW rule {i} uses L7 fields and is dropped"));
                }
                (true, Action::Deny) => {
                    l7.push(format!(
                        "DENY rule {i} uses L7 fields; its L4 part is enforced"
                    ));
                    rules.push(compiled);
                }
            }
        }
        Self {
            name: format!("{}/{}", doc.metadata.namespace, doc.metadata.name),
            namespace: doc.metadata.namespace.clone(),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            action,
            dry_run: doc
                .metadata
                .annotations
                .get(DRY_RUN_ANNOTATION)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            targets_waypoint: spec.target_ref.is_some() || spec.target_refs.is_some(),
            rules,
            l7_note: (!l7.is_empty()).then(|| l7.join("; ")),
        }
    }

    fn applies_to(&self, root_namespace: &str, workload: &Workload) -> bool {
        if self.targets_waypoint {
            return false;
        }
        let in_scope = self.namespace == root_namespace || self.namespace == workload.namespace;
        in_scope
            && self.selector.as_ref().is_none_or(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| workload.labels.get(k) == Some(v))
            })
    }

    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

/// Compiles a rule, stripping L7 content; reports whether there was any.
fn compile_rule(rule: &Rule) -> (CompiledRule, bool) {
    let mut has_l7 = false;
    let from = rule
        .from
        .iter()
        .map(|f| {
            has_l7 |= source_has_l7(&f.source);
            compile_source(&f.source)
        })
        .collect();
    let to = rule
        .to
        .iter()
        .map(|t| {
            let op = &t.operation;
            has_l7 |= [
                &op.hosts,
                &op.not_hosts,
                &op.methods,
                &op.not_methods,
                &op.paths,
                &op.not_paths,
            ]
            .iter()
            .any(|v| !v.is_empty());
            Ports {
                any_of: op.ports.iter().map(|p| p.0).collect(),
                none_of: op.not_ports.iter().map(|p| p.0).collect(),
            }
        })
        .collect();
    let when = rule
        .when
        .iter()
        .filter_map(|c| {
            let compiled = compile_when(c);
            has_l7 |= compiled.is_none();
            compiled
        })
        .collect();
    (CompiledRule { from, to, when }, has_l7)
}

/// Istio's principal form: the SPIFFE id without `spiffe://`.
fn principal(conn: &ConnInfo<'_>) -> Option<String> {
    conn.src_identity.map(|id| {
        format!(
            "{}/ns/{}/sa/{}",
            id.trust_domain, id.namespace, id.service_account
        )
    })
}

impl CompiledRule {
    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        let principal = principal(conn);
        let namespace = conn.src_identity.map(|id| id.namespace.as_str());
        let service_account = conn
            .src_identity
            .map(|id| format!("{}/{}", id.namespace, id.service_account));
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                s.principals.matches(principal.as_deref())
                    && s.namespaces.matches(namespace)
                    && s.service_accounts.matches(service_account.as_deref())
                    && s.ips.matches(conn.src_ip)
            });
        let to = self.to.is_empty() || self.to.iter().any(|p| p.matches(conn.dst_port));
        from && to
            && self.when.iter().all(|w| match w {
                When::SourceIp(b) => b.matches(conn.src_ip),
                When::SourceNamespace(p) => p.matches(namespace),
                When::SourcePrincipal(p) => p.matches(principal.as_deref()),
                When::DestinationIp(b) => b.matches(conn.dst_ip),
                When::DestinationPort(p) => p.matches(conn.dst_port),
            })
    }
}

/// The policies that apply to one workload, by action.
#[derive(Debug, Default)]
pub struct Applicable {
    deny: Vec<Arc<CompiledPolicy>>,
    allow: Vec<Arc<CompiledPolicy>>,
    dry_run: Vec<Arc<CompiledPolicy>>,
}

impl Applicable {
    pub(super) fn select(all: &[Arc<CompiledPolicy>], root: &str, workload: &Workload) -> Self {
        let mut out = Self::default();
        for policy in all.iter().filter(|p| p.applies_to(root, workload)) {
            let list = match (policy.dry_run, policy.action) {
                (true, _) => &mut out.dry_run,
                (false, Action::Deny) => &mut out.deny,
                (false, Action::Allow) => &mut out.allow,
            };
            list.push(Arc::clone(policy));
        }
        out
    }

    /// Any matching DENY denies; no ALLOW policy allows; otherwise an ALLOW must match.
    #[must_use]
    pub fn decide(&self, conn: &ConnInfo<'_>) -> Decision {
        let dry_run = self.dry_run_outcome(conn);
        if let Some(p) = self.deny.iter().find(|p| p.matches(conn)) {
            return Decision {
                allowed: false,
                reason: p.name.clone(),
                dry_run,
            };
        }
        if self.allow.is_empty() {
            return Decision {
                allowed: true,
                reason: "no ALLOW policy applies".to_owned(),
                dry_run,
            };
        }
        match self.allow.iter().find(|p| p.matches(conn)) {
            Some(p) => Decision {
                allowed: true,
                reason: p.name.clone(),
                dry_run,
            },
            None => Decision {
                allowed: false,
                reason: "no ALLOW policy matched".to_owned(),
                dry_run,
            },
        }
    }

    /// What the dry-run policies would decide on their own, if any applies.
    fn dry_run_outcome(&self, conn: &ConnInfo<'_>) -> Option<(bool, String)> {
        let first = self.dry_run.first()?;
        for p in self.dry_run.iter().filter(|p| p.action == Action::Deny) {
            if p.matches(conn) {
                return Some((false, p.name.clone()));
            }
        }
        let allows: Vec<_> = self
            .dry_run
            .iter()
            .filter(|p| p.action == Action::Allow)
            .collect();
        if allows.is_empty() {
            return Some((true, first.name.clone()));
        }
        match allows.iter().find(|p| p.matches(conn)) {
            Some(p) => Some((true, p.name.clone())),
            None => Some((false, allows[0].name.clone())),
        }
    }
}
