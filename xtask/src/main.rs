//! Developer and CI entry points (`cargo xtask <command>`).

mod bench;
mod demo;
mod fuzz;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

/// mesh's developer tasks. Every command needs root (network namespaces, cgroups, eBPF).
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build and the tests need (apt packages, bpf-linker, the BPF
    /// toolchain link, bpffs). Idempotent: fast when nothing is missing.
    Setup,
    /// Format check, clippy (warnings denied), unit tests and the namespaced end-to-end tests.
    /// Fails if any namespaced test was skipped.
    Test,
    /// Benchmarks against a baseline measured in the same run; writes target/bench/report.json.
    Bench {
        /// Run every scenario briefly (CI uses this so the suite never rots).
        #[arg(long)]
        quick: bool,
        /// Record the daemons with `perf` during the throughput, request/response and
        /// connection-rate scenarios and report where their time goes (on by default in full
        /// runs; `--profile=false` turns it off).
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        profile: Option<bool>,
    },
    /// Run every fuzz target (cargo-fuzz, nightly) for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Bring up a 2-node, 4-pod testbed, run mesh-node on each node and real traffic between
    /// the pods, print what happened, and tear everything down.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::Test => test::run(),
        Command::Demo => demo::run(),
        Command::Bench { quick, profile } => bench::run(quick, profile.unwrap_or(!quick)),
        Command::Fuzz { seconds } => fuzz::run(seconds),
    }
}
