//! The istiod stand-in on loopback, driven by a raw tonic client over the daemon's own channel
//! code (`mesh_node::istio::channel`: TLS to `istiod.istio-system.svc`, bearer token, cluster
//! ID), without a daemon: the CA signs only identities of workloads on the token's node and
//! refuses bad tokens, clusters and an unavailable CA; the delta ADS serves what is scripted,
//! pushes deltas, records ACKs and NACKs, and honours `initial_resource_versions` after a
//! restart. The namespaced tests then trust it as istiod.

use std::{
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use mesh_node::{
    config::IstioConfig,
    istio::{
        channel,
        proto::{
            ADDRESS_TYPE, AUTHORIZATION_TYPE,
            auth::{
                IstioCertificateRequest,
                istio_certificate_service_client::IstioCertificateServiceClient,
            },
            discovery::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as RpcStatus,
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
            security::{self, Authorization},
            workload::{Address, address},
        },
    },
};
use mesh_tests::istiod::{CaOutcome, Istiod, IstiodOptions, malformed_any, workload, workload_any};
use prost::Message as _;
use prost_types::{Struct, Value, value::Kind};
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(5);
const NODE_ID: &str = "ztunnel~10.0.0.9~mesh-node-a.istio-system~istio-system.svc.cluster.local";

/// A stand-in on a free loopback port and a directory with its root and a token for node-a.
struct Fixture {
    istiod: Istiod,
    dir: PathBuf,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let options = IstiodOptions {
            max_cert_lifetime: Duration::from_hours(1),
            ..IstiodOptions::default()
        };
        let istiod = Istiod::start(None, "127.0.0.1:0".parse().unwrap(), options)
            .expect("the stand-in starts");
        let dir = std::env::temp_dir().join(format!("mesh-istiod-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        istiod.write_root(&dir.join("root.pem")).unwrap();
        istiod.write_token("node-a", &dir.join("token")).unwrap();
        istiod.set_workload(workload(
            "a1",
            "shop",
            "sa-a1",
            "node-a",
            &["10.0.0.1".parse().unwrap()],
        ));
        istiod.set_workload(workload(
            "b1",
            "shop",
            "sa-b1",
            "node-b",
            &["10.0.1.1".parse().unwrap()],
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Self {
            istiod,
            dir,
            runtime,
        }
    }

    /// The daemon's `istio:` settings for this stand-in, with `token` as the token file.
    fn config(&self, token: &str, cluster: &str) -> IstioConfig {
        IstioConfig {
            enabled: true,
            address: self.istiod.url(),
            root_cert_file: self.dir.join("root.pem"),
            token_file: self.dir.join(token),
            cluster_id: cluster.to_owned(),
            ..IstioConfig::default()
        }
    }

    fn channel(&self, token: &str, cluster: &str) -> channel::IstiodChannel {
        let config = self.config(token, cluster);
        let _guard = self.runtime.enter();
        channel::connect(&config, &config.address).expect("a channel")
    }

    /// `CreateCertificate` for `identity` (if any) with the given token file and cluster.
    fn sign(
        &self,
        token: &str,
        cluster: &str,
        identity: Option<&str>,
        validity_secs: i64,
    ) -> Result<Vec<String>, tonic::Status> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        if let Some(id) = identity {
            params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        }
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let metadata = identity.map(|id| Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.to_owned())),
                },
            )]
            .into_iter()
            .collect(),
        });
        let mut client = IstioCertificateServiceClient::new(self.channel(token, cluster));
        self.runtime.block_on(async {
            tokio::time::timeout(
                WAIT,
                client.create_certificate(IstioCertificateRequest {
                    csr,
                    validity_duration: validity_secs,
                    metadata,
                }),
            )
            .await
            .expect("the CA answers in time")
            .map(|r| r.into_inner().cert_chain)
        })
    }

    /// Opens a delta ADS stream; requests go in through the sender, responses come out of
    /// the receiver (`Err` when the stream ends).
    fn stream(
        &self,
        token: &str,
    ) -> (
        tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
        std_mpsc::Receiver<Result<DeltaDiscoveryResponse, tonic::Status>>,
    ) {
        let (req_tx, req_rx) = tokio::sync::mpsc::channel(16);
        let (resp_tx, resp_rx) = std_mpsc::channel();
        let mut client = AggregatedDiscoveryServiceClient::new(self.channel(token, "Kubernetes"));
        self.runtime.spawn(async move {
            let mut responses = match client
                .delta_aggregated_resources(ReceiverStream::new(req_rx))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    let _ = resp_tx.send(Err(status));
                    return;
                }
            };
            loop {
                match responses.message().await {
                    Ok(Some(r)) => {
                        if resp_tx.send(Ok(r)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = resp_tx.send(Err(tonic::Status::cancelled("stream ended")));
                        return;
                    }
                    Err(status) => {
                        let _ = resp_tx.send(Err(status));
                        return;
                    }
                }
            }
        });
        (req_tx, resp_rx)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

#[test]
fn ca_signs_only_identities_of_workloads_on_the_tokens_node() {
    let mut f = Fixture::new("ca");

    // An identity of a workload on node-a: signed, lifetime capped at an hour, chained to
    // the root, the identity as the only SAN whatever the CSR asked.
    let chain = f
        .sign("token", "Kubernetes", Some(&spiffe("sa-a1")), 2 * 3600)
        .expect("signed");
    assert_eq!(chain.len(), 2, "leaf and root: {chain:?}");
    assert_eq!(chain[1], f.istiod.root_pem());
    let leaf_der = der(&chain[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let root_der = &f.istiod.roots_der()[0];
    let (_, root) = x509_parser::parse_x509_certificate(root_der).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("signed by the root");
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(sans, [format!("URI({})", spiffe("sa-a1"))]);
    let validity = leaf.validity();
    let secs = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert!(
        (3600..=3600 + 120).contains(&secs),
        "capped lifetime: {secs}s"
    );
    let record = f.istiod.ca_records().pop().unwrap();
    assert_eq!(record.node.as_deref(), Some("node-a"));
    assert_eq!(record.identity.as_deref(), Some(spiffe("sa-a1").as_str()));
    assert!(
        matches!(record.outcome, CaOutcome::Issued { lifetime, .. } if lifetime == Duration::from_hours(1))
    );

    // A shorter request is granted as asked.
    f.sign("token", "Kubernetes", Some(&spiffe("sa-a1")), 600)
        .unwrap();
    assert!(matches!(f.istiod.ca_records().pop().unwrap().outcome,
        CaOutcome::Issued { lifetime, .. } if lifetime == Duration::from_mins(10)));

    // A workload on another node, an unknown identity, none at all: refused.
    for identity in [Some(spiffe("sa-b1")), Some(spiffe("nobody")), None] {
        let err = f
            .sign("token", "Kubernetes", identity.as_deref(), 600)
            .expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{identity:?}: {err}"
        );
        assert_eq!(
            f.istiod.ca_records().pop().unwrap().outcome,
            CaOutcome::PermissionDenied
        );
    }

    // A token the stand-in did not issue, another cluster.
    write(&f.dir.join("forged"), "not-a-token");
    let err = f
        .sign("forged", "Kubernetes", Some(&spiffe("sa-a1")), 600)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert_eq!(
        f.istiod.ca_records().pop().unwrap().outcome,
        CaOutcome::BadToken
    );
    let err = f
        .sign("token", "other", Some(&spiffe("sa-a1")), 600)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert_eq!(
        f.istiod.ca_records().pop().unwrap().outcome,
        CaOutcome::WrongCluster
    );

    // A token for node-b may have b1's identity.
    f.istiod
        .write_token("node-b", &f.dir.join("token-b"))
        .unwrap();
    f.sign("token-b", "Kubernetes", Some(&spiffe("sa-b1")), 600)
        .expect("b1 on node-b");

    // The CA down, then back.
    f.istiod.set_ca_available(false);
    let err = f
        .sign("token", "Kubernetes", Some(&spiffe("sa-a1")), 600)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert_eq!(
        f.istiod.ca_records().pop().unwrap().outcome,
        CaOutcome::Unavailable
    );
    f.istiod.set_ca_available(true);

    // A new root signs from now on; both are available; the old serving certificate still
    // works until a restart, after which only a client with the new root connects.
    let old_root = f.istiod.root_pem();
    f.istiod.rotate_root().unwrap();
    let chain = f
        .sign("token", "Kubernetes", Some(&spiffe("sa-a1")), 600)
        .unwrap();
    assert_eq!(chain[1], f.istiod.root_pem());
    assert_ne!(chain[1], old_root);
    assert_eq!(
        f.istiod.roots_pem(),
        [old_root.clone(), f.istiod.root_pem()]
    );
    f.istiod.restart().unwrap();
    let err = f
        .sign("token", "Kubernetes", Some(&spiffe("sa-a1")), 600)
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "old root only: {err}");
    f.istiod.write_roots(&f.dir.join("root.pem")).unwrap();
    assert_eq!(
        std::fs::read_to_string(f.dir.join("root.pem")).unwrap(),
        f.istiod.roots_pem().concat()
    );
    f.sign("token", "Kubernetes", Some(&spiffe("sa-a1")), 600)
        .expect("with both roots");

    let issued = f.istiod.ca_records().iter().filter(|r| r.issued()).count();
    assert_eq!(issued, 5, "{:#?}", f.istiod.ca_records());
}

/// The DER of a PEM certificate.
fn der(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .expect("PEM")
        .1
        .contents
}

fn subscribe(type_url: &str, initial: &[(String, String)]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: NODE_ID.to_owned(),
            cluster: "Kubernetes".to_owned(),
            metadata: Some(Struct {
                fields: [(
                    "NODE_NAME".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue("node-a".to_owned())),
                    },
                )]
                .into_iter()
                .collect(),
            }),
        }),
        type_url: type_url.to_owned(),
        initial_resource_versions: initial.iter().cloned().collect(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn answer(response: &DeltaDiscoveryResponse, error: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail: error.map(|e| RpcStatus {
            code: 3,
            message: e.to_owned(),
            details: Vec::new(),
        }),
        ..DeltaDiscoveryRequest::default()
    }
}

fn next(
    rx: &std_mpsc::Receiver<Result<DeltaDiscoveryResponse, tonic::Status>>,
) -> DeltaDiscoveryResponse {
    rx.recv_timeout(WAIT)
        .expect("a response in time")
        .expect("the stream is up")
}

fn names(response: &DeltaDiscoveryResponse) -> Vec<&str> {
    response.resources.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn ads_serves_pushes_and_records_answers() {
    let f = Fixture::new("ads");
    f.istiod.set_authorization(&Authorization {
        name: "deny-a1".to_owned(),
        namespace: "shop".to_owned(),
        scope: security::Scope::Namespace.into(),
        action: security::Action::Deny.into(),
        ..Authorization::default()
    });
    let a1 = "Kubernetes//Pod/shop/a1";
    let b1 = "Kubernetes//Pod/shop/b1";

    // A bad token: the stream is refused.
    write(&f.dir.join("forged"), "not-a-token");
    let (_tx, rx) = f.stream("forged");
    let status = rx.recv_timeout(WAIT).unwrap().expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    assert_eq!(f.istiod.rejected_streams(), 1);

    // Subscriptions get everything of their type; the stream's node is recorded.
    let (tx, rx) = f.stream("token");
    tx.blocking_send(subscribe(ADDRESS_TYPE, &[])).unwrap();
    let addresses = next(&rx);
    assert_eq!(addresses.type_url, ADDRESS_TYPE);
    assert_eq!(names(&addresses), [a1, b1]);
    let decoded = Address::decode(
        addresses.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap();
    assert!(matches!(decoded.r#type, Some(address::Type::Workload(w)) if w.name == "a1"));
    tx.blocking_send(answer(&addresses, None)).unwrap();
    tx.blocking_send(subscribe(AUTHORIZATION_TYPE, &[]))
        .unwrap();
    let policies = next(&rx);
    assert_eq!(names(&policies), ["shop/deny-a1"]);
    tx.blocking_send(answer(&policies, None)).unwrap();
    let acks = f.istiod.wait_ack(ADDRESS_TYPE, WAIT).unwrap();
    assert_eq!(acks[0].nonce, addresses.nonce);
    f.istiod.wait_ack(AUTHORIZATION_TYPE, WAIT).unwrap();
    let streams = f.istiod.wait_streams(1, WAIT).unwrap();
    assert_eq!(streams[0].node_id, NODE_ID);
    assert_eq!(streams[0].token_node, "node-a");
    assert!(
        streams[0]
            .metadata
            .as_ref()
            .unwrap()
            .fields
            .contains_key("NODE_NAME")
    );
    assert_eq!(streams[0].subscribed, [ADDRESS_TYPE, AUTHORIZATION_TYPE]);

    // A change is pushed as a delta with a fresh nonce.
    f.istiod
        .set_workload(workload("c1", "shop", "sa-c1", "node-a", &[]));
    let push = next(&rx);
    assert_eq!(names(&push), ["Kubernetes//Pod/shop/c1"]);
    assert!(push.removed_resources.is_empty());
    assert_ne!(push.nonce, addresses.nonce);
    tx.blocking_send(answer(&push, None)).unwrap();
    f.istiod.wait_ack(ADDRESS_TYPE, WAIT).unwrap();
    f.istiod.remove_resource(ADDRESS_TYPE, a1);
    let push = next(&rx);
    assert!(push.resources.is_empty());
    assert_eq!(push.removed_resources, [a1]);
    tx.blocking_send(answer(&push, None)).unwrap();
    f.istiod.wait_ack(ADDRESS_TYPE, WAIT).unwrap();

    // A malformed resource: the client's NACK is recorded, with its message.
    f.istiod
        .set_resource(ADDRESS_TYPE, "junk", malformed_any(ADDRESS_TYPE));
    let push = next(&rx);
    assert_eq!(names(&push), ["junk"]);
    assert!(
        Address::decode(
            push.resources[0]
                .resource
                .as_ref()
                .unwrap()
                .value
                .as_slice()
        )
        .is_err()
    );
    tx.blocking_send(answer(&push, Some("junk does not decode")))
        .unwrap();
    let nack = f.istiod.wait_nack(ADDRESS_TYPE, WAIT).unwrap();
    assert_eq!(
        (nack.nonce.as_str(), nack.error.as_deref()),
        (push.nonce.as_str(), Some("junk does not decode"))
    );
    assert!(
        f.istiod.wait_ack(ADDRESS_TYPE, WAIT).is_err(),
        "a NACK is not an ACK"
    );
    f.istiod.remove_resource(ADDRESS_TYPE, "junk");
    let push = next(&rx);
    assert_eq!(push.removed_resources, ["junk"]);
    tx.blocking_send(answer(&push, None)).unwrap();
    f.istiod.wait_ack(ADDRESS_TYPE, WAIT).unwrap();

    drop(tx);
    let acks = f.istiod.acks();
    assert_eq!(acks.iter().filter(|a| a.is_nack()).count(), 1, "{acks:#?}");
}

#[test]
fn ads_after_a_restart_sends_only_what_the_client_lacks() {
    let mut f = Fixture::new("restart");
    let (tx, rx) = f.stream("token");
    tx.blocking_send(subscribe(ADDRESS_TYPE, &[])).unwrap();
    let addresses = next(&rx);
    tx.blocking_send(answer(&addresses, None)).unwrap();
    f.istiod.wait_ack(ADDRESS_TYPE, WAIT).unwrap();

    // A restart cuts the stream; the client comes back with the versions it holds (a1 and
    // b1 as sent, and one since gone) and gets only what changed meanwhile (a1 changed, c1
    // new: not b1).
    let mut versions: Vec<(String, String)> = addresses
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(versions.len(), 2);
    versions.push(("Kubernetes//Pod/shop/gone".to_owned(), "v1".to_owned()));
    f.istiod.restart().unwrap();
    let ended = rx.recv_timeout(WAIT).expect("the stream ends");
    assert!(ended.is_err(), "{ended:?}");
    f.istiod.set_resources(
        ADDRESS_TYPE,
        ["a1", "c1"].map(|name| {
            let w = workload(name, "shop", &format!("sa-{name}"), "node-a", &[]);
            (w.uid.clone(), workload_any(w))
        }),
    );
    let (tx, rx) = f.stream("token");
    tx.blocking_send(subscribe(ADDRESS_TYPE, &versions))
        .unwrap();
    let resync = next(&rx);
    assert_eq!(
        names(&resync),
        ["Kubernetes//Pod/shop/a1", "Kubernetes//Pod/shop/c1"]
    );
    assert_eq!(resync.removed_resources, ["Kubernetes//Pod/shop/gone"]);
    tx.blocking_send(answer(&resync, None)).unwrap();
    f.istiod.wait_ack(ADDRESS_TYPE, WAIT).unwrap();
    let streams = f.istiod.streams();
    assert_eq!(streams.len(), 2, "{streams:#?}");
    assert!(!streams[0].open && streams[1].open);
    assert_eq!(streams[1].initial_versions[ADDRESS_TYPE].len(), 3);
}
