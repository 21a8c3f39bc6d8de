//! HBONE request handling from untrusted peers: the method and `:authority` checks (address
//! and hostname authorities, at a pod and at an east-west gateway), and the SPIFFE identity parser applied to URI SANs.
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
    // A hostname authority (double HBONE): only the service's port, to this endpoint.
    if let Ok((dst, _)) = mesh_node::proxy::check_connect_to(
        &method,
        Some(authority),
        &ips,
        &[15001, 15006, 15008],
        &HOSTS,
    ) {
        assert!(ips.contains(&dst.ip()));
        assert!(![15001, 15006, 15008].contains(&dst.port()));
    }
    // At an east-west gateway: a service hostname, never an address.
    if let Ok((host, port)) = mesh_node::proxy::check_gateway_connect(&method, Some(authority)) {
        assert!(port != 0 && !host.is_empty() && host.len() <= 253);
        assert!(host.parse::<std::net::IpAddr>().is_err());
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        );
    }
    let _ = authority.parse::<mesh_node::identity::Identity>();
});

/// `echo.default.svc.cluster.local:8080` → 10.0.0.1:7000.
static HOSTS: std::sync::LazyLock<mesh_node::state::service::HostIndex> =
    std::sync::LazyLock::new(|| {
        let service: mesh_node::state::service::Service = serde_yaml_ng::from_str(
            "{name: echo, addresses: [10.96.0.1], ports: [{port: 8080, targetPort: 7000}], endpoints: [{address: 10.0.0.1}]}",
        )
        .expect("service");
        mesh_node::state::service::HostIndex::build(&[service], &[])
    });
