//! HBONE request handling from untrusted peers: the method and `:authority` checks, and the
//! SPIFFE identity parser applied to URI SANs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (method, authority) = text.split_once('\n').unwrap_or(("CONNECT", text));
    let method = http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::CONNECT);
    let ips = ["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
    if let Ok(dst) =
        mesh_node::proxy::check_connect(&method, Some(authority), &ips, &[15001, 15006, 15008])
    {
        assert!(ips.contains(&dst.ip()));
        assert!(![15001, 15006, 15008].contains(&dst.port()));
    }
    let _ = authority.parse::<mesh_node::identity::Identity>();
});
