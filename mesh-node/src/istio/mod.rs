//! Istio's control plane as mesh-node's source of certificates and state (the `istio:` mode):
//! workload certificates from istiod's CA (`IstioCertificateService/CreateCertificate`) and the
//! mesh's workloads, services and authorization policies from istiod's delta xDS
//! (`istio.workload.Address`, `istio.security.Authorization`), as ztunnel gets them. With it,
//! mesh-node replaces ztunnel in an Istio ambient install.

pub mod ca;
pub mod channel;
pub mod convert;
pub mod netns;
pub mod proto;
pub mod xds;
