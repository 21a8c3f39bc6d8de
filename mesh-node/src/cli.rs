//! The `mesh-node` command line: parses arguments and hands over to [`crate::app`]. Lives in the
//! library so that the test harness binary runs exactly the daemon's code.

use std::path::PathBuf;

use std::time::{Duration, SystemTime};

use crate::{
    app,
    config::{self, Config, LogFormat},
    identity::{CA_CERT_FILE, CA_KEY_FILE, Identity, LocalCa},
    logging,
    state::file::{Document, Watched},
};

/// Every proxied connection holds descriptors: raise the soft `RLIMIT_NOFILE` to the hard limit
/// (a daemon serving a node needs far more than the default 1024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0
        }
    };
    if raised {
        tracing::debug!(limit = lim.rlim_cur, "raised the open file limit");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open file limit");
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}
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
    /// Manage a local (development) certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Inspect configuration without running anything.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a development root CA (ECDSA P-256) in DIR: ca-cert.pem and ca-key.pem (0600).
    Init {
        /// Directory to write to; existing files are never overwritten.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain the CA is for (recorded in its subject).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Issue a workload certificate and key from the CA in DIR (for VMs, tests and debugging).
    Issue {
        /// Directory holding ca-cert.pem and ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// SPIFFE id, e.g. `spiffe://cluster.local/ns/default/sa/web`.
        #[arg(long)]
        identity: String,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the private key (PEM, 0600).
        #[arg(long)]
        key: PathBuf,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        lifetime_seconds: u64,
        /// Start the validity this many seconds in the past (a negative lifetime end makes an
        /// expired certificate: use with --lifetime-seconds smaller than this).
        #[arg(long, default_value_t = 60)]
        backdate_seconds: u64,
    },
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

/// The error of a command that has already been reported in the daemon's log (in the
/// configured format), so that `main` does not print it a second time.
#[derive(Debug, thiserror::Error)]
#[error("reported in the log")]
struct Logged;

/// Runs the command line; `main` of the `mesh-node` binary.
///
/// A failure is a user's error (a bad file, a missing CA), not a crash: it prints one line,
/// `error: what: cause: cause`, and exits 1. It never prints a backtrace, whatever
/// `RUST_BACKTRACE` says (an `anyhow::Error` returned from `main` would print one).
#[must_use]
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if !e.is::<Logged>() {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
        Command::Ca(CaCommand::Init { dir, trust_domain }) => {
            let (cert, key) = LocalCa::init(&dir, &trust_domain)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        Command::Ca(CaCommand::Issue {
            ca_dir,
            identity,
            cert,
            key,
            lifetime_seconds,
            backdate_seconds,
        }) => {
            let identity: Identity = identity.parse()?;
            let ca = LocalCa::load(&ca_dir.join(CA_CERT_FILE), &ca_dir.join(CA_KEY_FILE))?;
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let now = SystemTime::now();
            let not_before = now - Duration::from_secs(backdate_seconds);
            let issued = ca.issue_for_key(
                &identity,
                &pair,
                not_before,
                not_before + Duration::from_secs(lifetime_seconds),
            )?;
            std::fs::write(&cert, issued.pem())?;
            write_private(&key, &pair.serialize_pem())?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let document = Document::load(Some(&file), env)?;
            print!("{}", document.to_yaml()?);
            Ok(())
        }
        Command::Run { config, log_format } => {
            let (mut document, file) = match config {
                Some(path) => {
                    let (document, watched) = Watched::load(&path, env)?;
                    (document, Some(watched))
                }
                None => (Document::load(None, env)?, None),
            };
            if let Some(format) = log_format {
                document.config.log.format = format;
            }
            let log = logging::init(&document.config.log)?;
            raise_fd_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("mesh-worker")
                .build()
                .context("starting the async runtime")?;
            // From here on errors go to the log, in its format (JSON lines stay JSON).
            runtime
                .block_on(app::run(document, file, log))
                .map_err(|e| {
                    tracing::error!(error = %crate::error_chain(&e), "mesh-node failed");
                    anyhow::Error::new(Logged)
                })
        }
    }
}
