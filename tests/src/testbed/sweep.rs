//! Leftovers of testbeds whose process died without unwinding (SIGKILL, abort): every name
//! carries the owner's pid, and a new testbed removes what belongs to pids that no longer run.

use std::path::Path;

use super::{cgroup, net};

/// Prefix of every testbed id (`mt-<pid>-<seq>`).
pub const PREFIX: &str = "mt-";

/// The owner pid encoded in a testbed name, if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn is_dead(pid: u32) -> bool {
    !Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes namespaces, cgroups and bpffs directories of dead testbed owners. Best effort.
pub fn sweep_dead() {
    let dead = |name: &str| owner_pid(name).is_some_and(is_dead);
    if let Ok(root) = cgroup::root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = cgroup::kill_all(&entry.path());
                let _ = cgroup::remove_tree(&entry.path());
            }
        }
    }
    for name in net::list_netns() {
        if dead(&name) {
            let _ = net::delete_netns(&name);
        }
    }
    for dir in ["/sys/fs/bpf", &std::env::temp_dir().to_string_lossy()] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                if dead(&entry.file_name().to_string_lossy()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_pid() {
        assert_eq!(owner_pid("mt-1234-0-node-a"), Some(1234));
        assert_eq!(owner_pid("mt-1234-0"), Some(1234));
        assert_eq!(owner_pid("mt-x-0"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }
}
