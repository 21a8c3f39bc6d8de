//! How a proxied connection can fail or be refused, kept typed to the end: one [`Error`] per
//! connection, mapped here, once, to its metrics label
//! (`mesh_connection_errors_total{reason}`), its Istio response flag (access log and
//! `istio_tcp_connections_closed_total{response_flags}`) and the HBONE status it is answered
//! with. A STRICT refusal is not a policy denial, and neither is a limit.

use std::{io, net::SocketAddr, sync::Arc};

use http::StatusCode;
use tracing::{info, warn};

use super::Proxy;
use crate::{
    hbone::{HboneError, ServerError},
    identity::{CertError, Identity},
    metrics::{ConnRecord, Direction},
    tls::TlsError,
};

/// Why a `CONNECT` request is answered with 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadConnect {
    #[error("not a CONNECT")]
    NotConnect,
    #[error("authority is not ip:port")]
    BadAuthority,
    #[error("authority IP is not this workload")]
    NotThisWorkload,
    #[error("reserved port")]
    ReservedPort,
    /// An address authority at an east-west gateway, which forwards to services only.
    #[error("authority is an address, not a service hostname")]
    AddressAuthority,
}

impl BadConnect {
    /// The metrics label.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            BadConnect::NotConnect => "bad_request_method",
            BadConnect::BadAuthority => "bad_request_authority",
            BadConnect::NotThisWorkload => "bad_request_workload",
            BadConnect::ReservedPort => "reserved_port",
            BadConnect::AddressAuthority => "bad_request_address",
        }
    }
}

/// Why a connection through the proxy was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Plaintext into a workload whose `PeerAuthentication` is STRICT.
    #[error("plaintext refused: PeerAuthentication is STRICT")]
    Strict,
    /// An authorization policy denied it (or no ALLOW matched).
    #[error("denied by policy {policy}")]
    Denied { policy: String },
    /// An abort injected by a `FaultInjection` (named).
    #[error("aborted by the injected fault {fault}")]
    FaultAbort { fault: Arc<str> },
    /// The service's connection rate limit.
    #[error("connection rate limit of {service} reached")]
    RateLimited { service: Arc<str> },
    /// The destination's `DestinationRule` `maxConnections` are open.
    #[error("connection pool of {destination} is full (maxConnections)")]
    PoolFull { destination: Arc<str> },
    /// A service address without a ready endpoint.
    #[error("no ready endpoint for the service {service}")]
    NoEndpoint { service: Arc<str> },
    /// A hostname no service of this gateway's state has (on that port).
    #[error("no service {hostname}")]
    UnknownService { hostname: Arc<str> },
    /// An endpoint on another network whose network names no gateway to reach it by.
    #[error("no east-west gateway for the network {network}")]
    NoGateway { network: Arc<str> },
    /// A workload of another network addressed by its IP: only a service (whose hostname the
    /// gateway resolves) can be reached across networks.
    #[error("{dst} is a workload of the network {network}, reachable only through a service")]
    RemoteAddress { dst: SocketAddr, network: Arc<str> },
    /// A captured outbound connection whose original destination the kernel did not record.
    #[error("no original destination recorded for the captured connection")]
    NoOriginalDst,
    /// Plaintext to one of the daemon's own ports.
    #[error("connection to the reserved port {0}")]
    ReservedPort(u16),
    /// An HBONE request that is not a valid `CONNECT` to this workload.
    #[error("bad HBONE request")]
    BadRequest(#[source] BadConnect),
    /// A limit (the reason names it: `limit_total`, `fd_budget`, ...).
    #[error("connection limit reached ({0})")]
    Limit(&'static str),
    /// Connecting to the application (inbound, same node) or the destination (passthrough).
    #[error("connecting to {dst}")]
    Upstream {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The source workload's certificate is not available.
    #[error("no certificate for {identity}")]
    NoCertificate {
        identity: Identity,
        #[source]
        source: CertError,
    },
    #[error("TLS configuration")]
    TlsConfig(#[source] TlsError),
    /// The HBONE tunnel to the destination's node (connect, TLS, HTTP/2, or its answer).
    #[error("HBONE")]
    Hbone(#[source] HboneError),
    /// The peer went away before it was answered.
    #[error("the peer went away before the answer")]
    PeerGone(#[source] h2::Error),
}

impl Error {
    /// The metrics label (`mesh_connection_errors_total{reason}`).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Strict => "strict_mtls",
            Error::Denied { .. } => "policy_denied",
            Error::NoEndpoint { .. } => "no_endpoint",
            Error::FaultAbort { .. } => "fault_abort",
            Error::RateLimited { .. } => "rate_limit",
            Error::PoolFull { .. } => "pool_limit",
            Error::UnknownService { .. } => "unknown_service",
            Error::NoGateway { .. } => "no_gateway",
            Error::RemoteAddress { .. } => "remote_network_address",
            Error::NoOriginalDst => "no_original_destination",
            Error::ReservedPort(_) => "reserved_port",
            Error::BadRequest(bad) => bad.reason(),
            Error::Limit(reason) => reason,
            Error::Upstream { .. } => "upstream_connect",
            Error::NoCertificate { .. } => "no_certificate",
            Error::TlsConfig(_) => "tls_config",
            Error::Hbone(e) => match e {
                HboneError::Connect { .. } => "hbone_connect",
                // What was wrong with the server's certificate, as for clients on 15008.
                HboneError::Tls { source, .. } => crate::hbone::tls_failure(source),
                HboneError::TlsTimeout { .. } => "hbone_tls_timeout",
                HboneError::H2 { .. } => "hbone_http2",
                HboneError::Status { status, .. } => match *status {
                    StatusCode::UNAUTHORIZED => "hbone_denied",
                    StatusCode::BAD_REQUEST => "hbone_bad_request",
                    _ => "hbone_unavailable",
                },
            },
            Error::PeerGone(_) => "peer_gone",
        }
    }

    /// Istio's (Envoy's) response flag: `DENY` (refused by policy or peer authentication),
    /// `UO` (a limit), `UH` (no healthy endpoint), `NR` (nowhere to send it), `DPE` (a bad
    /// request), `UF` (the upstream connection failed), `DC` (the peer went away).
    #[must_use]
    pub fn flag(&self) -> &'static str {
        match self {
            Error::Strict | Error::Denied { .. } => "DENY",
            Error::Limit(_) | Error::PoolFull { .. } => "UO",
            Error::FaultAbort { .. } => "FI",
            Error::RateLimited { .. } => "RL",
            Error::NoEndpoint { .. } | Error::NoGateway { .. } => "UH",
            Error::NoOriginalDst | Error::UnknownService { .. } | Error::RemoteAddress { .. } => {
                "NR"
            }
            Error::ReservedPort(_) | Error::BadRequest(_) => "DPE",
            Error::Upstream { .. }
            | Error::NoCertificate { .. }
            | Error::TlsConfig(_)
            | Error::Hbone(_) => "UF",
            Error::PeerGone(_) => "DC",
        }
    }

    /// The log line of a connection on `listener` that fails this way.
    #[must_use]
    pub fn message(&self, listener: &str) -> &'static str {
        match self {
            Error::Strict => "plaintext connection refused: PeerAuthentication is STRICT",
            Error::Denied { .. } => "connection denied by policy",
            Error::NoEndpoint { .. } => "no ready endpoint for the service; closing the connection",
            Error::FaultAbort { .. } => "connection aborted by an injected fault",
            Error::RateLimited { .. } => {
                "connection rate limit of the service reached; refusing the connection"
            }
            Error::PoolFull { .. } => {
                "connection pool of the destination is full (maxConnections); refusing the connection"
            }
            Error::NoOriginalDst => {
                "no original destination recorded for a captured connection; closing it"
            }
            Error::UnknownService { .. } => "no service of that hostname (503)",
            Error::NoGateway { .. } => {
                "endpoint on another network without an east-west gateway; closing the connection"
            }
            Error::RemoteAddress { .. } => {
                "workload of another network addressed by IP (only services cross networks); closing the connection"
            }
            Error::ReservedPort(_) => "connection to a reserved port refused",
            Error::BadRequest(_) => "HBONE request rejected (400)",
            Error::Limit(_) => "connection limit reached; refusing the connection",
            Error::Upstream { .. } if listener == "hbone" => "HBONE upstream connect failed (503)",
            Error::Upstream { .. } => "upstream connect failed",
            Error::NoCertificate { .. } if listener == "hbone" => {
                "HBONE connection not served: no certificate for the pod yet"
            }
            Error::NoCertificate { .. } => "no certificate for the source workload",
            Error::TlsConfig(_) => "TLS client configuration",
            Error::Hbone(_) => "HBONE connection failed",
            Error::PeerGone(_) => "client went away before the 200",
        }
    }

    /// Whether the endpoint failed (refused, timed out, answered the HBONE `CONNECT` with 503,
    /// broke the tunnel): outlier detection counts it, and another endpoint may be tried.
    /// Refusals by policy, peer authentication or a limit, and certificate problems are not.
    #[must_use]
    pub fn endpoint_failed(&self) -> bool {
        match self {
            Error::Upstream { .. } | Error::NoGateway { .. } => true,
            Error::Hbone(e) => match e {
                HboneError::Connect { .. }
                | HboneError::TlsTimeout { .. }
                | HboneError::H2 { .. } => true,
                HboneError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
                HboneError::Tls { .. } => false,
            },
            _ => false,
        }
    }

    /// The status an HBONE `CONNECT` that fails this way is answered with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) | Error::ReservedPort(_) => StatusCode::BAD_REQUEST,
            Error::Strict | Error::Denied { .. } => StatusCode::UNAUTHORIZED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What a report says about the connection.
pub(super) struct Context<'a> {
    pub direction: Direction,
    /// The workload of this node on the connection.
    pub workload: &'a str,
    /// The client's address (the application's, outbound; the peer's, inbound).
    pub client: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub peer_identity: Option<&'a Identity>,
}

impl Proxy {
    /// Reports a refused or failed connection, in one place: counted by its reason in
    /// `mesh_connection_errors_total{listener,reason}`, logged (rate-limited per reason), and
    /// its record (when the connection had one) closed with the error's response flag and
    /// reason. Peer authentication and policy refusals are logged by the admission with the
    /// deciding policy, so only counted here.
    pub(super) fn report(
        &self,
        listener: &'static str,
        error: &Error,
        record: Option<ConnRecord>,
        context: &Context<'_>,
    ) {
        let reason = error.reason();
        let suppressed = self.metrics.error(listener, reason);
        if let Some(suppressed) = suppressed
            && !matches!(error, Error::Strict | Error::Denied { .. })
        {
            warn!(
                direction = context.direction.as_str(),
                listener,
                workload = context.workload,
                client = %context.client,
                orig_dst = context.dst.map(|d| d.to_string()).unwrap_or_default(),
                peer_identity = context.peer_identity.map(ToString::to_string).unwrap_or_default(),
                reason,
                error = %crate::error_chain(error),
                suppressed,
                "{}",
                error.message(listener)
            );
        }
        if let Some(record) = record {
            record.fail(error.flag(), &crate::error_chain(error));
        }
    }

    /// Reports what the HBONE server transport refused or ended on its own (TLS, handshakes,
    /// protocol abuse, PING, idle, the stream cap) for the pod `workload`.
    pub(super) fn transport_error(
        &self,
        workload: &str,
        peer: SocketAddr,
        identity: Option<&Identity>,
        error: &ServerError,
    ) {
        let reason = error.reason();
        let Some(suppressed) = self.metrics.error("hbone", reason) else {
            return;
        };
        let identity = identity.map(ToString::to_string).unwrap_or_default();
        let detail = crate::error_chain(error);
        if let ServerError::Idle(timeout) = error {
            info!(direction = "inbound", dst_workload = workload, client = %peer, peer_identity = identity, reason, ?timeout, suppressed, "{error}");
        } else {
            warn!(direction = "inbound", dst_workload = workload, client = %peer, peer_identity = identity, reason, error = detail, suppressed, "{error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_keeps_its_own_label_flag_and_status() {
        let denied = Error::Denied {
            policy: "shop/deny".to_owned(),
        };
        assert_eq!(
            (Error::Strict.reason(), Error::Strict.status()),
            ("strict_mtls", StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            (denied.reason(), denied.flag(), denied.status()),
            ("policy_denied", "DENY", StatusCode::UNAUTHORIZED)
        );
        let limit = Error::Limit("limit_source");
        assert_eq!(
            (limit.reason(), limit.flag(), limit.status()),
            ("limit_source", "UO", StatusCode::SERVICE_UNAVAILABLE)
        );
        let bad = Error::BadRequest(BadConnect::NotThisWorkload);
        assert_eq!(
            (bad.reason(), bad.status()),
            ("bad_request_workload", StatusCode::BAD_REQUEST)
        );
        let upstream = Error::Upstream {
            dst: "198.18.1.2:80".parse().unwrap(),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!(
            (upstream.reason(), upstream.flag(), upstream.status()),
            ("upstream_connect", "UF", StatusCode::SERVICE_UNAVAILABLE)
        );
        let answered = Error::Hbone(HboneError::Status {
            address: "198.18.2.2:15008".parse().unwrap(),
            status: StatusCode::UNAUTHORIZED,
        });
        assert_eq!(answered.reason(), "hbone_denied");
    }
}
