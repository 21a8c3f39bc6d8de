//! Compiled authorization policies and their evaluation.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::{
    ConnInfo, DRY_RUN_ANNOTATION, Decision,
    model::{Action, Condition, IpBlock, PolicyDocument, Rule, Source, parse_block},
};
use crate::workload::Workload;

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

    /// As [`Patterns::matches`] for a value known by several equivalent forms (a principal
    /// in each of the trust domains that are aliases of each other): an entry matched by any
    /// form counts, positive or negative (as Istio expands policies to the aliases). No form:
    /// no value.
    fn matches_forms(&self, forms: &[String]) -> bool {
        let hit = |list: &[Pattern]| forms.iter().any(|v| list.iter().any(|p| p.matches(v)));
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

/// A service-account constraint: exact `(namespace, name)` pairs, as Istio's `serviceAccounts`
/// (no wildcards; a bare name is in the policy's namespace).
#[derive(Clone, Debug, Default)]
struct ServiceAccounts {
    any_of: Vec<(String, String)>,
    none_of: Vec<(String, String)>,
}

impl ServiceAccounts {
    fn matches(&self, value: Option<(&str, &str)>) -> bool {
        let hit = |list: &[(String, String)]| {
            value.is_some_and(|(ns, sa)| list.iter().any(|(n, s)| n == ns && s == sa))
        };
        (self.any_of.is_empty() || hit(&self.any_of)) && !hit(&self.none_of)
    }
}

#[derive(Clone, Debug, Default)]
struct CompiledSource {
    principals: Patterns,
    namespaces: Patterns,
    service_accounts: ServiceAccounts,
    ips: Blocks,
}

/// A `when` condition on an L4 attribute.
#[derive(Clone, Debug)]
enum When {
    SourceIp(Blocks),
    SourceNamespace(Patterns),
    SourcePrincipal(Patterns),
    SourceServiceAccount(ServiceAccounts),
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
    /// What the node enforces differently from what the document says (attributes it cannot
    /// see), if anything.
    pub note: Option<String>,
}

/// A field of a policy that is invalid: `(field path, reason)`.
pub(super) type Invalid = (String, String);

/// `ns/name` or `name` (in `policy_ns`), as Istio validates `serviceAccounts`.
fn service_account(value: &str, policy_ns: &str) -> Result<(String, String), String> {
    let bad = || format!("`{value}`: expected `name` or `namespace/name`, without wildcards");
    if value.is_empty() || value.contains('*') {
        return Err(bad());
    }
    match value.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        Some(_) => Err(bad()),
        None => Ok((policy_ns.to_owned(), value.to_owned())),
    }
}

fn service_accounts(
    positive: &[String],
    negative: &[String],
    policy_ns: &str,
) -> Result<ServiceAccounts, String> {
    let parse = |list: &[String]| {
        list.iter()
            .map(|v| service_account(v, policy_ns))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(ServiceAccounts {
        any_of: parse(positive)?,
        none_of: parse(negative)?,
    })
}

/// Istio refuses empty strings in match lists; an empty pattern would match nothing (and so
/// exclude nothing in a `not` list).
fn no_empty(at: &str, lists: &[(&str, &[String])]) -> Result<(), Invalid> {
    for (name, list) in lists {
        if list.iter().any(String::is_empty) {
            return Err((format!("{at}.{name}"), "empty value".to_owned()));
        }
    }
    Ok(())
}

/// The source fields the node cannot see (`remoteIpBlocks` come from `X-Forwarded-For` or the
/// PROXY protocol, request principals from a JWT), by name.
fn invisible_source_fields(s: &Source) -> Vec<&'static str> {
    [
        ("remoteIpBlocks", s.remote_ip_blocks.is_empty()),
        ("notRemoteIpBlocks", s.not_remote_ip_blocks.is_empty()),
        ("requestPrincipals", s.request_principals.is_empty()),
        ("notRequestPrincipals", s.not_request_principals.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, empty)| (!empty).then_some(name))
    .collect()
}

fn compile_source(s: &Source, at: &str, policy_ns: &str) -> Result<CompiledSource, Invalid> {
    no_empty(
        at,
        &[
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
        ],
    )?;
    let has_accounts = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_identity = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
    ]
    .iter()
    .any(|l| !l.is_empty());
    if has_accounts && has_identity {
        return Err((
            format!("{at}.serviceAccounts"),
            "cannot be combined with principals or namespaces (as in Istio)".to_owned(),
        ));
    }
    Ok(CompiledSource {
        principals: Patterns::new(&s.principals, &s.not_principals),
        namespaces: Patterns::new(&s.namespaces, &s.not_namespaces),
        service_accounts: service_accounts(&s.service_accounts, &s.not_service_accounts, policy_ns)
            .map_err(|reason| (format!("{at}.serviceAccounts"), reason))?,
        // Only the connection's source address: `remoteIpBlocks` are not the same thing.
        ips: Blocks {
            any_of: s.ip_blocks.clone(),
            none_of: s.not_ip_blocks.clone(),
        },
    })
}

/// A `when` condition: `Some` for an L4 attribute, `None` for one of Istio's attributes that
/// only an L7 proxy sees; an error for a bad value or a key Istio does not know.
fn compile_when(c: &Condition, at: &str, policy_ns: &str) -> Result<Option<When>, Invalid> {
    let invalid = |field: &str, reason: String| Err((format!("{at}.{field}"), reason));
    if c.key.is_empty() {
        return invalid("key", "must not be empty".to_owned());
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        return invalid(
            "values",
            "one of values or notValues must be set".to_owned(),
        );
    }
    let blocks = |field: &str, list: &[String]| {
        list.iter()
            .map(|v| {
                parse_block(v).map(IpBlock).ok_or_else(|| {
                    (
                        format!("{at}.{field}"),
                        format!("invalid IP block `{v}` (expected a CIDR or an IP)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ports = |field: &str, list: &[String]| {
        list.iter()
            .map(|v| match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err((
                    format!("{at}.{field}"),
                    format!("invalid port `{v}` (expected 1-65535)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let key = c.key.as_str();
    if [
        "source.namespace",
        "source.principal",
        "source.ip",
        "destination.ip",
    ]
    .contains(&key)
    {
        no_empty(at, &[("values", &c.values), ("notValues", &c.not_values)])?;
    }
    Ok(Some(match key {
        "source.ip" => When::SourceIp(Blocks {
            any_of: blocks("values", &c.values)?,
            none_of: blocks("notValues", &c.not_values)?,
        }),
        "destination.ip" => When::DestinationIp(Blocks {
            any_of: blocks("values", &c.values)?,
            none_of: blocks("notValues", &c.not_values)?,
        }),
        "destination.port" => When::DestinationPort(Ports {
            any_of: ports("values", &c.values)?,
            none_of: ports("notValues", &c.not_values)?,
        }),
        "source.namespace" => When::SourceNamespace(Patterns::new(&c.values, &c.not_values)),
        "source.principal" => When::SourcePrincipal(Patterns::new(&c.values, &c.not_values)),
        "source.serviceAccount" => When::SourceServiceAccount(
            service_accounts(&c.values, &c.not_values, policy_ns)
                .map_err(|reason| (format!("{at}.values"), reason))?,
        ),
        "remote.ip" | "connection.sni" => return Ok(None),
        k if k.starts_with("request.") || k.starts_with("experimental.envoy.filters.") => {
            return Ok(None);
        }
        "destination.namespace" | "destination.name" | "destination.user" => {
            return invalid(
                "key",
                format!("`{key}` is not supported by Istio (v1beta1 and later)"),
            );
        }
        k if k.starts_with("destination.labels") => {
            return invalid(
                "key",
                format!("`{key}` is replaced by the workload selector"),
            );
        }
        _ => return invalid("key", format!("unknown attribute `{key}`")),
    }))
}

impl CompiledPolicy {
    /// Compiles an `AuthorizationPolicy` document (its `apiVersion`, names and kind-specific
    /// fields already checked by the store); a bad value is `(field, reason)`.
    ///
    /// Attributes the node cannot see follow Istio's ambient semantics (istiod's translation
    /// for ztunnel): an ALLOW rule that uses one never matches (the rule is dropped), a DENY
    /// rule is enforced without them (more restrictive: a source whose only constraint is such
    /// an attribute matches every source).
    pub fn compile(doc: &PolicyDocument) -> Result<Self, Invalid> {
        let spec = &doc.spec;
        let action = spec.action.unwrap_or(Action::Allow);
        let mut notes = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            let (compiled, invisible) =
                compile_rule(rule, &format!("spec.rules[{i}]"), &doc.metadata.namespace)?;
            if invisible.is_empty() {
                rules.push(compiled);
                continue;
            }
            let fields = invisible.join(", ");
            match action {
                Action::Allow => notes.push(format!(
                    "ALLOW rule {i} uses {fields}, which the node cannot see: the rule never matches"
                )),
                Action::Deny => {
                    notes.push(format!(
                        "DENY rule {i} uses {fields}, which the node cannot see: it is enforced \
                         without them (more restrictive)"
                    ));
                    rules.push(compiled);
                }
            }
        }
        Ok(Self {
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
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        })
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

/// Compiles a rule without the attributes the node cannot see; returns their names too.
fn compile_rule(
    rule: &Rule,
    at: &str,
    policy_ns: &str,
) -> Result<(CompiledRule, Vec<String>), Invalid> {
    let mut invisible: Vec<String> = Vec::new();
    let mut note = |name: &str| {
        if !invisible.iter().any(|n| n == name) {
            invisible.push(name.to_owned());
        }
    };
    let mut from = Vec::new();
    for (i, f) in rule.from.iter().enumerate() {
        invisible_source_fields(&f.source)
            .into_iter()
            .for_each(&mut note);
        from.push(compile_source(
            &f.source,
            &format!("{at}.from[{i}].source"),
            policy_ns,
        )?);
    }
    let mut to = Vec::new();
    for t in &rule.to {
        let op = &t.operation;
        for (name, list) in [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ] {
            if !list.is_empty() {
                note(name);
            }
        }
        to.push(Ports {
            any_of: op.ports.iter().map(|p| p.0).collect(),
            none_of: op.not_ports.iter().map(|p| p.0).collect(),
        });
    }
    let mut when = Vec::new();
    for (i, c) in rule.when.iter().enumerate() {
        match compile_when(c, &format!("{at}.when[{i}]"), policy_ns)? {
            Some(w) => when.push(w),
            None => note(&format!("when `{}`", c.key)),
        }
    }
    Ok((CompiledRule { from, to, when }, invisible))
}

/// Istio's principal form (the SPIFFE id without `spiffe://`) of the peer: in its own trust
/// domain and, when that is one of `conn.trust_aliases`, in each of them (a policy naming a
/// principal of the mesh's trust domain applies to the same workload of an alias). None in
/// plaintext.
fn principals(conn: &ConnInfo<'_>) -> Vec<String> {
    let Some(id) = conn.src_identity else {
        return Vec::new();
    };
    let form = |td: &str| format!("{td}/ns/{}/sa/{}", id.namespace, id.service_account);
    let mut forms = vec![form(&id.trust_domain)];
    if conn.trust_aliases.contains(&id.trust_domain) {
        forms.extend(
            conn.trust_aliases
                .iter()
                .filter(|td| **td != id.trust_domain)
                .map(|td| form(td)),
        );
    }
    forms
}

impl CompiledRule {
    fn matches(&self, conn: &ConnInfo<'_>) -> bool {
        let principals = principals(conn);
        let namespace = conn.src_identity.map(|id| id.namespace.as_str());
        let service_account = conn
            .src_identity
            .map(|id| (id.namespace.as_str(), id.service_account.as_str()));
        let from = self.from.is_empty()
            || self.from.iter().any(|s| {
                s.principals.matches_forms(&principals)
                    && s.namespaces.matches(namespace)
                    && s.service_accounts.matches(service_account)
                    && s.ips.matches(conn.src_ip)
            });
        let to = self.to.is_empty() || self.to.iter().any(|p| p.matches(conn.dst_port));
        from && to
            && self.when.iter().all(|w| match w {
                When::SourceIp(b) => b.matches(conn.src_ip),
                When::SourceNamespace(p) => p.matches(namespace),
                When::SourcePrincipal(p) => p.matches_forms(&principals),
                When::SourceServiceAccount(a) => a.matches(service_account),
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
