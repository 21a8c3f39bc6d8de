//! `cargo xtask demo`: a live 2-node, 4-pod mesh on this machine, narrated.
//!
//! Builds the daemon (and its kernel programs) and the test application, brings up the netns
//! testbed, runs one `mesh-node` per node with the kernel programs attached to that node's
//! cgroup, sends real traffic between pods within and across nodes over IPv4 and IPv6, stops
//! the daemons, prints what their kernel programs saw, tears everything down and checks that
//! nothing was left behind.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_tests::{Proc, Testbed, Topology};

use crate::util::{Step, cargo, require_root, run_checked, workspace_root};

/// (from, to, IPv6?, bytes)
const FLOWS: &[(&str, &str, bool, u64)] = &[
    ("a1", "b1", false, 1 << 20),
    ("a2", "b2", true, 1 << 20),
    ("b1", "a2", false, 256 << 10),
    ("a1", "a2", true, 256 << 10),
];
const APP_PORT: u16 = 7000;

pub fn run() -> anyhow::Result<()> {
    require_root("demo")?;
    let step = Step::start("building mesh-node, its kernel programs and the test app");
    run_checked(&mut cargo(&[
        "build",
        "--release",
        "--package",
        "mesh-node",
        "--package",
        "mesh-tests",
        "--bins",
    ]))?;
    step.done();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("release");
    let daemon = target.join("mesh-node");
    let app = target.join("mesh-testapp");

    let before = MachineState::read();
    let step = Step::start("bringing up the testbed: 2 nodes, 4 pods");
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1", "b2"]),
    )?;
    step.done();
    print_topology(&bed);

    let result = run_mesh(&bed, &daemon, &app);
    drop(bed);
    let after = MachineState::read();
    let leftovers = after.minus(&before);
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

fn run_mesh(bed: &Testbed, daemon: &Path, app: &Path) -> anyhow::Result<()> {
    let app = app.to_str().context("non-UTF-8 path")?;
    let mut daemons = Vec::new();
    for node in bed.nodes() {
        let config = bed.tmp_dir().join(format!("{}.yaml", node.name()));
        std::fs::write(
            &config,
            format!(
                "node: {}\nlog:\n  format: text\n  filter: info\nredirect:\n  cgroup: {}\n",
                node.name(),
                node.cgroup().display()
            ),
        )?;
        let mut proc = node.spawn(&[
            daemon.to_str().context("non-UTF-8 path")?,
            "run",
            "--config",
            config.to_str().context("non-UTF-8 path")?,
        ])?;
        proc.wait_for_output("ready", Duration::from_secs(10))
            .with_context(|| format!("mesh-node on {}", node.name()))?;
        println!("mesh-node running on {} (pid {})", node.name(), proc.pid());
        daemons.push((node.name().to_owned(), proc));
    }

    let mut servers = Vec::new();
    for pod in bed.pods() {
        let mut server = pod.spawn(&[app, "echo", &format!("[::]:{APP_PORT}")])?;
        server.wait_for_output("listening", Duration::from_secs(5))?;
        servers.push(server);
    }
    println!("echo servers listening on port {APP_PORT} in every pod\n");

    println!("traffic (each client sends a pattern, half-closes, and checks the echo):");
    for &(from, to, v6, bytes) in FLOWS {
        let src = bed.pod(from);
        let dst = bed.pod(to);
        let addr = dst.addr(v6, APP_PORT);
        let path = if src.node() == dst.node() {
            "same node "
        } else {
            "cross-node"
        };
        let out = src
            .exec(&[app, "client", &addr.to_string(), &bytes.to_string()])?
            .ok()
            .with_context(|| format!("{from} -> {addr}"))?;
        let report: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
        println!(
            "  {from} ({}) -> {to} {addr:<26} {path}  {:>5} KiB each way, intact={}, \
             peer seen by the client: {}, {:.1} ms",
            src.node(),
            bytes / 1024,
            report["intact"],
            report["peer"].as_str().unwrap_or("?"),
            report["total_us"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }

    println!("\nstopping the daemons (SIGTERM):");
    for (node, proc) in &mut daemons {
        let status = proc.stop(Duration::from_secs(5))?;
        print_daemon_summary(node, proc, status.success());
    }
    drop(servers);
    Ok(())
}

/// Prints the daemon's shutdown lines: its kernel counters and the clean exit.
fn print_daemon_summary(node: &str, proc: &Proc, clean: bool) {
    let log = proc.stderr();
    let counters = log
        .lines()
        .find(|l| l.contains("kernel counters at shutdown"))
        .and_then(|l| l.split("counters=").nth(1))
        .unwrap_or("(not logged)");
    println!(
        "  mesh-node on {node}: exited {}; its connect programs saw {counters}",
        if clean { "cleanly" } else { "WITH AN ERROR" }
    );
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
