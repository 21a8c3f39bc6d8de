//! The benchmark report: a table on stdout, `report.json` (every figure, baseline, ratio, the
//! kernel and CPU), `report.md`, and `report.svg` (ratios against the direct baseline), with
//! regressions of more than 10 % against the previous report flagged.

use std::{fmt::Write as _, path::Path};

use super::{Figure, profile::Profiles};

fn human(value: f64, unit: &str) -> String {
    if !value.is_finite() {
        return "n/a".to_owned();
    }
    match unit {
        "B/s" => format!("{:.2} Gbit/s", value * 8.0 / 1e9),
        "B" if value.abs() >= 1_048_576.0 => format!("{:.1} MiB", value / 1_048_576.0),
        "B" => format!("{value:.0} B"),
        "us" => format!("{value:.1} µs"),
        "ns" => format!("{value:.0} ns"),
        "s" => format!("{value:.3} s"),
        _ => format!("{value:.0} {unit}"),
    }
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

/// Figures that got more than 10 % worse than in `previous`.
fn regressions(figures: &[Figure], previous: Option<&[Figure]>) -> Vec<String> {
    let Some(previous) = previous else {
        return Vec::new();
    };
    figures
        .iter()
        .filter_map(|f| {
            let old = previous
                .iter()
                .find(|p| p.scenario == f.scenario && p.metric == f.metric)?;
            // Compare ratios where there is a baseline (robust to machine noise), else values.
            let (new_v, old_v) = match (f.ratio, old.ratio) {
                (Some(n), Some(o)) => (n, o),
                _ => (f.median, old.median),
            };
            if !(new_v.is_finite() && old_v.is_finite()) || old_v == 0.0 {
                return None;
            }
            let change = (new_v - old_v) / old_v.abs();
            let worse = if f.higher_is_better {
                change < -0.10
            } else {
                change > 0.10
            };
            worse.then(|| format!("{} / {}: {:+.1} %", f.scenario, f.metric, change * 100.0))
        })
        .collect()
}

pub fn write(
    dir: &Path,
    quick: bool,
    figures: &[Figure],
    previous: Option<&[Figure]>,
    profiles: &Profiles,
) -> anyhow::Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpu = cpu_model();
    let regressed = regressions(figures, previous);

    let mut md = format!(
        "# mesh benchmark report\n\nkernel {kernel}, CPU {cpu}, {} run; medians of repeated runs (min–max), \
         baseline = the same pods talking directly in the same run.\n\n\
         | scenario | figure | mesh | min–max | baseline | ratio | target | met |\n|---|---|---|---|---|---|---|---|\n",
        if quick { "quick" } else { "full" }
    );
    println!(
        "\n{:<12} {:<58} {:>16} {:>16} {:>7}  target",
        "scenario", "figure", "mesh", "baseline", "ratio"
    );
    for f in figures {
        let ratio = f
            .ratio
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
        let baseline = f
            .baseline
            .map_or_else(|| "-".to_owned(), |b| human(b, &f.unit));
        let target = f.target.clone().unwrap_or_default();
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            // A target the figure's spread straddles: neither met nor missed.
            None if f.target.is_some() => "inconclusive",
            None => "",
        };
        println!(
            "{:<12} {:<58} {:>16} {:>16} {:>7}  {target} {met}",
            f.scenario,
            f.metric,
            human(f.median, &f.unit),
            baseline,
            ratio
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}–{} | {baseline} | {ratio} | {target} | {met} |",
            f.scenario,
            f.metric,
            human(f.median, &f.unit),
            human(f.min, &f.unit),
            human(f.max, &f.unit)
        );
    }
    if regressed.is_empty() {
        md.push_str("\nNo figure regressed by more than 10 % against the previous report.\n");
    } else {
        md.push_str("\nRegressed by more than 10 % against the previous report:\n");
        for r in &regressed {
            let _ = writeln!(md, "- {r}");
            println!("REGRESSION: {r}");
        }
    }
    md.push_str(&super::profile::markdown(profiles));
    let json = serde_json::json!({
        "quick": quick,
        "kernel": kernel,
        "cpu": cpu,
        "figures": figures,
        "regressions": regressed,
        "profile": profiles,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(dir.join("report.md"), md)?;
    std::fs::write(dir.join("report.svg"), svg(figures))?;
    println!(
        "\nreports: {0}/report.json, {0}/report.md, {0}/report.svg",
        dir.display()
    );
    Ok(())
}

/// A horizontal bar chart of the ratios to the direct baseline (1.0 = as fast as direct).
#[expect(clippy::cast_precision_loss, reason = "a dozen rows")]
fn svg(figures: &[Figure]) -> String {
    let rows: Vec<&Figure> = figures
        .iter()
        .filter(|f| f.ratio.is_some_and(f64::is_finite))
        .collect();
    let (width, bar_x, scale) = (900.0, 380.0, 400.0);
    let height = 60.0 + 28.0 * rows.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"16\">mesh vs direct (ratio, same run)</text>\n\
         <line x1=\"{x1}\" y1=\"35\" x2=\"{x1}\" y2=\"{y2}\" stroke=\"#888\" stroke-dasharray=\"4\"/>\n\
         <text x=\"{x1}\" y=\"{y3}\" fill=\"#555\">1.0 = direct</text>\n",
        x1 = bar_x + scale,
        y2 = height - 20.0,
        y3 = height - 6.0,
    );
    for (i, f) in rows.iter().enumerate() {
        let y = 40.0 + 28.0 * i as f64;
        let ratio = f.ratio.unwrap_or(0.0);
        let w = (ratio * scale).clamp(1.0, width - bar_x - 60.0);
        let color = match f.met {
            Some(false) => "#d9534f",
            _ => "#4a90d9",
        };
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{ty}\">{} — {}</text><rect x=\"{bar_x}\" y=\"{y}\" width=\"{w:.1}\" height=\"18\" fill=\"{color}\"/>\
             <text x=\"{tx:.1}\" y=\"{ty}\">{ratio:.2}</text>",
            f.scenario,
            f.metric,
            ty = y + 14.0,
            tx = bar_x + w + 6.0,
        );
    }
    out.push_str("</svg>\n");
    out
}
