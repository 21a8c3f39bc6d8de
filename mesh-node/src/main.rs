//! `mesh-node` command line: parses arguments and hands over to [`mesh_node::app`].

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_node::{
    app,
    config::{self, Config, LogFormat},
    logging,
};

/// mesh-node: the per-node data plane of the mesh sidecarless service mesh.
///
/// One mesh-node runs on every node (a Kubernetes DaemonSet, or a systemd service on a VM). Its
/// kernel programs steer the TCP traffic of enrolled pods into it; it tunnels pod-to-pod traffic
/// in mutual TLS (HBONE, compatible with Istio ztunnel), enforces L4 authorization and exports
/// node-level metrics. It needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and a Linux
/// kernel >= 5.14 with cgroup v2.
#[expect(
    clippy::doc_markdown,
    reason = "this text is the --help output, not rustdoc"
)]
#[derive(Debug, Parser)]
#[command(name = "mesh-node", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGINT or SIGTERM.
    Run {
        /// YAML configuration file (see docs/configuration.md). Default: the embedded default
        /// configuration (`mesh-node config default`).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Override `log.format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Inspect configuration without running anything.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the embedded default configuration.
    Default,
    /// Validate a configuration file and print the effective configuration (with defaults and
    /// environment overrides applied) as YAML.
    Check {
        /// YAML configuration file.
        file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = |key: &str| std::env::var(key).ok();
    match cli.command {
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config::DEFAULT_YAML);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(Some(&file), env)?;
            print!("{}", serde_yaml_ng::to_string(&config)?);
            Ok(())
        }
        Command::Run { config, log_format } => {
            let mut config = Config::load(config.as_deref(), env)?;
            if let Some(format) = log_format {
                config.log.format = format;
            }
            logging::init(&config.log)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("mesh-worker")
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(app::run(config)).map_err(|e| {
                tracing::error!(error = %format_chain(&e), "mesh-node failed");
                anyhow::Error::new(e)
            })
        }
    }
}

/// `error: cause: cause` on one line, for the final log record.
fn format_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
