//! Conversions between std socket addresses and the kernel ABI types of `mesh-common`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::{ConnKey, FAMILY_V4, FAMILY_V6, PodAddrKey, SockAddr};

/// Address words as the kernel stores them (network byte order in memory; IPv4 in word 0). An
/// IPv4-mapped IPv6 address is treated as the IPv4 address, as the kernel programs do.
fn words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return words(IpAddr::V4(v4));
            }
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The key of `ip` as an address of the pod with netns `netns`.
pub fn pod_addr_key(netns: u64, ip: IpAddr) -> PodAddrKey {
    let (ip, family) = words(ip);
    PodAddrKey {
        netns,
        ip,
        family: u32::from(family),
        pad: 0,
    }
}

/// The address a [`PodAddrKey`] holds; `None` for an unknown family.
pub fn pod_addr_ip(key: &PodAddrKey) -> Option<IpAddr> {
    let family = u16::try_from(key.family).ok()?;
    to_socket_addr(&SockAddr {
        ip: key.ip,
        port: 0,
        family,
    })
    .map(|a| a.ip())
}

pub fn conn_key(netns: u64, peer: SocketAddr) -> ConnKey {
    let (ip, family) = words(peer.ip());
    ConnKey {
        netns,
        ip,
        port: peer.port(),
        family,
        pad: 0,
    }
}

/// The std form of a kernel socket address; `None` for an unknown family.
pub fn to_socket_addr(addr: &SockAddr) -> Option<SocketAddr> {
    let bytes = |w: u32| w.to_ne_bytes();
    let ip = match addr.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(bytes(addr.ip[0]))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in addr.ip.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&bytes(*w));
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, addr.port))
}

/// LPM trie data and prefix length for a CIDR (IPv4 as `::ffff:0:0/96` + prefix).
pub fn lpm_key(net: &ipnet::IpNet) -> ([u8; 16], u32) {
    match net {
        ipnet::IpNet::V4(v4) => (
            v4.network().to_ipv6_mapped().octets(),
            96 + u32::from(v4.prefix_len()),
        ),
        ipnet::IpNet::V6(v6) => (v6.network().octets(), u32::from(v6.prefix_len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_normalises_mapped_addresses() {
        for text in ["198.18.1.2:7000", "[fd6d:0:1::2]:443"] {
            let addr: SocketAddr = text.parse().unwrap();
            let (ip, family) = words(addr.ip());
            let kernel = SockAddr {
                ip,
                port: addr.port(),
                family,
            };
            assert_eq!(to_socket_addr(&kernel), Some(addr));
        }
        let mapped: IpAddr = "::ffff:198.18.1.2".parse().unwrap();
        let plain: IpAddr = "198.18.1.2".parse().unwrap();
        assert_eq!(pod_addr_key(7, mapped), pod_addr_key(7, plain));
        // Network byte order in memory: the first octet is the first byte of word 0.
        assert_eq!(pod_addr_key(7, plain).ip[0].to_ne_bytes(), [198, 18, 1, 2]);
        for ip in [plain, "fe80::1".parse().unwrap()] {
            assert_eq!(pod_addr_ip(&pod_addr_key(7, ip)), Some(ip));
        }
    }

    #[test]
    fn lpm_keys_map_ipv4_into_ipv6() {
        let (data, len) = lpm_key(&"10.0.0.0/8".parse().unwrap());
        assert_eq!(len, 104);
        assert_eq!(&data[10..13], &[0xff, 0xff, 10]);
        let (data, len) = lpm_key(&"fd00::/8".parse().unwrap());
        assert_eq!((data[0], len), (0xfd, 8));
    }
}
