//! `mesh-node`: the per-node data plane of the mesh service mesh.
//!
//! Modules follow the architecture (`docs/architecture.md`): `redirect` owns the kernel programs
//! and network-namespace plumbing, `state` what the mesh knows (workloads, services, policies)
//! and where it comes from, `inpod` keeps enrolled pods in line with the state, `proxy` owns the
//! data path and `hbone` is its transport (TLS and HTTP/2 CONNECT), `config` holds the daemon's
//! settings, `workload` what a workload is, and `app` wires them together. `main.rs` only
//! parses the command line. No module imports one that imports it back
//! (`tests/modules.rs`).

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod istio;
pub mod logging;
pub mod metrics;
pub mod network;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod throttle;
pub mod tls;
pub mod traffic;
pub mod workload;

/// `error: cause: cause` on one line, for log records.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
