//! Services from the file source (how VMs and Kubernetes-less nodes use them): a virtual
//! address load-balanced per connection across endpoints chosen by selector and listed
//! explicitly, over HBONE and the same-node path, with the locality preference, the
//! `destination_service` label, and a run-time edit.

use std::{net::SocketAddr, path::Path, time::Duration};

use mesh_tests::{
    Daemon, Testbed,
    helpers::{echo_servers, two_nodes},
    mesh::{NodeSettings, write_atomically},
};

mesh_tests::binaries!(APP, DUT);
const VIP: &str = "198.19.255.20";

fn services(bed: &Testbed, load_balancing: &str) -> String {
    format!(
        "- name: echo\n  namespace: default\n  addresses: [{VIP}]\n  ports: [{{port: 80, targetPort: 7000}}]\n  \
         selector: {{app: b1}}\n  endpoints: [{{address: {a2}}}]\n  loadBalancing: {load_balancing}\n",
        a2 = bed.pod("a2").ipv4()
    )
}

/// Where the access log of `daemon` says service connections went: (path, destination pod).
fn service_records(daemon: &Daemon) -> Vec<(String, String)> {
    daemon
        .records("connection complete")
        .into_iter()
        .filter(|r| {
            r["direction"] == "outbound" && r["dst_service"] == "echo.default.svc.cluster.local"
        })
        .map(|r| {
            (
                r["path"].as_str().unwrap_or_default().to_owned(),
                r["dst_workload"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_service_address_is_load_balanced_across_its_endpoints() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1", "a2"], &["b1"]);
    let _servers = echo_servers(&bed, APP, &["a2", "b1"], 7000);
    let enrolled = ["a1", "a2", "b1"];
    let settings = NodeSettings {
        services: services(&bed, "any"),
        ..NodeSettings::default()
    };
    let a = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &enrolled, &settings)
        .expect("daemon a");
    let _b = Daemon::start_with_settings(&bed, "node-b", Path::new(DUT), &enrolled, &settings)
        .expect("daemon b");
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let send = || {
        bed.pod("a1")
            .exec(&[APP, "send", &vip.to_string(), "via the service"])
            .expect("client")
            .status
            .success()
    };
    for _ in 0..6 {
        assert!(send(), "connection through the service");
    }
    a.wait_for_records("connection complete", 6, Duration::from_secs(5))
        .expect("records");
    let mut seen = service_records(&a);
    seen.sort();
    assert_eq!(
        seen,
        [
            ("hbone".to_owned(), "default/b1".to_owned()),
            ("hbone".to_owned(), "default/b1".to_owned()),
            ("hbone".to_owned(), "default/b1".to_owned()),
            ("same-node".to_owned(), "default/a2".to_owned()),
            ("same-node".to_owned(), "default/a2".to_owned()),
            ("same-node".to_owned(), "default/a2".to_owned()),
        ],
        "round robin over the selected and the listed endpoint"
    );

    // Prefer this node: only a2 from a1; the edit is picked up at run time.
    let config = a.config().to_owned();
    let text = std::fs::read_to_string(&config).unwrap();
    write_atomically(
        &config,
        &text.replace("loadBalancing: any", "loadBalancing: preferNode"),
    )
    .unwrap();
    a.wait_for_records("configuration reloaded", 1, Duration::from_secs(5))
        .expect("reload");
    for _ in 0..4 {
        assert!(send());
    }
    a.wait_for_records("connection complete", 10, Duration::from_secs(5))
        .expect("records");
    let local = service_records(&a)[6..].to_vec();
    assert!(
        local
            .iter()
            .all(|(path, dst)| path == "same-node" && dst == "default/a2"),
        "{local:?}"
    );

    // No endpoint left (selector matches nothing, list empty): connections are refused.
    write_atomically(
        &config,
        &text
            .replace("selector: {app: b1}", "selector: {app: nobody}")
            .replace(
                &format!("endpoints: [{{address: {}}}]", bed.pod("a2").ipv4()),
                "endpoints: []",
            ),
    )
    .unwrap();
    a.wait_for_records("configuration reloaded", 2, Duration::from_secs(5))
        .expect("reload");
    assert!(!send(), "no ready endpoint");
    a.wait_for_records(
        "no ready endpoint for the service; closing the connection",
        1,
        Duration::from_secs(5),
    )
    .expect("logged");
}
