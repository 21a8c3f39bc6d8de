//! The one address encoding of the map ABI, used by the kernel programs and the daemon alike
//! (and so tested once, on the host): 32-bit words in network byte order as the kernel hands
//! them over (IPv4 in word 0), ports in host order, and an IPv4-mapped IPv6 address treated as
//! the IPv4 address it is (a dual-stack socket reports IPv4 peers that way).
//!
//! Functions the kernel programs call are `#[inline(always)]`: the BPF target gets them inlined
//! into each program rather than as BPF-to-BPF calls.
#![expect(
    clippy::inline_always,
    reason = "inlined into the kernel programs (no BPF-to-BPF calls)"
)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{ConnKey, FAMILY_V4, FAMILY_V6, PodAddrKey, SockAddr};

/// `::ffff:0:0/96` prefix word (word 2 of a mapped address, network order).
const MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

impl SockAddr {
    /// An IPv4 address as the kernel hands it over (network order).
    #[inline(always)]
    #[must_use]
    pub fn from_v4(ip: u32, port: u16) -> Self {
        Self {
            ip: [ip, 0, 0, 0],
            port,
            family: FAMILY_V4,
        }
    }

    /// An IPv6 address as the kernel hands it over; an IPv4-mapped one becomes IPv4.
    #[inline(always)]
    #[must_use]
    pub fn from_v6(ip: [u32; 4], port: u16) -> Self {
        if ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_WORD {
            Self::from_v4(ip[3], port)
        } else {
            Self {
                ip,
                port,
                family: FAMILY_V6,
            }
        }
    }

    /// The address as the IPv6 words `getpeername6`/`connect6` expect (IPv4 as mapped).
    #[inline(always)]
    #[must_use]
    pub fn v6_words(&self) -> [u32; 4] {
        if self.family == FAMILY_V4 {
            [0, 0, MAPPED_WORD, self.ip[0]]
        } else {
            self.ip
        }
    }

    /// `127.0.0.0/8` or `::1`.
    #[inline(always)]
    #[must_use]
    pub fn is_loopback(&self) -> bool {
        if self.family == FAMILY_V4 {
            self.ip[0].to_ne_bytes()[0] == 127
        } else {
            self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == 0 && self.ip[3] == 1u32.to_be()
        }
    }

    /// Whether both are the same address (ports aside).
    #[inline(always)]
    #[must_use]
    pub fn same_ip(&self, other: &Self) -> bool {
        self.family == other.family
            && self.ip[0] == other.ip[0]
            && self.ip[1] == other.ip[1]
            && self.ip[2] == other.ip[2]
            && self.ip[3] == other.ip[3]
    }

    /// The 16 address bytes used as LPM trie data (IPv4 as `::ffff:a.b.c.d`).
    #[inline(always)]
    #[must_use]
    pub fn lpm_bytes(&self) -> [u8; 16] {
        let w = self.v6_words();
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = w[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }

    /// The kernel form of a socket address.
    #[must_use]
    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(v4) => Self::from_v4(u32::from_ne_bytes(v4.octets()), addr.port()),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                Self::from_v6([w(0), w(4), w(8), w(12)], addr.port())
            }
        }
    }

    /// The socket address; `None` for an unknown family.
    #[must_use]
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        let ip = match self.family {
            FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(self.ip[0].to_ne_bytes())),
            FAMILY_V6 => {
                let mut o = [0u8; 16];
                for (i, w) in self.ip.iter().enumerate() {
                    o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

impl PodAddrKey {
    /// `addr` as an address of the pod with netns `netns`.
    #[inline(always)]
    #[must_use]
    pub fn new(netns: u64, addr: &SockAddr) -> Self {
        Self {
            netns,
            ip: addr.ip,
            family: u32::from(addr.family),
            pad: 0,
        }
    }

    /// The address this key holds; `None` for an unknown family.
    #[must_use]
    pub fn ip(&self) -> Option<IpAddr> {
        let family = u16::try_from(self.family).ok()?;
        let addr = SockAddr {
            ip: self.ip,
            port: 0,
            family,
        };
        addr.to_socket_addr().map(|a| a.ip())
    }
}

impl ConnKey {
    /// The key of a connection whose client socket, in the netns `netns`, has the local address
    /// `local`.
    #[inline(always)]
    #[must_use]
    pub fn new(netns: u64, local: &SockAddr) -> Self {
        Self {
            netns,
            ip: local.ip,
            port: local.port,
            family: local.family,
            pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn round_trips_and_normalises_mapped_addresses() {
        for text in ["198.18.1.2:7000", "[fd6d:0:1::2]:443", "[fe80::1]:1"] {
            let addr = sock(text);
            assert_eq!(
                SockAddr::from_socket_addr(addr).to_socket_addr(),
                Some(addr)
            );
        }
        let mapped = SockAddr::from_socket_addr(sock("[::ffff:198.18.1.2]:80"));
        let plain = SockAddr::from_socket_addr(sock("198.18.1.2:80"));
        assert_eq!(mapped, plain);
        assert_eq!(PodAddrKey::new(7, &mapped), PodAddrKey::new(7, &plain));
        // Network byte order in memory: the first octet is the first byte of word 0.
        assert_eq!(plain.ip[0].to_ne_bytes(), [198, 18, 1, 2]);
        assert_eq!(
            PodAddrKey::new(7, &plain).ip(),
            Some("198.18.1.2".parse().unwrap())
        );
    }

    #[test]
    fn the_kernel_view_of_an_address_is_the_daemons() {
        // What `connect6` reads from `user_ip6` for an IPv4-mapped destination, and what
        // `getpeername6` must write back.
        let v4 = SockAddr::from_socket_addr(sock("198.18.1.2:7000"));
        let words = v4.v6_words();
        assert_eq!(SockAddr::from_v6(words, 7000), v4);
        let v6 = SockAddr::from_socket_addr(sock("[fd6d::2]:7000"));
        assert_eq!(SockAddr::from_v6(v6.v6_words(), 7000), v6);
        assert_eq!(
            ConnKey::new(3, &v4),
            ConnKey {
                netns: 3,
                ip: v4.ip,
                port: 7000,
                family: FAMILY_V4,
                pad: 0
            }
        );
    }

    #[test]
    fn loopback_and_equality_ignore_ports() {
        for (text, loopback) in [
            ("127.0.0.1:1", true),
            ("127.9.9.9:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("198.18.1.2:1", false),
            ("[fe80::1]:1", false),
            ("[::]:1", false),
        ] {
            assert_eq!(
                SockAddr::from_socket_addr(sock(text)).is_loopback(),
                loopback,
                "{text}"
            );
        }
        let a = SockAddr::from_socket_addr(sock("198.18.1.2:1"));
        let b = SockAddr::from_socket_addr(sock("198.18.1.2:2"));
        let c = SockAddr::from_socket_addr(sock("[::ffff:198.18.1.2]:3"));
        assert!(a.same_ip(&b) && a.same_ip(&c));
        assert!(!a.same_ip(&SockAddr::from_socket_addr(sock("198.18.1.3:1"))));
    }

    #[test]
    fn lpm_bytes_map_ipv4_into_ipv6() {
        let v4 = SockAddr::from_socket_addr(sock("10.1.2.3:0")).lpm_bytes();
        assert_eq!(&v4[10..16], &[0xff, 0xff, 10, 1, 2, 3]);
        let v6 = SockAddr::from_socket_addr(sock("[fd00::1]:0")).lpm_bytes();
        assert_eq!((v6[0], v6[15]), (0xfd, 1));
    }
}
