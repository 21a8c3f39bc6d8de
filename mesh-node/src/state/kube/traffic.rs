//! The traffic objects of the Kubernetes source: which API versions it mirrors, and the
//! traffic set built from the mirrors and the file's documents, each object checked on its own
//! (one that fails keeps its last good version, the others are unaffected).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use kube::{
    ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::reflector::Store,
};
use tracing::{error, warn};

use super::{convert, merge_by};
use crate::traffic::{TrafficDocument, TrafficError, TrafficKind, TrafficSet};

/// The kinds mirrored, each at one served version: `TCPRoute` is only in the Gateway API's
/// experimental channel, at v1alpha2; Istio's networking kinds at v1, the version the policy
/// mirrors use for security.istio.io (served since Istio 1.22); our `FaultInjection` at
/// v1alpha1. The API server converts what was written at another version.
pub(super) const KINDS: [(TrafficKind, &str, &str, &str); 4] = [
    (
        TrafficKind::TcpRoute,
        "gateway.networking.k8s.io",
        "v1alpha2",
        "tcproutes",
    ),
    (
        TrafficKind::VirtualService,
        "networking.istio.io",
        "v1",
        "virtualservices",
    ),
    (
        TrafficKind::DestinationRule,
        "networking.istio.io",
        "v1",
        "destinationrules",
    ),
    (
        TrafficKind::FaultInjection,
        "mesh.io",
        "v1alpha1",
        "faultinjections",
    ),
];

/// The API resource of a mirrored kind.
pub(super) fn resource(group: &str, version: &str, kind: TrafficKind, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, &kind.to_string()),
        plural,
    )
}

/// What turns the traffic mirrors into a traffic set.
#[derive(Default)]
pub(super) struct TrafficBuilder {
    /// (uid, resourceVersion) of objects already checked → their document or error.
    checked: HashMap<(String, String), Result<TrafficDocument, TrafficError>>,
    /// uid → last good document.
    last_good: HashMap<String, TrafficDocument>,
    last: Option<Arc<TrafficSet>>,
}

impl TrafficBuilder {
    /// The cluster's traffic objects (a bad one keeps its last good version, or without one
    /// is left out: a route or fault not applied fails no security control) plus the file's.
    pub(super) fn build(
        &mut self,
        stores: &[(TrafficKind, Store<DynamicObject>)],
        file: &Arc<TrafficSet>,
    ) -> Arc<TrafficSet> {
        let mut docs: Vec<TrafficDocument> = Vec::new();
        let mut live = HashSet::new();
        for (kind, store) in stores {
            for obj in store.state() {
                let uid = convert::object_uid(&obj, &kind);
                live.insert(uid.clone());
                let key = (uid.clone(), obj.resource_version().unwrap_or_default());
                let checked = self.checked.entry(key).or_insert_with(|| {
                    let result = convert::traffic_document(&obj, *kind);
                    if let Err(e) = &result {
                        warn!(
                            kind = %kind,
                            namespace = %obj.namespace().unwrap_or_default(),
                            name = %obj.name_any(),
                            field = %e.field,
                            error = %e.reason,
                            "rejected traffic object; its last good version stays in force, or, \
                             without one, it is not applied"
                        );
                    }
                    result
                });
                match checked {
                    Ok(doc) => {
                        self.last_good.insert(uid, doc.clone());
                        docs.push(doc.clone());
                    }
                    Err(_) => docs.extend(self.last_good.get(&uid).cloned()),
                }
            }
        }
        self.last_good.retain(|uid, _| live.contains(uid));
        self.checked.retain(|(uid, _), _| live.contains(uid));
        // The mirrors list in no particular order: sorted, an unchanged set compares equal.
        docs.sort_by_key(TrafficDocument::describe);
        merge_by(&mut docs, file.documents(), TrafficDocument::describe);
        if let Some(last) = &self.last
            && last.documents() == docs.as_slice()
        {
            return Arc::clone(last);
        }
        let set = match TrafficSet::new(&docs) {
            Ok(set) => Arc::new(set),
            Err(e) => {
                error!(document = %e.document, field = %e.field, error = %e.reason, "rejected the cluster's traffic documents; keeping the last good set");
                return self.last.clone().unwrap_or_else(|| Arc::clone(file));
            }
        };
        self.last = Some(Arc::clone(&set));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn object(name: &str, rv: &str, spec: &serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                         "resourceVersion": rv},
            "spec": spec,
        }))
        .unwrap()
    }

    fn route(backend: &str) -> serde_json::Value {
        serde_json::json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
            "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
        })
    }

    fn stores(objects: Vec<DynamicObject>) -> Vec<(TrafficKind, Store<DynamicObject>)> {
        let (kind, group, version, plural) = KINDS[0];
        let mut writer = reflector::store::Writer::new(resource(group, version, kind, plural));
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(o));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        vec![(kind, writer.as_reader())]
    }

    fn backends(set: &TrafficSet) -> Vec<String> {
        set.documents()
            .iter()
            .map(|d| {
                let rules = d.spec.rules.as_ref().unwrap();
                format!("{}:{}", d.metadata.name, rules[0].backend_refs[0].name)
            })
            .collect()
    }

    #[test]
    fn a_bad_object_keeps_its_last_good_version_and_the_others_apply() {
        let mut builder = TrafficBuilder::default();
        let file = Arc::new(TrafficSet::default());
        let set = builder.build(
            &stores(vec![
                object("a", "1", &route("v1")),
                object("b", "1", &route("v1")),
            ]),
            &file,
        );
        assert_eq!(backends(&set), ["a:v1", "b:v1"]);
        // `a` loses its backend port (fails validation), `b` changes: `a` stays at v1.
        let bad = serde_json::json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
            "rules": [{"backendRefs": [{"name": "v2"}]}],
        });
        let objects = || vec![object("a", "2", &bad), object("b", "2", &route("v2"))];
        let set = builder.build(&stores(objects()), &file);
        assert_eq!(backends(&set), ["a:v1", "b:v2"]);
        assert_eq!(
            builder.checked[&("uid-a".to_owned(), "2".to_owned())]
                .as_ref()
                .unwrap_err()
                .field,
            "spec.rules[0].backendRefs[0].port"
        );
        // Unchanged: the same set.
        let again = builder.build(&stores(objects()), &file);
        assert!(Arc::ptr_eq(&set, &again));
        // Without a last good version, a bad object is left out.
        let mut fresh = TrafficBuilder::default();
        let set = fresh.build(&stores(objects()), &file);
        assert_eq!(backends(&set), ["b:v2"]);
        // Deleted: its last good version goes too.
        let set = builder.build(&stores(vec![object("b", "2", &route("v2"))]), &file);
        assert_eq!(backends(&set), ["b:v2"]);
        assert!(!builder.last_good.contains_key("uid-a"));
    }

    #[test]
    fn the_clusters_objects_win_over_the_files() {
        let file_doc = |backend: &str| -> TrafficDocument {
            let mut obj = object("a", "1", &route(backend));
            obj.metadata.uid = None;
            convert::traffic_document(&obj, TrafficKind::TcpRoute).unwrap()
        };
        let mut other = file_doc("f");
        other.metadata.name = "from-file".to_owned();
        let file = Arc::new(TrafficSet::new(&[file_doc("f"), other]).unwrap());
        let mut builder = TrafficBuilder::default();
        let set = builder.build(&stores(vec![object("a", "1", &route("k"))]), &file);
        assert_eq!(backends(&set), ["a:k", "from-file:f"]);
    }
}
