//! What the end-to-end tests in `tests/tests/` share: the crate's binaries, the skip check,
//! the usual two-node testbeds and their daemons, echo servers and probes run in pods, curl in
//! a node, polling, and Istio `PeerAuthentication` documents as `policies:` items.
//!
//! Cargo tells only integration tests and benchmarks where the binaries of their package are
//! (`CARGO_BIN_EXE_<name>`), not this library, so the helpers that run `mesh-testapp` take its
//! path (the test's `APP`, declared with [`binaries!`](crate::binaries)).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use crate::{CmdOutput, Daemon, Proc, Testbed, Topology};

/// Declares the named binaries of the tests crate as `&str` constants holding their paths:
/// `APP` (`mesh-testapp`), `DUT` (`mesh-node-dut`, the daemon under test) and `BENCH`
/// (`mesh-bench`). Use it in an integration test or benchmark, where Cargo sets the paths:
/// `mesh_tests::binaries!(APP, DUT);`.
#[macro_export]
macro_rules! binaries {
    ($($name:ident),+ $(,)?) => {
        $($crate::binaries!(@one $name);)+
    };
    (@one APP) => {
        /// `mesh-testapp`, the plain application run in pods.
        const APP: &str = env!("CARGO_BIN_EXE_mesh-testapp");
    };
    (@one DUT) => {
        /// `mesh-node-dut`, the daemon under test.
        const DUT: &str = env!("CARGO_BIN_EXE_mesh-node-dut");
    };
    (@one BENCH) => {
        /// `mesh-bench`, the load generator.
        const BENCH: &str = env!("CARGO_BIN_EXE_mesh-bench");
    };
}

/// Returns from the calling test when it cannot build a testbed and skipping is allowed; see
/// [`namespaced_test_can_run`](crate::namespaced_test_can_run) (which panics when skipping is
/// not allowed). The first line of every namespaced test.
#[macro_export]
macro_rules! skip_unless_namespaced {
    () => {
        if !$crate::namespaced_test_can_run() {
            return;
        }
    };
}

/// A testbed of `node-a` with the pods `a` and `node-b` with the pods `b`, panicking if it
/// cannot be built.
#[must_use]
pub fn two_nodes(a: &[&str], b: &[&str]) -> Testbed {
    Testbed::up(&Topology::new().node("node-a", a).node("node-b", b)).expect("testbed")
}

/// [`two_nodes`] with two pods each: `node-a` (`a1`, `a2`) and `node-b` (`b1`, `b2`).
#[must_use]
pub fn two_by_two() -> Testbed {
    two_nodes(&["a1", "a2"], &["b1", "b2"])
}

/// Daemons (the binary `dut`) on `node-a` and `node-b`, both with the pods `enrolled`, each
/// ready when this returns.
#[must_use]
pub fn two_daemons(bed: &Testbed, dut: &str, enrolled: &[&str]) -> (Daemon, Daemon) {
    let a = Daemon::start(bed, "node-a", Path::new(dut), enrolled).expect("daemon a");
    let b = Daemon::start(bed, "node-b", Path::new(dut), enrolled).expect("daemon b");
    (a, b)
}

/// Echo servers of `app` (`mesh-testapp`) on `[::]:port` in each of `pods`, listening when
/// this returns; they stop when the returned processes drop.
#[must_use]
pub fn echo_servers(bed: &Testbed, app: &str, pods: &[&str], port: u16) -> Vec<Proc> {
    pods.iter()
        .map(|pod| {
            bed.pod(pod)
                .spawn_server(&[app, "echo", &format!("[::]:{port}")])
                .unwrap_or_else(|e| panic!("echo server in {pod}: {e:#}"))
        })
        .collect()
}

/// Whether `app send` in `from` gets its message echoed back from `to`'s IPv4 address and
/// `port`.
#[must_use]
pub fn connects(bed: &Testbed, app: &str, from: &str, to: &str, port: u16) -> bool {
    let target = bed.pod(to).addr(false, port).to_string();
    bed.pod(from)
        .exec(&[app, "send", &target, "probe"])
        .expect("client runs")
        .status
        .success()
}

/// Runs `app client` in `from` against `to`, sending `bytes`; returns its JSON report,
/// panicking if it fails.
#[must_use]
pub fn client(
    bed: &Testbed,
    app: &str,
    from: &str,
    to: SocketAddr,
    bytes: u64,
) -> serde_json::Value {
    let out = bed
        .pod(from)
        .exec(&[app, "client", &to.to_string(), &bytes.to_string()])
        .expect("client runs")
        .ok()
        .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
    serde_json::from_str(out.stdout.trim()).expect("client prints JSON")
}

/// Runs `curl -sS --max-time <max_time> <args>` in `node`'s netns (where the daemon's metrics,
/// readiness and admin endpoints listen on loopback), panicking only if curl cannot be run.
#[must_use]
pub fn curl(bed: &Testbed, node: &str, max_time: Duration, args: &[&str]) -> CmdOutput {
    let seconds = max_time.as_secs_f64().to_string();
    let mut command = vec!["curl", "-sS", "--max-time", &seconds];
    command.extend_from_slice(args);
    bed.node(node).exec(&command).expect("curl runs")
}

/// `(status code, body)` of the readiness endpoint of `node`'s daemon.
#[must_use]
pub fn readiness(bed: &Testbed, node: &str) -> (String, String) {
    let out = curl(
        bed,
        node,
        Duration::from_secs(2),
        &[
            "-w",
            "\n%{http_code}",
            "http://127.0.0.1:15021/healthz/ready",
        ],
    );
    let (body, code) = out.stdout.trim().rsplit_once('\n').unwrap_or(("", ""));
    (code.to_owned(), body.to_owned())
}

/// Polls `check` every 100 ms until it holds or `timeout` passes; how long it took, if it held.
pub fn within(timeout: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if check() {
            return Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`within`], panicking with `what` if `check` does not hold within `timeout`.
pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    assert!(
        within(timeout, check).is_some(),
        "timed out after {timeout:?}: {what}"
    );
}

/// A `PeerAuthentication` as a `policies:` list item. `selector` is its `matchLabels` in YAML
/// flow style (`{app: b1}`), or empty for none (namespace- or mesh-wide).
#[must_use]
pub fn peer_authentication(namespace: &str, name: &str, selector: &str, mode: &str) -> String {
    let selector = if selector.is_empty() {
        String::new()
    } else {
        format!("    selector:\n      matchLabels: {selector}\n")
    };
    format!(
        "- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata:\n    name: {name}\n    namespace: {namespace}\n  spec:\n{selector}    mtls: {{mode: {mode}}}\n"
    )
}
