//! mTLS tunnelling end to end: HBONE between two nodes' daemons, on the wire, pooled, large,
//! rotated; and against an HBONE peer that shares no code with mesh (Python `ssl` + `h2`).

use std::{path::Path, time::Duration};

use mesh_tests::{
    Daemon, Proc, Testbed,
    helpers::{echo_servers, two_by_two, two_daemons},
    mesh::{TRUST_DOMAIN, ca_init, issue_cert},
};

mesh_tests::binaries!(APP, DUT);
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/hbone_peer.py");
const PORT: u16 = 7000;

fn run_ok(bed: &Testbed, pod: &str, argv: &[&str], timeout: Duration) -> serde_json::Value {
    let out = bed
        .pod(pod)
        .exec_timeout(argv, timeout)
        .expect("runs")
        .ok()
        .unwrap_or_else(|e| panic!("{pod}: {argv:?}: {e}"));
    let report: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON report");
    assert_eq!(report["intact"], true, "{report}");
    report
}

fn identity(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

/// Runs tcpdump on the inter-node link while `traffic` runs; returns the raw capture. It
/// listens on node-a's port of the bridge (`n1`): frames the bridge forwards between ports do not
/// show on `br0` itself.
fn capture(bed: &Testbed, traffic: impl FnOnce()) -> Vec<u8> {
    let file = bed.tmp_dir().join(format!("link-{}.pcap", rand_hex()));
    let file_str = file.to_str().unwrap().to_owned();
    let mut tcpdump = bed
        .spawn_on_link(&[
            "tcpdump",
            "-i",
            "n1",
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-w",
            &file_str,
            "tcp",
        ])
        .expect("tcpdump");
    tcpdump
        .wait_for_output("listening on n1", Duration::from_secs(5))
        .expect("tcpdump up");
    traffic();
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.signal(nix::sys::signal::Signal::SIGINT);
    tcpdump.wait(Duration::from_secs(5)).expect("tcpdump exits");
    let pcap = std::fs::read(&file).expect("capture file");
    let summary = std::process::Command::new("tcpdump")
        .args(["-nn", "-r", &file_str])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    eprintln!("capture:\n{summary}");
    assert!(
        pcap.len() > 200,
        "the capture saw the traffic ({} bytes)",
        pcap.len()
    );
    pcap
}

fn rand_hex() -> String {
    let mut bytes = [0u8; 16];
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut bytes).unwrap();
    bytes.iter().fold(String::new(), |mut hex, b| {
        use std::fmt::Write as _;
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// TCP port 15008 (0x3aa0) as a source or destination port, in any captured packet.
fn has_hbone_port(pcap: &[u8]) -> bool {
    contains(pcap, &15008u16.to_be_bytes())
}

#[test]
fn pod_to_pod_traffic_across_nodes_is_encrypted_on_the_wire() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["b1", "b2"], PORT);
    let enrolled = ["a1", "b1"];
    let (a, b) = two_daemons(&bed, DUT, &enrolled);

    // Mesh: a1 -> b1, IPv4 and IPv6.
    let marker = format!("MARKER-{}", rand_hex());
    let pcap = capture(&bed, || {
        for v6 in [false, true] {
            let target = bed.pod("b1").addr(v6, PORT).to_string();
            run_ok(
                &bed,
                "a1",
                &[APP, "send", &target, &marker],
                Duration::from_secs(10),
            );
        }
    });
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the marker must not cross the link in clear"
    );
    assert!(has_hbone_port(&pcap), "HBONE on port 15008");
    assert!(
        contains(&pcap, &[0x17, 0x03, 0x03]),
        "TLS application data records"
    );
    let outbound = a.captured("outbound");
    assert!(
        outbound.iter().all(|r| r["path"] == "hbone"),
        "{outbound:?}"
    );
    let inbound = b.captured("inbound");
    assert_eq!(inbound.len(), 2, "{inbound:?}");
    for record in &inbound {
        assert_eq!(record["path"], "hbone");
        assert_eq!(
            record["peer_identity"],
            identity("a1"),
            "the source identity reaches the destination"
        );
    }

    // Control: the same between pods outside the mesh shows the marker, so the capture works.
    let marker = format!("MARKER-{}", rand_hex());
    let pcap = capture(&bed, || {
        let target = bed.pod("b2").addr(false, PORT).to_string();
        run_ok(
            &bed,
            "a2",
            &[APP, "send", &target, &marker],
            Duration::from_secs(10),
        );
    });
    assert!(
        contains(&pcap, marker.as_bytes()),
        "plaintext between non-enrolled pods"
    );
    assert!(!has_hbone_port(&pcap));
}

#[test]
fn concurrent_connections_share_pooled_http2_connections_and_large_transfers_arrive_intact() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["b1"], PORT);
    let enrolled = ["a1", "b1"];
    let (a, _b) = two_daemons(&bed, DUT, &enrolled);
    let target = bed.pod("b1").addr(false, PORT).to_string();

    // 40 concurrent clients, 1 MiB each way each.
    let clients: Vec<Proc> = (0..40)
        .map(|_| {
            bed.pod("a1")
                .spawn(&[APP, "client", &target, "1048576"])
                .expect("spawn")
        })
        .collect();
    for mut c in clients {
        let status = c.wait(Duration::from_mins(1)).expect("client finishes");
        assert!(status.success(), "{}", c.stderr());
        let report: serde_json::Value = serde_json::from_str(c.stdout().trim()).unwrap();
        assert_eq!(report["intact"], true, "{report}");
    }
    let opened = a.records("HBONE connection opened").len();
    eprintln!("40 concurrent connections used {opened} pooled HTTP/2 connection(s)");
    assert_eq!(
        opened, 1,
        "one pooled connection carries all of them (cap 100 streams)"
    );
    assert_eq!(a.captured("outbound").len(), 40);

    // 256 MiB each way, with the half-close at the end.
    let report = run_ok(
        &bed,
        "a1",
        &[APP, "client", &target, "268435456"],
        Duration::from_mins(3),
    );
    assert_eq!(report["received"], 268_435_456u64);
    assert_eq!(
        a.records("HBONE connection opened").len(),
        1,
        "still the same pooled connection"
    );
}

#[test]
fn the_same_node_path_skips_tls_and_is_visible() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2"], PORT);
    let a = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1", "a2"]).expect("daemon");
    for v6 in [false, true] {
        let target = bed.pod("a2").addr(v6, PORT).to_string();
        run_ok(
            &bed,
            "a1",
            &[APP, "client", &target, "1000000"],
            Duration::from_secs(20),
        );
    }
    let outbound = a.captured("outbound");
    assert_eq!(outbound.len(), 2);
    for record in &outbound {
        assert_eq!(record["path"], "same-node", "{record}");
        assert_eq!(record["dst_workload"], "default/a2");
    }
    assert!(
        a.records("HBONE connection opened").is_empty(),
        "no TLS on the same node"
    );
    assert!(
        a.captured("inbound").is_empty(),
        "not captured a second time at a2"
    );
}

#[test]
fn certificates_rotate_under_a_running_connection() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["b1"], PORT);
    let settings = mesh_tests::mesh::NodeSettings {
        cert_lifetime_seconds: 4,
        ..Default::default()
    };
    let enrolled = ["a1", "b1"];
    let a = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &enrolled, &settings)
        .expect("a");
    let b = Daemon::start_with_settings(&bed, "node-b", Path::new(DUT), &enrolled, &settings)
        .expect("b");
    let target = bed.pod("b1").addr(false, PORT).to_string();
    // A connection that lives for 7 s, through at least three renewals on each side.
    let report = run_ok(
        &bed,
        "a1",
        &[APP, "trickle", &target, "7"],
        Duration::from_secs(30),
    );
    assert!(report["received"].as_u64().unwrap() > 0);
    for daemon in [&a, &b] {
        let issued = daemon.records("certificate issued").len();
        assert!(
            issued >= 3,
            "renewed at half-life: {issued} certificates issued"
        );
    }
    // New connections use the current certificates.
    run_ok(
        &bed,
        "a1",
        &[APP, "client", &target, "100000"],
        Duration::from_secs(10),
    );
}

/// Issues a certificate for `id` from the CA in `ca_dir` into the testbed's directory.
fn issue(bed: &Testbed, ca_dir: &Path, id: &str, name: &str, extra: &[&str]) -> (String, String) {
    let (cert, key) = issue_cert(bed, Path::new(DUT), ca_dir, id, name, extra)
        .unwrap_or_else(|e| panic!("{e:#}"));
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

fn other_ca(bed: &Testbed) -> std::path::PathBuf {
    let dir = bed.tmp_dir().join("other-ca");
    ca_init(Path::new(DUT), &dir).expect("ca init");
    dir
}

/// Runs the Python HBONE client in `pod`; returns its JSON report.
fn python_client(bed: &Testbed, pod: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = vec!["python3", PEER, "client"];
    cmd.extend_from_slice(args);
    let out = bed.pod(pod).exec(&cmd).expect("python3 runs");
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: stdout {} stderr {}", out.stdout, out.stderr))
}

#[test]
fn a_foreign_hbone_client_connects_through_the_daemon_and_bad_requests_get_400_or_503() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2"], PORT);
    let daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a2"]).expect("daemon");
    let ca = daemon.ca().to_path_buf();
    let ca_cert = ca.join("ca-cert.pem").to_str().unwrap().to_owned();
    let hbone = format!("{}:15008", bed.pod("a2").ipv4());
    let app = bed.pod("a2").addr(false, PORT).to_string();
    let (cert, key) = issue(&bed, &ca, &identity("b1"), "b1", &[]);

    // A well-behaved peer: 200 and the bytes echo back (IPv4 and IPv6 authority).
    let ok = python_client(
        &bed,
        "b1",
        &[
            "--connect",
            &hbone,
            "--authority",
            &app,
            "--ca",
            &ca_cert,
            "--cert",
            &cert,
            "--key",
            &key,
        ],
    );
    assert_eq!(
        (ok["status"].as_u64(), ok["echo_ok"].as_bool()),
        (Some(200), Some(true)),
        "{ok}"
    );
    let hbone6 = format!("[{}]:15008", bed.pod("a2").ipv6());
    let app6 = bed.pod("a2").addr(true, PORT).to_string();
    let ok = python_client(
        &bed,
        "b1",
        &[
            "--connect",
            &hbone6,
            "--authority",
            &app6,
            "--ca",
            &ca_cert,
            "--cert",
            &cert,
            "--key",
            &key,
        ],
    );
    assert_eq!(ok["status"], 200, "{ok}");
    let inbound = daemon.captured("inbound");
    assert_eq!(inbound.len(), 2);
    assert_eq!(inbound[0]["peer_identity"], identity("b1"));

    // Requests the server refuses: reserved port, an IP that is not this workload → 400;
    // nothing listening → 503.
    let statuses: Vec<u64> = [
        format!("{}:15006", bed.pod("a2").ipv4()),
        format!("{}:{PORT}", bed.pod("b2").ipv4()),
        format!("{}:7999", bed.pod("a2").ipv4()),
    ]
    .iter()
    .map(|authority| {
        let r = python_client(
            &bed,
            "b1",
            &[
                "--connect",
                &hbone,
                "--authority",
                authority,
                "--ca",
                &ca_cert,
                "--cert",
                &cert,
                "--key",
                &key,
            ],
        );
        r["status"].as_u64().unwrap_or_else(|| panic!("{r}"))
    })
    .collect();
    assert_eq!(statuses, [400, 400, 503]);
    assert_eq!(daemon.records("HBONE request rejected (400)").len(), 2);
    assert_eq!(
        daemon.records("HBONE upstream connect failed (503)").len(),
        1
    );
}

#[test]
fn clients_without_a_valid_mesh_certificate_are_rejected_with_a_reason() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2"], PORT);
    let daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a2"]).expect("daemon");
    let ca = daemon.ca().to_path_buf();
    let ca_cert = ca.join("ca-cert.pem").to_str().unwrap().to_owned();
    let hbone = format!("{}:15008", bed.pod("a2").ipv4());
    let app = bed.pod("a2").addr(false, PORT).to_string();

    // Clients the TLS layer refuses, each logged with the reason.
    let other = other_ca(&bed);
    let (foreign_cert, foreign_key) = issue(&bed, &other, &identity("b1"), "foreign", &[]);
    let (td_cert, td_key) = issue(
        &bed,
        &ca,
        "spiffe://other.domain/ns/default/sa/b1",
        "td",
        &[],
    );
    let (old_cert, old_key) = issue(
        &bed,
        &ca,
        &identity("b1"),
        "expired",
        &["--backdate-seconds", "7200", "--lifetime-seconds", "3600"],
    );
    let cases: [(&str, Vec<&str>); 4] = [
        ("no client certificate", vec![]),
        (
            "another CA",
            vec!["--cert", &foreign_cert, "--key", &foreign_key],
        ),
        (
            "another trust domain",
            vec!["--cert", &td_cert, "--key", &td_key],
        ),
        ("expired", vec!["--cert", &old_cert, "--key", &old_key]),
    ];
    for (i, (case, creds)) in cases.iter().enumerate() {
        let mut args = vec![
            "--connect",
            hbone.as_str(),
            "--authority",
            app.as_str(),
            "--ca",
            ca_cert.as_str(),
        ];
        args.extend(creds);
        let r = python_client(&bed, "b1", &args);
        assert!(
            r.get("status").is_none_or(serde_json::Value::is_null),
            "{case}: must not get a status: {r}"
        );
        daemon
            .wait_for_records(
                "HBONE TLS handshake rejected",
                i + 1,
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    let reasons: Vec<String> = daemon
        .records("HBONE TLS handshake rejected")
        .iter()
        .map(|r| r["error"].as_str().unwrap_or_default().to_owned())
        .collect();
    eprintln!("rejections: {reasons:#?}");
    // A CA with the same subject name fails on the signature, another one as an unknown issuer.
    let foreign = |r: &str| r.contains("UnknownIssuer") || r.contains("BadSignature");
    assert!(reasons[0].contains("no certificates"), "{}", reasons[0]);
    assert!(foreign(&reasons[1]), "{}", reasons[1]);
    assert!(reasons[2].contains("trust domain"), "{}", reasons[2]);
    assert!(reasons[3].contains("Expired"), "{}", reasons[3]);
    assert!(
        daemon.captured("inbound").is_empty(),
        "no rejected client reached the application"
    );
}

#[test]
fn the_daemon_connects_to_a_foreign_hbone_server_and_rejects_wrong_identities() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    // No daemon on node-b: b1 "is" a Python HBONE server with b1's identity.
    let daemon = Daemon::start(&bed, "node-a", Path::new(DUT), &["a1", "b1"]).expect("daemon");
    let ca = daemon.ca().to_path_buf();
    let ca_cert = ca.join("ca-cert.pem").to_str().unwrap().to_owned();
    let listen = format!("{}:15008", bed.pod("b1").ipv4());
    let target = bed.pod("b1").addr(false, PORT).to_string();
    let other = other_ca(&bed);

    let mut servers = Vec::new();
    let cases = [
        (
            "right identity",
            issue(&bed, &ca, &identity("b1"), "srv-ok", &[]),
            true,
        ),
        (
            "wrong identity",
            issue(&bed, &ca, &identity("b2"), "srv-wrong", &[]),
            false,
        ),
        (
            "another CA",
            issue(&bed, &other, &identity("b1"), "srv-foreign", &[]),
            false,
        ),
        (
            "expired",
            issue(
                &bed,
                &ca,
                &identity("b1"),
                "srv-expired",
                &["--backdate-seconds", "7200", "--lifetime-seconds", "3600"],
            ),
            false,
        ),
    ];
    for (case, (cert, key), accepted) in &cases {
        drop(servers.pop());
        let mut server = bed
            .pod("b1")
            .spawn(&[
                "python3", PEER, "server", "--listen", &listen, "--ca", &ca_cert, "--cert", cert,
                "--key", key,
            ])
            .expect("python server");
        server
            .wait_for_output("listening", Duration::from_secs(10))
            .expect("python server up");
        let started = std::time::Instant::now();
        let out = bed
            .pod("a1")
            .exec(&[APP, "send", &target, "through a foreign server"])
            .expect("client");
        if *accepted {
            assert!(out.status.success(), "{case}: {}", out.stderr);
            assert!(
                server
                    .stdout()
                    .contains(&format!("\"authority\": \"{target}\"")),
                "{case}: {}",
                server.stdout()
            );
            assert!(server.stdout().contains("\"method\": \"CONNECT\""));
        } else {
            assert!(!out.status.success(), "{case}: the connection must fail");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{case}: failed promptly"
            );
        }
        servers.push(server);
    }
    let failures: Vec<String> = daemon
        .records("HBONE connection failed")
        .iter()
        .map(|r| r["error"].as_str().unwrap_or_default().to_owned())
        .collect();
    eprintln!("failures: {failures:#?}");
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(
        failures[0].contains(&identity("b2")) && failures[0].contains(&identity("b1")),
        "{}",
        failures[0]
    );
    assert!(
        failures[1].contains("UnknownIssuer") || failures[1].contains("BadSignature"),
        "{}",
        failures[1]
    );
    assert!(failures[2].contains("Expired"), "{}", failures[2]);
}

/// A certificate with these URI SANs signed by the CA in `ca_dir` (what `mesh-node ca issue`
/// never makes): (cert, key) paths.
fn multi_san(bed: &Testbed, ca_dir: &Path, sans: &[&str], name: &str) -> (String, String) {
    let read = |file: &str| std::fs::read_to_string(ca_dir.join(file)).expect("CA file");
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca-cert.pem"), ca_key).expect("CA");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|uri| rcgen::SanType::URI((*uri).try_into().expect("IA5")))
        .collect();
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_mins(1)).into();
    params.not_after = (now + Duration::from_hours(1)).into();
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let (cert_path, key_path) = (
        bed.tmp_dir().join(format!("{name}-cert.pem")),
        bed.tmp_dir().join(format!("{name}-key.pem")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (
        cert_path.to_str().unwrap().to_owned(),
        key_path.to_str().unwrap().to_owned(),
    )
}

/// `mesh_connection_errors_total{listener="hbone",reason="tls_handshake"}` on node-a.
fn tls_handshake_errors(bed: &Testbed) -> u64 {
    mesh_tests::mesh::counter(
        bed,
        "node-a",
        "mesh_connection_errors_total{listener=\"hbone\",reason=\"tls_certificate_identity\"}",
    )
    .expect("metrics")
}

/// Issue 13, item 4: a mesh-CA certificate with `spiffe://evil.local/...` first and a
/// `cluster.local` identity second was accepted (some SAN in the trust domain), identified as
/// the first, and a DENY on the second principal bypassed.
#[test]
fn a_certificate_with_several_uri_sans_is_refused_at_the_handshake() {
    mesh_tests::skip_unless_namespaced!();
    let bed = two_by_two();
    let _servers = echo_servers(&bed, APP, &["a2"], PORT);
    let deny_b1 = "- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata:\n    name: deny-b1\n    namespace: default\n  spec:\n    action: DENY\n    rules:\n    - from:\n      - source:\n          principals: [cluster.local/ns/default/sa/b1]\n";
    let settings = mesh_tests::mesh::NodeSettings {
        policies: deny_b1.to_owned(),
        ..Default::default()
    };
    let daemon = Daemon::start_with_settings(&bed, "node-a", Path::new(DUT), &["a2"], &settings)
        .expect("daemon");
    let ca = daemon.ca().to_path_buf();
    let ca_cert = ca.join("ca-cert.pem").to_str().unwrap().to_owned();
    let hbone = format!("{}:15008", bed.pod("a2").ipv4());
    let app = bed.pod("a2").addr(false, PORT).to_string();
    let connect = |cert: &str, key: &str| {
        python_client(
            &bed,
            "b1",
            &[
                "--connect",
                &hbone,
                "--authority",
                &app,
                "--ca",
                &ca_cert,
                "--cert",
                cert,
                "--key",
                key,
            ],
        )
    };
    // Controls: the policy denies b1 and lets b2 in.
    let (cert, key) = multi_san(&bed, &ca, &[&identity("b1")], "b1-only");
    assert_eq!(connect(&cert, &key)["status"], 401, "DENY applies to b1");
    let (cert, key) = multi_san(&bed, &ca, &[&identity("b2")], "b2-only");
    assert_eq!(connect(&cert, &key)["status"], 200, "b2 is allowed");
    let before = tls_handshake_errors(&bed);

    let evil = "spiffe://evil.local/ns/default/sa/x";
    let cases = [
        ("evil first", vec![evil.to_owned(), identity("b1")]),
        ("evil second", vec![identity("b1"), evil.to_owned()]),
        ("two mesh identities", vec![identity("b2"), identity("b1")]),
        (
            "a URL and b1",
            vec!["https://b1.example".to_owned(), identity("b1")],
        ),
    ];
    for (i, (case, sans)) in cases.iter().enumerate() {
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let (cert, key) = multi_san(&bed, &ca, &sans, &format!("multi-{i}"));
        let r = connect(&cert, &key);
        assert!(
            r.get("status").is_none_or(serde_json::Value::is_null),
            "{case}: refused at the TLS handshake, not answered: {r}"
        );
        // Counted each (the log line is rate-limited per reason).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while tls_handshake_errors(&bed) < before + i as u64 + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{case}: not counted as an identity failure"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let reasons: Vec<String> = daemon
        .records("HBONE TLS handshake rejected")
        .iter()
        .map(|r| r["error"].as_str().unwrap_or_default().to_owned())
        .collect();
    eprintln!("rejections: {reasons:#?}");
    assert!(!reasons.is_empty(), "logged");
    for reason in &reasons {
        // rustls prints its `Other` certificate errors with `Debug`.
        assert!(reason.contains("SeveralUris"), "{reason}");
    }
    assert_eq!(
        tls_handshake_errors(&bed),
        before + cases.len() as u64,
        "counted"
    );
    let inbound = daemon.captured("inbound");
    assert_eq!(
        inbound.len(),
        1,
        "only the allowed b2 reached the application: {inbound:?}"
    );
}
