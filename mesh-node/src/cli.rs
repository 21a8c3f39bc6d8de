//! The `mesh-node` command line: parses arguments and hands over to [`crate::app`]. Lives in the
//! library so that the test harness binary runs exactly the daemon's code.

use std::path::PathBuf;

use crate::{
    app,
    config::{self, Config, LogFormat},
    logging,
};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
    /// Remove everything the daemon pinned in bpffs (detaching its kernel programs from the
    /// cgroup and from every pod netns). Run it after stopping the daemon to uninstall.
    Cleanup {
        /// YAML configuration file (for `redirect.bpffs`). Default: the embedded default.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
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

/// Runs the command line; `main` of the `mesh-node` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = |key: &str| std::env::var(key).ok();
    match cli.command {
        Command::Config(ConfigCommand::Default) => {
            print!("{}", config::DEFAULT_YAML);
            Ok(())
        }
        Command::Cleanup { config } => {
            let config = Config::load(config.as_deref(), env)?;
            let dir = &config.redirect.bpffs;
            let removed = crate::redirect::remove_pins(dir)
                .with_context(|| format!("removing pins under {}", dir.display()))?;
            println!("removed {removed} pins under {}", dir.display());
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(Some(&file), env)?;
            print!("{}", serde_yaml_ng::to_string(&config)?);
            Ok(())
        }
        Command::Run { config, log_format } => {
            let file = config;
            let mut config = Config::load(file.as_deref(), env)?;
            if let Some(format) = log_format {
                config.log.format = format;
            }
            logging::init(&config.log)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("mesh-worker")
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(app::run(config, file)).map_err(|e| {
                tracing::error!(error = %crate::error_chain(&e), "mesh-node failed");
                anyhow::Error::new(e)
            })
        }
    }
}
