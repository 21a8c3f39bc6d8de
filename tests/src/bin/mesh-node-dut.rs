//! The daemon under test: the same command line as the `mesh-node` binary, built as a binary of
//! this crate so that integration tests can find it (`CARGO_BIN_EXE_mesh-node-dut`).

fn main() -> std::process::ExitCode {
    mesh_node::cli::main()
}
