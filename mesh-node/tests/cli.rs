//! The `mesh-node` binary as a user meets it: a mistake (a bad configuration, a CA key that is
//! not the certificate's) is one `error:` line and exit status 1, never a backtrace, whatever
//! `RUST_BACKTRACE` says.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const EXE: &str = env!("CARGO_BIN_EXE_mesh-node");

/// A temporary directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!("mesh-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mesh_node(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env("RUST_BACKTRACE", "full")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("mesh-node runs")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn a_bad_configuration_is_one_error_line_without_a_backtrace() {
    let dir = Dir::new("check");
    let bad = dir.0.join("bad.yaml");
    std::fs::write(&bad, "node: a\nlog:\n  format: text\n  colour: red\n").unwrap();
    let out = mesh_node(&["config", "check", path_str(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with(&format!("error: {}: ", bad.display()))
            && lines[0].contains("colour")
            && lines[0].contains("line 4"),
        "{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("backtrace"), "{stderr}");

    // A semantic error names the line too; an empty file is refused.
    std::fs::write(
        &bad,
        "workloads:\n- {name: a, node: n, ips: [198.18.0.1]}\n- {name: b, node: n, ips: [198.18.0.1]}\n",
    )
    .unwrap();
    let out = mesh_node(&["config", "check", path_str(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("workloads[1].ips[0]` at line 3 column"),
        "{stderr}"
    );
    std::fs::write(&bad, "").unwrap();
    let out = mesh_node(&["config", "check", path_str(&bad)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no configuration in it"), "{stderr}");

    let out = mesh_node(&["config", "check", "/nonexistent/mesh.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: reading /nonexistent/mesh.yaml: No such file or directory (os error 2)"
    );
}

#[test]
fn a_good_configuration_checks() {
    let dir = Dir::new("good");
    let good = dir.0.join("good.yaml");
    std::fs::write(&good, "node: a\n").unwrap();
    let out = mesh_node(&["config", "check", path_str(&good)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("node: a"));
}

#[test]
fn a_ca_key_of_another_ca_stops_the_daemon_before_it_touches_anything() {
    let dir = Dir::new("ca");
    for ca in ["ca-a", "ca-b"] {
        let out = mesh_node(&["ca", "init", "--dir", path_str(&dir.0.join(ca))]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cert = dir.0.join("ca-a/ca-cert.pem");
    let key = dir.0.join("ca-b/ca-key.pem");
    // Should the CA ever load later than it must, nothing below could attach anywhere: the
    // cgroup does not exist and the pin directory is not on bpffs.
    let config = dir.0.join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "node: a\nlog:\n  format: json\nredirect:\n  cgroup: {}\n  bpffs: {}\n\
             identity:\n  caCertFile: {}\n  caKeyFile: {}\n",
            dir.0.join("no-such-cgroup").display(),
            dir.0.join("not-bpffs").display(),
            cert.display(),
            key.display(),
        ),
    )
    .unwrap();
    let out = mesh_node(&["run", "--config", path_str(&config)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failure = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["message"] == "mesh-node failed")
        .unwrap_or_else(|| panic!("a JSON `mesh-node failed` record: {stderr}"));
    let error = failure["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&*cert.to_string_lossy())
            && error.contains(&*key.to_string_lossy())
            && error.contains("does not belong"),
        "{error}"
    );
    assert!(
        !stderr.contains("listening"),
        "failed before any listener: {stderr}"
    );
    assert!(
        stderr
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every line is JSON: {stderr}"
    );
}
