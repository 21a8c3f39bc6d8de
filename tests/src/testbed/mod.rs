//! Nodes and pods as network namespaces on one machine.
//!
//! Layout (all addresses are benchmarking/ULA test ranges, and exist only inside the testbed's
//! own namespaces):
//! - a *fabric* netns holds a bridge that joins the nodes (the inter-node link);
//! - each *node* is a netns with `eth0` on the bridge (`198.19.0.<n>/24`, `fd6d:0:ffff::<n>/64`)
//!   and one veth per pod; it forwards and routes to the other nodes' pod ranges;
//! - each *pod* is a netns with `eth0` wired to its node (`198.18.<n>.<p>/32`,
//!   `fd6d:0:<n>::<p>/128`, default routes via the node), and a cgroup v2 directory that the
//!   processes it runs are placed in;
//! - each *host* (a VM or bare-metal machine outside the cluster) is a netns of its own with
//!   `eth0` on the same bridge (`198.19.0.<254 - i>/24`, `fd6d:0:ffff::<254 - i>/64`), routes to
//!   every node's pod range, and a cgroup with an `app` cgroup below it for its applications.
//!
//! Every name carries a per-testbed id (`mt-<pid>-<seq>`) so that tests run in parallel, and
//! [`Testbed`]'s `Drop` kills every process and removes every namespace, cgroup, bpffs
//! directory and temporary file it made, also while unwinding from a panic. Leftovers of a test
//! process that was killed outright are swept by the next testbed (see `sweep`).

mod cgroup;
mod host;
mod isolate;
mod net;
mod process;
mod sweep;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

pub use host::Host;
pub use process::{CmdOutput, Proc};

/// Where a testbed places processes and which namespace they run in.
#[derive(Clone, Debug)]
struct Place {
    netns: String,
    cgroup: PathBuf,
    logs: PathBuf,
}

/// A declarative description of the nodes and their pods.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    nodes: Vec<(String, Vec<String>)>,
    hosts: Vec<String>,
}

impl Topology {
    /// An empty topology.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node with the named pods. Names are short labels (`[a-z0-9-]`, at most 12 chars).
    #[must_use]
    pub fn node(mut self, name: &str, pods: &[&str]) -> Self {
        self.nodes.push((
            name.to_owned(),
            pods.iter().map(|p| (*p).to_owned()).collect(),
        ));
        self
    }

    /// Adds a standalone host (a VM) on the inter-node link, outside every node. Same naming
    /// rules as nodes.
    #[must_use]
    pub fn host(mut self, name: &str) -> Self {
        self.hosts.push(name.to_owned());
        self
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.nodes.is_empty() || self.nodes.len() + self.hosts.len() > 250 {
            bail!("a topology needs 1 to 250 nodes and hosts");
        }
        let mut seen = std::collections::HashSet::new();
        let hosts = self.hosts.iter().map(|h| (h, &[][..]));
        let nodes = self.nodes.iter().map(|(n, pods)| (n, &pods[..]));
        for (node, pods) in nodes.chain(hosts) {
            if pods.len() > 250 {
                bail!("node {node}: at most 250 pods");
            }
            for name in std::iter::once(node).chain(pods) {
                let ok = !name.is_empty()
                    && name.len() <= 12
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !ok {
                    bail!("bad name {name:?}: use [a-z0-9-], at most 12 characters");
                }
                if !seen.insert(name.clone()) {
                    bail!("name {name:?} is used twice");
                }
            }
        }
        Ok(())
    }
}

/// A node of a running testbed.
#[derive(Debug)]
pub struct Node {
    name: String,
    index: u8,
    place: Place,
    pods: Vec<Pod>,
}

/// A pod of a running testbed.
#[derive(Debug)]
pub struct Pod {
    name: String,
    node: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    place: Place,
}

/// A running testbed; dropping it tears everything down.
#[derive(Debug)]
pub struct Testbed {
    id: String,
    fabric_netns: String,
    nodes: Vec<Node>,
    hosts: Vec<Host>,
    cgroup: PathBuf,
    bpffs: PathBuf,
    tmp: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Checks what a testbed needs: root, a cgroup v2 hierarchy and iproute2.
pub fn check_privileges() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".to_owned());
    }
    cgroup::root().map_err(|e| e.to_string())?;
    if !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() {
        return Err("iproute2 (`ip`) is not installed".to_owned());
    }
    Ok(())
}

impl Testbed {
    /// Builds the topology. On error, whatever was already built is torn down.
    pub fn up(topology: &Topology) -> anyhow::Result<Self> {
        topology.validate()?;
        sweep::sweep_dead();
        let id = format!(
            "{}{}-{}",
            sweep::PREFIX,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_root = cgroup::root()?;
        let mut bed = Testbed {
            fabric_netns: format!("{id}-fab"),
            cgroup: cgroup_root.join(&id),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&id),
            tmp: std::env::temp_dir().join(&id),
            nodes: Vec::new(),
            hosts: Vec::new(),
            id,
        };
        // From here on, `bed`'s Drop cleans up whatever part exists.
        bed.build(topology)?;
        Ok(bed)
    }

    fn build(&mut self, topology: &Topology) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.tmp).context("creating the log directory")?;
        cgroup::create(&self.cgroup)?;
        for (n, (node_name, pod_names)) in topology.nodes.iter().enumerate() {
            let index = u8::try_from(n + 1).context("too many nodes")?;
            let node_place = Place {
                netns: format!("{}-{node_name}", self.id),
                cgroup: self.cgroup.join(node_name),
                logs: self.tmp.join(node_name),
            };
            let mut pods = Vec::new();
            for (p, pod_name) in pod_names.iter().enumerate() {
                let host = u8::try_from(p + 2).context("too many pods")?;
                pods.push(Pod {
                    name: pod_name.clone(),
                    node: node_name.clone(),
                    ipv4: net::pod_ipv4(index, host),
                    ipv6: net::pod_ipv6(index, host),
                    place: Place {
                        netns: format!("{}-{node_name}-{pod_name}", self.id),
                        cgroup: node_place.cgroup.join(pod_name),
                        logs: self.tmp.join(format!("{node_name}-{pod_name}")),
                    },
                });
            }
            self.nodes.push(Node {
                name: node_name.clone(),
                index,
                place: node_place,
                pods,
            });
        }
        for (i, name) in topology.hosts.iter().enumerate() {
            let index = u8::try_from(254 - i).context("too many hosts")?;
            self.hosts.push(Host::new(self, name, index));
        }
        for node in &self.nodes {
            cgroup::create(&node.place.cgroup)?;
            for pod in &node.pods {
                cgroup::create(&pod.place.cgroup)?;
            }
        }
        for host in &self.hosts {
            cgroup::create(&host.place.cgroup)?;
            cgroup::create(host.app_cgroup())?;
        }
        net::build(self)
    }

    /// The testbed's unique id (prefix of every name it creates).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The nodes, in topology order.
    #[must_use]
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`.
    #[must_use]
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in the testbed"))
    }

    /// The pod called `name` (pod names are unique across nodes).
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name:?} in the testbed"))
    }

    /// The standalone hosts, in topology order.
    #[must_use]
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The host called `name`.
    #[must_use]
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in the testbed"))
    }

    /// Starts a long-lived process on the node or host called `name` (in its netns and
    /// cgroup), e.g. a daemon.
    pub fn spawn_on(&self, name: &str, argv: &[&str]) -> anyhow::Result<Proc> {
        match self.hosts.iter().find(|h| h.name == name) {
            Some(host) => host.spawn(argv),
            None => self.node(name).spawn(argv),
        }
    }

    /// Every pod, node by node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The testbed's own cgroup v2 directory (the "test cgroup"): every node and pod cgroup is
    /// below it, so a cgroup program attached here sees all of them and nothing else.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A bpffs directory for this testbed's pins, created on first use and removed (with
    /// everything pinned below it) on drop.
    pub fn bpffs_dir(&self) -> anyhow::Result<&Path> {
        cgroup::ensure_bpffs()?;
        std::fs::create_dir_all(&self.bpffs)
            .with_context(|| format!("creating {}", self.bpffs.display()))?;
        Ok(&self.bpffs)
    }

    /// Directory for files belonging to this testbed (configs, logs); removed on drop.
    #[must_use]
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Starts a long-lived process on the inter-node link (the fabric netns that holds the
    /// bridge `br0`), e.g. a packet capture.
    pub fn spawn_on_link(&self, argv: &[&str]) -> anyhow::Result<Proc> {
        let place = Place {
            netns: self.fabric_netns.clone(),
            cgroup: self.cgroup.clone(),
            logs: self.tmp.join("link"),
        };
        process::spawn(&place, argv, &[])
    }

    /// Names of the network namespaces this testbed made.
    #[must_use]
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.fabric_netns.clone()];
        for node in &self.nodes {
            names.push(node.place.netns.clone());
            names.extend(node.pods.iter().map(|p| p.place.netns.clone()));
        }
        names.extend(self.hosts.iter().map(|h| h.place.netns.clone()));
        names
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            process::dump_logs(&self.tmp);
        }
        let errors = teardown(self);
        if !errors.is_empty() {
            eprintln!("testbed {}: teardown problems: {errors:#?}", self.id);
        }
    }
}

/// Kills every process, then removes namespaces, cgroups, pins and files. Keeps going past
/// errors and returns them.
fn teardown(bed: &Testbed) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = cgroup::kill_all(&bed.cgroup) {
        errors.push(format!("killing processes: {e:#}"));
    }
    for name in bed.netns_names().iter().rev() {
        if let Err(e) = net::delete_netns(name) {
            errors.push(format!("deleting netns {name}: {e:#}"));
        }
    }
    if let Err(e) = cgroup::remove_tree(&bed.cgroup) {
        errors.push(format!("removing cgroup {}: {e:#}", bed.cgroup.display()));
    }
    if bed.bpffs.exists()
        && let Err(e) = std::fs::remove_dir_all(&bed.bpffs)
    {
        errors.push(format!("removing {}: {e}", bed.bpffs.display()));
    }
    if bed.tmp.exists()
        && let Err(e) = std::fs::remove_dir_all(&bed.tmp)
    {
        errors.push(format!("removing {}: {e}", bed.tmp.display()));
    }
    errors
}

impl Node {
    /// The node's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's address on the inter-node link.
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        net::node_ipv4(self.index)
    }

    /// The node's IPv6 address on the inter-node link.
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        net::node_ipv6(self.index)
    }

    /// The node's network namespace (`/run/netns/<name>`).
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        net::netns_path(&self.place.netns)
    }

    /// The node's cgroup (node-level processes such as the daemon run here).
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.place.cgroup
    }

    /// The node's pods.
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Starts a long-lived process in the node's netns and cgroup.
    pub fn spawn(&self, argv: &[&str]) -> anyhow::Result<Proc> {
        process::spawn(&self.place, argv, &[])
    }

    /// Starts a long-lived process with extra environment variables.
    pub fn spawn_with_env(&self, argv: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Proc> {
        process::spawn(&self.place, argv, env)
    }

    /// Runs a command in the node's netns and cgroup to completion (killed after 30 s).
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<CmdOutput> {
        process::exec(&self.place, argv, process::EXEC_TIMEOUT)
    }
}

impl Pod {
    /// The pod's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the node the pod runs on.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pod's IPv4 address.
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The pod's IPv6 address.
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// `ipv4:port` or `[ipv6]:port`.
    #[must_use]
    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        };
        SocketAddr::new(ip, port)
    }

    /// The pod's network namespace (`/run/netns/<name>`).
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        net::netns_path(&self.place.netns)
    }

    /// The pod's cgroup v2 directory.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.place.cgroup
    }

    /// Starts a long-lived process inside the pod (its netns and cgroup).
    pub fn spawn(&self, argv: &[&str]) -> anyhow::Result<Proc> {
        process::spawn(&self.place, argv, &[])
    }

    /// Runs a command inside the pod to completion (killed after 30 s).
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<CmdOutput> {
        process::exec(&self.place, argv, process::EXEC_TIMEOUT)
    }

    /// Starts a long-lived process inside the pod's netns, in the cgroup `sub` below the pod's
    /// cgroup (created, with its parents, if missing): e.g. a kubelet-style
    /// `kubepods/besteffort/pod<uid>/<container>` path, as a container runtime would place it.
    pub fn spawn_in_cgroup(&self, sub: &str, argv: &[&str]) -> anyhow::Result<Proc> {
        let cgroup = self.place.cgroup.join(sub);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let place = Place {
            cgroup,
            ..self.place.clone()
        };
        process::spawn(&place, argv, &[])
    }

    /// Starts a server inside the pod and waits (5 s at most) until it prints `listening`.
    pub fn spawn_server(&self, argv: &[&str]) -> anyhow::Result<Proc> {
        let mut server = self.spawn(argv)?;
        server.wait_for_output("listening", std::time::Duration::from_secs(5))?;
        Ok(server)
    }

    /// Runs a command inside the pod with a custom time limit.
    pub fn exec_timeout(
        &self,
        argv: &[&str],
        timeout: std::time::Duration,
    ) -> anyhow::Result<CmdOutput> {
        process::exec(&self.place, argv, timeout)
    }
}
