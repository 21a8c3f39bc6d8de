//! The daemon under the container runtimes' default seccomp profiles, which the `DaemonSet` asks
//! for (`seccompProfile: RuntimeDefault`, issue 13 item 14): Docker's (containerd's default
//! follows it) and containers/common's (CRI-O's and Podman's), as `cargo xtask setup` extracts
//! them from Debian's packages. `tests/python/runtime_default.py` resolves a profile as the
//! runtimes do for x86-64 and the `DaemonSet`'s four capabilities, loads it with libseccomp (as
//! runc and crun do) with `no_new_privs` (`allowPrivilegeEscalation: false`), reduces the
//! capability bounding set to those four, and executes the daemon. Under each profile both
//! nodes' daemons load and attach their programs, carry mTLS and plaintext, serve metrics
//! (with the kernel's per-program counters, `BPF_ENABLE_STATS`) and stop cleanly; a control
//! shows that the filter is real.

use std::path::{Path, PathBuf};

use mesh_tests::{
    Daemon, Testbed, Topology,
    helpers::{connects, echo_servers, two_nodes},
    mesh::NodeSettings,
};

mesh_tests::binaries!(APP, DUT);
const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/runtime_default.py");
/// Debian's Python, where `python3-seccomp` is installed.
const PYTHON: &str = "/usr/bin/python3";
/// Where `cargo xtask setup` puts the profiles.
const PROFILES: &str = "/usr/local/share/mesh/seccomp";
/// The `DaemonSet`'s capabilities, as the profiles name them.
const CAPS: &str = "CAP_BPF,CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_SYS_PTRACE";
/// The same, as setpriv names them.
const KEEP: &str = "bpf,net_admin,sys_admin,sys_ptrace";
/// `CapBnd` of a process with exactly those: bits 39, 12, 21 and 19.
const CAP_BND: &str = "0000008000281000";

fn profile(name: &str) -> PathBuf {
    let path = Path::new(PROFILES).join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo xtask setup` extracts it",
        path.display()
    );
    path
}

/// The command prefix that runs the daemon as the runtime would, the profile resolved for
/// `profile_caps`.
fn under(profile: &Path, profile_caps: &str) -> NodeSettings {
    NodeSettings {
        wrapper: [
            PYTHON,
            HELPER,
            "--profile",
            profile.to_str().expect("UTF-8 path"),
            "--profile-caps",
            profile_caps,
            "--caps",
            KEEP,
            "--",
        ]
        .map(str::to_owned)
        .to_vec(),
        ..NodeSettings::default()
    }
}

/// `Key:` of `/proc/<pid>/status`.
fn status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn the_daemon_runs_under_the_runtimes_default_seccomp_profiles() {
    mesh_tests::skip_unless_namespaced!();
    for name in ["docker.json", "containers-common.json"] {
        let settings = under(&profile(name), CAPS);
        let bed = two_nodes(&["a1"], &["b1", "b2"]);
        let _server = echo_servers(&bed, APP, &["b1"], 7000);
        let enrolled = ["a1", "b1"];
        let mut a =
            Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &enrolled, &settings)
                .unwrap_or_else(|e| panic!("{name}: daemon a: {e:#}"));
        let mut b =
            Daemon::start_with_settings(&bed, "node-b", Path::new(DUT), &enrolled, &settings)
                .unwrap_or_else(|e| panic!("{name}: daemon b: {e:#}"));
        for daemon in [&mut a, &mut b] {
            let pid = daemon.proc().pid();
            assert_eq!(
                (
                    status(pid, "Seccomp:"),
                    status(pid, "NoNewPrivs:"),
                    status(pid, "CapBnd:"),
                    status(pid, "CapEff:")
                ),
                (
                    "2".to_owned(),
                    "1".to_owned(),
                    CAP_BND.to_owned(),
                    CAP_BND.to_owned()
                ),
                "{name}: the daemon runs filtered, without new privileges, with the four capabilities"
            );
        }
        assert!(
            connects(&bed, APP, "a1", "b1", 7000),
            "{name}: mTLS across nodes"
        );
        assert!(
            connects(&bed, APP, "b2", "b1", 7000),
            "{name}: plaintext into b1"
        );
        assert!(
            b.captured("inbound")
                .iter()
                .any(|r| r["peer_identity"] == "spiffe://cluster.local/ns/default/sa/a1"),
            "{name}: b1's daemon captured a1's connection: {:?}",
            b.captured("inbound")
        );
        let metrics = bed
            .node("node-b")
            .exec(&[
                "curl",
                "-sf",
                "--max-time",
                "5",
                "http://127.0.0.1:15020/metrics",
            ])
            .expect("curl runs");
        assert!(
            metrics.status.success() && metrics.stdout.contains("mesh_ebpf_program_runs"),
            "{name}: metrics with the programs' counters: {}",
            metrics.stderr
        );
        for daemon in [&mut a, &mut b] {
            let exit = daemon.stop().expect("stops");
            assert!(
                exit.success(),
                "{name}: clean exit ({exit}): {}",
                daemon.proc().stderr()
            );
            let denied: Vec<String> = daemon
                .logs()
                .iter()
                .filter(|r| r["level"] == "WARN" || r["level"] == "ERROR")
                .filter(|r| r.to_string().contains("Operation not permitted"))
                .map(ToString::to_string)
                .collect();
            assert!(denied.is_empty(), "{name}: denied calls: {denied:?}");
        }
    }
}

/// The control: resolved as if the container lacked `CAP_SYS_ADMIN` (which the daemon still
/// holds), Docker's profile (20.10, Debian's) denies `bpf(2)` and `setns(2)`, and the daemon
/// refuses to start (its first map cannot be created). So the filter above is real, and it is
/// `CAP_SYS_ADMIN` that admits the daemon's `bpf`, `setns` and `clone3` in these profiles.
#[test]
fn the_profile_is_enforced_a_control() {
    mesh_tests::skip_unless_namespaced!();
    let settings = under(
        &profile("docker.json"),
        "CAP_BPF,CAP_NET_ADMIN,CAP_SYS_PTRACE",
    );
    let bed = Testbed::up(&Topology::new().node("node-a", &["a1"])).expect("testbed");
    let started = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &["a1"], &settings);
    let Err(e) = started else {
        panic!("the daemon started although the profile denies bpf(2)");
    };
    let message = format!("{e:#}");
    assert!(
        message.contains("loading the kernel programs")
            && message.contains("Operation not permitted"),
        "refused because bpf(2) was denied: {message}"
    );
}
