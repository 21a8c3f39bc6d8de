//! Small helpers for running commands and reporting progress.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Builds the daemon and the named binaries of the tests crate in release mode (the kernel
/// programs with them); returns the directory holding the binaries.
pub fn build_release_bins(test_bins: &[&str]) -> anyhow::Result<PathBuf> {
    let mut args = vec![
        "build",
        "--release",
        "--package",
        "mesh-node",
        "--package",
        "mesh-tests",
        "--bin",
        "mesh-node",
    ];
    for bin in test_bins {
        args.extend(["--bin", bin]);
    }
    run_checked(&mut cargo(&args))?;
    Ok(target_dir().join("release"))
}

/// Fails early, with the reason, when not running as root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!(
            "`cargo xtask {what}` needs root (network namespaces, cgroups and eBPF); \
             run it with sudo or as root"
        );
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Prints a step header; the returned guard prints the elapsed time when the step ends.
pub struct Step {
    name: String,
    start: Instant,
}

impl Step {
    pub fn start(name: &str) -> Self {
        println!("==> {name}");
        Self {
            name: name.to_owned(),
            start: Instant::now(),
        }
    }

    pub fn done(self) {
        println!(
            "    {} done in {:.1}s",
            self.name,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// A cargo command in the workspace, with the eBPF build made mandatory.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.args(args)
        .current_dir(workspace_root())
        .env("MESH_REQUIRE_EBPF", "1");
    cmd
}

/// Runs `cmd`, fails if it fails.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` with stdout and stderr merged into one pipe (so their order is kept), echoing
/// every line as it comes and returning them all with the exit status.
pub fn run_streaming(cmd: &mut Command) -> anyhow::Result<(bool, Vec<String>)> {
    let (reader, writer) = std::io::pipe().context("pipe")?;
    cmd.stdout(writer.try_clone()?).stderr(writer);
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    // `cmd` still holds the parent's copies of the write end: replace them, or the reader
    // never sees end-of-file.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut lines = Vec::new();
    for line in BufReader::new(reader).lines() {
        let line = line.context("reading output")?;
        println!("{line}");
        lines.push(line);
    }
    let status = child.wait()?;
    Ok((status.success(), lines))
}

/// Output of a command that must succeed.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
