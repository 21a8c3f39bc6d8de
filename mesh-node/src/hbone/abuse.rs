//! What a hostile or broken HBONE peer did, named for `mesh_connection_errors_total{reason}`:
//! the TLS handshakes it failed, and the HTTP/2 connection errors h2 answers with GOAWAY (rapid
//! reset, CONTINUATION flood, oversized headers, other protocol errors).
//!
//! h2 names the limit a peer broke only in the debug data of the GOAWAY it sends
//! (`too_many_resets`, `too_many_continuations`, `header_list_way_too_large`, ...): the error
//! it returns to the server carries the reason code alone (h2 0.4, `Connection::take_error`).
//! So [`Watched`] reads the frame headers of what the server writes (9 bytes of fixed layout
//! per frame, RFC 9113 §4.1; payloads are skipped) and keeps the debug data of a GOAWAY.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The metrics label of a failed TLS handshake: what was wrong with the peer's certificate, or
/// `tls_handshake` for anything else (not TLS, a protocol error).
#[must_use]
pub fn tls_error(e: &io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "tls_no_client_certificate",
        Some(E::InvalidCertificate(C::Expired | C::NotValidYet | C::ExpiredContext { .. })) => {
            "tls_certificate_expired"
        }
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            "tls_certificate_untrusted"
        }
        // The verifier's own checks (trust domain, SPIFFE identity).
        Some(E::InvalidCertificate(C::Other(_) | C::ApplicationVerificationFailure)) => {
            "tls_certificate_identity"
        }
        Some(E::InvalidCertificate(_)) => "tls_certificate_invalid",
        _ => "tls_handshake",
    }
}

/// The metrics label of an error that ended a server connection, or `None` when the connection
/// just ended (the peer closed or reset it, or sent GOAWAY itself). `sent` is what the
/// connection's [`Watched`] saw of the GOAWAY h2 sent: once h2 wrote one with an error code,
/// that is why the connection ended, even if flushing it then failed (a peer that sends abuse
/// and resets at once makes h2 report the I/O error instead).
#[must_use]
pub fn connection_error(e: &h2::Error, sent: &SentGoaway) -> Option<&'static str> {
    if e.is_go_away() && e.is_library() {
        return Some(sent.label().unwrap_or_else(|| classify(e.reason(), "")));
    }
    sent.label()
}

/// The label of the last GOAWAY with an error a [`Watched`] stream saw written.
#[derive(Clone, Default)]
pub struct SentGoaway(Arc<Mutex<Option<&'static str>>>);

impl SentGoaway {
    fn label(&self) -> Option<&'static str> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An HTTP/2 server's transport, passed through unchanged; the GOAWAY frames written to it are
/// noted in its [`SentGoaway`].
pub struct Watched<T> {
    inner: T,
    scan: FrameScan,
    sent: SentGoaway,
}

impl<T> Watched<T> {
    pub fn new(inner: T) -> (Self, SentGoaway) {
        let sent = SentGoaway::default();
        let watched = Self {
            inner,
            scan: FrameScan::default(),
            sent: sent.clone(),
        };
        (watched, sent)
    }

    fn wrote(&mut self, bytes: &[u8]) {
        if let Some((code, debug)) = self.scan.feed(bytes)
            && code != Reason::NO_ERROR
        {
            let label = classify(Some(code), &String::from_utf8_lossy(&debug));
            *self.sent.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(label);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.wrote(&buf[..written]);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        let mut left = written;
        for buf in bufs {
            let n = left.min(buf.len());
            self.wrote(&buf[..n]);
            left -= n;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// HTTP/2 frame type of GOAWAY.
const GOAWAY: u8 = 0x7;
/// Debug data kept of a GOAWAY (h2's markers are short).
const MAX_DEBUG: usize = 64;

/// Follows frame boundaries in a server's output (which starts with a frame: the server has no
/// preface besides its SETTINGS), keeping the payload of GOAWAY frames.
#[derive(Default)]
struct FrameScan {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame's payload, if it is a GOAWAY.
    goaway: Option<Vec<u8>>,
}

impl FrameScan {
    /// Consumes bytes written; a GOAWAY completed in them as (error code, debug data).
    fn feed(&mut self, mut bytes: &[u8]) -> Option<(Reason, Vec<u8>)> {
        let mut found = None;
        while !bytes.is_empty() {
            if self.left == 0 {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have < 9 {
                    break;
                }
                self.have = 0;
                self.left = usize::from(self.head[0]) << 16
                    | usize::from(self.head[1]) << 8
                    | usize::from(self.head[2]);
                self.goaway = (self.head[3] == GOAWAY).then(Vec::new);
            } else {
                let n = self.left.min(bytes.len());
                if let Some(payload) = self.goaway.as_mut() {
                    let room = (8 + MAX_DEBUG).saturating_sub(payload.len());
                    payload.extend_from_slice(&bytes[..n.min(room)]);
                }
                self.left -= n;
                bytes = &bytes[n..];
            }
            if self.left == 0
                && self.have == 0
                && let Some(payload) = self.goaway.take()
                && payload.len() >= 8
            {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                found = Some((Reason::from(code), payload[8..].to_vec()));
            }
        }
        found
    }
}

fn classify(reason: Option<Reason>, message: &str) -> &'static str {
    match reason {
        Some(Reason::ENHANCE_YOUR_CALM) => [
            ("too_many_resets", "http2_rapid_reset"),
            ("too_many_continuations", "http2_continuation_flood"),
            ("header_list_way_too_large", "http2_header_too_large"),
            ("too_many_internal_resets", "http2_stream_errors"),
            ("too_many_data_frames", "http2_data_flood"),
        ]
        .iter()
        .find(|(marker, _)| message.contains(marker))
        .map_or("http2_enhance_your_calm", |(_, label)| label),
        Some(Reason::COMPRESSION_ERROR) => "http2_header_too_large",
        Some(Reason::FLOW_CONTROL_ERROR) => "http2_flow_control",
        Some(Reason::FRAME_SIZE_ERROR) => "http2_frame_size",
        _ => "http2_protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2_abuse_is_named_by_its_limit() {
        // The messages as h2 0.4 formats the GOAWAYs it sends.
        for (reason, message, label) in [
            (
                Reason::ENHANCE_YOUR_CALM,
                "connection error detected: ENHANCE_YOUR_CALM (b\"too_many_resets\")",
                "http2_rapid_reset",
            ),
            (
                Reason::ENHANCE_YOUR_CALM,
                "connection error detected: ENHANCE_YOUR_CALM (b\"too_many_continuations\")",
                "http2_continuation_flood",
            ),
            (
                Reason::ENHANCE_YOUR_CALM,
                "connection error detected: ENHANCE_YOUR_CALM (b\"header_list_way_too_large\")",
                "http2_header_too_large",
            ),
            (
                Reason::ENHANCE_YOUR_CALM,
                "connection error detected: ENHANCE_YOUR_CALM",
                "http2_enhance_your_calm",
            ),
            (
                Reason::COMPRESSION_ERROR,
                "connection error detected: COMPRESSION_ERROR",
                "http2_header_too_large",
            ),
            (
                Reason::PROTOCOL_ERROR,
                "connection error detected: PROTOCOL_ERROR",
                "http2_protocol",
            ),
        ] {
            assert_eq!(classify(Some(reason), message), label, "{message}");
        }
    }

    #[test]
    fn tls_failures_are_named_by_what_was_wrong() {
        use rustls::{CertificateError as C, Error as E};
        let io = |e: E| io::Error::new(io::ErrorKind::InvalidData, e);
        for (error, label) in [
            (E::NoCertificatesPresented, "tls_no_client_certificate"),
            (E::InvalidCertificate(C::Expired), "tls_certificate_expired"),
            (
                E::InvalidCertificate(C::UnknownIssuer),
                "tls_certificate_untrusted",
            ),
            (
                E::InvalidCertificate(C::ApplicationVerificationFailure),
                "tls_certificate_identity",
            ),
            (
                E::InvalidCertificate(C::BadEncoding),
                "tls_certificate_invalid",
            ),
            (E::DecryptError, "tls_handshake"),
        ] {
            assert_eq!(tls_error(&io(error.clone())), label, "{error}");
        }
        assert_eq!(
            tls_error(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            "tls_handshake"
        );
    }

    #[test]
    fn ends_that_are_not_abuse_are_not_counted() {
        let sent = SentGoaway::default();
        let reason = h2::Error::from(Reason::PROTOCOL_ERROR);
        assert_eq!(
            connection_error(&reason, &sent),
            None,
            "not a GOAWAY h2 sent"
        );
        // Once h2 wrote a GOAWAY with an error, that is why the connection ended, whatever
        // error the end itself reports.
        let (mut watched, sent) = Watched::new(());
        watched.wrote(&frame(GOAWAY, &[0, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(sent.label(), None, "NO_ERROR is not abuse (idle, draining)");
        let mut goaway = vec![0, 0, 0, 1, 0, 0, 0, 0xb];
        goaway.extend_from_slice(b"header_list_way_too_large");
        watched.wrote(&frame(GOAWAY, &goaway));
        assert_eq!(
            connection_error(&reason, &sent),
            Some("http2_header_too_large")
        );
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_goaway_is_found_among_the_frames_written_however_they_are_split() {
        let mut goaway = vec![0, 0, 0, 7, 0, 0, 0, 0xb];
        goaway.extend_from_slice(b"too_many_resets");
        let stream: Vec<u8> = [
            frame(0x4, &[0, 3, 0, 0, 0, 200]),
            frame(0x0, &[0x7; 3000]),
            frame(0x6, &[0; 8]),
            frame(GOAWAY, &goaway),
        ]
        .concat();
        for chunk in [1, 2, 5, 9, 10, 100, stream.len()] {
            let mut scan = FrameScan::default();
            let found: Vec<_> = stream.chunks(chunk).filter_map(|c| scan.feed(c)).collect();
            assert_eq!(
                found,
                [(Reason::ENHANCE_YOUR_CALM, b"too_many_resets".to_vec())],
                "in chunks of {chunk}"
            );
        }
        let mut scan = FrameScan::default();
        assert_eq!(
            scan.feed(&frame(0x0, b"\0\0\0\x07\0\0\0\x0b")),
            None,
            "GOAWAY-like bytes in a DATA frame are not a GOAWAY"
        );
    }
}
