//! The configuration file written the ways operators really write it, with the real daemon and
//! kernel programs: truncated in place, written slowly, cut in the middle of the workload list,
//! swapped as a Kubernetes `ConfigMap` swaps it. Enrolled pods stay enrolled and a STRICT
//! `PeerAuthentication` keeps refusing plaintext through all of it; each bad version is logged
//! and counted; a good edit afterwards applies (issue 13, item 1).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_tests::{
    Daemon, Testbed,
    helpers::{connects, echo_servers, peer_authentication, two_nodes},
    mesh::{NodeSettings, ca_dir, config_yaml, counter},
};

mesh_tests::binaries!(APP, DUT);
const REJECTED: &str = "rejected configuration change; keeping the last good state";
const RELOADED: &str = "configuration reloaded";

/// A mesh-wide `PeerAuthentication` (root namespace, no selector).
fn mesh_wide(mode: &str) -> String {
    peer_authentication("istio-system", "default", "", mode)
}

/// The daemon still serves a2 as before: a1 reaches it through the mesh, and b1 (outside the
/// mesh, on a node without a daemon) is refused by STRICT.
fn still_protected(bed: &Testbed, daemon: &Daemon, step: &str) {
    assert!(
        connects(bed, APP, "a1", "a2", 7000),
        "{step}: a1 → a2 through the mesh"
    );
    assert!(
        !connects(bed, APP, "b1", "a2", 7000),
        "{step}: plaintext from b1 must stay refused (STRICT)"
    );
    assert!(
        daemon.records("pod unenrolled").is_empty(),
        "{step}: nothing was unenrolled: {:?}",
        daemon.records("pod unenrolled")
    );
}

/// `mesh_config_reloads_total{result}` from the daemon's metrics endpoint.
fn reloads(bed: &Testbed, result: &str) -> u64 {
    counter(
        bed,
        "node-a",
        &format!("mesh_config_reloads_total{{result=\"{result}\"}}"),
    )
    .expect("metrics")
}

/// A `ConfigMap` volume as kubelet lays it out: `mesh.yaml -> ..data/mesh.yaml`,
/// `..data -> ..vN`, swapped by renaming a new `..data` symlink over the old one.
struct ConfigMap {
    dir: PathBuf,
    version: usize,
}

impl ConfigMap {
    fn new(dir: PathBuf, text: &str) -> Self {
        std::fs::create_dir_all(&dir).expect("configmap dir");
        let mut map = Self { dir, version: 0 };
        map.swap(text);
        std::os::unix::fs::symlink("..data/mesh.yaml", map.file()).expect("symlink");
        map
    }

    /// The path the daemon reads.
    fn file(&self) -> PathBuf {
        self.dir.join("mesh.yaml")
    }

    /// The file the symlinks lead to now (where in-place writes land).
    fn current(&self) -> PathBuf {
        self.dir.join(format!("..v{}/mesh.yaml", self.version))
    }

    fn swap(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).expect("version dir");
        std::fs::write(self.dir.join(&version).join("mesh.yaml"), text).expect("write");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap");
    }
}

/// Waits for the next rejection (`rejected` counts them) and checks that it names the file.
fn rejection(daemon: &Daemon, rejected: &mut usize, step: &str) {
    *rejected += 1;
    daemon
        .wait_for_records(REJECTED, *rejected, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{step}: {e}"));
    let record = daemon.records(REJECTED).pop().expect("a record");
    eprintln!("{step}: {}", record["error"]);
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.contains("mesh.yaml")),
        "{step}: the error names the file: {record}"
    );
}

fn write_in_place(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .expect("open")
        .write_all(text.as_bytes())
        .expect("write");
}

#[test]
fn bad_and_half_written_configuration_files_never_unenroll_a_pod_or_drop_a_policy() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_nodes(&["a1", "a2"], &["b1"]);
    let _apps = echo_servers(&bed, APP, &["a1", "a2"], 7000);
    let ca = ca_dir(&bed, Path::new(DUT)).expect("ca");
    let text = |mode: &str, connect_timeout: &str| {
        let settings = NodeSettings {
            policies: mesh_wide(mode),
            ..NodeSettings::default()
        };
        config_yaml(&bed, "node-a", &ca, &settings, &["a1", "a2"])
            .expect("config")
            .replace("connectTimeoutMs: 3000", connect_timeout)
    };
    let good = text("STRICT", "connectTimeoutMs: 3000");
    let mut map = ConfigMap::new(bed.tmp_dir().join("configmap"), &good);
    let daemon = Daemon::start_with(&bed, "node-a", Path::new(DUT), &map.file()).expect("daemon");
    still_protected(&bed, &daemon, "at start");
    let mut rejected = 0;
    // `: > file`: truncated in place.
    write_in_place(&map.current(), "");
    rejection(&daemon, &mut rejected, "truncated");
    still_protected(&bed, &daemon, "truncated");

    // Restored in place, then rewritten by a slow writer that pauses (file open) after the
    // first workload: that half is a valid document without a2.
    write_in_place(&map.current(), &good);
    daemon
        .wait_for_records(RELOADED, 1, Duration::from_secs(5))
        .expect("restored");
    let cut = good.find("- name: a2").expect("a2's entry");
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(map.current())
        .expect("open");
    writer.write_all(&good.as_bytes()[..cut]).expect("write");
    std::thread::sleep(Duration::from_secs(2));
    still_protected(
        &bed,
        &daemon,
        "while a slow writer has written half the file",
    );
    writer.write_all(&good.as_bytes()[cut..]).expect("write");
    drop(writer);
    daemon
        .wait_for_records(RELOADED, 2, Duration::from_secs(5))
        .expect("the complete file is read");
    assert_eq!(
        daemon.records(REJECTED).len(),
        rejected,
        "the half was never read"
    );

    // Cut in the middle of a2's entry: inside a value (`node: node-` parses), then after a
    // line that leaves the entry without its addresses.
    let node_line = cut + good[cut..].find("node: node-a").expect("a2's node");
    write_in_place(&map.current(), &good[..node_line + "node: node-".len()]);
    rejection(&daemon, &mut rejected, "cut inside a line");
    let entry_line = cut + good[cut..].find('\n').expect("a line") + 1;
    write_in_place(&map.current(), &good[..entry_line]);
    rejection(&daemon, &mut rejected, "cut after a2's name");
    still_protected(&bed, &daemon, "cut in the workload list");

    // A ConfigMap update that swaps in an empty file.
    map.swap("");
    rejection(&daemon, &mut rejected, "ConfigMap swapped to an empty file");
    still_protected(&bed, &daemon, "ConfigMap swapped to an empty file");
    assert_eq!(reloads(&bed, "rejected"), rejected as u64, "counted");

    // A good edit applies: PERMISSIVE lets b1 in. The start-only field edited with it is named.
    map.swap(&text("PERMISSIVE", "connectTimeoutMs: 2500"));
    daemon
        .wait_for_records(RELOADED, 3, Duration::from_secs(5))
        .expect("the good edit applies");
    assert!(
        connects(&bed, APP, "b1", "a2", 7000),
        "PERMISSIVE admits plaintext"
    );
    let warnings = daemon.records(
        "configuration fields that are read at start only changed; they apply when the daemon restarts",
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["fields"], "proxy.connectTimeoutMs");
    assert_eq!(reloads(&bed, "applied"), 3);
    assert!(daemon.records("pod unenrolled").is_empty());
}
