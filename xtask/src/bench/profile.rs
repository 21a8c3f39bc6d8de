//! Where the daemons' time goes: `perf record` (CPU-clock sampling with DWARF call graphs, so
//! it works in VMs without hardware counters) on both daemons while one scenario runs, folded
//! with `inferno`, broken down by category of the sampled function, and drawn as a flame graph
//! (`target/bench/flamegraph-<scenario>.svg`). Missing or unusable `perf` never fails the
//! suite: the report says why there is no profile.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use inferno::collapse::Collapse as _;

/// Sampling frequency (Hz, per CPU). Odd, so it does not beat with periodic work.
const FREQUENCY: &str = "1999";

/// Categories, in the order the report lists them. Each sample goes to exactly one.
pub const CATEGORIES: &[(&str, &str)] = &[
    (
        "crypto",
        "AES-GCM, hashes and signatures (ring / aws-lc), sealing and opening TLS records",
    ),
    (
        "copies",
        "memcpy/memmove in user space, copies between user and kernel buffers",
    ),
    (
        "kernel TCP / syscalls",
        "the rest of the kernel: socket calls, the TCP/IP stack, veth/bridge, softirqs",
    ),
    (
        "tls record layer",
        "rustls outside the cipher: framing, buffering",
    ),
    (
        "h2",
        "HTTP/2 framing, flow control, stream state (the h2 crate)",
    ),
    (
        "runtime / scheduling",
        "tokio and mio, and in the kernel: epoll/futex waits, waking threads, context switches",
    ),
    ("allocation", "malloc/free, Rust allocation glue"),
    (
        "metrics / logging",
        "prometheus-client, tracing, formatting, the JSON access log",
    ),
    ("mesh-node", "the daemon's own code"),
    ("other", "everything else"),
];

/// One scenario's profile.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub scenario: String,
    /// What ran while recording.
    pub workload: String,
    /// Sampled CPU time in nanoseconds (perf's cpu-clock period summed over the samples).
    pub cpu_ns: u64,
    /// (category, share of samples), in [`CATEGORIES`] order.
    pub categories: Vec<(String, f64)>,
    /// (function, share of samples as the sampled leaf), largest first.
    pub top_self: Vec<(String, f64)>,
    /// (function, share of samples with it anywhere on the stack), largest first; runtime
    /// plumbing (thread starts, the scheduler loop) left out.
    pub top_total: Vec<(String, f64)>,
    /// The flame graph, relative to the report's directory.
    pub flamegraph: String,
}

/// The profiling part of the report.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Profiles {
    /// Why there are no (or fewer) profiles, if so.
    pub note: Option<String>,
    pub profiles: Vec<Profile>,
}

/// Checks that `perf` exists and may sample: `Err` says why not.
pub fn available() -> Result<(), String> {
    let out = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            FREQUENCY,
            "-g",
            "-o",
            "/dev/null",
            "--",
            "true",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`perf` is not installed ({e}); `cargo xtask setup` installs it"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`perf record` does not work here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Records `pids` (all their threads) while `workload` runs, then folds and analyses the samples
/// into `dir`.
pub fn record(
    dir: &Path,
    scenario: &str,
    description: &str,
    pids: &[u32],
    workload: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Profile> {
    let data = dir.join(format!("perf-{scenario}.data"));
    let pid_list = pids
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", FREQUENCY])
        // DWARF unwinding: release builds have no frame pointers; 16 KiB of stack per sample
        // reaches through tokio's frames.
        .args(["--call-graph", "dwarf,16384", "-p", &pid_list, "-o"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf record")?;
    // perf prints nothing when it is attached; the data file's header appears when it is.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&data).map_or(0, |m| m.len()) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let ran = workload();
    // SAFETY: kill(2) on our own child.
    #[expect(clippy::cast_possible_wrap, reason = "pids fit i32")]
    unsafe {
        libc::kill(perf.id() as i32, libc::SIGINT);
    }
    let out = perf.wait_with_output().context("waiting for perf record")?;
    ran?;
    if !out.status.success() && !data.exists() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let folded = fold(&data);
    let _ = std::fs::remove_file(&data);
    let folded = folded?;
    std::fs::write(
        dir.join(format!("profile-{scenario}.folded")),
        folded.join("\n"),
    )?;
    let svg = format!("flamegraph-{scenario}.svg");
    flamegraph(&dir.join(&svg), scenario, description, &folded)?;
    let mut profile = analyse(&folded);
    scenario.clone_into(&mut profile.scenario);
    description.clone_into(&mut profile.workload);
    profile.flamegraph = svg;
    Ok(profile)
}

/// `perf script` (no inline resolution: it is slow and the flame graph does not need it)
/// folded into one line per distinct stack.
fn fold(data: &Path) -> anyhow::Result<Vec<String>> {
    let mut script = Command::new("perf")
        .args(["script", "--no-inline", "-i"])
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf script")?;
    let stdout = script.stdout.take().context("perf script stdout")?;
    let mut options = inferno::collapse::perf::Options::default();
    options.annotate_kernel = true;
    options.nthreads = 1;
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::from(options)
        .collapse(std::io::BufReader::new(stdout), &mut folded)
        .context("folding perf script output")?;
    let status = script.wait()?;
    if !status.success() {
        bail!("perf script failed ({status})");
    }
    Ok(folded.lines().map_while(Result::ok).collect())
}

fn flamegraph(
    path: &PathBuf,
    scenario: &str,
    description: &str,
    folded: &[String],
) -> anyhow::Result<()> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!("mesh-node, {scenario}");
    options.subtitle = Some(description.to_owned());
    "ns".clone_into(&mut options.count_name);
    options.hash = true;
    options.deterministic = true;
    let file = std::fs::File::create(path)?;
    inferno::flamegraph::from_lines(
        &mut options,
        folded.iter().map(String::as_str),
        std::io::BufWriter::new(file),
    )
    .with_context(|| format!("drawing {}", path.display()))
}

/// Splits a folded line into its frames (root first) and count.
fn parse(line: &str) -> Option<(Vec<&str>, u64)> {
    let (stack, count) = line.rsplit_once(' ')?;
    Some((stack.split(';').collect(), count.parse().ok()?))
}

/// Leaf functions that copy memory (user space, or between user and kernel buffers).
const COPIES: &[&str] = &[
    "memcpy",
    "memmove",
    "copy_user",
    "copy_to_iter",
    "copy_from_iter",
    "rep_movs",
    "copy_page",
    "skb_copy_datagram",
    "csum_partial_copy",
];
/// User-space cryptography (ring's and aws-lc's symbols).
const CRYPTO: &[&str] = &[
    "aes",
    "gcm",
    "ghash",
    "gfmul",
    "ring_core",
    "ring::aead",
    "ring::digest",
    "ring::ec",
    "aws_lc",
    "sha256",
    "sha512",
    "p256",
    "ecp_nistz",
    "bn_",
    "chacha",
    "poly1305",
];
/// The allocator.
const ALLOCATION: &[&str] = &[
    "malloc",
    "free",
    "_int_",
    "calloc",
    "realloc",
    "__rust_alloc",
    "__rust_dealloc",
    "__rust_realloc",
    "alloc::raw_vec",
    "tcache",
    "unlink_chunk",
    "sysmalloc",
];
/// Kernel frames that make a kernel sample scheduling cost: waits, wake-ups, thread switches
/// (a socket write that wakes the reader's thread pays for the wake-up too).
const KERNEL_SCHEDULING: &[&str] = &[
    "sys_epoll_wait",
    "sys_epoll_pwait",
    "sys_futex",
    "sys_sched_yield",
    "sys_nanosleep",
    "sys_clock_nanosleep",
    "schedule_tail",
    "ret_from_fork",
    "__schedule_",
    "try_to_wake_up",
    "ep_poll_callback",
];
/// User-space runtime: tokio, mio, thread parking.
const RUNTIME: &[&str] = &[
    "tokio",
    "mio::",
    "parking_lot",
    "std::sync",
    "std::thread",
    "futex",
    "epoll",
    "pthread",
];
/// libc's system-call wrappers.
const SYSCALL_WRAPPERS: &[&str] = &[
    "__libc_send",
    "__libc_recv",
    "__libc_write",
    "__libc_read",
    "__GI___libc_write",
    "__GI___libc_read",
    "__send",
    "__recv",
    "writev",
    "readv",
    "syscall",
];
const METRICS_LOGGING: &[&str] = &[
    "prometheus_client",
    "tracing",
    "core::fmt",
    "metrics::",
    "serde_json",
    "Stderr",
];

/// The category of one sample: by its leaf frame, and for kernel time by its stack.
pub fn categorize(stack: &[&str]) -> &'static str {
    let leaf = stack.last().copied().unwrap_or("");
    let leaf_has = |needles: &[&str]| needles.iter().any(|n| leaf.contains(n));
    let kernel = leaf.ends_with("_[k]");
    if leaf_has(COPIES) {
        "copies"
    } else if kernel {
        let scheduling = stack
            .iter()
            .any(|f| KERNEL_SCHEDULING.iter().any(|n| f.contains(n)));
        if scheduling {
            "runtime / scheduling"
        } else {
            "kernel TCP / syscalls"
        }
    } else if leaf_has(CRYPTO) {
        "crypto"
    } else if leaf_has(ALLOCATION) {
        "allocation"
    } else if leaf.starts_with("h2::") || leaf.contains("<h2::") {
        "h2"
    } else if leaf.contains("rustls") {
        "tls record layer"
    } else if leaf_has(RUNTIME) {
        "runtime / scheduling"
    } else if leaf_has(SYSCALL_WRAPPERS) {
        "kernel TCP / syscalls"
    } else if leaf_has(METRICS_LOGGING) {
        "metrics / logging"
    } else if leaf.contains("mesh_node") {
        "mesh-node"
    } else {
        "other"
    }
}

/// Frames that are on nearly every stack and say nothing about where time goes.
fn plumbing(frame: &str) -> bool {
    [
        "start_thread",
        "clone3",
        "__clone",
        "std::sys::",
        "std::thread",
        "tokio::runtime",
        "core::ops::function",
        "std::panicking",
        "std::panic",
        "__rust_try",
        "_start",
        "__libc_start",
        "main",
        "mesh-node",
        "tokio-runtime-w",
        "mesh-netns",
        "entry_SYSCALL",
        "do_syscall_64",
        "[unknown]",
        "tokio::task",
        "tokio::loom",
        "std::rt",
        "core::panic",
        "mesh-worker",
    ]
    .iter()
    .any(|p| frame.starts_with(p))
        || [
            "BlockingTask",
            "thread_start",
            "core::future::poll_fn::PollFn",
            "<core::pin::Pin",
        ]
        .iter()
        .any(|p| frame.contains(p))
        || !frame.contains(|c: char| c.is_ascii_alphabetic())
}

/// Shares by category and the top functions of folded stacks.
pub fn analyse(folded: &[String]) -> Profile {
    let mut total = 0u64;
    let mut by_category: HashMap<&str, u64> = HashMap::new();
    let mut by_leaf: HashMap<String, u64> = HashMap::new();
    let mut by_frame: HashMap<String, u64> = HashMap::new();
    for line in folded {
        let Some((stack, count)) = parse(line) else {
            continue;
        };
        total += count;
        *by_category.entry(categorize(&stack)).or_default() += count;
        *by_leaf
            .entry(short(stack.last().copied().unwrap_or("?")))
            .or_default() += count;
        let mut seen = std::collections::HashSet::new();
        for frame in &stack {
            let name = short(frame);
            if !plumbing(frame) && seen.insert(name.clone()) {
                *by_frame.entry(name).or_default() += count;
            }
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "sample counts")]
    let share = |n: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 / total as f64
        }
    };
    let top = |map: HashMap<String, u64>, n: usize| {
        let mut v: Vec<(String, u64)> = map.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.into_iter()
            .take(n)
            .map(|(k, c)| (k, share(c)))
            .collect::<Vec<_>>()
    };
    Profile {
        scenario: String::new(),
        workload: String::new(),
        cpu_ns: total,
        categories: CATEGORIES
            .iter()
            .map(|(c, _)| {
                (
                    (*c).to_owned(),
                    share(by_category.get(c).copied().unwrap_or(0)),
                )
            })
            .collect(),
        top_self: top(by_leaf, 15),
        top_total: top(by_frame, 25),
        flamegraph: String::new(),
    }
}

/// A function name without generic arguments (`<A as B>::f` keeps its two types), capped in
/// length.
fn short(frame: &str) -> String {
    let keep = usize::from(frame.starts_with('<'));
    let mut out = String::new();
    let mut depth = 0usize;
    for c in frame.chars() {
        match c {
            '<' => {
                if depth < keep {
                    out.push('<');
                }
                depth += 1;
            }
            '>' => {
                depth = depth.saturating_sub(1);
                if depth < keep {
                    out.push('>');
                }
            }
            _ if depth <= keep => out.push(c),
            _ => {}
        }
    }
    let out = out.trim_end_matches("::{{closure}}");
    if out.chars().count() > 110 {
        let cut: String = out.chars().take(110).collect();
        format!("{cut}…")
    } else {
        out.to_owned()
    }
}

/// The Markdown section of the report.
pub fn markdown(p: &Profiles) -> String {
    let mut md = String::from(
        "\n## Where the time goes (perf, both daemons)\n\n\
         CPU-clock samples of both `mesh-node` processes (all threads, kernel included) while one \
         scenario runs; each sample is put in one category by the function it hit (kernel time \
         spent waiting, waking a thread or switching threads counts as scheduling). Flame \
         graphs are next to this report. What binds each figure and what would close the gap \
         to the targets: `docs/performance.md`, \"The remaining gap, and what would close \
         it\".\n",
    );
    if let Some(note) = &p.note {
        let _ = writeln!(md, "\nNo profile: {note}");
    }
    if p.profiles.is_empty() {
        return md;
    }
    md.push_str("\n| category |");
    for prof in &p.profiles {
        let _ = write!(md, " {} |", prof.scenario);
    }
    md.push_str("\n|---|");
    for _ in &p.profiles {
        md.push_str("---|");
    }
    md.push('\n');
    for (i, (cat, _)) in CATEGORIES.iter().enumerate() {
        let _ = write!(md, "| {cat} |");
        for prof in &p.profiles {
            let _ = write!(
                md,
                " {:.1} % |",
                prof.categories.get(i).map_or(0.0, |c| c.1) * 100.0
            );
        }
        md.push('\n');
    }
    md.push_str("| CPU time sampled |");
    for prof in &p.profiles {
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let ms = prof.cpu_ns as f64 / 1e6;
        let _ = write!(md, " {ms:.0} ms |");
    }
    md.push('\n');
    md.push_str("\nCategories: ");
    md.push_str(
        &CATEGORIES
            .iter()
            .map(|(c, d)| format!("*{c}*: {d}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    md.push_str(".\n");
    for prof in &p.profiles {
        let _ = writeln!(
            md,
            "\n### {}: {} ([flame graph]({}))\n\nTop functions by own samples:\n",
            prof.scenario, prof.workload, prof.flamegraph
        );
        for (f, s) in &prof.top_self {
            let _ = writeln!(md, "- {:.1} % `{f}`", s * 100.0);
        }
        md.push_str("\nTop functions including callees:\n\n");
        for (f, s) in prof.top_total.iter().take(15) {
            let _ = writeln!(md, "- {:.1} % `{f}`", s * 100.0);
        }
    }
    md
}

/// One line per profile for the terminal.
pub fn summary(p: &Profiles) -> String {
    let mut out = String::new();
    if let Some(note) = &p.note {
        let _ = writeln!(out, "profile: {note}");
    }
    for prof in &p.profiles {
        let cats: Vec<String> = prof
            .categories
            .iter()
            .filter(|(_, s)| *s >= 0.005)
            .map(|(c, s)| format!("{c} {:.0} %", s * 100.0))
            .collect();
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let ms = prof.cpu_ns as f64 / 1e6;
        let _ = writeln!(
            out,
            "profile {} ({ms:.0} CPU ms): {}",
            prof.scenario,
            cats.join(", ")
        );
    }
    out
}

/// Reads `perf script`-style text already folded (for tests and re-analysis).
#[cfg(test)]
fn lines(text: &str) -> Vec<String> {
    std::io::Cursor::new(text)
        .lines()
        .map_while(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_follow_the_leaf_and_the_stack() {
        let folded = lines(
            "mesh-node;tokio::x;ring_core_0_17_aes_gcm_enc_update 6\n\
             mesh-node;h2::proto::streams::send::Send::x 1\n\
             mesh-node;__memmove_avx_unaligned_erms 2\n\
             mesh-node;__x64_sys_sendto_[k];tcp_sendmsg_[k];_copy_from_iter_[k] 3\n\
             mesh-node;__x64_sys_sendto_[k];tcp_sendmsg_locked_[k] 4\n\
             mesh-node;__x64_sys_epoll_wait_[k];schedule_[k] 2\n\
             mesh-node;_int_malloc 1\n\
             mesh-node;something_else 1",
        );
        let p = analyse(&folded);
        assert_eq!(p.cpu_ns, 20);
        let get = |c: &str| p.categories.iter().find(|(n, _)| n == c).unwrap().1;
        assert!((get("crypto") - 0.30).abs() < 1e-9);
        assert!((get("copies") - 0.25).abs() < 1e-9);
        assert!((get("kernel TCP / syscalls") - 0.20).abs() < 1e-9);
        assert!((get("runtime / scheduling") - 0.10).abs() < 1e-9);
        assert!((get("h2") - 0.05).abs() < 1e-9);
        assert!((get("allocation") - 0.05).abs() < 1e-9);
        assert!((get("other") - 0.05).abs() < 1e-9);
        let sum: f64 = p.categories.iter().map(|(_, s)| s).sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert_eq!(p.top_self[0].0, "ring_core_0_17_aes_gcm_enc_update");
    }

    #[test]
    fn short_names_drop_generics() {
        assert_eq!(
            short("h2::proto::streams::Streams<B,P>::poll_x"),
            "h2::proto::streams::Streams::poll_x"
        );
        assert_eq!(
            short("<tokio_rustls::client::TlsStream<IO> as tokio::io::AsyncWrite>::poll_write"),
            "<tokio_rustls::client::TlsStream as tokio::io::AsyncWrite>::poll_write"
        );
    }
}
