//! Istio policy documents: parsing, validation, compilation and a decision on the result.
#![no_main]

use mesh_node::{
    identity::Identity,
    policy::{ConnInfo, PolicyDocument, PolicyStore},
    workload::Workload,
};

libfuzzer_sys::fuzz_target!(|text: &str| {
    let Ok(docs) = serde_yaml_ng::from_str::<Vec<PolicyDocument>>(text) else {
        return;
    };
    let Ok(store) = PolicyStore::new("istio-system", &docs) else {
        return;
    };
    let workload = Workload {
        name: "web".into(),
        namespace: "default".into(),
        service_account: "web".into(),
        labels: [("app".to_owned(), "web".to_owned())].into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
        node: "n".into(),
        netns: None,
        enrolled: true,
        network: String::new(),
        trust_domain: None,
    };
    let id = Identity::new("cluster.local", "default", "client");
    for identity in [None, Some(&id)] {
        let conn = ConnInfo {
            src_ip: "10.1.2.3".parse().unwrap(),
            src_identity: identity,
            dst_ip: "10.0.0.1".parse().unwrap(),
            dst_port: 8080,
            trust_aliases: &[],
        };
        let _ = store.authorize(&workload, &conn);
        let _ = store.mtls_mode(&workload, 8080);
    }
});
