//! Network namespaces, links, addresses and routes of a testbed, through iproute2.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::Testbed;

/// Pod `host` on node `node` (both 1-based; host 1 is the node's gateway address).
pub fn pod_ipv4(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node, host)
}

pub fn pod_ipv6(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd6d, 0, u16::from(node), 0, 0, 0, 0, u16::from(host))
}

pub fn node_ipv4(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, node)
}

pub fn node_ipv6(node: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd6d, 0, 0xffff, 0, 0, 0, 0, u16::from(node))
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Sysctls every testbed namespace gets before links exist: no IPv6 duplicate address
/// detection (addresses are usable at once), forwarding on (nodes route for their pods).
const SYSCTLS: &[&str] = &[
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv4.ip_forward=1",
];

/// Creates every namespace, link, address and route of the testbed.
pub fn build(bed: &Testbed) -> anyhow::Result<()> {
    for name in bed.netns_names() {
        run("ip", &["netns", "add", &name])?;
        run(
            "ip",
            &[&["netns", "exec", &name, "sysctl", "-qw"][..], SYSCTLS].concat(),
        )?;
    }

    let fab = &bed.fabric_netns;
    let mut fabric = String::from("link add br0 type bridge\nlink set br0 up\nlink set lo up\n");
    for node in &bed.nodes {
        let n = node.index;
        let ns = &node.place.netns;
        // The veth is created inside the fabric netns with its peer directly in the node's: no
        // interface ever appears in the host namespace.
        writeln!(
            fabric,
            "link add n{n} type veth peer name eth0 netns {ns}\n\
             link set n{n} master br0\nlink set n{n} up"
        )?;
    }
    for host in &bed.hosts {
        writeln!(
            fabric,
            "link add h{i} type veth peer name eth0 netns {ns}\n\
             link set h{i} master br0\nlink set h{i} up",
            i = host.index,
            ns = host.place.netns,
        )?;
    }
    batch(Some(fab), &fabric)?;

    for host in &bed.hosts {
        let mut script = format!(
            "link set lo up\nlink set eth0 up\n\
             addr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\n",
            node_ipv4(host.index),
            node_ipv6(host.index)
        );
        for node in &bed.nodes {
            let m = node.index;
            writeln!(
                script,
                "route add {}/24 via {}\nroute add {}/64 via {}",
                pod_ipv4(m, 0),
                node_ipv4(m),
                pod_ipv6(m, 0),
                node_ipv6(m)
            )?;
        }
        batch(Some(&host.place.netns), &script)?;
    }

    for node in &bed.nodes {
        let n = node.index;
        let mut script = format!(
            "link set lo up\nlink set eth0 up\n\
             addr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\n",
            node_ipv4(n),
            node_ipv6(n)
        );
        for (p, pod) in node.pods.iter().enumerate() {
            let dev = format!("p{p}");
            writeln!(
                script,
                "link add {dev} type veth peer name eth0 netns {pod_ns}\n\
                 link set {dev} up\n\
                 addr add {gw4}/32 dev {dev}\naddr add {gw6}/128 dev {dev} nodad\n\
                 route add {ip4}/32 dev {dev}\nroute add {ip6}/128 dev {dev}",
                pod_ns = pod.place.netns,
                gw4 = pod_ipv4(n, 1),
                gw6 = pod_ipv6(n, 1),
                ip4 = pod.ipv4,
                ip6 = pod.ipv6,
            )?;
        }
        for other in bed.nodes.iter().filter(|o| o.index != n) {
            let m = other.index;
            writeln!(
                script,
                "route add {}/24 via {}\nroute add {}/64 via {}",
                pod_ipv4(m, 0),
                node_ipv4(m),
                pod_ipv6(m, 0),
                node_ipv6(m)
            )?;
        }
        batch(Some(&node.place.netns), &script)?;

        for pod in &node.pods {
            let script = format!(
                "link set lo up\nlink set eth0 up\n\
                 addr add {ip4}/32 dev eth0\naddr add {ip6}/128 dev eth0 nodad\n\
                 route add {gw4}/32 dev eth0\nroute add default via {gw4} dev eth0\n\
                 route add {gw6}/128 dev eth0\nroute add default via {gw6} dev eth0\n",
                ip4 = pod.ipv4,
                ip6 = pod.ipv6,
                gw4 = pod_ipv4(n, 1),
                gw6 = pod_ipv6(n, 1),
            );
            batch(Some(&pod.place.netns), &script)?;
        }
    }
    Ok(())
}

/// Deletes a named network namespace if it exists (its interfaces go with it).
pub fn delete_netns(name: &str) -> anyhow::Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    run("ip", &["netns", "delete", name])
}

/// Names of every named network namespace on the machine.
pub fn list_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `ip [-n NETNS] -batch -` with `script` on stdin.
fn batch(netns: Option<&str>, script: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running ip")?;
    child
        .stdin
        .take()
        .context("ip stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch in {netns:?} failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command to completion, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
