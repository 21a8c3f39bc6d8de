//! Running `mesh-node` on testbed nodes: per-node configuration files listing the testbed's
//! pods as workloads, starting and restarting daemons, and reading their JSON logs.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{Pod, Proc, Testbed};

/// A `mesh-node` process on one testbed node.
pub struct Daemon {
    proc: Proc,
    node: String,
    exe: PathBuf,
    config: PathBuf,
    ca: PathBuf,
    settings: NodeSettings,
    enrolled: Vec<String>,
}

/// The namespace every testbed workload lives in.
pub const NAMESPACE: &str = "default";

/// Logged by the daemon each time it applied a changed configuration.
pub const RELOADED: &str = "configuration reloaded";

/// Trust domain of testbed meshes.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The testbed's CA directory (shared by all nodes), created on first use with `exe ca init`.
pub fn ca_dir(bed: &Testbed, exe: &Path) -> anyhow::Result<PathBuf> {
    let dir = bed.tmp_dir().join("ca");
    if !dir.join("ca-cert.pem").exists() {
        ca_init(exe, &dir)?;
    }
    Ok(dir)
}

/// Creates a CA in `dir` with `exe ca init`.
pub fn ca_init(exe: &Path, dir: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(exe)
        .args(["ca", "init", "--dir"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("ca init: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Issues a certificate for the SPIFFE ID `identity` from the CA in `ca` with `exe ca issue`
/// (`extra`: more of its arguments) into the testbed's directory, as `<name>-cert.pem` and
/// `<name>-key.pem`; returns their paths.
pub fn issue_cert(
    bed: &Testbed,
    exe: &Path,
    ca: &Path,
    identity: &str,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = bed.tmp_dir().join(format!("{name}-cert.pem"));
    let key = bed.tmp_dir().join(format!("{name}-key.pem"));
    let out = std::process::Command::new(exe)
        .args(["ca", "issue", "--ca-dir"])
        .arg(ca)
        .args(["--identity", identity, "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(extra)
        .output()?;
    if !out.status.success() {
        bail!("ca issue: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((cert, key))
}

/// Per-node settings that tests vary.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Lifetime of workload certificates.
    pub cert_lifetime_seconds: u64,
    /// The `policies:` list (YAML items of Istio documents), empty for none.
    pub policies: String,
    /// `proxy.handshakeTimeoutMs`.
    pub handshake_timeout_ms: u64,
    /// `proxy.maxConnectionsPerWorkload`.
    pub max_connections_per_workload: usize,
    /// The `services:` list (YAML items), empty for none.
    pub services: String,
    /// The `traffic:` list (YAML items of traffic documents), empty for none.
    pub traffic: String,
    /// A command the daemon runs under (`[wrapper..., exe, "run", ...]`), empty for none: a
    /// seccomp profile, `strace`.
    pub wrapper: Vec<String>,
    /// More fields of the `proxy:` section, as `key: value` lines, e.g.
    /// `"pingIntervalMs: 1000\nhboneIdleTimeoutMs: 1500"`.
    pub proxy: String,
    /// More `workloads:` items (YAML) after the testbed's pods, e.g. a VM's entry.
    pub workloads: String,
    /// The testbed pods listed as workloads, `None` for all. A cluster's daemons list their
    /// own cluster's pods; another cluster's go to `workloads`, with their network
    /// ([`pod_workload`]).
    pub pods: Option<Vec<String>>,
    /// The daemon's `network:`, empty for none.
    pub network: String,
    /// The `networks:` list (YAML items: the other networks and their gateways), empty for
    /// none.
    pub networks: String,
    /// Fields of the `gateway:` section, as YAML lines relative to it (`"enabled: true"`),
    /// empty for none.
    pub gateway: String,
    /// More fields of the `identity:` section, as YAML lines relative to it, e.g.
    /// `"trustBundleFiles: [/tmp/ca2/ca-cert.pem]"`.
    pub identity: String,
    /// The CA directory the daemon issues certificates from (a cluster's own CA); `None` for
    /// the testbed's ([`ca_dir`]).
    pub ca: Option<PathBuf>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            cert_lifetime_seconds: 86_400,
            policies: String::new(),
            handshake_timeout_ms: 10_000,
            max_connections_per_workload: 20_000,
            services: String::new(),
            traffic: String::new(),
            wrapper: Vec::new(),
            proxy: String::new(),
            workloads: String::new(),
            pods: None,
            network: String::new(),
            networks: String::new(),
            gateway: String::new(),
            identity: String::new(),
            ca: None,
        }
    }
}

/// The YAML configuration of `node`, listing every pod of the testbed as a workload (with its
/// service account named after the pod) and enrolling the pods named in `enrolled`, then
/// `settings.workloads`. `node` may be a standalone host: its `redirect.cgroup` is the host's
/// application cgroup, and its own workload entry is one of `settings.workloads`.
pub fn config_yaml(
    bed: &Testbed,
    node: &str,
    ca: &Path,
    settings: &NodeSettings,
    enrolled: &[&str],
) -> anyhow::Result<String> {
    // A standalone host's daemon (a VM) captures its application cgroup.
    let cgroup = match bed.hosts().iter().find(|h| h.name() == node) {
        Some(host) => host.app_cgroup(),
        None => bed.node(node).cgroup(),
    };
    let bpffs = bed.bpffs_dir()?.join(node);
    let mut yaml = format!(
        "node: {node}\nlog:\n  format: json\n  filter: info,mesh_node=debug\n\
         redirect:\n  cgroup: {}\n  bpffs: {}\nproxy:\n  connectTimeoutMs: 3000\n  handshakeTimeoutMs: {}\n  maxConnectionsPerWorkload: {}\n{}\
         identity:\n  trustDomain: {TRUST_DOMAIN}\n  caCertFile: {ca}/ca-cert.pem\n  \
         caKeyFile: {ca}/ca-key.pem\n  certLifetimeSeconds: {}\n{}policies:\n{}services:\n{}traffic:\n{}workloads:\n",
        cgroup.display(),
        bpffs.display(),
        settings.handshake_timeout_ms,
        settings.max_connections_per_workload,
        settings.proxy.lines().fold(String::new(), |mut out, line| {
            let _ = writeln!(out, "  {}", line.trim());
            out
        }),
        settings.cert_lifetime_seconds,
        indented(&settings.identity),
        if settings.policies.trim().is_empty() {
            "  []\n"
        } else {
            settings.policies.as_str()
        },
        if settings.services.trim().is_empty() {
            "  []\n"
        } else {
            settings.services.as_str()
        },
        if settings.traffic.trim().is_empty() {
            "  []\n"
        } else {
            settings.traffic.as_str()
        },
        ca = ca.display(),
    );
    let listed = |pod: &Pod| {
        settings
            .pods
            .as_ref()
            .is_none_or(|pods| pods.iter().any(|p| p == pod.name()))
    };
    for pod in bed.pods().filter(|p| listed(p)) {
        yaml.push_str(&pod_workload(pod, "", enrolled.contains(&pod.name())));
    }
    yaml.push_str(&settings.workloads);
    if !settings.network.is_empty() {
        writeln!(yaml, "network: {}", settings.network)?;
    }
    if !settings.networks.trim().is_empty() {
        writeln!(yaml, "networks:\n{}", settings.networks.trim_end())?;
    }
    if !settings.gateway.trim().is_empty() {
        write!(yaml, "gateway:\n{}", indented(&settings.gateway))?;
    }
    Ok(yaml)
}

/// The `workloads:` item of the testbed pod `pod` (service account and `app` label named after
/// it), as [`config_yaml`] lists the pods. With a `network`, the item names it and leaves out
/// the netns: how a cluster's daemons list another cluster's pods (whose daemons own them).
#[must_use]
pub fn pod_workload(pod: &Pod, network: &str, enrolled: bool) -> String {
    let place = if network.is_empty() {
        format!("netns: {}", pod.netns_path().display())
    } else {
        format!("network: {network}")
    };
    format!(
        "- name: {name}\n  namespace: {NAMESPACE}\n  serviceAccount: {name}\n  \
         labels: {{app: {name}}}\n  \
         ips: [{v4}, \"{v6}\"]\n  node: {node}\n  {place}\n  enrolled: {enrolled}\n",
        name = pod.name(),
        v4 = pod.ipv4(),
        v6 = pod.ipv6(),
        node = pod.node(),
    )
}

/// `lines`, each indented by two spaces (the fields of a section), ending in a line break.
fn indented(lines: &str) -> String {
    lines.lines().fold(String::new(), |mut out, line| {
        let _ = writeln!(out, "  {line}");
        out
    })
}

/// The value of one sample (`name{labels}` exactly as exposed) of the metrics endpoint of the
/// daemon on `node` (0 when the sample is absent: a counter not incremented yet).
pub fn counter(bed: &Testbed, node: &str, sample: &str) -> anyhow::Result<u64> {
    let out = bed.node(node).exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15020/metrics",
    ])?;
    let prefix = format!("{sample} ");
    match out.stdout.lines().find_map(|l| l.strip_prefix(&prefix)) {
        Some(value) => Ok(value.trim().parse()?),
        None => Ok(0),
    }
}

/// Replaces a file atomically (write beside it, then rename), as a careful operator would.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes `node`'s first configuration file; the CA directory and the file.
fn write_first_config(
    bed: &Testbed,
    node: &str,
    exe: &Path,
    settings: &NodeSettings,
    enrolled: &[&str],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca = match &settings.ca {
        Some(dir) => dir.clone(),
        None => ca_dir(bed, exe)?,
    };
    let config = bed.tmp_dir().join(format!("{node}.yaml"));
    write_atomically(&config, &config_yaml(bed, node, &ca, settings, enrolled)?)?;
    Ok((ca, config))
}

impl Daemon {
    /// Writes `node`'s configuration and starts `exe run` in the node's netns and cgroup;
    /// returns once it logged `ready`.
    pub fn start(bed: &Testbed, node: &str, exe: &Path, enrolled: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_settings(bed, node, exe, enrolled, &NodeSettings::default())
    }

    /// [`Daemon::start`] with non-default settings.
    pub fn start_with_settings(
        bed: &Testbed,
        node: &str,
        exe: &Path,
        enrolled: &[&str],
        settings: &NodeSettings,
    ) -> anyhow::Result<Self> {
        let (ca, config) = write_first_config(bed, node, exe, settings, enrolled)?;
        let mut daemon = Self::spawn(bed, node, exe, &config, &settings.wrapper)?;
        daemon.ca = ca;
        daemon.settings = settings.clone();
        daemon.enrolled = enrolled.iter().map(|s| (*s).to_owned()).collect();
        Ok(daemon)
    }

    /// Writes `node`'s configuration (`settings.gateway` enables the east-west gateway role;
    /// `enrolled`: the pods of the gateway's cluster that are in the mesh) and starts `exe run`
    /// in the node's netns; returns once its readiness endpoint answers 200 (15 s at most).
    pub fn start_gateway(
        bed: &Testbed,
        node: &str,
        exe: &Path,
        enrolled: &[&str],
        settings: &NodeSettings,
    ) -> anyhow::Result<Self> {
        let (ca, config) = write_first_config(bed, node, exe, settings, enrolled)?;
        let mut daemon = Self::spawn_unready(bed, node, exe, &config, &settings.wrapper)?;
        daemon.ca = ca;
        daemon.settings = settings.clone();
        daemon.enrolled = enrolled.iter().map(|s| (*s).to_owned()).collect();
        let ready = crate::helpers::within(Duration::from_secs(15), || {
            crate::helpers::readiness(bed, node).0 == "200" || !daemon.proc.is_running()
        });
        if ready.is_none() || !daemon.proc.is_running() {
            bail!(
                "gateway on {node} not ready: {:?}; log:\n{}",
                crate::helpers::readiness(bed, node),
                daemon.proc.stderr()
            );
        }
        Ok(daemon)
    }

    /// Starts a daemon with an existing configuration file.
    pub fn start_with(
        bed: &Testbed,
        node: &str,
        exe: &Path,
        config: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn(bed, node, exe, config, &[])
    }

    fn spawn(
        bed: &Testbed,
        node: &str,
        exe: &Path,
        config: &Path,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let daemon = Self::spawn_unready(bed, node, exe, config, wrapper)?;
        let mut proc = daemon.proc;
        proc.wait_for_output("\"message\":\"ready\"", Duration::from_secs(15))
            .with_context(|| format!("mesh-node on {node}"))?;
        Ok(Self { proc, ..daemon })
    }

    /// Starts `exe run` without waiting for anything.
    fn spawn_unready(
        bed: &Testbed,
        node: &str,
        exe: &Path,
        config: &Path,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let exe_str = exe.to_str().context("non-UTF-8 path")?;
        let config_str = config.to_str().context("non-UTF-8 path")?;
        let mut argv: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        argv.extend([exe_str, "run", "--config", config_str]);
        let proc = bed.spawn_on(node, &argv)?;
        Ok(Self {
            proc,
            node: node.to_owned(),
            exe: exe.to_owned(),
            config: config.to_owned(),
            ca: ca_dir(bed, exe)?,
            settings: NodeSettings::default(),
            enrolled: Vec::new(),
        })
    }

    /// Replaces the configuration file with `text` (atomically) and waits, at most `timeout`,
    /// until the daemon logged one more `configuration reloaded`.
    pub fn reload_with(&self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        let reloads = self.records(RELOADED).len();
        write_atomically(&self.config, text)?;
        self.wait_for_records(RELOADED, reloads + 1, timeout)
    }

    /// Rewrites the configuration with a new `policies:` list (the daemon picks it up).
    pub fn set_policies(&mut self, bed: &Testbed, policies: &str) -> anyhow::Result<()> {
        policies.clone_into(&mut self.settings.policies);
        let enrolled: Vec<String> = self.enrolled.clone();
        let enrolled: Vec<&str> = enrolled.iter().map(String::as_str).collect();
        self.write_config(bed, &enrolled)
    }

    /// Rewrites the configuration with a new set of enrolled pods (the daemon picks it up).
    pub fn set_enrolled(&mut self, bed: &Testbed, enrolled: &[&str]) -> anyhow::Result<()> {
        self.enrolled = enrolled.iter().map(|s| (*s).to_owned()).collect();
        self.write_config(bed, enrolled)
    }

    /// Rewrites the configuration with `settings` (the same enrolled pods and CA) and waits, at
    /// most `timeout`, until the daemon applied it.
    pub fn reload_settings(
        &mut self,
        bed: &Testbed,
        settings: &NodeSettings,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let enrolled: Vec<&str> = self.enrolled.iter().map(String::as_str).collect();
        let text = config_yaml(bed, &self.node, &self.ca, settings, &enrolled)?;
        self.reload_with(&text, timeout)?;
        self.settings = settings.clone();
        Ok(())
    }

    fn write_config(&self, bed: &Testbed, enrolled: &[&str]) -> anyhow::Result<()> {
        write_atomically(
            &self.config,
            &config_yaml(bed, &self.node, &self.ca, &self.settings, enrolled)?,
        )
    }

    /// The configuration file.
    #[must_use]
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Every JSON log record so far.
    #[must_use]
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.proc
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Log records with this message.
    #[must_use]
    pub fn records(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs()
            .into_iter()
            .filter(|r| r["message"] == message)
            .collect()
    }

    /// `connection captured` records of one direction.
    #[must_use]
    pub fn captured(&self, direction: &str) -> Vec<serde_json::Value> {
        self.records("connection captured")
            .into_iter()
            .filter(|r| r["direction"] == direction)
            .collect()
    }

    /// Waits until `count` records with `message` exist.
    pub fn wait_for_records(
        &self,
        message: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.records(message).len();
            if n >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-node on {}: {n} `{message}` records after {timeout:?}, wanted {count}; log:\n{}",
                    self.node,
                    self.proc.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM (SIGKILL after 5 s).
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.proc.stop(Duration::from_secs(5))
    }

    /// Kills the daemon outright (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.proc.signal(nix::sys::signal::Signal::SIGKILL);
        self.proc.wait(Duration::from_secs(5))?;
        Ok(())
    }

    /// Starts a new daemon with the same binary and configuration.
    pub fn restart(&self, bed: &Testbed) -> anyhow::Result<Self> {
        let mut daemon = Self::start_with(bed, &self.node, &self.exe, &self.config)?;
        daemon.settings = self.settings.clone();
        daemon.enrolled.clone_from(&self.enrolled);
        daemon.ca.clone_from(&self.ca);
        Ok(daemon)
    }

    /// The CA directory this daemon's configuration points at.
    #[must_use]
    pub fn ca(&self) -> &Path {
        &self.ca
    }
}
