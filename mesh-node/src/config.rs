//! The daemon's settings: one serializable [`Config`], read from YAML (a file, or the embedded
//! default) plus a few environment overrides, validated before use.
//!
//! The same file also carries the file state source's `workloads`, `services` and `policies`
//! (`state::file` reads and checks them, and reloads them when the file changes): [`Config`]
//! accepts those top-level keys and leaves them alone, so that the file as a whole still refuses
//! unknown fields.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod gateway;
mod istio;
mod locate;

pub use gateway::GatewayConfig;
pub use istio::{ENV_INSTANCE_IP, ENV_POD_NAME, ENV_POD_NAMESPACE, IstioConfig};
pub use locate::Position;

/// The embedded default configuration (`mesh-node config default`).
pub const DEFAULT_YAML: &str = include_str!("../config/default.yaml");

/// Environment variable overriding [`Config::node`] (Kubernetes sets it from `spec.nodeName`).
pub const ENV_NODE_NAME: &str = "MESH_NODE_NAME";
/// Environment variable overriding [`Config::network`] (a Helm value or the cluster's
/// `topology.istio.io/network`, as ztunnel's `NETWORK`).
pub const ENV_NETWORK: &str = "MESH_NETWORK";
/// Environment variable overriding [`LogConfig::filter`].
pub const ENV_LOG: &str = "MESH_LOG";

/// mesh-node's configuration. Every field has a default; unknown fields are errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Name of this node: the daemon serves the workloads placed on it. Default: the host name.
    pub node: String,
    /// Zone of this node, for services that prefer endpoints in the same zone. Default: none;
    /// with the Kubernetes source, the Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// The network this node is on (Istio's `topology.istio.io/network`): workloads that
    /// name another network are reached through that network's gateway (`networks`).
    /// Default: none (the default network; workloads that name no network are on it).
    pub network: String,
    /// Run as an east-west gateway instead of a node proxy.
    pub gateway: GatewayConfig,
    /// Logging.
    pub log: LogConfig,
    /// Kernel redirection.
    pub redirect: RedirectConfig,
    /// Proxy behaviour.
    pub proxy: ProxyConfig,
    /// Workload identities and certificates.
    pub identity: IdentityConfig,
    /// The Kubernetes state source.
    pub kubernetes: KubernetesConfig,
    /// istiod as the source of certificates and state (instead of the local CA and the
    /// Kubernetes source).
    pub istio: IstioConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Namespace whose policies apply mesh-wide (Istio's root namespace). Default:
    /// `istio-system`.
    pub root_namespace: String,
    /// `policies`, `workloads`, `services`, `traffic`: the file state source's sections, read by
    /// `state::file::Document`; accepted here so that the file still refuses unknown fields.
    #[serde(skip_serializing)]
    policies: Elsewhere,
    /// See `policies`.
    #[serde(skip_serializing)]
    workloads: Elsewhere,
    /// See `policies`.
    #[serde(skip_serializing)]
    services: Elsewhere,
    /// See `policies`.
    #[serde(skip_serializing)]
    traffic: Elsewhere,
    /// See `policies`.
    #[serde(skip_serializing)]
    networks: Elsewhere,
}

/// A top-level section of the file that another part of the daemon reads (the file state
/// source's `workloads`, `services` and `policies`): any YAML is accepted here, unread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Elsewhere;

impl<'de> Deserialize<'de> for Elsewhere {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| Self)
    }
}

/// The Kubernetes state source: workloads, services and policies from the API server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesConfig {
    /// Learn workloads, services and policies from the Kubernetes API (in addition to the
    /// file's `workloads`, `services` and `policies`, which stay useful for VMs). Default:
    /// `false`.
    pub enabled: bool,
    /// kubeconfig file to reach the API server. Default: none: `$KUBECONFIG`, then
    /// `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Label that opts a namespace in (and, set to `optOutValue`, a pod out). Default:
    /// `mesh.io/dataplane-mode` (`istio.io/dataplane-mode` reuses Istio's labels).
    pub enroll_label: String,
    /// Value of `enrollLabel` on a namespace that enrolls its pods. Default: `ambient`.
    pub enroll_value: String,
    /// Value of `enrollLabel` on a pod that keeps it out of the mesh. Default: `none`.
    pub opt_out_value: String,
    /// The host's `/proc` (the daemon runs with `hostPID`), scanned for the network
    /// namespaces of this node's pods. Default: `/proc`.
    pub proc_root: PathBuf,
    /// How often this node's pods are matched with their network namespaces again (pod
    /// sandboxes can be replaced without a pod change), in milliseconds. Default: 5000.
    pub rescan_interval_ms: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            kubeconfig: None,
            enroll_label: "mesh.io/dataplane-mode".to_owned(),
            enroll_value: "ambient".to_owned(),
            opt_out_value: "none".to_owned(),
            proc_root: PathBuf::from("/proc"),
            rescan_interval_ms: 5_000,
        }
    }
}

/// The Prometheus endpoint (`/metrics` on port 15020).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsConfig {
    /// Address the endpoint listens on: `::` is every address, IPv4 and IPv6; `0.0.0.0` every
    /// IPv4 address; `127.0.0.1` only local scrapers (the metrics name every workload,
    /// principal and policy of the node). Default: `::`.
    pub bind_address: std::net::IpAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            bind_address: std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// Identity and certificate settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityConfig {
    /// SPIFFE trust domain: identities are `spiffe://<trustDomain>/ns/<ns>/sa/<sa>`, and only
    /// peers of this trust domain (and of `trustDomainAliases`) are accepted. Default:
    /// `cluster.local`.
    pub trust_domain: String,
    /// Other trust domains whose workloads are accepted as peers (another cluster's mesh
    /// with a trust domain of its own; its root must be in `trustBundleFiles`). Default: none.
    pub trust_domain_aliases: Vec<String>,
    /// More root certificates (PEM files, each one or several certificates) that peers'
    /// chains may end in, besides the certificate source's own root: the roots of the other
    /// clusters of a multi-cluster mesh (a trust bundle). Re-read when they change; a file
    /// that cannot be read or parsed keeps its last good roots. Default: none.
    pub trust_bundle_files: Vec<PathBuf>,
    /// Local CA certificate (PEM). `mesh-node ca init --dir DIR` creates a development CA.
    /// Default: `/etc/mesh/ca/ca-cert.pem`.
    pub ca_cert_file: PathBuf,
    /// Local CA private key (PEM). Default: `/etc/mesh/ca/ca-key.pem`.
    pub ca_key_file: PathBuf,
    /// Lifetime of workload certificates, in seconds; they are renewed at half-life.
    /// Default: 86400 (24 h).
    pub cert_lifetime_seconds: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            trust_domain_aliases: Vec::new(),
            trust_bundle_files: Vec::new(),
            ca_cert_file: PathBuf::from("/etc/mesh/ca/ca-cert.pem"),
            ca_key_file: PathBuf::from("/etc/mesh/ca/ca-key.pem"),
            cert_lifetime_seconds: 86_400,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node: String::new(),
            zone: None,
            network: String::new(),
            gateway: GatewayConfig::default(),
            log: LogConfig::default(),
            redirect: RedirectConfig::default(),
            proxy: ProxyConfig::default(),
            identity: IdentityConfig::default(),
            kubernetes: KubernetesConfig::default(),
            istio: IstioConfig::default(),
            metrics: MetricsConfig::default(),
            root_namespace: "istio-system".to_owned(),
            policies: Elsewhere,
            workloads: Elsewhere,
            services: Elsewhere,
            traffic: Elsewhere,
            networks: Elsewhere,
        }
    }
}

/// Proxy settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Time limit for connecting to a destination, in milliseconds. Default: 10000.
    pub connect_timeout_ms: u64,
    /// On SIGTERM, how long open connections may run on after the listeners closed (a new
    /// daemon takes the new connections meanwhile), in milliseconds. Default: 30000.
    pub drain_timeout_ms: u64,
    /// Time limit for a peer to complete the TLS handshake on 15008, in milliseconds.
    /// Default: 10000.
    pub handshake_timeout_ms: u64,
    /// Connections the daemon handles at once, all workloads together; more are reset with a
    /// log line and `mesh_connection_errors_total{reason="limit_total"}`. Default: 100000.
    pub max_connections: usize,
    /// Connections one workload may have at once (in and out). Default: 20000.
    pub max_connections_per_workload: usize,
    /// Connections one source address may have at once into this node's pods: HBONE
    /// connections (TLS handshakes in progress included) and plaintext connections; more are
    /// reset (`reason="limit_source"`). Default: 10000 (half of a workload's share; sources
    /// behind SNAT share an address).
    pub max_connections_per_source: usize,
    /// HBONE connections into this node that carry no stream for this long are closed (GOAWAY),
    /// in milliseconds. Default: 360000 (6 min: longer than a client pool's 5 min, so that a
    /// well-behaved peer closes first).
    pub hbone_idle_timeout_ms: u64,
    /// Interval of the HTTP/2 PING keepalive on HBONE connections (both sides), in
    /// milliseconds. Default: 10000 (as ztunnel).
    pub ping_interval_ms: u64,
    /// An HBONE connection whose peer has not answered a PING within this long is dropped, in
    /// milliseconds. Default: 20000 (as ztunnel).
    pub ping_timeout_ms: u64,
    /// Idle time before TCP keepalive probes start on the daemon's sockets, in milliseconds.
    /// Default: 60000.
    pub tcp_keepalive_time_ms: u64,
    /// Interval of TCP keepalive probes, in milliseconds. Default: 10000.
    pub tcp_keepalive_interval_ms: u64,
    /// `TCP_USER_TIMEOUT` of the daemon's sockets: a connection whose sent data (or keepalive
    /// probes) stay unacknowledged this long is dropped, in milliseconds. Default: 60000.
    pub tcp_user_timeout_ms: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            drain_timeout_ms: 30_000,
            handshake_timeout_ms: 10_000,
            max_connections: 100_000,
            max_connections_per_workload: 20_000,
            max_connections_per_source: 10_000,
            hbone_idle_timeout_ms: 360_000,
            ping_interval_ms: 10_000,
            ping_timeout_ms: 20_000,
            tcp_keepalive_time_ms: 60_000,
            tcp_keepalive_interval_ms: 10_000,
            tcp_user_timeout_ms: 60_000,
        }
    }
}

impl ProxyConfig {
    /// The per-source limit, idle timeout and keepalive fields: all must be positive, and
    /// `TCP_USER_TIMEOUT` (which decides when unanswered keepalive probes end a connection)
    /// must leave room for one probe.
    fn validate_liveness(&self) -> Result<(), (&'static str, &'static str)> {
        let positive = [
            (
                self.max_connections_per_source as u64,
                "proxy.maxConnectionsPerSource",
            ),
            (self.hbone_idle_timeout_ms, "proxy.hboneIdleTimeoutMs"),
            (self.ping_interval_ms, "proxy.pingIntervalMs"),
            (self.ping_timeout_ms, "proxy.pingTimeoutMs"),
            (self.tcp_keepalive_time_ms, "proxy.tcpKeepaliveTimeMs"),
            (
                self.tcp_keepalive_interval_ms,
                "proxy.tcpKeepaliveIntervalMs",
            ),
            (self.tcp_user_timeout_ms, "proxy.tcpUserTimeoutMs"),
        ];
        if let Some((_, field)) = positive.iter().find(|(v, _)| *v == 0) {
            return Err((field, "must be positive"));
        }
        // Kernel socket options take whole seconds (keepalive) and an int of ms (user timeout).
        for (v, field) in [
            (self.tcp_keepalive_time_ms, "proxy.tcpKeepaliveTimeMs"),
            (
                self.tcp_keepalive_interval_ms,
                "proxy.tcpKeepaliveIntervalMs",
            ),
        ] {
            if !(1000..=32_767_000).contains(&v) {
                return Err((field, "must be between 1000 and 32767000 (whole seconds)"));
            }
        }
        if self.tcp_user_timeout_ms > i32::MAX as u64 {
            return Err(("proxy.tcpUserTimeoutMs", "must fit in 31 bits"));
        }
        Ok(())
    }
}

/// How the daemon logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LogConfig {
    /// `text` (human-readable) or `json` (one object per line). Default: `text`.
    pub format: LogFormat,
    /// `tracing` filter directives (`RUST_LOG` syntax), e.g. `info,mesh_node::redirect=debug`.
    /// Default: `info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Kernel redirection settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectConfig {
    /// cgroup v2 directory that the `connect` programs attach to; they see every process below
    /// it. Default: the cgroup v2 root (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hosts
    /// in hybrid mode).
    pub cgroup: Option<PathBuf>,
    /// `SO_MARK` set on every socket the daemon opens; the kernel programs never capture a
    /// marked socket. Default: `0x539` (1337, as Istio).
    pub mark: u32,
    /// bpffs directory where the daemon pins its maps and links, so that a restarted daemon
    /// adopts them. Default: `/sys/fs/bpf/mesh`.
    pub bpffs: PathBuf,
    /// Destination CIDRs that enrolled pods reach directly, never through the daemon.
    /// Default: none (loopback is always excluded).
    pub exclude_cidrs: Vec<ipnet::IpNet>,
    /// Destination ports that enrolled pods reach directly. Default: none.
    pub exclude_ports: Vec<u16>,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            mark: mesh_common::DAEMON_MARK,
            bpffs: PathBuf::from("/sys/fs/bpf/mesh"),
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
        }
    }
}

/// Why a configuration was rejected. The message names the origin and the field, and for a
/// file the line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {origin}")]
    Read {
        origin: Origin,
        #[source]
        source: io::Error,
    },
    /// Empty, blanks or comments only: never a configuration, even a default one (a file
    /// truncated to nothing would otherwise unenroll every pod and drop every policy).
    #[error("{origin}: no configuration in it (empty, or only comments)")]
    Empty { origin: Origin },
    /// A file whose last line has no line break: cut short while it was written (or a write
    /// that failed half-way), not a complete document.
    #[error(
        "{origin}: the last line has no line break: the file looks cut short (a write in \
         progress or one that failed); a complete file ends with a newline"
    )]
    Incomplete { origin: Origin },
    /// The YAML message already names the field, line and column; it is part of this error's
    /// own message (not a separate cause) so that one log line says everything.
    #[error("{origin}: {error}")]
    Parse {
        origin: Origin,
        error: serde_yaml_ng::Error,
    },
    #[error("{origin}: {error}{}", At(.at))]
    Policy {
        origin: Origin,
        error: Box<crate::policy::PolicyError>,
        at: Option<Position>,
    },
    #[error("{origin}: field `{field}`{}: {reason}", At(.at))]
    Invalid {
        origin: Origin,
        field: String,
        reason: String,
        at: Option<Position>,
    },
}

/// ` at line L column C`, or nothing when the position is unknown.
struct At<'a>(&'a Option<Position>);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(position) => write!(f, " at {position}"),
            None => Ok(()),
        }
    }
}

impl ConfigError {
    /// A semantic error of `field` (a path such as `workloads[1].ips[0]`) in `text`, placed at
    /// the field's line when it can be found.
    #[must_use]
    pub fn invalid(origin: &Origin, text: &str, field: String, reason: String) -> Self {
        Self::Invalid {
            origin: origin.clone(),
            at: locate::locate(text, &field),
            field,
            reason,
        }
    }

    /// An invalid policy document of `text`'s `policies`, placed at the offending field.
    #[must_use]
    pub fn policy(origin: &Origin, text: &str, error: crate::policy::PolicyError) -> Self {
        Self::Policy {
            origin: origin.clone(),
            at: locate::locate(text, &format!("policies[{}].{}", error.index, error.field)),
            error: Box::new(error),
        }
    }

    /// A text without any configuration in it, or cut short (see [`Config::parse`]).
    fn check_complete(text: &str, origin: &Origin) -> Result<(), Self> {
        if locate::is_empty_document(text) {
            return Err(Self::Empty {
                origin: origin.clone(),
            });
        }
        if matches!(origin, Origin::File(_)) && !text.ends_with('\n') {
            return Err(Self::Incomplete {
                origin: origin.clone(),
            });
        }
        Ok(())
    }
}

/// Where a configuration came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The embedded default.
    Embedded,
    /// A file.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Embedded => f.write_str("embedded default configuration"),
            Origin::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The text of `file` (the embedded default when `None`) and where it came from.
pub fn read(file: Option<&Path>) -> Result<(Origin, String), ConfigError> {
    match file {
        None => Ok((Origin::Embedded, DEFAULT_YAML.to_owned())),
        Some(path) => {
            let origin = Origin::File(path.to_owned());
            match fs::read_to_string(path) {
                Ok(text) => Ok((origin, text)),
                Err(source) => Err(ConfigError::Read { origin, source }),
            }
        }
    }
}

impl Config {
    /// Reads the configuration from `file` (or the embedded default when `None`), then applies
    /// the environment overrides looked up through `env` and fills computed defaults.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (origin, text) = read(file)?;
        Ok(Self::parse(&text, &origin)?.with_overrides(env))
    }

    /// Applies the environment overrides looked up through `env` and fills computed defaults
    /// (the node name from the host name).
    #[must_use]
    pub fn with_overrides(mut self, env: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(node) = env(ENV_NODE_NAME).filter(|v| !v.is_empty()) {
            self.node = node;
        }
        if let Some(filter) = env(ENV_LOG).filter(|v| !v.is_empty()) {
            self.log.filter = filter;
        }
        if let Some(network) = env(ENV_NETWORK).filter(|v| !v.is_empty()) {
            self.network = network;
        }
        if self.node.is_empty() {
            self.node = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".to_owned());
        }
        self.istio.apply_env(&env, &self.node);
        self
    }

    /// Parses and validates the settings of YAML text. Besides YAML and field errors, a text
    /// without any configuration in it is refused, and so is a file whose last line has no
    /// line break (cut short); semantic errors name the line and column of the field. The
    /// file state source's sections are only checked to be YAML (`state::file` reads them).
    pub fn parse(text: &str, origin: &Origin) -> Result<Self, ConfigError> {
        ConfigError::check_complete(text, origin)?;
        let config: Config = serde_yaml_ng::from_str(text).map_err(|error| ConfigError::Parse {
            origin: origin.clone(),
            error,
        })?;
        config
            .validate()
            .map_err(|(field, reason)| ConfigError::invalid(origin, text, field, reason))?;
        Ok(config)
    }

    /// The first invalid setting: its field path and why.
    fn validate(&self) -> Result<(), (String, String)> {
        let invalid = |field: &str, reason: &str| (field.to_owned(), reason.to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.filter) {
            return Err(invalid("log.filter", &e.to_string()));
        }
        if self.redirect.mark == 0 {
            return Err(invalid(
                "redirect.mark",
                "must be non-zero (0 is the mark of unmarked sockets)",
            ));
        }
        if let Some(cgroup) = &self.redirect.cgroup
            && !cgroup.is_absolute()
        {
            return Err(invalid("redirect.cgroup", "must be an absolute path"));
        }
        if !self.redirect.bpffs.is_absolute() {
            return Err(invalid("redirect.bpffs", "must be an absolute path"));
        }
        if let Some(i) = self.redirect.exclude_ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                &format!("redirect.excludePorts[{i}]"),
                "0 is not a port",
            ));
        }
        if !crate::identity::valid_trust_domain(&self.identity.trust_domain) {
            return Err(invalid(
                "identity.trustDomain",
                "must be a SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`",
            ));
        }
        if let Some(i) = self
            .identity
            .trust_domain_aliases
            .iter()
            .position(|td| !crate::identity::valid_trust_domain(td))
        {
            return Err(invalid(
                &format!("identity.trustDomainAliases[{i}]"),
                "must be a SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`",
            ));
        }
        if let Some(i) = self
            .identity
            .trust_bundle_files
            .iter()
            .position(|f| !f.is_absolute())
        {
            return Err(invalid(
                &format!("identity.trustBundleFiles[{i}]"),
                "must be an absolute path",
            ));
        }
        if self.identity.cert_lifetime_seconds < 2 {
            return Err(invalid(
                "identity.certLifetimeSeconds",
                "must be at least 2",
            ));
        }
        if self.proxy.connect_timeout_ms == 0 {
            return Err(invalid("proxy.connectTimeoutMs", "must be positive"));
        }
        if self.proxy.handshake_timeout_ms == 0 {
            return Err(invalid("proxy.handshakeTimeoutMs", "must be positive"));
        }
        if self.proxy.max_connections == 0 {
            return Err(invalid("proxy.maxConnections", "must be positive"));
        }
        if self.proxy.max_connections_per_workload == 0 {
            return Err(invalid(
                "proxy.maxConnectionsPerWorkload",
                "must be positive",
            ));
        }
        if let Err((field, reason)) = self.proxy.validate_liveness() {
            return Err(invalid(field, reason));
        }
        let k8s = &self.kubernetes;
        if k8s.enroll_label.is_empty() {
            return Err(invalid("kubernetes.enrollLabel", "must not be empty"));
        }
        if k8s.enroll_value.is_empty() {
            return Err(invalid("kubernetes.enrollValue", "must not be empty"));
        }
        if !k8s.proc_root.is_absolute() {
            return Err(invalid("kubernetes.procRoot", "must be an absolute path"));
        }
        if k8s.rescan_interval_ms == 0 {
            return Err(invalid("kubernetes.rescanIntervalMs", "must be positive"));
        }
        if let Err((field, reason)) = self.istio.validate(k8s.enabled) {
            return Err(invalid(&field, reason));
        }
        if let Err((field, reason)) = self.gateway.validate() {
            return Err(invalid(&field, reason));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
