//! Finding the network namespaces of this node's workloads by their addresses, in the host's
//! `/proc`: istiod names a workload's addresses, not its pod UID or its sandbox.
//!
//! Processes are grouped by network namespace (the inode of `<proc>/<pid>/ns/net`); for each
//! namespace, the addresses local to it are read from its first process's
//! `net/fib_trie` (IPv4: the `/32 host LOCAL` entries) and `net/if_inet6` (IPv6). The host's
//! namespace (that of pid 1) and the daemon's own are skipped: a host-network process is no
//! workload. An address local to two namespaces is not matched (which one would be a guess).
//! A workload keeps the namespace chosen for it while that process lives, stays in the same
//! namespace and still has the address there, so that a container restart does not look like
//! a new namespace; a replaced sandbox (new inode) does.
//!
//! Only processes in the cgroup subtree the daemon's programs are attached to
//! (`redirect.cgroup`; on a node, the whole host) are considered: a namespace whose processes
//! the programs do not see could not be captured anyway, and another mesh on the same host (a
//! test's, a nested cluster's) may use the same addresses.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    net::{IpAddr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where an address's network namespace was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub pid: u32,
    /// Device and inode of the namespace (identify it while it exists).
    pub id: (u64, u64),
    /// `<proc>/<pid>/ns/net`.
    pub path: PathBuf,
}

/// Finds the namespaces of the `wanted` addresses among the processes below the cgroup
/// `scope` (a path of the cgroup v2 hierarchy such as `/kubepods`; `None`: every process);
/// keeps `previous` choices that are still valid. Returns only the addresses found.
#[must_use]
pub fn scan<S: std::hash::BuildHasher>(
    proc_root: &Path,
    scope: Option<&str>,
    wanted: &HashSet<IpAddr, S>,
    previous: &HashMap<IpAddr, Found, S>,
) -> HashMap<IpAddr, Found> {
    let mut found: HashMap<IpAddr, Found> = HashMap::new();
    for (ip, old) in previous {
        if wanted.contains(ip)
            && ns_id(&old.path) == Some(old.id)
            && local_addresses(proc_root, old.pid).contains(ip)
        {
            found.insert(*ip, old.clone());
        }
    }
    if wanted.iter().all(|ip| found.contains_key(ip)) {
        return found;
    }
    let skip: HashSet<(u64, u64)> = [
        ns_id(&proc_root.join("1/ns/net")),
        ns_id(Path::new("/proc/self/ns/net")),
        ns_id(&proc_root.join("self/ns/net")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    // Namespace → its oldest process (the sandbox's, in practice).
    let mut namespaces: HashMap<(u64, u64), u32> = HashMap::new();
    for pid in pids {
        if let Some(id) = ns_id(&ns_path(proc_root, pid))
            && !skip.contains(&id)
            && scope.is_none_or(|scope| in_scope(proc_root, pid, scope))
        {
            namespaces.entry(id).or_insert(pid);
        }
    }
    // Address → namespace, `None` once a second namespace has it too.
    let mut owners: HashMap<IpAddr, Option<Found>> = HashMap::new();
    for (id, pid) in namespaces {
        for ip in local_addresses(proc_root, pid) {
            if !wanted.contains(&ip) || found.contains_key(&ip) {
                continue;
            }
            let candidate = Found {
                pid,
                id,
                path: ns_path(proc_root, pid),
            };
            match owners.entry(ip) {
                Entry::Vacant(e) => {
                    e.insert(Some(candidate));
                }
                Entry::Occupied(mut e) => {
                    if e.get().as_ref().is_some_and(|f| f.id != id) {
                        e.insert(None);
                    }
                }
            }
        }
    }
    found.extend(owners.into_iter().filter_map(|(ip, f)| Some((ip, f?))));
    found
}

/// Whether process `pid` is in the cgroup v2 subtree `scope`.
fn in_scope(proc_root: &Path, pid: u32, scope: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")) else {
        return false;
    };
    let scope = scope.trim_end_matches('/');
    text.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|path| {
            path.strip_prefix(scope)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// The cgroup v2 path (as `/proc/<pid>/cgroup` shows it) of the directory `dir` of a cgroup2
/// mount, read from this process's mount table; `None` for the hierarchy's root (every
/// process is below it) or when `dir` is on no cgroup2 mount.
#[must_use]
pub fn cgroup_scope(dir: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup_scope_in(&mounts, dir)
}

fn cgroup_scope_in(mountinfo: &str, dir: &Path) -> Option<String> {
    // `id parent major:minor root mount-point options... - fstype source super-options`.
    let best = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = left.split_whitespace().collect();
            let (root, mount) = (*fields.get(3)?, Path::new(*fields.get(4)?));
            let rest = dir.strip_prefix(mount).ok()?;
            Some((mount.components().count(), root, rest.to_owned()))
        })
        .max_by_key(|(depth, _, _)| *depth)?;
    let (_, root, rest) = best;
    let path = Path::new(root).join(rest);
    let path = path.to_str()?.trim_end_matches('/');
    (!path.is_empty()).then(|| path.to_owned())
}

fn ns_path(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("ns/net")
}

fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The addresses local to the network namespace of process `pid`.
fn local_addresses(proc_root: &Path, pid: u32) -> HashSet<IpAddr> {
    let net = proc_root.join(pid.to_string()).join("net");
    let mut out = HashSet::new();
    if let Ok(text) = std::fs::read_to_string(net.join("fib_trie")) {
        out.extend(fib_trie_local(&text).into_iter().map(IpAddr::V4));
    }
    if let Ok(text) = std::fs::read_to_string(net.join("if_inet6")) {
        out.extend(if_inet6(&text).into_iter().map(IpAddr::V6));
    }
    out
}

/// The IPv4 addresses of `/proc/net/fib_trie` marked `/32 host LOCAL`: each leaf line
/// (`|-- 10.0.0.5`) is followed by its entries (`/32 host LOCAL`).
#[must_use]
pub fn fib_trie_local(text: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out = Vec::new();
    let mut leaf = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("|--") {
            leaf = rest.trim().parse().ok();
        } else if line.starts_with("+--") {
            leaf = None;
        } else if line.split_whitespace().collect::<Vec<_>>() == ["/32", "host", "LOCAL"]
            && let Some(ip) = leaf
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// The addresses of `/proc/net/if_inet6`: 32 hex digits, then index, prefix length, scope,
/// flags and interface name.
#[must_use]
pub fn if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            if hex.len() != 32 {
                return None;
            }
            u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        +-- 10.244.1.0/28 2 0 2
           |-- 10.244.1.0
              /24 link UNICAST
           |-- 10.244.1.7
              /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 10.244.1.7
              /32 host LOCAL
";

    #[test]
    fn parses_fib_trie_and_if_inet6() {
        let ips = fib_trie_local(FIB_TRIE);
        assert_eq!(
            ips,
            vec![
                "10.244.1.7".parse::<std::net::Ipv4Addr>().unwrap(),
                "127.0.0.1".parse().unwrap()
            ]
        );
        let v6 = if_inet6(
            "fd000000000000000000000000000007 02 80 00 80     eth0\n\
             00000000000000000000000000000001 01 80 10 80       lo\n\
             short 01 80 10 80 x\n",
        );
        assert_eq!(
            v6,
            vec!["fd00::7".parse::<Ipv6Addr>().unwrap(), Ipv6Addr::LOCALHOST]
        );
    }

    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("mesh-istio-netns-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// A process; `ns` is the directory holding its namespace file (shared by processes of
        /// one namespace through a hard link) and its addresses.
        fn process(&self, pid: u32, ns: &str, v4: &[&str], v6: &[&str]) {
            let ns_dir = self.0.join(format!("ns-{ns}"));
            std::fs::create_dir_all(&ns_dir).unwrap();
            let ns_file = ns_dir.join("net");
            if !ns_file.exists() {
                std::fs::write(&ns_file, "").unwrap();
            }
            let p = self.0.join(pid.to_string());
            std::fs::create_dir_all(p.join("ns")).unwrap();
            std::fs::create_dir_all(p.join("net")).unwrap();
            let _ = std::fs::remove_file(p.join("ns/net"));
            std::fs::hard_link(&ns_file, p.join("ns/net")).unwrap();
            let mut trie = String::from("Local:\n  +-- 0.0.0.0/0 3 0 5\n");
            for ip in v4 {
                writeln!(trie, "     |-- {ip}\n        /32 host LOCAL").unwrap();
            }
            trie.push_str("     |-- 10.0.0.255\n        /32 link BROADCAST\n");
            std::fs::write(p.join("net/fib_trie"), trie).unwrap();
            let mut inet6 = String::new();
            for ip in v6 {
                let n = u128::from(ip.parse::<Ipv6Addr>().unwrap());
                writeln!(inet6, "{n:032x} 02 80 00 80 eth0").unwrap();
            }
            std::fs::write(p.join("net/if_inet6"), inet6).unwrap();
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ips(list: &[&str]) -> HashSet<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn scan_finds_keeps_skips_and_replaces() {
        let proc = FakeProc::new("scan");
        // The host (pid 1) has a workload-looking address: never matched there.
        proc.process(1, "host", &["10.0.0.9"], &[]);
        proc.process(40, "a", &["10.0.0.1"], &["fd00::1"]);
        proc.process(41, "a", &["10.0.0.1"], &["fd00::1"]);
        proc.process(50, "b", &["10.0.0.2"], &[]);
        // Two namespaces claim 10.0.0.3: neither is chosen.
        proc.process(60, "c", &["10.0.0.3"], &[]);
        proc.process(70, "d", &["10.0.0.3"], &[]);
        std::fs::create_dir_all(proc.0.join("self")).unwrap();
        let wanted = ips(&["10.0.0.1", "fd00::1", "10.0.0.2", "10.0.0.3", "10.0.0.9"]);
        let first = scan(&proc.0, None, &wanted, &HashMap::new());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(first.len(), 3, "{first:?}");
        assert_eq!(first[&ip("10.0.0.1")].pid, 40, "the oldest process");
        assert_eq!(first[&ip("fd00::1")].pid, 40, "IPv6 from if_inet6");
        assert_eq!(first[&ip("10.0.0.1")].path, proc.0.join("40/ns/net"));
        assert_eq!(first[&ip("10.0.0.2")].pid, 50);
        assert!(!first.contains_key(&ip("10.0.0.3")), "ambiguous");
        assert!(!first.contains_key(&ip("10.0.0.9")), "the host's namespace");

        // Kept while valid, even with an older process of the namespace.
        proc.process(30, "a", &["10.0.0.1"], &["fd00::1"]);
        assert_eq!(
            scan(&proc.0, None, &wanted, &first)[&ip("10.0.0.1")].pid,
            40
        );
        // The chosen process exits: another of the namespace is chosen.
        std::fs::remove_dir_all(proc.0.join("40")).unwrap();
        let next = scan(&proc.0, None, &wanted, &first);
        assert_eq!(next[&ip("10.0.0.1")].pid, 30);
        assert_eq!(next[&ip("10.0.0.1")].id, first[&ip("10.0.0.1")].id);
        // Sandbox replaced: pid 50 is now in a new namespace with the same address.
        proc.process(50, "b2", &["10.0.0.2"], &[]);
        let replaced = scan(&proc.0, None, &wanted, &next);
        assert_eq!(replaced[&ip("10.0.0.2")].pid, 50);
        assert_ne!(replaced[&ip("10.0.0.2")].id, next[&ip("10.0.0.2")].id);
        // The address leaves its namespace: no longer matched.
        proc.process(50, "b2", &[], &[]);
        assert!(!scan(&proc.0, None, &wanted, &replaced).contains_key(&ip("10.0.0.2")));
        // Outside the cgroup scope: not seen.
        std::fs::write(proc.0.join("30/cgroup"), "0::/other/pod\n").unwrap();
        std::fs::write(proc.0.join("41/cgroup"), "0::/mesh/node-a/pod-a1\n").unwrap();
        let scoped = scan(&proc.0, Some("/mesh/node-a"), &wanted, &HashMap::new());
        assert_eq!(scoped[&ip("10.0.0.1")].pid, 41, "{scoped:?}");
        assert!(scan(&proc.0, Some("/mesh/node-b"), &wanted, &HashMap::new()).is_empty());
        assert!(
            scan(&proc.0, Some("/mesh/node"), &wanted, &HashMap::new()).is_empty(),
            "a prefix of a name is not a parent"
        );
        // Unwanted addresses are not reported.
        assert!(scan(&proc.0, None, &ips(&["10.0.0.2"]), &HashMap::new()).is_empty());
    }

    #[test]
    fn cgroup_scope_of_a_directory() {
        let mountinfo = "24 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n\
                         30 24 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                         31 1 0:24 / /proc rw - proc proc rw\n";
        let scope = |d: &str| cgroup_scope_in(mountinfo, Path::new(d));
        assert_eq!(scope("/sys/fs/cgroup"), None, "the root: every process");
        assert_eq!(
            scope("/sys/fs/cgroup/unified"),
            None,
            "the deeper mount's root"
        );
        assert_eq!(
            scope("/sys/fs/cgroup/unified/mesh/node-a").as_deref(),
            Some("/mesh/node-a")
        );
        assert_eq!(
            scope("/sys/fs/cgroup/kubepods").as_deref(),
            Some("/kubepods")
        );
        assert_eq!(scope("/elsewhere"), None);
        // A mount of a subtree (a container's cgroup namespace view).
        let sub = "40 1 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_scope_in(sub, Path::new("/sys/fs/cgroup/x")).as_deref(),
            Some("/kubepods/pod1/x")
        );
    }
}
