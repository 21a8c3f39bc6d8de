//! The gRPC channel to istiod: TLS with istiod's certificate verified against the mesh's roots
//! for istiod's name, and on every request the projected service-account token as the bearer
//! token (re-read each time: the kubelet rotates it) and the cluster ID.

use std::path::{Path, PathBuf};

use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::config::IstioConfig;

/// How long connecting to istiod may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading istiod's root certificates {path}")]
    Roots {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoRoots { path: PathBuf },
    #[error("istiod address {address}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A channel to istiod whose requests carry the token and the cluster ID.
pub type IstiodChannel = InterceptedService<Channel, Auth>;

/// Adds `authorization: Bearer <token>` and `clusterid: <id>` to every request.
#[derive(Clone, Debug)]
pub struct Auth {
    token_file: PathBuf,
    cluster_id: MetadataValue<tonic::metadata::Ascii>,
}

impl Auth {
    #[must_use]
    pub fn new(token_file: &Path, cluster_id: &str) -> Self {
        Self {
            token_file: token_file.to_owned(),
            cluster_id: cluster_id
                .parse()
                .unwrap_or_else(|_| MetadataValue::from_static("Kubernetes")),
        }
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // A few hundred bytes from a tmpfs: read on the calling task.
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            Status::unauthenticated(format!(
                "reading the token {}: {e}",
                self.token_file.display()
            ))
        })?;
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Status::unauthenticated("the token is not a valid header value"))?;
        let metadata = request.metadata_mut();
        metadata.insert("authorization", bearer);
        metadata.insert("clusterid", self.cluster_id.clone());
        Ok(request)
    }
}

/// A channel to `address` (`https://host:port`), connected on first use, with the roots read
/// now from the configured file (so a reconnect after a root change uses the new ones).
pub fn connect(config: &IstioConfig, address: &str) -> Result<IstiodChannel, ChannelError> {
    let path = &config.root_cert_file;
    let pem = std::fs::read(path).map_err(|source| ChannelError::Roots {
        path: path.clone(),
        source,
    })?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(ChannelError::NoRoots { path: path.clone() });
    }
    let address_err = |source| ChannelError::Address {
        address: address.to_owned(),
        source,
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .domain_name(config.istiod_san());
    let channel = Endpoint::from_shared(address.to_owned())
        .map_err(address_err)?
        .tls_config(tls)
        .map_err(address_err)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect_lazy();
    Ok(InterceptedService::new(
        channel,
        Auth::new(&config.token_file, &config.cluster_id),
    ))
}
