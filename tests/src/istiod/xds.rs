//! The stand-in's delta ADS: per stream, what was sent of each type (name → version), so that
//! the first request for a type gets every resource not already at the client's version
//! (`initial_resource_versions`), and every scripted change gets the difference (changed
//! resources, `removed_resources`) with a fresh nonce. ACKs and NACKs are recorded, never
//! acted on (istiod does not resend after a NACK either).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
};

use mesh_node::istio::proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{Shared, State, ca::authenticate};

/// One ADS stream, as the tests see it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamInfo {
    /// In order of opening, from 1.
    pub id: u64,
    /// The node of the stream's token.
    pub token_node: String,
    /// `node.id` of the first request (empty until it arrives).
    pub node_id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.metadata`.
    pub metadata: Option<prost_types::Struct>,
    /// Type URLs subscribed to, in order.
    pub subscribed: Vec<String>,
    /// `initial_resource_versions` of each type's first request.
    pub initial_versions: BTreeMap<String, HashMap<String, String>>,
    /// Responses sent.
    pub responses: u64,
    /// Still connected.
    pub open: bool,
}

/// A client's answer to a response: an ACK, or a NACK with its error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub stream: u64,
    pub type_url: String,
    pub nonce: String,
    /// `error_detail.message` of a NACK.
    pub error: Option<String>,
}

impl Ack {
    #[must_use]
    pub fn is_nack(&self) -> bool {
        self.error.is_some()
    }
}

/// One stream's bookkeeping.
pub(super) struct StreamState {
    pub(super) info: StreamInfo,
    subscribed: BTreeSet<String>,
    /// Type → name → version the client was last sent.
    sent: HashMap<String, HashMap<String, String>>,
    /// Type → nonce of the last response sent.
    last_nonce: HashMap<String, String>,
}

/// For each open stream subscribed to `type_url`: its answer to the last response of that type
/// (`None` while unanswered). `None` when no open stream is subscribed.
pub(super) fn latest_answers(state: &State, type_url: &str) -> Option<Vec<Option<Ack>>> {
    let answers: Vec<_> = state
        .streams
        .values()
        .filter(|s| s.info.open && s.subscribed.contains(type_url))
        .map(|s| {
            let nonce = s.last_nonce.get(type_url)?;
            state
                .acks
                .iter()
                .rev()
                .find(|a| a.stream == s.info.id && a.type_url == type_url && &a.nonce == nonce)
                .cloned()
        })
        .collect();
    (!answers.is_empty()).then_some(answers)
}

/// The response that brings stream `id` up to date on `type_url`, if anything changed (or
/// always, with `force`: a subscription is answered even when there is nothing to send).
fn delta(
    state: &mut State,
    id: u64,
    type_url: &str,
    force: bool,
) -> Option<DeltaDiscoveryResponse> {
    let current = state.resources.get(type_url);
    let stream = state.streams.get_mut(&id)?;
    let sent = stream.sent.entry(type_url.to_owned()).or_default();
    let mut resources = Vec::new();
    for (name, stored) in current.into_iter().flatten() {
        if sent.get(name) != Some(&stored.version) {
            resources.push(Resource {
                version: stored.version.clone(),
                resource: Some(stored.any.clone()),
                name: name.clone(),
                ..Resource::default()
            });
            sent.insert(name.clone(), stored.version.clone());
        }
    }
    let mut removed_resources: Vec<String> = sent
        .keys()
        .filter(|name| current.is_none_or(|c| !c.contains_key(*name)))
        .cloned()
        .collect();
    removed_resources.sort();
    for name in &removed_resources {
        sent.remove(name);
    }
    if resources.is_empty() && removed_resources.is_empty() && !force {
        return None;
    }
    state.nonce += 1;
    let nonce = format!("n{}", state.nonce);
    let stream = state.streams.get_mut(&id)?;
    stream.last_nonce.insert(type_url.to_owned(), nonce.clone());
    stream.info.responses += 1;
    Some(DeltaDiscoveryResponse {
        system_version_info: format!("v{}", state.version),
        resources,
        type_url: type_url.to_owned(),
        nonce,
        removed_resources,
    })
}

/// `AggregatedDiscoveryService`.
pub(super) struct AdsService(pub(super) Arc<Shared>);

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let shared = Arc::clone(&self.0);
        let node = match authenticate(&shared, request.metadata()) {
            Ok(node) => node,
            Err((_, status)) => {
                shared.update(|s| s.rejected_streams += 1);
                return Err(status);
            }
        };
        let id = shared.update(|s| {
            s.next_stream += 1;
            let id = s.next_stream;
            s.streams.insert(
                id,
                StreamState {
                    info: StreamInfo {
                        id,
                        token_node: node,
                        open: true,
                        ..StreamInfo::default()
                    },
                    subscribed: BTreeSet::new(),
                    sent: HashMap::new(),
                    last_nonce: HashMap::new(),
                },
            );
            id
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(serve_stream(shared, id, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Marks a stream closed however its task ends (also when the runtime is shut down).
struct Closed(Arc<Shared>, u64);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.update(|s| {
            if let Some(st) = s.streams.get_mut(&self.1) {
                st.info.open = false;
            }
        });
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    id: u64,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let _closed = Closed(Arc::clone(&shared), id);
    let mut pushes = shared.pushes.subscribe();
    loop {
        let responses = tokio::select! {
            request = requests.message() => match request {
                Ok(Some(request)) => shared.update(|s| on_request(s, id, request)),
                // The client went away, or the stream broke.
                Ok(None) | Err(_) => return,
            },
            changed = pushes.changed() => {
                if changed.is_err() {
                    return;
                }
                shared.update(|s| {
                    let types: Vec<String> = s
                        .streams
                        .get(&id)
                        .map(|st| st.subscribed.iter().cloned().collect())
                        .unwrap_or_default();
                    types.iter().filter_map(|t| delta(s, id, t, false)).collect()
                })
            }
            () = tx.closed() => return,
        };
        for response in responses {
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }
}

/// Records a request; returns the responses it calls for.
fn on_request(
    state: &mut State,
    id: u64,
    request: DeltaDiscoveryRequest,
) -> Vec<DeltaDiscoveryResponse> {
    let Some(stream) = state.streams.get_mut(&id) else {
        return Vec::new();
    };
    if let Some(node) = request.node
        && stream.info.node_id.is_empty()
    {
        stream.info.node_id = node.id;
        stream.info.cluster = node.cluster;
        stream.info.metadata = node.metadata;
    }
    let type_url = request.type_url;
    if !request.response_nonce.is_empty() {
        state.acks.push(Ack {
            stream: id,
            type_url,
            nonce: request.response_nonce,
            error: request.error_detail.map(|e| e.message),
        });
        return Vec::new();
    }
    // A subscription (the first request for a type, or again after a reconnect of the same
    // stream, which resends everything not at the client's versions).
    if stream.subscribed.insert(type_url.clone()) {
        stream.info.subscribed.push(type_url.clone());
    }
    stream
        .info
        .initial_versions
        .entry(type_url.clone())
        .or_insert_with(|| request.initial_resource_versions.clone());
    stream
        .sent
        .insert(type_url.clone(), request.initial_resource_versions);
    delta(state, id, &type_url, true).into_iter().collect()
}
