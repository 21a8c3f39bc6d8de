//! `cargo xtask test`: what CI runs. Format check, clippy with warnings denied, the unit and
//! in-process tests, then the namespaced tests (real namespaces, real eBPF), which may not skip.

use anyhow::bail;

use crate::util::{Step, cargo, require_root, run_checked, run_streaming};

/// Environment variable that would let namespaced tests skip; never passed on from here.
const ALLOW_SKIP_ENV: &str = mesh_tests::ALLOW_SKIP_ENV;

/// Integration tests of `mesh-tests` that use no namespace (they run in the same step, and
/// count as tests, but not as namespaced ones).
const NOT_NAMESPACED: &[&str] = &[
    // Renders deploy/ with kubectl and checks the manifests.
    "tests/deploy.rs",
];

#[derive(Debug, Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Passed tests of the namespaced tier (integration tests of `mesh-tests`).
    namespaced: u64,
    namespaced_binaries: Vec<String>,
}

impl Tally {
    /// Reads cargo's `Running <target>` and libtest's `test result:` lines.
    fn add(&mut self, lines: &[String], namespaced_package: bool) {
        let mut current = String::new();
        for line in lines {
            let line = line.trim();
            if line.starts_with("Doc-tests ") {
                line.clone_into(&mut current);
            } else if let Some(rest) = line.strip_prefix("Running ") {
                rest.split(' ')
                    .next()
                    .unwrap_or_default()
                    .clone_into(&mut current);
            } else if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |label: &str| {
                    rest.split(';')
                        .find_map(|part| part.trim().strip_suffix(label))
                        .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                let (passed, failed, ignored) =
                    (count("passed"), count("failed"), count("ignored"));
                self.passed += passed;
                self.failed += failed;
                self.ignored += ignored;
                if namespaced_package
                    && current.starts_with("tests/")
                    && !NOT_NAMESPACED.contains(&current.as_str())
                {
                    self.namespaced += passed;
                    self.namespaced_binaries
                        .push(format!("{current} ({passed})"));
                }
            }
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    require_root("test")?;
    // deploy's test renders the manifests with kubectl: fail now rather than after the build.
    if let Err(why) = crate::setup::check_kubectl() {
        bail!("{why}\n{}", crate::setup::KUBECTL_HELP);
    }

    let step = Step::start("cargo fmt --check");
    run_checked(&mut cargo(&["fmt", "--all", "--check"]))?;
    step.done();

    let step =
        Step::start("cargo clippy --all-targets -- -D warnings (builds the kernel programs)");
    run_checked(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    step.done();

    let mut tally = Tally::default();
    let mut ok = true;

    let step = Step::start("unit and in-process tests");
    let (passed, lines) = run_streaming(
        cargo(&[
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "mesh-tests",
            "--no-fail-fast",
        ])
        .env_remove(ALLOW_SKIP_ENV),
    )?;
    tally.add(&lines, false);
    ok &= passed;
    step.done();

    let step = Step::start("the rootless tier (the data path on loopback) as an unprivileged user");
    match rootless_tier() {
        Ok((passed, lines)) => {
            tally.add(&lines, false);
            ok &= passed;
        }
        Err(e) => {
            println!("the rootless tier could not run unprivileged: {e:#}");
            ok = false;
        }
    }
    step.done();

    let step = Step::start(
        "namespaced tests (network namespaces, cgroups, real eBPF) and deploy/'s manifests",
    );
    let (passed, lines) = run_streaming(
        cargo(&[
            "test",
            "--release",
            "--package",
            "mesh-tests",
            "--no-fail-fast",
        ])
        .env_remove(ALLOW_SKIP_ENV),
    )?;
    tally.add(&lines, true);
    ok &= passed;
    step.done();

    // The benchmark suite must keep working; its numbers are not asserted here.
    let step = Step::start("cargo xtask bench --quick (asserts it runs, not its numbers)");
    let bench = crate::bench::run(true, false);
    if let Err(e) = &bench {
        println!("benchmark suite failed: {e:#}");
        ok = false;
    }
    step.done();

    // A short fuzzing pass over every parser of untrusted input.
    let step = Step::start("cargo xtask fuzz --seconds 5 (a short pass)");
    if let Err(e) = crate::fuzz::run(5) {
        println!("fuzzing failed: {e:#}");
        ok = false;
    }
    step.done();

    println!(
        "namespaced tests run: {} in {}",
        tally.namespaced,
        tally.namespaced_binaries.join(", ")
    );
    println!(
        "tests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    if !ok || tally.failed > 0 {
        bail!("tests failed");
    }
    if tally.ignored > 0 {
        bail!("{} tests were ignored; every test must run", tally.ignored);
    }
    if tally.namespaced == 0 {
        bail!("no namespaced test ran");
    }
    Ok(())
}

/// The user the rootless tier runs as (`nobody`).
const UNPRIVILEGED: &str = "65534";

/// Runs mesh-node's rootless test binary (`tests/direct.rs`, built by the previous step) as an
/// unprivileged user, to show that the data path it covers needs no privilege.
fn rootless_tier() -> anyhow::Result<(bool, Vec<String>)> {
    let output = cargo(&[
        "test",
        "--release",
        "--package",
        "mesh-node",
        "--test",
        "direct",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(std::process::Stdio::inherit())
    .output()?;
    let binary = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "direct")
        .find_map(|m| m["executable"].as_str().map(str::to_owned));
    let Some(binary) = binary else {
        bail!("cargo did not name the rootless test binary");
    };
    // The header line the tally reads, then the run.
    let mut lines = vec![format!(
        "     Running tests/direct.rs ({binary}) as uid {UNPRIVILEGED}"
    )];
    let (passed, run) = run_streaming(
        std::process::Command::new("setpriv")
            .args([
                "--reuid",
                UNPRIVILEGED,
                "--regid",
                UNPRIVILEGED,
                "--clear-groups",
                "--",
                &binary,
            ])
            .env_remove(ALLOW_SKIP_ENV),
    )?;
    lines.extend(run);
    Ok((passed, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_cargo_output() {
        let lines: Vec<String> = [
            "     Running unittests src/lib.rs (target/release/deps/mesh_tests-1)",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "     Running tests/kernel.rs (target/release/deps/kernel-2)",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "     Running tests/testbed.rs (target/release/deps/testbed-3)",
            "test result: FAILED. 4 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out",
            "     Running tests/deploy.rs (target/release/deps/deploy-4)",
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "   Doc-tests mesh_tests",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
        ]
        .map(String::from)
        .to_vec();
        let mut tally = Tally::default();
        tally.add(&lines, true);
        assert_eq!((tally.passed, tally.failed, tally.ignored), (14, 1, 2));
        // deploy.rs counts as a test, not as a namespaced one.
        assert_eq!(tally.namespaced, 7);
        assert_eq!(tally.namespaced_binaries.len(), 2);
    }
}
