//! The peer identity extracted from a presented certificate (X.509 DER from the wire).
#![no_main]

libfuzzer_sys::fuzz_target!(|der: &[u8]| {
    let cert = rustls_pki_types::CertificateDer::from(der.to_vec());
    let _ = mesh_node::tls::peer_identity(&[cert]);
});
