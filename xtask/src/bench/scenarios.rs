//! The testbed scenarios: throughput, request/response latency, connection rate, memory and
//! CPU, each measured directly (no daemon) and through the mesh in the same run.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail};
use mesh_tests::{Daemon, Testbed, Topology};

use super::{
    Figure,
    profile::{self, Profiles},
    stats,
};
use crate::util::Step;

const PORT: u16 = 9000;

struct Bench<'a> {
    bed: &'a Testbed,
    tool: String,
    reps: usize,
    secs: u64,
}

impl Bench<'_> {
    /// Runs `mesh-bench` in `pod` and returns its JSON report.
    fn run(&self, pod: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut cmd = vec![self.tool.as_str()];
        cmd.extend_from_slice(args);
        let out = self
            .bed
            .pod(pod)
            .exec_timeout(&cmd, Duration::from_secs(self.secs * 4 + 60))?
            .ok()
            .with_context(|| format!("mesh-bench {args:?} in {pod}"))?;
        Ok(serde_json::from_str(out.stdout.trim())?)
    }

    /// `reps` samples of `field` from `mesh-bench ARGS` run in `pod` against `target`.
    fn samples(
        &self,
        pod: &str,
        target: &str,
        args: &[&str],
        field: &str,
    ) -> anyhow::Result<Vec<f64>> {
        let mut out = Vec::new();
        for _ in 0..self.reps {
            let mut full = vec![args[0], target];
            full.extend_from_slice(&args[1..]);
            let v = self.run(pod, &full)?;
            out.push(
                v[field]
                    .as_f64()
                    .with_context(|| format!("{field} in {v}"))?,
            );
        }
        Ok(out)
    }
}

/// What was measured for one configuration (direct, or through the mesh).
#[derive(Default)]
struct Measured {
    throughput_cross_1: Vec<f64>,
    throughput_cross_8: Vec<f64>,
    throughput_same_1: Vec<f64>,
    rr_p50: Vec<f64>,
    rr_p90: Vec<f64>,
    rr_p99: Vec<f64>,
    rr_max: Vec<f64>,
    conn_rate: Vec<f64>,
}

fn measure(b: &Bench<'_>, cross: &str, same: &str, rate: u64) -> anyhow::Result<Measured> {
    let secs = b.secs.to_string();
    let rate_s = rate.to_string();
    let mut m = Measured {
        throughput_cross_1: b.samples(
            "a1",
            cross,
            &["throughput", &secs, "1"],
            "bytes_per_second",
        )?,
        throughput_cross_8: b.samples(
            "a1",
            cross,
            &["throughput", &secs, "8"],
            "bytes_per_second",
        )?,
        throughput_same_1: b.samples(
            "a1",
            same,
            &["throughput", &secs, "1"],
            "bytes_per_second",
        )?,
        rr_max: b.samples("a1", cross, &["rr", "0", &secs], "requests_per_second")?,
        conn_rate: b.samples("a1", cross, &["connrate", &secs], "connections_per_second")?,
        ..Measured::default()
    };
    for _ in 0..b.reps {
        let v = b.run("a1", &["rr", cross, &rate_s, &secs])?;
        m.rr_p50.push(v["p50_us"].as_f64().unwrap_or(f64::NAN));
        m.rr_p90.push(v["p90_us"].as_f64().unwrap_or(f64::NAN));
        m.rr_p99.push(v["p99_us"].as_f64().unwrap_or(f64::NAN));
    }
    Ok(m)
}

fn rss_bytes(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb * 1024.0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| {
        fields
            .get(i - 2)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    #[expect(clippy::cast_precision_loss, reason = "clock ticks")]
    let hz = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64;
    (tick(13) + tick(14)) / hz
}

fn figure(
    scenario: &str,
    metric: &str,
    unit: &str,
    samples: &[f64],
    baseline: Option<&[f64]>,
    target: Option<(&str, f64, bool)>,
    higher_is_better: bool,
) -> Figure {
    let (median, min, max) = stats(samples);
    let base = baseline.map(|b| stats(b).0);
    let ratio = base.map(|b| median / b);
    let met = target.map(|(_, limit, on_ratio)| {
        let value = if on_ratio {
            ratio.unwrap_or(f64::NAN)
        } else {
            median
        };
        if higher_is_better {
            value >= limit
        } else {
            value <= limit
        }
    });
    Figure {
        scenario: scenario.to_owned(),
        metric: metric.to_owned(),
        unit: unit.to_owned(),
        median,
        min,
        max,
        baseline: base,
        ratio,
        target: target.map(|(t, _, _)| t.to_owned()),
        met,
        higher_is_better,
    }
}

/// Runs every scenario; with `profile_dir`, also records the daemons' profiles there.
pub fn run_all(
    quick: bool,
    bin: &Path,
    profile_dir: Option<&Path>,
) -> anyhow::Result<(Vec<Figure>, Profiles)> {
    let tool = bin.join("mesh-bench").to_str().context("path")?.to_owned();
    let daemon_exe = bin.join("mesh-node");
    let bed = Testbed::up(
        &Topology::new()
            .node("node-a", &["a1", "a2"])
            .node("node-b", &["b1"]),
    )?;
    // Thousands of short connections a second leave thousands of client ports in TIME_WAIT;
    // let new connections reuse them (as the kernel already does on loopback) so that neither
    // the direct baseline nor the mesh runs out of ports during the connection-rate scenario.
    for pod in ["a1", "a2", "b1"] {
        bed.pod(pod)
            .exec(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"])?
            .ok()?;
    }
    let mut servers = Vec::new();
    for pod in ["a2", "b1"] {
        let mut s = bed
            .pod(pod)
            .spawn(&[&tool, "serve", &format!("[::]:{PORT}")])?;
        s.wait_for_output("listening", Duration::from_secs(5))?;
        servers.push(s);
    }
    let bench = Bench {
        bed: &bed,
        tool,
        reps: if quick { 2 } else { 5 },
        secs: if quick { 1 } else { 3 },
    };
    let cross = bed.pod("b1").addr(false, PORT).to_string();
    let same = bed.pod("a2").addr(false, PORT).to_string();
    let rate = if quick { 200 } else { 1000 };

    let step = Step::start("baseline: pods talking directly (no daemon)");
    let direct = measure(&bench, &cross, &same, rate)?;
    step.done();

    let step = Step::start("mesh: a1, a2 on node-a and b1 on node-b enrolled (HBONE across nodes)");
    let enrolled = ["a1", "a2", "b1"];
    let mut a = Daemon::start(&bed, "node-a", &daemon_exe, &enrolled)?;
    let mut b = Daemon::start(&bed, "node-b", &daemon_exe, &enrolled)?;
    std::thread::sleep(Duration::from_millis(500));
    let (pa, pb) = (a.proc().pid(), b.proc().pid());
    let idle_rss = vec![rss_bytes(pa), rss_bytes(pb)];
    let cpu0 = cpu_seconds(pa) + cpu_seconds(pb);
    let bytes_before = bench.samples(
        "a1",
        &cross,
        &["throughput", &bench.secs.to_string(), "1"],
        "bytes_per_second",
    )?;
    #[expect(clippy::cast_precision_loss, reason = "bytes")]
    let gib = bytes_before.iter().sum::<f64>() * bench.secs as f64 / (1u64 << 30) as f64;
    let cpu_per_gib = (cpu_seconds(pa) + cpu_seconds(pb) - cpu0) / gib;
    let cpu1 = cpu_seconds(pa) + cpu_seconds(pb);
    let rr = bench.run("a1", &["rr", &cross, "0", &bench.secs.to_string()])?;
    let requests = rr["requests"].as_f64().unwrap_or(f64::NAN);
    let cpu_per_k = (cpu_seconds(pa) + cpu_seconds(pb) - cpu1) / requests * 1000.0;
    let mesh = measure(&bench, &cross, &same, rate)?;
    step.done();

    let profiles = match profile_dir {
        Some(dir) => profile_daemons(&bench, dir, &[pa, pb], &cross, rate),
        None => Profiles {
            note: Some("not requested (`cargo xtask bench --profile`)".to_owned()),
            profiles: Vec::new(),
        },
    };

    let idle_count: u64 = if quick { 1000 } else { 10_000 };
    let step = Step::start(&format!(
        "memory: {idle_count} idle connections through the mesh"
    ));
    let before = (rss_bytes(pa), rss_bytes(pb));
    let mut idle = bed
        .pod("a1")
        .spawn(&[&bench.tool, "idle", &cross, &idle_count.to_string()])?;
    idle.wait_for_output("\"open\"", Duration::from_mins(2))
        .context("opening idle connections")?;
    std::thread::sleep(Duration::from_secs(1));
    #[expect(clippy::cast_precision_loss, reason = "bytes")]
    let per_conn = vec![
        (rss_bytes(pa) - before.0) / idle_count as f64,
        (rss_bytes(pb) - before.1) / idle_count as f64,
    ];
    drop(idle);
    step.done();
    if !a.proc().is_running() || !b.proc().is_running() {
        bail!("a daemon died during the benchmark");
    }
    let _ = (a.stop(), b.stop());

    let extras = Extras {
        rate,
        idle_count,
        idle_rss,
        per_conn,
        cpu_per_gib,
        cpu_per_k,
    };
    Ok((figures(&direct, &mesh, &extras), profiles))
}

/// Records both daemons with `perf` during the cross-node throughput, request/response and
/// connection-rate scenarios. Never fails: what could not be recorded is noted instead.
fn profile_daemons(b: &Bench<'_>, dir: &Path, pids: &[u32], cross: &str, rate: u64) -> Profiles {
    let step = Step::start("profile: perf record on both daemons (throughput, rr, connrate)");
    let mut out = Profiles::default();
    if let Err(why) = profile::available() {
        println!("    no profile: {why}");
        out.note = Some(why);
        return out;
    }
    let secs = b.secs.max(2).to_string();
    let rate_s = rate.to_string();
    let runs: [(&str, String, Vec<&str>); 3] = [
        (
            "throughput",
            format!("cross-node HBONE, 1 stream, {secs} s"),
            vec!["throughput", cross, &secs, "1"],
        ),
        (
            "rr",
            format!("cross-node HBONE, 1 KiB request/response at {rate}/s, {secs} s"),
            vec!["rr", cross, &rate_s, &secs],
        ),
        (
            "connrate",
            format!("cross-node HBONE, new connections back to back, {secs} s"),
            vec!["connrate", cross, &secs],
        ),
    ];
    for (name, description, args) in runs {
        match profile::record(dir, name, &description, pids, || {
            b.run("a1", &args).map(|_| ())
        }) {
            Ok(p) => out.profiles.push(p),
            Err(e) => {
                println!("    profile {name} failed: {e:#}");
                let note = out.note.get_or_insert_with(String::new);
                let _ = std::fmt::Write::write_fmt(note, format_args!("{name}: {e:#}. "));
            }
        }
    }
    print!("{}", profile::summary(&out));
    step.done();
    out
}

/// Figures measured only through the mesh.
struct Extras {
    rate: u64,
    idle_count: u64,
    idle_rss: Vec<f64>,
    per_conn: Vec<f64>,
    cpu_per_gib: f64,
    cpu_per_k: f64,
}

/// The report's figures, one row each.
#[rustfmt::skip]
fn figures(direct: &Measured, mesh: &Measured, x: &Extras) -> Vec<Figure> {
    let (rate, n) = (x.rate, x.idle_count);
    let added = |m: &[f64], d: &[f64]| -> Vec<f64> {
        let base = stats(d).0;
        m.iter().map(|v| v - base).collect()
    };
    vec![
        figure("throughput", "cross-node, 1 stream", "B/s", &mesh.throughput_cross_1, Some(&direct.throughput_cross_1), Some(("ratio >= 0.5", 0.5, true)), true),
        figure("throughput", "cross-node, 8 streams", "B/s", &mesh.throughput_cross_8, Some(&direct.throughput_cross_8), None, true),
        figure("throughput", "same-node, 1 stream", "B/s", &mesh.throughput_same_1, Some(&direct.throughput_same_1), Some(("ratio >= 0.8", 0.8, true)), true),
        figure("latency", &format!("p50 at {rate}/s, 1 KiB each way"), "us", &mesh.rr_p50, Some(&direct.rr_p50), None, false),
        figure("latency", "p50 added", "us", &added(&mesh.rr_p50, &direct.rr_p50), None, Some(("<= 20 us", 20.0, false)), false),
        figure("latency", "p90 added", "us", &added(&mesh.rr_p90, &direct.rr_p90), None, None, false),
        figure("latency", "p99 added", "us", &added(&mesh.rr_p99, &direct.rr_p99), None, Some(("<= 100 us", 100.0, false)), false),
        figure("latency", "maximum request rate", "req/s", &mesh.rr_max, Some(&direct.rr_max), None, true),
        figure("connections", "new connections per second", "conn/s", &mesh.conn_rate, Some(&direct.conn_rate), Some(("ratio >= 0.5", 0.5, true)), true),
        figure("memory", "daemon RSS idle", "B", &x.idle_rss, None, Some(("<= 20 MiB", 20.0 * 1_048_576.0, false)), false),
        figure("memory", &format!("daemon RSS per idle proxied connection ({n})"), "B", &x.per_conn, None, Some(("<= 2 KiB", 2048.0, false)), false),
        figure("cpu", "daemon CPU seconds per GiB (cross-node, both daemons)", "s", &[x.cpu_per_gib], None, None, false),
        figure("cpu", "daemon CPU seconds per 1,000 requests (both daemons)", "s", &[x.cpu_per_k], None, None, false),
    ]
}
