//! Both verifiers against leaves from a test CA with every shape of URI SANs: only a leaf with
//! exactly one SPIFFE URI SAN is accepted, and its identity is the one verified.

use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    client::danger::ServerCertVerifier,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::ClientCertVerifier,
};

use super::{PeerVerifier, RootStore, peer_identity};
use crate::identity::{Identity, svid_identity};

const EVIL: &str = "spiffe://evil.local/ns/default/sa/x";
const B1: &str = "spiffe://cluster.local/ns/default/sa/b1";

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

fn test_ca() -> TestCa {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let root = params.self_signed(&key).unwrap().der().clone();
    TestCa {
        issuer: Issuer::new(params, key),
        root,
    }
}

/// A leaf with these subject alternative names (`uri:` or `dns:` prefixes).
fn leaf(ca: &TestCa, sans: &[&str]) -> CertificateDer<'static> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.split_once(':') {
            Some(("dns", name)) => SanType::DnsName((*name).try_into().unwrap()),
            _ => SanType::URI((*san).try_into().unwrap()),
        })
        .collect();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.signed_by(&key, &ca.issuer).unwrap().der().clone()
}

fn fixed(ca: &TestCa) -> Arc<[CertificateDer<'static>]> {
    Arc::new([ca.root.clone()])
}

fn client_side(ca: &TestCa, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let verifier = PeerVerifier::client(
        &crate::tls::provider(),
        fixed(ca),
        &["cluster.local".to_owned()],
    )
    .unwrap();
    verifier
        .verify_client_cert(cert, &[], UnixTime::now())
        .map(|_| ())
}

fn server_side(
    ca: &TestCa,
    cert: &CertificateDer<'_>,
    expected: &str,
) -> Result<(), rustls::Error> {
    let verifier = PeerVerifier::server(
        &crate::tls::provider(),
        fixed(ca),
        expected.parse().unwrap(),
    )
    .unwrap();
    verifier
        .verify_server_cert(
            cert,
            &[],
            &ServerName::try_from("ignored.invalid").unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

#[test]
fn a_leaf_with_one_spiffe_id_is_verified_and_identified_by_it() {
    let ca = test_ca();
    for sans in [&[B1][..], &[B1, "dns:b1.default.svc"], &["dns:b1", B1]] {
        let cert = leaf(&ca, sans);
        client_side(&ca, &cert).unwrap_or_else(|e| panic!("{sans:?}: {e}"));
        server_side(&ca, &cert, B1).unwrap_or_else(|e| panic!("{sans:?}: {e}"));
        let id: Identity = B1.parse().unwrap();
        assert_eq!(peer_identity(&[cert]), Some(id), "{sans:?}");
    }
}

#[test]
fn leaves_without_exactly_one_spiffe_uri_san_are_refused_by_both_verifiers() {
    let ca = test_ca();
    for (sans, why) in [
        (&[EVIL, B1][..], "URI subject alternative names"),
        (&[B1, EVIL], "URI subject alternative names"),
        (&[B1, B1], "URI subject alternative names"),
        (
            &["https://example.com/b1", B1],
            "URI subject alternative names",
        ),
        (&[B1, "urn:x:y"], "URI subject alternative names"),
        (&["dns:b1.default.svc"], "no URI subject alternative name"),
        (&[], "no URI subject alternative name"),
        (
            &["spiffe://cluster.local/ns/default/sa/b%31"],
            "not a SPIFFE workload id",
        ),
        (
            &["spiffe://Cluster.local/ns/default/sa/b1"],
            "not a SPIFFE workload id",
        ),
        (
            &["spiffe://cluster.local/ns/../sa/b1"],
            "not a SPIFFE workload id",
        ),
        (
            &["spiffe://cluster.local/ns/default/sa/b1?x=1"],
            "not a SPIFFE workload id",
        ),
    ] {
        let cert = leaf(&ca, sans);
        let client = client_side(&ca, &cert).expect_err("the server must refuse this client");
        let server = server_side(&ca, &cert, B1).expect_err("the client must refuse this server");
        for err in [client, server] {
            let text = format!("{err} {}", crate::error_chain(&err));
            let source = match &err {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(e)) => {
                    format!("{e}: {}", crate::error_chain(&*e.0))
                }
                other => panic!("{sans:?}: {other}"),
            };
            assert!(source.contains(why), "{sans:?}: {text} / {source}");
        }
        assert_eq!(peer_identity(std::slice::from_ref(&cert)), None, "{sans:?}");
        assert!(svid_identity(&cert).is_err());
    }
}

#[test]
fn identity_checks_compare_the_one_identity() {
    let ca = test_ca();
    let other_domain = leaf(&ca, &["spiffe://other.local/ns/default/sa/b1"]);
    assert!(
        client_side(&ca, &other_domain).is_err(),
        "another trust domain"
    );
    let b2 = leaf(&ca, &["spiffe://cluster.local/ns/default/sa/b2"]);
    let err = server_side(&ca, &b2, B1).unwrap_err().to_string();
    assert!(err.contains("sa/b2") && err.contains("sa/b1"), "{err}");
}

#[test]
fn a_leaf_from_another_ca_is_refused_whatever_its_san() {
    let (ca, other) = (test_ca(), test_ca());
    let cert = leaf(&other, &[B1]);
    assert!(client_side(&ca, &cert).is_err());
    assert!(server_side(&ca, &cert, B1).is_err());
}

/// Roots that a test replaces.
#[derive(Debug)]
struct Swappable(Mutex<Arc<[CertificateDer<'static>]>>);

impl RootStore for Arc<Swappable> {
    fn current_roots(&self) -> Arc<[CertificateDer<'static>]> {
        Arc::clone(&self.0.lock().unwrap())
    }
}

#[test]
fn a_verifier_reads_the_current_roots_at_each_handshake_and_parses_them_once_per_change() {
    let (old, new) = (test_ca(), test_ca());
    let store = Arc::new(Swappable(Mutex::new(fixed(&old))));
    let verifier = PeerVerifier::client(
        &crate::tls::provider(),
        Arc::clone(&store),
        &["cluster.local".to_owned()],
    )
    .unwrap();
    let verify =
        |cert: &CertificateDer<'_>| verifier.verify_client_cert(cert, &[], UnixTime::now());
    let (from_old, from_new) = (leaf(&old, &[B1]), leaf(&new, &[B1]));
    verify(&from_old).expect("chained to the root it was built with");
    assert!(verify(&from_new).is_err(), "a root not yet trusted");
    let before = verifier.anchors().unwrap();
    assert!(
        Arc::ptr_eq(&before, &verifier.anchors().unwrap()),
        "unchanged roots are not parsed again"
    );
    *store.0.lock().unwrap() = Arc::new([old.root.clone(), new.root.clone()]);
    verify(&from_new).expect("the added root is trusted by the verifier built before it");
    verify(&from_old).expect("both roots during the rotation");
    assert_eq!(verifier.anchors().unwrap().len(), 2);
    *store.0.lock().unwrap() = fixed(&new);
    assert!(
        verify(&from_old).is_err(),
        "a dropped root is no longer trusted"
    );
    // Roots that are not trust anchors fail every handshake rather than keep the old ones.
    *store.0.lock().unwrap() = Arc::new([CertificateDer::from(vec![0x30, 0x00])]);
    assert!(
        verify(&from_new).is_err(),
        "fails closed on unparsable roots"
    );
}

#[test]
fn an_any_of_server_verifier_accepts_each_listed_identity_and_nothing_else() {
    let ca = test_ca();
    let b2 = "spiffe://cluster.local/ns/default/sa/b2";
    let verifier = PeerVerifier::server_any_of(
        &crate::tls::provider(),
        fixed(&ca),
        vec![B1.parse().unwrap(), b2.parse().unwrap()],
    )
    .unwrap();
    let verify = |verifier: &PeerVerifier, san: &str| {
        verifier.verify_server_cert(
            &leaf(&ca, &[san]),
            &[],
            &ServerName::try_from("ignored.invalid").unwrap(),
            &[],
            UnixTime::now(),
        )
    };
    assert!(verify(&verifier, B1).is_ok());
    assert!(verify(&verifier, b2).is_ok());
    let refused = verify(&verifier, "spiffe://cluster.local/ns/default/sa/b3")
        .expect_err("an identity not listed");
    assert!(refused.to_string().contains("one of ["), "{refused}");
    assert!(verify(&verifier, EVIL).is_err());
    // From another CA, a listed identity is refused all the same.
    let other = test_ca();
    assert!(
        verifier
            .verify_server_cert(
                &leaf(&other, &[B1]),
                &[],
                &ServerName::try_from("ignored.invalid").unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_err()
    );
    // An empty list accepts no server.
    let none =
        PeerVerifier::server_any_of(&crate::tls::provider(), fixed(&ca), Vec::new()).unwrap();
    assert!(verify(&none, B1).is_err());
}
