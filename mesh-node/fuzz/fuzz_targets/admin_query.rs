//! Query strings of the admin API (`POST /logging?filter=...`) from anyone on the node: any
//! text must decode to a value or none, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|query: &str| {
    let _ = mesh_node::admin::query_value(query, "filter");
});
