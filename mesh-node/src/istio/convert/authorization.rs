//! `istio.security.Authorization` → an `AuthorizationPolicy` document with the same
//! decisions: each rule's clauses multiplied out into disjunctive normal form of the engine's
//! L4 `when` conditions, refused wherever the engine would read a value differently.

use std::collections::BTreeMap;

use prost::Message as _;
use serde_json::{Value, json};

use super::{ConvertError, NAMESPACE_LABEL, POLICY_LABEL_PREFIX, ip, known, port, segment};
use crate::{
    istio::proto::security::{self, string_match::MatchType},
    policy::{PolicyDocument, PolicyStore},
};

/// The most rules one Authorization may expand to: each rule's clauses are multiplied out
/// into disjunctive normal form, which the engine's rules express exactly. Beyond this the
/// Authorization is rejected (never approximated).
pub const MAX_EXPANDED_RULES: usize = 1024;

/// Where an Authorization's document goes: its namespace (the root namespace: mesh-wide)
/// and selector, and its name there (prefixed with its own namespace where that differs).
fn placement(
    auth: &security::Authorization,
    scope: security::Scope,
    root_namespace: &str,
) -> (String, Option<BTreeMap<String, String>>, String) {
    let key = format!("{}/{}", auth.namespace, auth.name);
    let (namespace, selector) = match scope {
        security::Scope::Global => (root_namespace.to_owned(), None),
        security::Scope::Namespace if auth.namespace == root_namespace => (
            root_namespace.to_owned(),
            Some([(NAMESPACE_LABEL.to_owned(), auth.namespace.clone())].into()),
        ),
        security::Scope::Namespace => (auth.namespace.clone(), None),
        // Root-namespace documents apply in every namespace: the label alone selects.
        security::Scope::WorkloadSelector => (
            root_namespace.to_owned(),
            Some([(format!("{POLICY_LABEL_PREFIX}{key}"), "true".to_owned())].into()),
        ),
    };
    let name = if namespace == auth.namespace {
        auth.name.clone()
    } else {
        format!("{}.{}", auth.namespace, auth.name)
    };
    (namespace, selector, name)
}

fn document(
    name: &str,
    namespace: &str,
    selector: Option<BTreeMap<String, String>>,
    action: security::Action,
    rules: &[Value],
) -> Result<PolicyDocument, serde_json::Error> {
    let mut spec = json!({
        "action": match action {
            security::Action::Allow => "ALLOW",
            security::Action::Deny => "DENY",
        },
        "rules": rules,
    });
    if let Some(labels) = selector {
        spec["selector"] = json!({ "matchLabels": labels });
    }
    serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    }))
}

/// Decodes and converts one `istio.security.Authorization` into a document with the same
/// decisions.
pub fn authorization(bytes: &[u8], root_namespace: &str) -> Result<PolicyDocument, ConvertError> {
    let auth = security::Authorization::decode(bytes).map_err(|e| ConvertError::Decode {
        message: "istio.security.Authorization",
        reason: e.to_string(),
    })?;
    // prost skips fields it does not know: what it read must be all that was sent.
    if auth.encoded_len() != bytes.len() {
        return Err(ConvertError::UnknownFields {
            received: bytes.len(),
            understood: auth.encoded_len(),
        });
    }
    if auth.name.is_empty() {
        return Err(ConvertError::Missing {
            field: "name".to_owned(),
        });
    }
    segment("namespace", &auth.namespace)?;
    let scope = known(auth.scope, "scope", |v| security::Scope::try_from(v).ok())?;
    let action = known(auth.action, "action", |v| {
        security::Action::try_from(v).ok()
    })?;
    let mut rules = Vec::new();
    for (i, rule) in auth.rules.iter().enumerate() {
        expand_rule(rule, &format!("rules[{i}]"), &mut rules)?;
    }
    let (namespace, selector, name) = placement(&auth, scope, root_namespace);
    let doc = document(&name, &namespace, selector, action, &rules).map_err(|e| {
        ConvertError::Policy {
            field: "rules".to_owned(),
            reason: e.to_string(),
        }
    })?;
    PolicyStore::new(root_namespace, std::slice::from_ref(&doc)).map_err(|e| {
        ConvertError::Policy {
            field: e.field,
            reason: e.reason,
        }
    })?;
    Ok(doc)
}

/// Appends the rule in disjunctive normal form: one engine rule (its `when` conditions all
/// hold) per choice of one match from each clause. An empty match never matches (as in
/// ztunnel); a clause without matches always does.
fn expand_rule(rule: &security::Rule, at: &str, out: &mut Vec<Value>) -> Result<(), ConvertError> {
    let mut products: Vec<Vec<Value>> = vec![Vec::new()];
    for (c, clause) in rule.clauses.iter().enumerate() {
        if clause.matches.is_empty() {
            continue;
        }
        let mut choices = Vec::new();
        for (m, matched) in clause.matches.iter().enumerate() {
            let conditions = conditions(matched, &format!("{at}.clauses[{c}].matches[{m}]"))?;
            if !conditions.is_empty() {
                choices.push(conditions);
            }
        }
        if choices.is_empty() {
            // No match can match: neither can the rule.
            return Ok(());
        }
        if products.len().saturating_mul(choices.len()) + out.len() > MAX_EXPANDED_RULES {
            return Err(ConvertError::Inexact {
                field: at.to_owned(),
                reason: format!("its clauses multiply out to more than {MAX_EXPANDED_RULES} rules"),
            });
        }
        products = products
            .iter()
            .flat_map(|p| {
                choices.iter().map(move |choice| {
                    let mut all = p.clone();
                    all.extend(choice.iter().cloned());
                    all
                })
            })
            .collect();
    }
    out.extend(products.into_iter().map(|when| json!({ "when": when })));
    Ok(())
}

/// A match as `when` conditions (all must hold): one per kind present, a `not_` kind as
/// `notValues`.
fn conditions(m: &security::Match, at: &str) -> Result<Vec<Value>, ConvertError> {
    let mut out = Vec::new();
    let mut push = |key: &str, negated: bool, values: Vec<String>| {
        if !values.is_empty() {
            let list = if negated { "notValues" } else { "values" };
            out.push(json!({ "key": key, list: values }));
        }
    };
    let field = |f: &str| format!("{at}.{f}");
    for (key, list, negated, name) in [
        ("source.namespace", &m.namespaces, false, "namespaces"),
        (
            "source.namespace",
            &m.not_namespaces,
            true,
            "not_namespaces",
        ),
        ("source.principal", &m.principals, false, "principals"),
        (
            "source.principal",
            &m.not_principals,
            true,
            "not_principals",
        ),
    ] {
        let values = list
            .iter()
            .enumerate()
            .map(|(i, s)| pattern(s, &field(&format!("{name}[{i}]"))))
            .collect::<Result<_, _>>()?;
        push(key, negated, values);
    }
    for (key, list, negated, name) in [
        ("source.ip", &m.source_ips, false, "source_ips"),
        ("source.ip", &m.not_source_ips, true, "not_source_ips"),
        (
            "destination.ip",
            &m.destination_ips,
            false,
            "destination_ips",
        ),
        (
            "destination.ip",
            &m.not_destination_ips,
            true,
            "not_destination_ips",
        ),
    ] {
        let values = list
            .iter()
            .enumerate()
            .map(|(i, a)| block(a, &field(&format!("{name}[{i}]"))))
            .collect::<Result<_, _>>()?;
        push(key, negated, values);
    }
    for (list, negated, name) in [
        (&m.destination_ports, false, "destination_ports"),
        (&m.not_destination_ports, true, "not_destination_ports"),
    ] {
        let values = list
            .iter()
            .enumerate()
            .map(|(i, p)| port(*p, || field(&format!("{name}[{i}]"))).map(|p| p.to_string()))
            .collect::<Result<_, _>>()?;
        push("destination.port", negated, values);
    }
    Ok(out)
}

/// A string match in the engine's notation (`x`, `x*`, `*x`, `*`), refused where the engine
/// would read the notation differently from the match.
fn pattern(s: &security::StringMatch, field: &str) -> Result<String, ConvertError> {
    let inexact = |reason: &str| ConvertError::Inexact {
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    match &s.match_type {
        None => Err(ConvertError::Missing {
            field: format!("{field}.match_type"),
        }),
        Some(MatchType::Presence(())) => Ok("*".to_owned()),
        Some(MatchType::Exact(x)) if x.is_empty() => Err(inexact("an empty exact value")),
        Some(MatchType::Exact(x)) if x.starts_with('*') || x.ends_with('*') => {
            Err(inexact("an exact value starting or ending with `*`"))
        }
        Some(MatchType::Exact(x)) => Ok(x.clone()),
        // An empty prefix or suffix matches an absent value in ztunnel, `*` does not.
        Some(MatchType::Prefix(x) | MatchType::Suffix(x)) if x.is_empty() => {
            Err(inexact("an empty prefix or suffix"))
        }
        Some(MatchType::Prefix(x)) => Ok(format!("{x}*")),
        Some(MatchType::Suffix(x)) if x.ends_with('*') => Err(inexact("a suffix ending with `*`")),
        Some(MatchType::Suffix(x)) => Ok(format!("*{x}")),
    }
}

fn block(a: &security::Address, field: &str) -> Result<String, ConvertError> {
    let address = ip(&a.address, || format!("{field}.address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if a.length > max {
        return Err(ConvertError::PrefixLength {
            field: format!("{field}.length"),
            address,
            length: a.length,
        });
    }
    Ok(format!("{address}/{}", a.length))
}

/// What stands in for an Authorization that cannot be converted and has no good version:
/// the strictest policy of its kind on its scope (an ALLOW allows nothing there; a DENY, or
/// one whose action cannot be read, denies everything there). What cannot be read of the
/// scope widens it: the namespace from the resource name (`namespace/name`), else the root
/// namespace (mesh-wide).
#[must_use]
pub fn strictest_authorization(
    bytes: &[u8],
    resource: &str,
    root_namespace: &str,
) -> PolicyDocument {
    // A message that does not decode at all says nothing: only its resource name counts.
    let decoded = security::Authorization::decode(bytes).ok();
    let readable = decoded.is_some();
    let auth = decoded.unwrap_or_default();
    let namespace = if crate::identity::valid_segment(&auth.namespace) {
        Some(auth.namespace.clone())
    } else {
        resource
            .split_once('/')
            .map(|(ns, _)| ns)
            .filter(|ns| crate::identity::valid_segment(ns))
            .map(str::to_owned)
    };
    // No namespace to be read: the whole mesh.
    let unscoped = namespace.is_none();
    let namespace = namespace.unwrap_or_else(|| root_namespace.to_owned());
    let action = security::Action::try_from(auth.action)
        .ok()
        .filter(|_| readable)
        .unwrap_or(security::Action::Deny);
    let scope = security::Scope::try_from(auth.scope)
        .ok()
        .filter(|_| readable)
        // The workloads name the policy by its namespace and name: both must be read.
        .filter(|s| {
            *s != security::Scope::WorkloadSelector
                || (!auth.name.is_empty() && crate::identity::valid_segment(&auth.namespace))
        })
        .unwrap_or(if unscoped {
            security::Scope::Global
        } else {
            security::Scope::Namespace
        });
    let name = if auth.name.is_empty() {
        resource.rsplit('/').next().unwrap_or(resource).to_owned()
    } else {
        auth.name.clone()
    };
    let name = if name.is_empty() {
        "unnamed".to_owned()
    } else {
        name
    };
    let auth = security::Authorization {
        namespace,
        name,
        ..auth
    };
    let (namespace, selector, name) = placement(&auth, scope, root_namespace);
    let rules = match action {
        security::Action::Allow => vec![],
        security::Action::Deny => vec![json!({})],
    };
    document(&name, &namespace, selector, action, &rules).unwrap_or_else(|_| {
        document(
            &name,
            root_namespace,
            None,
            security::Action::Deny,
            &[json!({})],
        )
        .expect("a fixed, valid document")
    })
}
