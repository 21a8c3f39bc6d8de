//! `cargo xtask bench [--quick]`: benchmarks, each compared with a baseline measured in the same
//! run and reported as a ratio. Writes `target/bench/report.json`.
//!
//! Scenarios so far: `policy_decision` (per-connection authorization time with 10,000
//! policies, against a store holding only the applicable ones).

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::util::{Step, cargo, output, workspace_root};

pub fn run(quick: bool) -> anyhow::Result<()> {
    let step = Step::start("policy evaluation with 10,000 policies (builds the bench profile)");
    let mut cmd = cargo(&["bench", "--package", "mesh-node", "--bench", "policy", "--"]);
    if quick {
        cmd.arg("--quick");
    }
    let out = output(&mut cmd)?;
    step.done();
    let scenarios: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("bench output")?;
    if scenarios.is_empty() {
        bail!("the policy benchmark printed no result");
    }

    println!(
        "\n{:<18} {:>12} {:>12} {:>8} {:>14}",
        "scenario", "median", "baseline", "ratio", "target"
    );
    for s in &scenarios {
        println!(
            "{:<18} {:>9.0} ns {:>9.0} ns {:>8.3} {:>11} ns   (min {:.0}, max {:.0} ns; {} policies, first decision after a change {:.0} µs)",
            s["scenario"].as_str().unwrap_or("?"),
            s["median_ns"].as_f64().unwrap_or(f64::NAN),
            s["baseline_median_ns"].as_f64().unwrap_or(f64::NAN),
            s["ratio"].as_f64().unwrap_or(f64::NAN),
            s["target_median_ns"],
            s["min_ns"].as_f64().unwrap_or(f64::NAN),
            s["max_ns"].as_f64().unwrap_or(f64::NAN),
            s["policies"],
            s["first_decision_us"].as_f64().unwrap_or(f64::NAN),
        );
    }

    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("bench");
    std::fs::create_dir_all(&dir)?;
    let report = serde_json::json!({
        "quick": quick,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu": cpu_model(),
        "scenarios": scenarios,
    });
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\nreport: {}", path.display());
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map_or_else(String::new, |m| m.trim().to_owned())
}
