//! The netns testbed and helpers shared by mesh's end-to-end tests, the demo and the
//! benchmarks.
//!
//! A [`Testbed`] is a declarative topology of *nodes* and *pods* built on one machine from
//! network namespaces, veth pairs and cgroup v2 directories, torn down on drop (including
//! during a panic). See `docs/development.md`, "The netns testbed". [`helpers`] holds what
//! the test files share: the [`binaries!`] and [`skip_unless_namespaced!`] macros, the usual
//! topologies and their daemons, echo servers, probes and polling.

#[cfg(feature = "apiserver")]
pub mod apiserver;
pub mod helpers;
#[cfg(feature = "istiod")]
pub mod istiod;
#[cfg(feature = "manifests")]
pub mod manifests;
pub mod mesh;
pub mod testbed;

pub use mesh::Daemon;

/// Open file descriptors of a process (0 if it is gone).
#[must_use]
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Resident memory of a process in bytes (0 if it is gone).
#[must_use]
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}
pub use testbed::{CmdOutput, Host, Node, Pod, Proc, Testbed, Topology};

/// Environment variable that lets a namespaced test skip (pass without running) when the
/// machine cannot run it. `cargo xtask test` and CI never set it, so there a test that cannot
/// run fails.
pub const ALLOW_SKIP_ENV: &str = "MESH_TEST_ALLOW_SKIP";

/// Checks that this process can build a testbed (root, cgroup v2, `ip`). Returns `false` when
/// it cannot and skipping is allowed (after printing why); panics when it cannot and skipping
/// is not allowed.
#[must_use]
pub fn namespaced_test_can_run() -> bool {
    let Err(why) = testbed::check_privileges() else {
        return true;
    };
    if std::env::var_os(ALLOW_SKIP_ENV).is_some_and(|v| v == "1") {
        eprintln!("SKIPPED namespaced test: {why} ({ALLOW_SKIP_ENV}=1)");
        false
    } else {
        panic!("namespaced test cannot run: {why}; set {ALLOW_SKIP_ENV}=1 to allow skipping");
    }
}
