//! Address helpers: normalising IPv4-mapped IPv6 addresses, comparisons, loopback tests, LPM
//! keys.

use mesh_common::{FAMILY_V4, FAMILY_V6, SockAddr};

/// `::ffff:0:0/96` prefix word (word 2 of a mapped address, network order).
const MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

/// An IPv6 address as the kernel hands it over; an IPv4-mapped one becomes IPv4.
#[inline(always)]
pub fn from_v6(ip: [u32; 4], port: u16) -> SockAddr {
    if ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_WORD {
        SockAddr {
            ip: [ip[3], 0, 0, 0],
            port,
            family: FAMILY_V4,
        }
    } else {
        SockAddr {
            ip,
            port,
            family: FAMILY_V6,
        }
    }
}

#[inline(always)]
pub fn from_v4(ip: u32, port: u16) -> SockAddr {
    SockAddr {
        ip: [ip, 0, 0, 0],
        port,
        family: FAMILY_V4,
    }
}

/// The address as the IPv6 words `getpeername6`/`connect6` expect (IPv4 as mapped).
#[inline(always)]
pub fn to_v6_words(addr: &SockAddr) -> [u32; 4] {
    if addr.family == FAMILY_V4 {
        [0, 0, MAPPED_WORD, addr.ip[0]]
    } else {
        addr.ip
    }
}

/// `127.0.0.0/8` or `::1`.
#[inline(always)]
pub fn is_loopback(addr: &SockAddr) -> bool {
    if addr.family == FAMILY_V4 {
        addr.ip[0].to_ne_bytes()[0] == 127
    } else {
        addr.ip[0] == 0 && addr.ip[1] == 0 && addr.ip[2] == 0 && addr.ip[3] == 1u32.to_be()
    }
}

/// Whether two addresses are the same (ports ignored).
#[inline(always)]
pub fn same_ip(a: &SockAddr, b: &SockAddr) -> bool {
    a.family == b.family
        && a.ip[0] == b.ip[0]
        && a.ip[1] == b.ip[1]
        && a.ip[2] == b.ip[2]
        && a.ip[3] == b.ip[3]
}

/// The 16 address bytes used as LPM trie data (IPv4 as `::ffff:a.b.c.d`).
#[inline(always)]
pub fn lpm_bytes(addr: &SockAddr) -> [u8; 16] {
    let w = to_v6_words(addr);
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
