//! `cargo xtask bench [--quick]`: the benchmark suite. Every figure is the median of several
//! repetitions (with min and max) and, where one exists, is compared with a baseline measured
//! in the same run: the same pods talking directly, with no daemon. Writes
//! `target/bench/report.json`, `report.md` and `report.svg`, and flags figures that regressed
//! by more than 10 % against the previous report. With `profile` (the default of full runs) it
//! also records the daemons with `perf` and reports where their time goes (`profile.rs`).

mod profile;
mod report;
mod scenarios;

use anyhow::{Context as _, bail};

use crate::util::{Step, build_release_bins, cargo, output, target_dir};

/// One reported figure.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Figure {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The same measurement without the mesh (median), if it has one.
    pub baseline: Option<f64>,
    /// `median / baseline`.
    pub ratio: Option<f64>,
    /// The target, as text (e.g. "ratio >= 0.5").
    pub target: Option<String>,
    pub met: Option<bool>,
    /// Whether larger is better (for regression checks).
    pub higher_is_better: bool,
}

/// Median, min, max of samples.
pub fn stats(samples: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

pub fn run(quick: bool, profile: bool) -> anyhow::Result<()> {
    crate::util::require_root("bench")?;
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    // Only a report of the same kind is comparable (a quick run's 1-second samples are far
    // noisier than a full run's).
    let previous: Option<Vec<Figure>> = std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|v| v["quick"] == quick)
        .and_then(|v| serde_json::from_value(v["figures"].clone()).ok());

    let step = Step::start("building mesh-node and the load generator");
    let bin = build_release_bins(&["mesh-bench"])?;
    step.done();

    let (mut figures, profiles) = scenarios::run_all(quick, &bin, profile.then_some(&dir))?;
    figures.extend(policy(quick)?);
    figures.extend(traffic(quick)?);
    report::write(&dir, quick, &figures, previous.as_deref(), &profiles)?;
    Ok(())
}

/// The policy-evaluation micro-benchmark (`mesh-node/benches/policy.rs`).
fn policy(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let step = Step::start("policy evaluation with 10,000 policies (builds the bench profile)");
    let mut cmd = cargo(&["bench", "--package", "mesh-node", "--bench", "policy", "--"]);
    if quick {
        cmd.arg("--quick");
    }
    let out = output(&mut cmd)?;
    step.done();
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .context("the policy benchmark printed no result")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if !get("median_ns").is_finite() {
        bail!("policy benchmark output: {line}");
    }
    Ok(vec![Figure {
        scenario: "policy".into(),
        metric: format!("decision time, {} policies", v["policies"]),
        unit: "ns".into(),
        median: get("median_ns"),
        min: get("min_ns"),
        max: get("max_ns"),
        baseline: Some(get("baseline_median_ns")),
        ratio: Some(get("ratio")),
        target: Some("median <= 2000 ns".into()),
        met: Some(get("median_ns") <= 2000.0),
        higher_is_better: false,
    }])
}

/// The traffic-management micro-benchmark (`mesh-node/benches/traffic.rs`): a connection to a
/// service split 90/10 behind a rate limit against the same service without traffic rules,
/// interleaved in one run. The added cost is judged on the whole of its spread: under the
/// target (met), all of it over (not met), or straddling it (inconclusive, `met: None`).
fn traffic(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let step = Step::start("traffic management per connection (split, rate limit)");
    let mut cmd = cargo(&[
        "bench",
        "--package",
        "mesh-node",
        "--bench",
        "traffic",
        "--",
    ]);
    if quick {
        cmd.arg("--quick");
    }
    let out = output(&mut cmd)?;
    step.done();
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .context("the traffic benchmark printed no result")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    if !get("median_ns").is_finite() || !get("added_max_ns").is_finite() {
        bail!("traffic benchmark output: {line}");
    }
    let target = get("target_added_ns");
    let verdict = |prefix: &str| {
        let (min, max) = (
            get(&format!("{prefix}_min_ns")),
            get(&format!("{prefix}_max_ns")),
        );
        if max < target {
            Some(true)
        } else if min >= target {
            Some(false)
        } else {
            None
        }
    };
    let added = |prefix: &str, metric: &str| Figure {
        scenario: "traffic".into(),
        metric: metric.into(),
        unit: "ns".into(),
        median: get(&format!("{prefix}_median_ns")),
        min: get(&format!("{prefix}_min_ns")),
        max: get(&format!("{prefix}_max_ns")),
        baseline: None,
        ratio: None,
        target: Some(format!("max of spread < {target} ns")),
        met: verdict(prefix),
        higher_is_better: false,
    };
    Ok(vec![
        Figure {
            scenario: "traffic".into(),
            metric: "per connection, 90/10 split + rate limit".into(),
            unit: "ns".into(),
            median: get("median_ns"),
            min: get("min_ns"),
            max: get("max_ns"),
            baseline: Some(get("baseline_median_ns")),
            ratio: Some(get("ratio")),
            target: None,
            met: None,
            higher_is_better: false,
        },
        added("added", "added per connection by split + rate limit"),
        added(
            "counted_added",
            "added per connection, with the split counter",
        ),
    ])
}
