//! The daemon's configuration parser (the file source re-reads it on every change): any text
//! must give a document (settings, workloads, services, policies) or an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = mesh_node::state::file::Document::parse(text, &mesh_node::config::Origin::Embedded);
});
