//! Finding the network namespaces of this node's pods in the host's `/proc`.
//!
//! The kubelet puts every container of a pod below a cgroup named after the pod UID:
//! `…/kubepods/<qos>/pod<uid>/<container>` with the cgroupfs driver and
//! `…/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope` with the systemd
//! driver. Any process of a pod (the sandbox's `pause` at least) is in the pod's network
//! namespace, so `<proc>/<pid>/ns/net` names it. A pod keeps the process chosen for it while
//! that process lives and stays in the same namespace, so that a container restart does not
//! look like a new namespace; a replaced sandbox (new namespace inode) does.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where a pod's network namespace was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetns {
    pub pid: u32,
    /// Inode of the namespace (identifies it while it exists).
    pub inode: u64,
    pub path: PathBuf,
}

/// The pod UID in a cgroup v2 path, if the path is below a kubelet pod cgroup.
#[must_use]
pub fn pod_uid_from_cgroup(path: &str) -> Option<String> {
    for part in path.split('/') {
        // cgroupfs driver: `pod<uid>`.
        if let Some(uid) = part.strip_prefix("pod")
            && is_uid(uid)
        {
            return Some(uid.to_owned());
        }
        // systemd driver: `kubepods-<qos>-pod<uid_>.slice` or `kubepods-pod<uid_>.slice`.
        if let Some(slice) = part.strip_suffix(".slice")
            && let Some((_, uid)) = slice.rsplit_once("-pod")
        {
            let uid = uid.replace('_', "-");
            if is_uid(&uid) {
                return Some(uid);
            }
        }
    }
    None
}

/// A Kubernetes UID: 36 characters of hex digits and dashes in the UUID layout.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Scans `proc_root` for processes of the pods in `wanted` (pod UIDs); keeps `previous`
/// choices that are still valid.
#[must_use]
pub fn scan<S: std::hash::BuildHasher>(
    proc_root: &Path,
    wanted: &HashSet<String, S>,
    previous: &HashMap<String, PodNetns, S>,
) -> HashMap<String, PodNetns> {
    let mut found: HashMap<String, PodNetns> = HashMap::new();
    // Earlier choices first: still alive and in the same namespace → keep.
    for (uid, old) in previous {
        if wanted.contains(uid)
            && pod_of(proc_root, old.pid).as_deref() == Some(uid.as_str())
            && inode(&old.path) == Some(old.inode)
        {
            found.insert(uid.clone(), old.clone());
        }
    }
    if found.len() == wanted.len() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The oldest process of a pod is its sandbox (`pause`) in practice.
    pids.sort_unstable();
    for pid in pids {
        let Some(uid) = pod_of(proc_root, pid) else {
            continue;
        };
        if !wanted.contains(&uid) || found.contains_key(&uid) {
            continue;
        }
        let path = proc_root.join(pid.to_string()).join("ns/net");
        if let Some(inode) = inode(&path) {
            found.insert(uid, PodNetns { pid, inode, path });
        }
    }
    found
}

/// The pod UID of process `pid`, from its cgroup v2 membership.
fn pod_of(proc_root: &Path, pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .and_then(pod_uid_from_cgroup)
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f1c2a4e-9b7d-4c1e-8a2b-0123456789ab";

    #[test]
    fn cgroup_paths_of_both_drivers() {
        assert_eq!(
            pod_uid_from_cgroup(&format!("/kubepods/besteffort/pod{UID}/abc123")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_from_cgroup(&format!("/kubepods/pod{UID}/abc123")).as_deref(),
            Some(UID)
        );
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0a1b.scope",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_from_cgroup(&systemd).as_deref(), Some(UID));
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-77.scope",
            UID.replace('-', "_")
        );
        assert_eq!(pod_uid_from_cgroup(&guaranteed).as_deref(), Some(UID));
        for other in [
            "/system.slice/containerd.service",
            "/kubepods/besteffort/podnot-a-uid/x",
            "/user.slice/user-0.slice/session-1.scope",
            "/",
        ] {
            assert_eq!(pod_uid_from_cgroup(other), None, "{other}");
        }
    }

    /// A fake `/proc`: `ns/net` are plain files (their inodes stand in for namespaces).
    fn fake_proc(dir: &Path, pid: u32, cgroup: &str) -> PathBuf {
        let p = dir.join(pid.to_string());
        std::fs::create_dir_all(p.join("ns")).unwrap();
        std::fs::write(p.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        std::fs::write(p.join("ns/net"), "").unwrap();
        p.join("ns/net")
    }

    #[test]
    fn scan_finds_keeps_and_replaces() {
        let dir = std::env::temp_dir().join(format!("mesh-netns-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let other = "11111111-2222-3333-4444-555555555555";
        fake_proc(&dir, 40, &format!("/kubepods/besteffort/pod{UID}/app"));
        fake_proc(&dir, 30, &format!("/kubepods/besteffort/pod{UID}/pause"));
        fake_proc(&dir, 50, &format!("/kubepods/pod{other}/pause"));
        fake_proc(&dir, 60, "/system.slice/kubelet.service");
        std::fs::create_dir_all(dir.join("self")).unwrap();
        let wanted: HashSet<String> = [UID.to_owned()].into();
        let first = scan(&dir, &wanted, &HashMap::new());
        assert_eq!(first.len(), 1, "only wanted pods");
        assert_eq!(first[UID].pid, 30, "the oldest process");
        // Kept while valid, even if an older process appears.
        fake_proc(&dir, 20, &format!("/kubepods/besteffort/pod{UID}/x"));
        assert_eq!(scan(&dir, &wanted, &first)[UID].pid, 30);
        // The chosen process exits: another of the pod is chosen.
        std::fs::remove_dir_all(dir.join("30")).unwrap();
        let next = scan(&dir, &wanted, &first);
        assert_eq!(next[UID].pid, 20);
        // Sandbox replaced: the namespace (inode) changes under the same pid.
        // (The new file exists before the old one goes, so the two inodes differ: a freed
        // inode number can be reused at once.)
        let ns_file = dir.join("20/ns/net");
        std::fs::write(dir.join("20/ns/net2"), "").unwrap();
        std::fs::rename(dir.join("20/ns/net2"), &ns_file).unwrap();
        let replaced = scan(&dir, &wanted, &next);
        assert_eq!(replaced[UID].pid, 20);
        assert_ne!(replaced[UID].inode, next[UID].inode);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
