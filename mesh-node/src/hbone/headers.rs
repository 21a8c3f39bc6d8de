//! The headers ztunnel puts on a `CONNECT` besides `:authority`, and reads back: `forwarded`
//! (RFC 7239, the application's address), `baggage` (the source workload's telemetry metadata;
//! its content is the proxy's) and `traceparent` (W3C Trace Context, fresh random ids). Values
//! a peer sends are parsed with bounds and never trusted for identity.

use std::{fmt, net::SocketAddr};

use http::{HeaderMap, HeaderValue, header};

/// W3C baggage.
pub const BAGGAGE: &str = "baggage";
/// W3C Trace Context.
pub const TRACEPARENT: &str = "traceparent";

/// The headers of a `CONNECT` for the application connection from `client`, with the source's
/// `baggage` (skipped if it is not a valid header value).
#[must_use]
pub fn connect_headers(client: SocketAddr, baggage: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(header::FORWARDED, forwarded(client));
    if let Some(value) = baggage
        .filter(|b| !b.is_empty())
        .and_then(|b| HeaderValue::from_str(b).ok())
    {
        headers.insert(BAGGAGE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&TraceParent::random().to_string()) {
        headers.insert(TRACEPARENT, value);
    }
    headers
}

/// `forwarded: for="<ip>:<port>"` (`for="[<ipv6>]:<port>"`): RFC 7239 requires the quotes for
/// a node with a port and the brackets for IPv6. An IPv4-mapped address is sent as IPv4.
#[must_use]
pub fn forwarded(client: SocketAddr) -> HeaderValue {
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    HeaderValue::from_str(&format!("for=\"{client}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

/// A W3C `traceparent`: version `00`, a trace id, a parent (span) id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// New random ids (never all zeros, which W3C reserves), not sampled (as ztunnel sends).
    #[must_use]
    pub fn random() -> Self {
        Self {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: 0,
        }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (lower case, ids not all zeros); `None`
    /// otherwise. A later version's value may be longer (`-` and more fields, ignored).
    #[must_use]
    pub fn parse(value: &[u8]) -> Option<Self> {
        const LEN: usize = 55;
        let head = value.get(..LEN)?;
        let (version, trace, span, flags) = (
            &head[..2],
            head.get(3..35)?,
            head.get(36..52)?,
            head.get(53..)?,
        );
        let lower_hex = |f: &[u8]| f.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let dashes = [2, 35, 52].iter().all(|&i| head[i] == b'-');
        let later = value.len() > LEN;
        if !dashes
            || ![version, trace, span, flags].into_iter().all(lower_hex)
            || version == b"ff"
            || (later && (version == b"00" || value[LEN] != b'-'))
        {
            return None;
        }
        // Lower-case hex digits only (ASCII), so these parse.
        let text = |f| std::str::from_utf8(f).ok();
        let parsed = Self {
            trace_id: u128::from_str_radix(text(trace)?, 16).ok()?,
            span_id: u64::from_str_radix(text(span)?, 16).ok()?,
            flags: u8::from_str_radix(text(flags)?, 16).ok()?,
        };
        (parsed.trace_id != 0 && parsed.span_id != 0).then_some(parsed)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::{TraceParent, connect_headers, forwarded};

    #[test]
    fn forwarded_quotes_and_brackets() {
        let cases = [
            ("10.0.0.1:4711", r#"for="10.0.0.1:4711""#),
            (
                "[2001:db8:cafe::17]:4711",
                r#"for="[2001:db8:cafe::17]:4711""#,
            ),
            ("[::ffff:10.1.2.3]:80", r#"for="10.1.2.3:80""#),
        ];
        for (addr, expected) in cases {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(forwarded(addr).to_str().unwrap(), expected);
        }
    }

    #[test]
    fn traceparents_are_w3c_and_random() {
        let a = TraceParent::random();
        let text = a.to_string();
        assert_eq!(text.len(), 55, "{text}");
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [2, 32, 16, 2]
        );
        assert_eq!((parts[0], parts[3]), ("00", "00"));
        assert!(
            text.bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{text}"
        );
        assert_eq!(TraceParent::parse(text.as_bytes()), Some(a));
        let b = TraceParent::random();
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
    }

    #[test]
    fn traceparent_parsing_is_strict() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            TraceParent::parse(good.as_bytes()),
            Some(TraceParent {
                trace_id: 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                span_id: 0xb7ad_6b71_6920_3331,
                flags: 1,
            })
        );
        for bad in [
            "",
            "00",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-001",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
        let not_utf8 = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0\xff";
        assert_eq!(TraceParent::parse(not_utf8), None);
        // A later version's longer value: its first fields are read.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more";
        assert!(TraceParent::parse(later.as_bytes()).is_some());
    }

    #[test]
    fn connect_headers_carry_all_three() {
        let client: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let headers = connect_headers(client, Some("k8s.namespace.name=shop"));
        assert_eq!(headers["forwarded"], r#"for="10.0.0.1:5000""#);
        assert_eq!(headers["baggage"], "k8s.namespace.name=shop");
        assert!(TraceParent::parse(headers["traceparent"].as_bytes()).is_some());
        // A value that cannot be a header is left out, not sent broken.
        let headers = connect_headers(client, Some("bad\nvalue"));
        assert!(!headers.contains_key("baggage"));
        assert_eq!(headers.len(), 2);
    }
}
