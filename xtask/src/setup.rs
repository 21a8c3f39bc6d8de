//! `cargo xtask setup`: install what a fresh machine of this kind lacks, and nothing else.
//!
//! The recipe (docs/development.md): Debian's Rust (`rustc-web`, `cargo-web`) ships a prebuilt
//! `core` for `bpfel-unknown-none` (`libstd-rust-web-dev-bpf`); `bpf-linker` is built against
//! the LLVM that rustc uses; rustup sees Debian's toolchain as `debian-bpf`. Each step checks
//! first and only acts when something is missing.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::util::{Step, output, require_root, run_checked};

/// Debian packages the build, the tests and the demo need. `llvm-<N>-dev` is added with N read
/// from Debian's rustc.
const APT_PACKAGES: &[&str] = &[
    // Rust for the BPF target.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    // bpf-linker's build; gcc also builds aws-lc (rustls' crypto provider; no cmake needed).
    "gcc",
    "zlib1g-dev",
    "libzstd-dev",
    // The testbed and inspection.
    "iproute2",
    "bpftool",
    "python3",
    // Wire captures in the mTLS tests.
    "tcpdump",
    // The seccomp test loads the runtimes' default profiles with libseccomp's own bindings
    // (for Debian's /usr/bin/python3).
    "python3-seccomp",
    // The observability test scrapes the daemons with a real Prometheus (and promtool).
    "prometheus",
    "curl",
    // `cargo xtask bench` profiles the daemons with perf (it reports a missing perf instead of
    // failing).
    "linux-perf",
];

/// Python packages of the interop tests' HBONE peer (which shares no code with the project).
const PIP_PACKAGES: &[(&str, &str)] = &[("h2", "h2")];

const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLCHAIN: &str = "debian-bpf";

pub fn run() -> anyhow::Result<()> {
    require_root("setup")?;
    let start = Instant::now();
    install_apt(APT_PACKAGES)?;
    let llvm = rustc_llvm_major()?;
    install_apt(&[&format!("llvm-{llvm}-dev")])?;
    install_bpf_linker(llvm)?;
    link_toolchain()?;
    mount_bpffs()?;
    install_pip(PIP_PACKAGES)?;
    fetch_seccomp_profiles()?;
    install_cargo_fuzz()?;
    let kubectl = check_kubectl();
    println!(
        "setup complete in {:.1}s (LLVM {llvm}, bpf-linker {BPF_LINKER_VERSION}, toolchain {TOOLCHAIN}, {})",
        start.elapsed().as_secs_f64(),
        match &kubectl {
            Ok(version) => format!("kubectl with kustomize {version}"),
            Err(_) => "no usable kubectl".to_owned(),
        }
    );
    if let Err(why) = kubectl {
        // The demo and the namespaced tests do not need kubectl: say what is missing, loudly,
        // without failing them. `cargo xtask test` refuses to start without it.
        println!("\nWARNING: {why}\n{KUBECTL_HELP}");
    }
    Ok(())
}

/// What to do when kubectl is missing or too old. No registry these machines reach has a
/// recent one: Debian 12's `kubernetes-client` is 1.20, whose kustomize (v2) cannot render
/// `deploy/`.
pub const KUBECTL_HELP: &str = "\
deploy's test (tests/tests/deploy.rs) renders deploy/ with `kubectl kustomize`, which needs
kubectl >= 1.27 (kustomize v5). Install it from the Kubernetes project's packages
(https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/: the pkgs.k8s.io apt
repository, or the single kubectl binary into /usr/local/bin). Debian's `kubernetes-client`
package is too old (1.20, kustomize v2).";

/// The kustomize version of the `kubectl` on PATH (`v5.5.0`), if it is recent enough to render
/// `deploy/` (kustomize v5: kubectl >= 1.27).
pub fn check_kubectl() -> Result<String, String> {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .map_err(|e| format!("kubectl is not installed ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "`kubectl version --client` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("`kubectl version --client -o json` printed no JSON ({e})"))?;
    let version = info["kustomizeVersion"].as_str().unwrap_or_default();
    let major = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major >= 5 => Ok(version.to_owned()),
        _ => Err(format!(
            "kubectl {} has kustomize {version:?}; v5 or newer is needed",
            info["clientVersion"]["gitVersion"].as_str().unwrap_or("?")
        )),
    }
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn install_apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let step = Step::start(&format!("apt-get install {}", missing.join(" ")));
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    step.done();
    Ok(())
}

/// The LLVM major version of Debian's rustc (`LLVM version: 22.1.8` → 22).
fn rustc_llvm_major() -> anyhow::Result<u32> {
    let info = output(Command::new("/usr/bin/rustc").arg("-vV"))?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`/usr/bin/rustc -vV` does not name its LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("unparsable LLVM version {version:?}"))
}

fn cargo_bin() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME").map_or_else(
        || Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        Into::into,
    );
    home.join("bin")
}

/// Whether the installed bpf-linker has the right version and links the LLVM rustc uses.
fn bpf_linker_ok(llvm: u32) -> bool {
    let linker = cargo_bin().join("bpf-linker");
    let version = Command::new(&linker).arg("--version").output();
    let version_ok =
        version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    let ldd = Command::new("ldd").arg(&linker).output();
    let llvm_ok = ldd.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).contains(&format!("libLLVM.so.{llvm}"))
            || String::from_utf8_lossy(&o.stdout).contains(&format!("libLLVM-{llvm}"))
    });
    version_ok && llvm_ok
}

fn install_bpf_linker(llvm: u32) -> anyhow::Result<()> {
    if bpf_linker_ok(llvm) {
        return Ok(());
    }
    let step = Step::start(&format!(
        "cargo install bpf-linker@{BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
    ));
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "--force",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{llvm}")),
    )?;
    if !bpf_linker_ok(llvm) {
        bail!("bpf-linker was installed but does not link libLLVM {llvm}");
    }
    step.done();
    Ok(())
}

fn link_toolchain() -> anyhow::Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(TOOLCHAIN))
    {
        return Ok(());
    }
    let step = Step::start(&format!("rustup toolchain link {TOOLCHAIN} /usr"));
    run_checked(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    step.done();
    Ok(())
}

/// Python packages, installed for the `python3` on PATH (the one the tests run).
fn install_pip(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(module, _)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let step = Step::start(&format!("pip install {}", missing.join(" ")));
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing),
    )?;
    step.done();
    Ok(())
}

/// cargo-fuzz for `cargo xtask fuzz` (the fuzz targets build with the machine's nightly
/// toolchain).
fn install_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new(cargo_bin().join("cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    let step = Step::start("cargo install cargo-fuzz (about a minute)");
    run_checked(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    step.done();
    Ok(())
}

/// bpffs at /sys/fs/bpf (systemd mounts it on most hosts; minimal machines lack it).
/// Where the container runtimes' default seccomp profiles are put for the seccomp test
/// (`tests/tests/seccomp.rs` reads them from here).
const SECCOMP_DIR: &str = "/usr/local/share/mesh/seccomp";

/// The runtimes' default seccomp profiles, from the Debian packages that ship them as files:
/// Docker's (containerd's `RuntimeDefault` follows it) and containers/common's (CRI-O's and
/// Podman's). Only the two files are extracted: the packages themselves (Go sources, and
/// container networking) are not installed.
const SECCOMP_PROFILES: &[(&str, &str, &str)] = &[
    (
        "golang-github-docker-docker-dev",
        "usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json",
        "docker.json",
    ),
    (
        "golang-github-containers-common",
        "usr/share/containers/seccomp.json",
        "containers-common.json",
    ),
];

fn fetch_seccomp_profiles() -> anyhow::Result<()> {
    let dir = Path::new(SECCOMP_DIR);
    for (package, path, name) in SECCOMP_PROFILES {
        let dest = dir.join(name);
        if dest.is_file() {
            continue;
        }
        let step = Step::start(&format!("seccomp profile {name} from {package}"));
        let work = std::env::temp_dir().join(format!("mesh-seccomp-{package}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        // apt downloads as its own user `_apt`, which must be able to write here.
        std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
        run_checked(
            Command::new("apt-get")
                .args(["download", "-qq", package])
                .current_dir(&work),
        )?;
        let deb = std::fs::read_dir(&work)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let root = work.join("root");
        run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::create_dir_all(dir)?;
        std::fs::copy(root.join(path), &dest)
            .with_context(|| format!("{package} has no {path}"))?;
        std::fs::remove_dir_all(&work)?;
        step.done();
    }
    Ok(())
}

fn mount_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    let step = Step::start("mount -t bpf bpf /sys/fs/bpf");
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    step.done();
    Ok(())
}
