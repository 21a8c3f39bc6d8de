//! The `mesh-node` binary; the command line lives in [`mesh_node::cli`].

fn main() -> anyhow::Result<()> {
    mesh_node::cli::main()
}
