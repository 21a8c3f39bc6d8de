//! The `mesh-node` binary; the command line lives in [`mesh_node::cli`].

fn main() -> std::process::ExitCode {
    mesh_node::cli::main()
}
