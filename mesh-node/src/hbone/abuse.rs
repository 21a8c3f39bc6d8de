//! What a hostile or broken HBONE peer did, named for `mesh_connection_errors_total{reason}`:
//! the TLS handshakes it failed, the HTTP/2 connection errors h2 answers with GOAWAY (rapid
//! reset, CONTINUATION flood, oversized headers, other protocol errors), and the streams h2
//! refuses on its own while the connection goes on (a header list over the limit, answered
//! 431; another protocol error of one stream).
//!
//! h2 names the limit a peer broke only in the debug data of the GOAWAY it sends
//! (`too_many_resets`, `too_many_continuations`, `header_list_way_too_large`, ...): the error
//! it returns to the server carries the reason code alone (h2 0.4, `Connection::take_error`),
//! and a stream it refuses never reaches the server at all. So [`Watched`] reads the frame
//! headers of what the server writes (9 bytes of fixed layout per frame, RFC 9113 §4.1;
//! payloads are skipped but for GOAWAY and `RST_STREAM`): the debug data of a GOAWAY, and each
//! `RST_STREAM` with `PROTOCOL_ERROR`, which the daemon itself never sends (it resets with
//! `CANCEL` and `REFUSED_STREAM`); one that follows a `HEADERS` frame ending the same stream
//! is h2's 431.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use h2::Reason;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

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

/// The streams h2 refused on its own, counted by kind (in the order of [`REFUSED_STREAMS`]).
pub type StreamRefusals = watch::Receiver<[u64; 2]>;

/// The labels of the streams h2 refuses on its own, in the order of [`StreamRefusals`]'s
/// counts: a header list over the limit (answered 431), another protocol error of the stream.
pub const REFUSED_STREAMS: [&str; 2] = ["http2_headers_refused", "http2_stream_protocol"];

/// An HTTP/2 server's transport, passed through unchanged; the GOAWAY frames written to it are
/// noted in its [`SentGoaway`], the streams h2 refused in its [`StreamRefusals`].
pub struct Watched<T> {
    inner: T,
    scan: FrameScan,
    sent: SentGoaway,
    refused: watch::Sender<[u64; 2]>,
}

impl<T> Watched<T> {
    pub fn new(inner: T) -> (Self, SentGoaway, StreamRefusals) {
        let sent = SentGoaway::default();
        let (refused, refusals) = watch::channel([0; 2]);
        let watched = Self {
            inner,
            scan: FrameScan::default(),
            sent: sent.clone(),
            refused,
        };
        (watched, sent, refusals)
    }

    fn wrote(&mut self, bytes: &[u8]) {
        let (sent, refused) = (&self.sent, &self.refused);
        self.scan.feed(bytes, |found| match found {
            Found::Goaway(code, debug) => {
                if code != Reason::NO_ERROR {
                    let label = classify(Some(code), &String::from_utf8_lossy(&debug));
                    *sent.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(label);
                }
            }
            Found::Refused { answered } => {
                refused.send_modify(|counts| counts[usize::from(!answered)] += 1);
            }
        });
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

/// HTTP/2 frame types (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
/// The `END_STREAM` flag of a HEADERS frame.
const END_STREAM: u8 = 0x1;
/// Debug data kept of a GOAWAY (h2's markers are short).
const MAX_DEBUG: usize = 64;

/// What [`FrameScan`] found in a server's output.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A GOAWAY: its error code and debug data.
    Goaway(Reason, Vec<u8>),
    /// A stream reset with `PROTOCOL_ERROR`; `answered` when a HEADERS frame ended it first
    /// (h2's 431 for a header list over the limit).
    Refused { answered: bool },
}

/// Follows frame boundaries in a server's output (which starts with a frame: the server has no
/// preface besides its SETTINGS), keeping the payload of GOAWAY and `RST_STREAM` frames.
#[derive(Default)]
struct FrameScan {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame's payload, if it is a GOAWAY or an `RST_STREAM`.
    kept: Option<Vec<u8>>,
    /// The streams the last few HEADERS frames with `END_STREAM` ended (a ring).
    ended: [u32; 4],
    next_ended: usize,
}

impl FrameScan {
    /// Consumes bytes written, calling `on` for what completed in them.
    fn feed(&mut self, mut bytes: &[u8], mut on: impl FnMut(Found)) {
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
                let (kind, flags) = (self.head[3], self.head[4]);
                if kind == HEADERS && flags & END_STREAM != 0 {
                    self.ended[self.next_ended] = self.stream();
                    self.next_ended = (self.next_ended + 1) % self.ended.len();
                }
                self.kept = matches!(kind, GOAWAY | RST_STREAM).then(Vec::new);
            } else {
                let n = self.left.min(bytes.len());
                if let Some(payload) = self.kept.as_mut() {
                    let room = (8 + MAX_DEBUG).saturating_sub(payload.len());
                    payload.extend_from_slice(&bytes[..n.min(room)]);
                }
                self.left -= n;
                bytes = &bytes[n..];
            }
            if self.left == 0
                && self.have == 0
                && let Some(payload) = self.kept.take()
            {
                let code = |at: usize| {
                    payload
                        .get(at..at + 4)
                        .map(|c| Reason::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                };
                if self.head[3] == GOAWAY {
                    if let Some(reason) = code(4) {
                        on(Found::Goaway(reason, payload[8..].to_vec()));
                    }
                } else if code(0) == Some(Reason::PROTOCOL_ERROR) {
                    let stream = self.stream();
                    on(Found::Refused {
                        answered: self.ended.contains(&stream),
                    });
                }
            }
        }
    }

    /// The stream of the current frame (its header is complete).
    fn stream(&self) -> u32 {
        u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & !(1 << 31)
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
        let (mut watched, sent, _) = Watched::new(());
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
            assert_eq!(
                scan(&stream, chunk),
                [Found::Goaway(
                    Reason::ENHANCE_YOUR_CALM,
                    b"too_many_resets".to_vec()
                )],
                "in chunks of {chunk}"
            );
        }
        assert!(
            scan(&frame(0x0, b"\0\0\0\x07\0\0\0\x0b"), 100).is_empty(),
            "GOAWAY-like bytes in a DATA frame are not a GOAWAY"
        );
    }

    fn scan(bytes: &[u8], chunk: usize) -> Vec<Found> {
        let mut scan = FrameScan::default();
        let mut found = Vec::new();
        for c in bytes.chunks(chunk) {
            scan.feed(c, |f| found.push(f));
        }
        found
    }

    /// A frame of `kind` with `flags` on `stream`.
    fn on_stream(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = frame(kind, payload);
        out[4] = flags;
        out[5..9].copy_from_slice(&stream.to_be_bytes());
        out
    }

    #[test]
    fn streams_h2_refuses_itself_are_found_and_told_apart() {
        let protocol = 1u32.to_be_bytes();
        let stream: Vec<u8> = [
            // Our own answers: a 200 (stream 1 goes on), a 401 ending stream 3, our resets.
            on_stream(HEADERS, 0x4, 1, &[0x88]),
            on_stream(HEADERS, 0x5, 3, &[0x8a]),
            on_stream(RST_STREAM, 0, 1, &8u32.to_be_bytes()),
            on_stream(RST_STREAM, 0, 9, &7u32.to_be_bytes()),
            // h2's 431 on stream 5, then its reset; a protocol error reset on stream 7.
            on_stream(HEADERS, 0x5, 5, &[0x48, 0x03, b'4', b'3', b'1']),
            on_stream(0x0, 0x1, 1, &[0; 100]),
            on_stream(RST_STREAM, 0, 5, &protocol),
            on_stream(RST_STREAM, 0, 7, &protocol),
        ]
        .concat();
        for chunk in [1, 3, 9, 13, stream.len()] {
            assert_eq!(
                scan(&stream, chunk),
                [
                    Found::Refused { answered: true },
                    Found::Refused { answered: false }
                ],
                "in chunks of {chunk}"
            );
        }
        let (mut watched, _, refusals) = Watched::new(());
        watched.wrote(&stream);
        assert_eq!(*refusals.borrow(), [1, 1]);
    }
}
