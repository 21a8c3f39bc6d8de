//! `cargo xtask demo`: a live 2-node, 4-pod mesh on this machine, narrated.
//!
//! Builds the daemon (and its kernel programs) and the test application, brings up the netns
//! testbed, runs one `mesh-node` per node (a1, a2 and b1 enrolled, b2 not), sends real traffic
//! between pods within and across nodes over IPv4 and IPv6 and shows how each daemon carried it
//! (mTLS HBONE with the identities on both ends, the same-node path, plaintext), unenrolls a
//! pod at run time, kills a daemon and restarts it, prints the kernel counters, tears
//! everything down and checks that nothing was left behind.

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use mesh_tests::{Daemon, Testbed, Topology};

use crate::util::{Step, build_release_bins, require_root};

const APP_PORT: u16 = 7000;
/// The demo's service address (exists only as a destination the daemons recognise).
const SERVICE_VIP: &str = "198.19.255.10";

pub fn run() -> anyhow::Result<()> {
    require_root("demo")?;
    let step = Step::start("building mesh-node, its kernel programs and the test app");
    let target = build_release_bins(&["mesh-testapp"])?;
    step.done();

    let before = MachineState::read();
    let step = Step::start("bringing up the testbed: 2 nodes, 4 pods");
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1", "b2"]),
    )?;
    step.done();
    print_topology(&bed);

    let result = Demo {
        bed: &bed,
        daemon: &target.join("mesh-node"),
        app: &target.join("mesh-testapp"),
    }
    .run();
    drop(bed);
    let leftovers = MachineState::read().minus(&before);
    if leftovers.is_empty() {
        println!("\nteardown: no namespace, cgroup or bpffs entry left behind");
    } else {
        println!("\nteardown: LEFT BEHIND: {leftovers:?}");
    }
    result?;
    if !leftovers.is_empty() {
        bail!("the demo left things behind");
    }
    Ok(())
}

fn print_topology(bed: &Testbed) {
    println!("\n  {:<8} {:<16} {:<22} netns", "", "IPv4", "IPv6");
    for node in bed.nodes() {
        println!(
            "  {:<8} {:<16} {:<22} {}",
            node.name(),
            node.ipv4().to_string(),
            node.ipv6().to_string(),
            node.netns_path().display()
        );
        for pod in node.pods() {
            println!(
                "    {:<6} {:<16} {:<22} {}",
                pod.name(),
                pod.ipv4().to_string(),
                pod.ipv6().to_string(),
                pod.netns_path().display()
            );
        }
    }
    println!();
}

struct Demo<'a> {
    bed: &'a Testbed,
    daemon: &'a Path,
    app: &'a Path,
}

/// Log records each daemon had before a flow, to show only what the flow added.
struct Marks(Vec<usize>);

impl Demo<'_> {
    fn run(&self) -> anyhow::Result<()> {
        let bed = self.bed;
        let app = self.app.to_str().context("non-UTF-8 path")?;
        let mut servers = Vec::new();
        for pod in bed.pods() {
            let mut server = pod.spawn(&[app, "echo", &format!("[::]:{APP_PORT}")])?;
            server.wait_for_output("listening", Duration::from_secs(5))?;
            servers.push(server);
        }
        println!("echo servers listening on port {APP_PORT} in every pod");

        let enrolled = ["a1", "a2", "b1"];
        // A service `echo`: b1 by selector, a2 listed explicitly.
        let settings = mesh_tests::mesh::NodeSettings {
            services: format!(
                "- name: echo\n  namespace: default\n  addresses: [{SERVICE_VIP}]\n  \
                 ports: [{{port: 80, targetPort: {APP_PORT}}}]\n  selector: {{app: b1}}\n  \
                 endpoints: [{{address: {}}}]\n",
                bed.pod("a2").ipv4()
            ),
            ..mesh_tests::mesh::NodeSettings::default()
        };
        let mut daemons = Vec::new();
        for node in ["node-a", "node-b"] {
            let daemon = Daemon::start_with_settings(bed, node, self.daemon, &enrolled, &settings)?;
            let ready = &daemon.records("ready")[0];
            println!(
                "mesh-node running on {node}: {} pod(s) enrolled, kernel programs attached to {}",
                ready["enrolled"],
                ready["cgroup"].as_str().unwrap_or("?")
            );
            daemons.push(daemon);
        }
        for daemon in &daemons {
            daemon.wait_for_records("certificate issued", 1, Duration::from_secs(5))?;
        }
        println!("enrolled: a1, a2 (node-a) and b1 (node-b); b2 is not in the mesh");
        for (node, daemon) in ["node-a", "node-b"].iter().zip(&daemons) {
            for record in daemon.records("certificate issued") {
                println!(
                    "  {node} holds a certificate for {}",
                    record["identity"].as_str().unwrap_or("?")
                );
            }
        }

        println!("\ntraffic (each client sends a pattern, half-closes and checks the echo):");
        for (from, to, v6) in [
            ("a1", "b1", false),
            ("b1", "a1", true),
            ("a1", "a2", false),
            ("b2", "a2", false),
            ("a1", "b2", true),
        ] {
            self.flow(&daemons, from, to, v6, 256 << 10)?;
        }

        self.service_demo(&daemons)?;
        self.policy_demo(&mut daemons)?;

        println!("\nunenrolling a1 at run time (editing node-a's configuration file):");
        daemons[0].set_enrolled(bed, &["a2", "b1"])?;
        daemons[0].wait_for_records("pod unenrolled", 1, Duration::from_secs(5))?;
        let record = &daemons[0].records("pod unenrolled")[0];
        println!(
            "  node-a: {} unenrolled",
            record["workload"].as_str().unwrap_or("?")
        );
        self.flow(&daemons, "a1", "b1", false, 64 << 10)?;

        println!("\nkilling mesh-node on node-b (kill -9): b1 fails closed");
        daemons[1].kill()?;
        let target = bed.pod("b1").addr(false, APP_PORT);
        let out = bed
            .pod("b2")
            .exec(&[app, "client", &target.to_string(), "1024"])?;
        println!(
            "  b2 -> b1 {target}: {}",
            if out.status.success() {
                "CONNECTED (unexpected)".to_owned()
            } else {
                out.stderr.trim().to_owned()
            }
        );
        let restarted = daemons[1].restart(bed)?;
        daemons[1] = restarted;
        println!(
            "restarted mesh-node on node-b: adopted the pinned programs = {}",
            daemons[1].records("ready")[0]["adopted"]
        );
        self.flow(&daemons, "b2", "b1", false, 64 << 10)?;

        self.print_metrics()?;

        println!("\nstopping the daemons (SIGTERM):");
        for (node, daemon) in ["node-a", "node-b"].iter().zip(&mut daemons) {
            let status = daemon.stop()?;
            let counters = daemon
                .records("kernel counters at shutdown")
                .first()
                .and_then(|r| r["counters"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "(not logged)".to_owned());
            println!(
                "  {node}: exited {}; HBONE connections opened: {}; kernel counters {counters}",
                if status.success() {
                    "cleanly"
                } else {
                    "WITH AN ERROR"
                },
                daemon.records("HBONE connection opened").len()
            );
        }
        drop(servers);
        Ok(())
    }

    /// Four connections from a1 to the service address, one endpoint each (round robin).
    fn service_demo(&self, daemons: &[Daemon]) -> anyhow::Result<()> {
        let app = self.app.to_str().context("non-UTF-8 path")?;
        let vip = format!("{SERVICE_VIP}:80");
        println!(
            "\nservice echo.default.svc.cluster.local at {vip} (endpoints: b1 by selector, a2 listed):"
        );
        let before = daemons[0].records("service endpoint chosen").len();
        for _ in 0..4 {
            self.bed
                .pod("a1")
                .exec(&[app, "client", &vip, "1024"])?
                .ok()
                .with_context(|| format!("a1 -> {vip}"))?;
        }
        daemons[0].wait_for_records(
            "service endpoint chosen",
            before + 4,
            Duration::from_secs(5),
        )?;
        for record in daemons[0]
            .records("service endpoint chosen")
            .iter()
            .skip(before)
        {
            let endpoint = record["endpoint"].as_str().unwrap_or("?");
            let pod = ["a2", "b1"]
                .into_iter()
                .find(|p| self.bed.pod(p).addr(false, APP_PORT).to_string() == endpoint)
                .unwrap_or("?");
            println!("  a1 -> {vip}: mesh-node on node-a chose {endpoint} ({pod})");
        }
        Ok(())
    }

    /// Applies an Istio `AuthorizationPolicy` on node-b (b1 accepts only a1's identity), shows
    /// an allowed and a denied connection, then removes it.
    fn policy_demo(&self, daemons: &mut [Daemon]) -> anyhow::Result<()> {
        let bed = self.bed;
        let app = self.app.to_str().context("non-UTF-8 path")?;
        let policy = "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    \
                      name: b1-only-from-a1\n    namespace: default\n  spec:\n    selector:\n      \
                      matchLabels: {app: b1}\n    action: ALLOW\n    rules:\n    - from:\n      - source:\n          \
                      principals: [cluster.local/ns/default/sa/a1]\n";
        println!(
            "\napplying an Istio AuthorizationPolicy on node-b (live, by editing its configuration):"
        );
        for line in policy.lines() {
            println!("    {line}");
        }
        let reloads = daemons[1].records("configuration reloaded").len();
        daemons[1].set_policies(bed, policy)?;
        daemons[1].wait_for_records(
            "configuration reloaded",
            reloads + 1,
            Duration::from_secs(3),
        )?;
        self.flow(daemons, "a1", "b1", false, 16 << 10)?;
        if let Some(allowed) = daemons[1].records("connection allowed by policy").last() {
            println!(
                "      mesh-node on node-b: allowed by {}",
                allowed["policy"].as_str().unwrap_or("?")
            );
        }
        let target = bed.pod("b1").addr(false, APP_PORT);
        let out = bed
            .pod("a2")
            .exec(&[app, "client", &target.to_string(), "1024"])?;
        println!(
            "  a2 -> b1 {target}: {}",
            if out.status.success() {
                "CONNECTED (unexpected)".to_owned()
            } else {
                out.stderr.trim().to_owned()
            }
        );
        std::thread::sleep(Duration::from_millis(50));
        if let Some(denial) = daemons[1].records("connection denied by policy").last() {
            println!(
                "      mesh-node on node-b: denied {} -> {} ({}): {}; the application saw nothing (HBONE 401)",
                denial["peer_identity"].as_str().unwrap_or("?"),
                denial["orig_dst"].as_str().unwrap_or("?"),
                denial["path"].as_str().unwrap_or("?"),
                denial["policy"].as_str().unwrap_or("?"),
            );
        }
        daemons[1].set_policies(bed, "")?;
        daemons[1].wait_for_records(
            "configuration reloaded",
            reloads + 2,
            Duration::from_secs(3),
        )?;
        println!("  policy removed");
        Ok(())
    }

    /// Scrapes each daemon's `/metrics` (from inside its node) and prints the key figures.
    fn print_metrics(&self) -> anyhow::Result<()> {
        println!(
            "\nkey metrics (scraped from each node's :15020/metrics; node-b's process counts \
             start at its restart, its kernel counters survived it):"
        );
        for node in self.bed.nodes() {
            let url = format!("http://{}:15020/metrics", node.ipv4());
            let body = node
                .exec(&["curl", "-sS", "--max-time", "5", &url])?
                .ok()?
                .stdout;
            let sum = |name: &str, filter: &str| -> f64 {
                body.lines()
                    .filter(|l| l.starts_with(name) && l.contains(filter))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
                    + 0.0
            };
            println!(
                "  {}: connections opened {} (mTLS {}, plaintext {}), bytes received {:.0} KiB, \
                 sent {:.0} KiB, HBONE connections {}, policy decisions allow {} deny {}, \
                 enrolled {}, kernel captures {}, RSS {:.1} MiB",
                node.name(),
                sum("istio_tcp_connections_opened_total", ""),
                sum("istio_tcp_connections_opened_total", "mutual_tls"),
                sum(
                    "istio_tcp_connections_opened_total",
                    "connection_security_policy=\"none\""
                ),
                sum("istio_tcp_received_bytes_total", "") / 1024.0,
                sum("istio_tcp_sent_bytes_total", "") / 1024.0,
                sum("mesh_hbone_connections_opened_total", ""),
                sum("mesh_policy_decisions_total", "result=\"allow\""),
                sum("mesh_policy_decisions_total", "result=\"deny\""),
                sum("mesh_enrolled_workloads", ""),
                sum("mesh_ebpf_events_total", "connect_captured")
                    + sum("mesh_ebpf_events_total", "lookup_captured"),
                sum("process_resident_memory_bytes", "") / 1_048_576.0,
            );
        }
        Ok(())
    }

    fn marks(daemons: &[Daemon]) -> Marks {
        Marks(
            daemons
                .iter()
                .map(|d| d.records("connection captured").len())
                .collect(),
        )
    }

    /// Runs one client and prints its result and what each daemon captured for it.
    fn flow(
        &self,
        daemons: &[Daemon],
        from: &str,
        to: &str,
        v6: bool,
        bytes: u64,
    ) -> anyhow::Result<()> {
        let bed = self.bed;
        let app = self.app.to_str().context("non-UTF-8 path")?;
        let before = Self::marks(daemons);
        let addr = bed.pod(to).addr(v6, APP_PORT);
        let out = bed
            .pod(from)
            .exec(&[app, "client", &addr.to_string(), &bytes.to_string()])?
            .ok()
            .with_context(|| format!("{from} -> {addr}"))?;
        let report: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
        println!(
            "  {from} -> {to} {addr:<24} {:>4} KiB each way, intact={}, client's getpeername={}",
            bytes / 1024,
            report["intact"],
            report["peer"].as_str().unwrap_or("?"),
        );
        std::thread::sleep(Duration::from_millis(50));
        let mut seen = false;
        for (i, daemon) in daemons.iter().enumerate() {
            let node = if i == 0 { "node-a" } else { "node-b" };
            for record in daemon
                .records("connection captured")
                .iter()
                .skip(before.0[i])
            {
                seen = true;
                let direction = record["direction"].as_str().unwrap_or("?");
                let path = record["path"].as_str().unwrap_or("?");
                let detail = match (direction, path) {
                    ("outbound", "hbone") => format!(
                        "mTLS from {} to {}",
                        record["src_identity"].as_str().unwrap_or("?"),
                        record["dst_workload"].as_str().unwrap_or("?")
                    ),
                    ("inbound", "hbone") => format!(
                        "mTLS, peer verified as {}",
                        record["peer_identity"].as_str().unwrap_or("?")
                    ),
                    ("outbound", "same-node") => format!(
                        "same node: straight into {}'s netns, no TLS",
                        record["dst_workload"].as_str().unwrap_or("?")
                    ),
                    ("outbound", _) => "destination outside the mesh: plaintext".to_owned(),
                    _ => "plaintext from outside the mesh (permissive)".to_owned(),
                };
                let workload = record
                    .get("src_workload")
                    .or_else(|| record.get("dst_workload"))
                    .and_then(|w| w.as_str())
                    .unwrap_or("?");
                println!(
                    "      mesh-node on {node}: {direction:<8} {workload:<11} -> {}: {detail}",
                    record["orig_dst"].as_str().unwrap_or("?"),
                );
            }
        }
        if !seen {
            println!("      not captured: neither pod is enrolled, traffic went direct");
        }
        Ok(())
    }
}

/// What the demo must leave as it found: named netns, cgroups at the v2 root, bpffs entries.
#[derive(Debug, PartialEq, Eq)]
struct MachineState(BTreeSet<String>);

impl MachineState {
    fn read() -> Self {
        let mut entries = BTreeSet::new();
        for dir in [
            "/run/netns",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
            "/sys/fs/bpf",
        ] {
            if let Ok(list) = std::fs::read_dir(dir) {
                for entry in list.filter_map(Result::ok) {
                    if entry
                        .file_type()
                        .is_ok_and(|t| t.is_dir() || dir == "/run/netns")
                    {
                        entries.insert(format!("{dir}/{}", entry.file_name().to_string_lossy()));
                    }
                }
            }
        }
        Self(entries)
    }

    fn minus(&self, before: &Self) -> Vec<String> {
        self.0.difference(&before.0).cloned().collect()
    }
}
