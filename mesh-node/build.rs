//! Builds the kernel programs (`mesh-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! `$OUT_DIR/mesh-programs`, where `redirect::programs` embeds it.
//!
//! The BPF build uses Debian's Rust (linked into rustup as `debian-bpf` by `cargo xtask setup`)
//! because it ships a prebuilt `core` for the BPF target; see `docs/development.md`. When that
//! toolchain or `bpf-linker` is missing, an empty object is written instead so that a plain
//! `cargo check` works anywhere; the daemon then refuses to start with a message that says how to
//! fix it. `MESH_REQUIRE_EBPF=1` (set by `cargo xtask`) turns the missing toolchain into a
//! build error instead.
//!
//! It also compiles the Istio control-plane protocol (`proto/`, see its README) with the `protoc`
//! of the `protoc-bin-vendored` crate, into `$OUT_DIR`, where `istio::proto` includes it.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// rustup toolchain name that `cargo xtask setup` links to Debian's Rust.
const TOOLCHAIN: &str = "debian-bpf";
/// Name of the eBPF crate's `[[bin]]`.
const OBJECT: &str = "mesh-programs";

fn main() -> anyhow::Result<()> {
    compile_protos()?;
    println!("cargo:rerun-if-env-changed=MESH_REQUIRE_EBPF");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir.join("../mesh-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to mesh-ebpf")?;

    if let Err(missing) = toolchain_present() {
        if env::var_os("MESH_REQUIRE_EBPF").is_some_and(|v| v == "1") {
            bail!("{missing}; run `cargo xtask setup`");
        }
        println!(
            "cargo:warning={missing}: building mesh-node WITHOUT kernel programs \
             (it will refuse to run); run `cargo xtask setup` and rebuild"
        );
        // A path that does not exist makes cargo rerun this script on every build, so the real
        // object replaces the empty one as soon as `cargo xtask setup` has run.
        let cargo_home = env::var_os("CARGO_HOME").map_or_else(
            || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"),
            PathBuf::from,
        );
        println!(
            "cargo:rerun-if-changed={}",
            cargo_home.join("bin/bpf-linker").display()
        );
        println!("cargo:rerun-if-changed={ebpf_dir}");
        fs::write(out_dir.join(OBJECT), [])?;
        return Ok(());
    }

    // Only `aya_ebpf` needs an unstable feature (`asm_experimental_arch`). A crate-scoped value
    // keeps aya-build from turning on `-Z build-std` (which would need rust-src).
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN))
}

/// Checks that the pieces of the BPF toolchain are installed, naming the first one missing.
fn toolchain_present() -> Result<(), String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Err("bpf-linker not found".to_owned());
    }
    let rustc = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .output();
    if !rustc.is_ok_and(|o| o.status.success()) {
        return Err(format!("rustup toolchain `{TOOLCHAIN}` not found"));
    }
    Ok(())
}

/// The gRPC clients and servers (the servers are what the tests' istiod stand-in runs) and the
/// messages of istiod's CA and delta xDS.
fn compile_protos() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path().context("the vendored protoc")?;
    let include = protoc_bin_vendored::include_path().context("the vendored protoc's includes")?;
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };
    let files = [
        "proto/istio/ca.proto",
        "proto/envoy/discovery.proto",
        "proto/istio/workload.proto",
        "proto/istio/authorization.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &files.map(PathBuf::from),
            &[PathBuf::from("proto"), include],
        )
        .context("compiling proto/")?;
    Ok(())
}
