//! `cargo xtask fuzz [--seconds N]`: runs every cargo-fuzz target of `mesh-node/fuzz` for a
//! bounded time with libFuzzer and `AddressSanitizer` (nightly toolchain, installed by
//! `cargo xtask setup`). A crash fails the run and leaves its input under
//! `mesh-node/fuzz/artifacts/<target>/`; fix it and add the input as a regression test.

use std::process::Command;

use anyhow::bail;

use crate::util::{Step, run_checked, workspace_root};

/// The targets (`mesh-node/fuzz/fuzz_targets/*.rs`).
pub const TARGETS: &[&str] = &[
    "config_yaml",
    "policy",
    "hbone_request",
    "peer_certificate",
    "admin_query",
];

pub fn run(seconds: u64) -> anyhow::Result<()> {
    let dir = workspace_root().join("mesh-node/fuzz");
    let step = Step::start(
        "building the fuzz targets (nightly, AddressSanitizer; minutes on a cold cache)",
    );
    run_checked(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "build", "--release"])
            .current_dir(&dir),
    )?;
    step.done();
    let mut failed = Vec::new();
    for target in TARGETS {
        let step = Step::start(&format!("fuzzing {target} for {seconds} s"));
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "--release", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .current_dir(&dir)
            .status()?;
        if !status.success() {
            failed.push(*target);
        }
        step.done();
    }
    if !failed.is_empty() {
        bail!("fuzz targets crashed: {failed:?} (inputs under mesh-node/fuzz/artifacts/)");
    }
    println!(
        "fuzzing: {} targets ran {seconds} s each without a crash",
        TARGETS.len()
    );
    Ok(())
}
