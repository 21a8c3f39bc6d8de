//! `mesh-node`: the per-node data plane of the mesh service mesh.
//!
//! Modules follow the architecture (`docs/architecture.md`): `redirect` owns the kernel programs
//! and network-namespace plumbing, `config` the daemon's configuration, `logging` the tracing
//! set-up, and `app` wires them together. `main.rs` only parses the command line.

pub mod app;
pub mod config;
pub mod logging;
pub mod redirect;
