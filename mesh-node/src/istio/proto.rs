//! The messages and gRPC stubs of istiod's CA and delta xDS, compiled from `proto/` by the build
//! script (field names and numbers as in Istio's API).

#![allow(
    clippy::pedantic,
    clippy::doc_markdown,
    clippy::derive_partial_eq_without_eq,
    missing_docs,
    reason = "generated code"
)]

pub mod auth {
    //! `istio.v1.auth`: the certificate service.
    tonic::include_proto!("istio.v1.auth");
}

pub mod discovery {
    //! `envoy.service.discovery.v3`: aggregated discovery, delta form.
    tonic::include_proto!("envoy.service.discovery.v3");
}

pub mod workload {
    //! `istio.workload`: workloads and services.
    tonic::include_proto!("istio.workload");
}

pub mod security {
    //! `istio.security`: L4 authorization policies.
    tonic::include_proto!("istio.security");
}

/// `type_url` of the resource kinds a node proxy subscribes to.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
