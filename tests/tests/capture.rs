//! Inbound capture covers every address of an enrolled pod's netns (the netns is the unit of
//! enrollment): addresses its workload entry does not list, IPv4 and IPv6, and the IPv6
//! link-local address of its interface, are captured like the listed ones, so STRICT holds on
//! all of them. Port 15008 is left to the daemon only where its HBONE listener is bound.
//!
//! Before this was fixed (issue 13, item 2), plaintext to the pod's link-local address, or to
//! any address missing from `ips`, reached the application under STRICT, with no log line.

use std::{path::Path, time::Duration};

use mesh_tests::{Daemon, Testbed, Topology, helpers::peer_authentication, mesh::NodeSettings};

mesh_tests::binaries!(APP, DUT);

/// Addresses added to a1's netns that its workload entry does not list.
const EXTRA_V4: &str = "198.18.1.200";
const EXTRA_V6: &str = "fd6d:0:1::c8";

/// A `PeerAuthentication` for `a1` (selector `app: a1`) as a `policies:` list item.
fn peer_auth(mode: &str) -> String {
    peer_authentication("default", "a1-mtls", "{app: a1}", mode)
}

/// The output of a command that must succeed.
fn ip(out: anyhow::Result<mesh_tests::CmdOutput>, what: &str) -> String {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what}: {}", out.stderr);
    out.stdout
}

/// Whether a plaintext connection from node-a's own netns (outside the mesh) to `target` gets
/// its echo back.
fn reaches_app(bed: &Testbed, target: &str) -> bool {
    bed.node("node-a")
        .exec(&[APP, "send", target, "capture probe"])
        .expect("client runs")
        .status
        .success()
}

/// The targets: a1's listed IPv4 and IPv6, the unlisted ones, and its link-local address
/// (scoped to node-a's side of a1's veth).
fn targets(bed: &Testbed, port: u16) -> Vec<String> {
    let a1 = bed.pod("a1");
    let link_local = ip(
        a1.exec(&[
            "ip", "-o", "-6", "addr", "show", "dev", "eth0", "scope", "link",
        ]),
        "a1's link-local address",
    );
    let link_local = link_local
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no link-local address in {link_local:?}"))
        .to_owned();
    let link = ip(
        bed.node("node-a")
            .exec(&["ip", "-o", "link", "show", "dev", "p0"]),
        "node-a's veth to a1",
    );
    let ifindex = link.split(':').next().expect("ifindex").trim().to_owned();
    vec![
        a1.addr(false, port).to_string(),
        a1.addr(true, port).to_string(),
        format!("{EXTRA_V4}:{port}"),
        format!("[{EXTRA_V6}]:{port}"),
        format!("[{link_local}%{ifindex}]:{port}"),
    ]
}

/// Adds [`EXTRA_V4`] and [`EXTRA_V6`] to a1's netns, and routes to them in node-a's.
fn add_unlisted_addresses(bed: &Testbed) {
    let a1 = bed.pod("a1");
    ip(
        a1.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{EXTRA_V4}/32"),
            "dev",
            "eth0",
        ]),
        "extra IPv4",
    );
    ip(
        a1.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{EXTRA_V6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]),
        "extra IPv6",
    );
    let node = bed.node("node-a");
    ip(
        node.exec(&["ip", "route", "add", &format!("{EXTRA_V4}/32"), "dev", "p0"]),
        "route to the extra IPv4",
    );
    ip(
        node.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{EXTRA_V6}/128"),
            "dev",
            "p0",
        ]),
        "route to the extra IPv6",
    );
}

#[test]
fn every_address_of_an_enrolled_pods_netns_is_captured() {
    mesh_tests::skip_unless_namespaced!();
    let bed = Testbed::up(&Topology::new().node("node-a", &["a1"])).expect("testbed");
    add_unlisted_addresses(&bed);
    let a1 = bed.pod("a1");
    let _echo = a1
        .spawn_server(&[APP, "echo", "[::]:7000"])
        .expect("echo on a1");
    // An application listening on 15008 of an address the daemon's HBONE listener does not
    // bind: plaintext there would go around mTLS.
    let hbone_squatter = a1
        .spawn_server(&[APP, "echo", &format!("[{EXTRA_V6}]:15008")])
        .expect("squatter on 15008");
    let targets = targets(&bed, 7000);
    for target in &targets {
        assert!(
            reaches_app(&bed, target),
            "{target} works before enrollment"
        );
    }

    let settings = NodeSettings {
        policies: peer_auth("STRICT"),
        ..NodeSettings::default()
    };
    let mut daemon =
        Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &["a1"], &settings)
            .expect("daemon");
    for target in &targets {
        assert!(
            !reaches_app(&bed, target),
            "STRICT: plaintext to {target} must not reach a1's application"
        );
    }
    let refused: Vec<String> = daemon
        .records("plaintext connection refused: PeerAuthentication is STRICT")
        .iter()
        .filter_map(|r| r["orig_dst"].as_str().map(str::to_owned))
        .collect();
    for target in &targets {
        let ip = target
            .rsplit_once(':')
            .expect("port")
            .0
            .trim_start_matches('[');
        let ip = ip.split('%').next().unwrap_or(ip).trim_end_matches(']');
        assert!(
            refused.iter().any(|r| r.contains(ip)),
            "the refusal of {target} is logged with its address: {refused:?}"
        );
    }
    assert!(
        !reaches_app(&bed, &format!("[{EXTRA_V6}]:15008")),
        "15008 on an address without the daemon's HBONE listener is dropped"
    );
    assert!(
        !hbone_squatter.stdout().contains("echoed"),
        "nothing reached the application on 15008: {}",
        hbone_squatter.stdout()
    );

    // PERMISSIVE: the same connections are captured (each logged with its original
    // destination) and forwarded to the application, link-local included.
    let config = daemon.config().to_owned();
    let text = std::fs::read_to_string(&config).expect("config");
    daemon
        .reload_with(
            &text.replace("mode: STRICT", "mode: PERMISSIVE"),
            Duration::from_secs(5),
        )
        .expect("reloaded");
    let before = daemon.captured("inbound").len();
    for target in &targets {
        assert!(
            reaches_app(&bed, target),
            "PERMISSIVE: {target} is forwarded"
        );
    }
    assert_eq!(
        daemon.captured("inbound").len(),
        before + targets.len(),
        "every connection went through the daemon"
    );
    daemon.stop().expect("stop");
}
