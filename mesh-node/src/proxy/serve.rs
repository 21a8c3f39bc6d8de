//! Serving one pod: its listeners (outbound 15001, inbound plaintext 15006, HBONE 15008), each
//! with an accept loop that counts every connection against the limits before anything else,
//! and hands it to its path.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use super::{
    Active, OriginalDst, PodContext, Proxy, SocketFactory, Unit, accept,
    error::{Context, Error},
    forward,
    inbound::HboneHandler,
};
use crate::{hbone, identity::CertError, metrics::Direction, tls, workload::Workload};

/// A pod ready to be served: its listeners (bound, listening) and its seams.
pub struct PodListeners {
    pub workload: Arc<Workload>,
    pub sockets: Arc<dyn SocketFactory>,
    pub orig_dst: Arc<dyn OriginalDst>,
    /// Where the pod's outbound connections are captured to (15001).
    pub outbound: Vec<std::net::TcpListener>,
    /// Where plaintext into the pod is captured to (15006).
    pub inbound: std::net::TcpListener,
    /// `<pod IP>:15008` for each of its addresses.
    pub hbone: Vec<std::net::TcpListener>,
}

/// The accept loops serving one pod; dropping it stops them, closes the listeners and releases
/// the pod's certificate.
pub struct PodServing {
    tasks: Vec<JoinHandle<()>>,
    proxy: Arc<Proxy>,
    ctx: Arc<PodContext>,
    /// The inbound capture listener (also held by its accept loop), for the kernel's map.
    inbound: Arc<TcpListener>,
}

impl PodServing {
    /// The inbound capture listener, to be (re)installed as the netns's capture socket.
    #[must_use]
    pub fn inbound_listener(&self) -> &TcpListener {
        &self.inbound
    }

    /// Makes the pod known to the rest of the proxy (the same-node path, policy re-checks), in
    /// place of a previous enrollment of the same workload. Done once its kernel state is in
    /// place.
    pub fn publish(&self) {
        self.proxy
            .directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .local
            .insert(self.ctx.workload.uid(), Arc::clone(&self.ctx));
    }
}

impl Drop for PodServing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let mut directory = self
            .proxy
            .directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let uid = self.ctx.workload.uid();
        // A newer enrollment of the same workload (a replacement) may already be served.
        if directory
            .local
            .get(&uid)
            .is_some_and(|ctx| Arc::ptr_eq(ctx, &self.ctx))
        {
            directory.local.remove(&uid);
        }
        drop(directory);
        self.proxy.mesh.certs.release(&self.ctx.identity);
    }
}

fn tokio_listener(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

impl Proxy {
    /// Starts serving a pod: its certificate (prefetched now), its accept loops. The pod is
    /// known to the rest of the proxy once [`PodServing::publish`] is called.
    pub fn serve(self: &Arc<Self>, pod: PodListeners) -> std::io::Result<PodServing> {
        let identity = self.mesh.identity(&pod.workload);
        self.mesh.certs.acquire(&identity);
        let ctx = Arc::new(PodContext {
            workload: pod.workload,
            identity: identity.clone(),
            sockets: pod.sockets,
            orig_dst: pod.orig_dst,
            active: Arc::default(),
        });
        let server = tls::server_config(
            &self.mesh.provider,
            &self.mesh.certs,
            &identity,
            &self.mesh.accepted_domains,
        )
        .map_err(std::io::Error::other)?;
        let inbound = Arc::new(tokio_listener(pod.inbound)?);
        let mut serving = PodServing {
            tasks: Vec::new(),
            proxy: Arc::clone(self),
            ctx: Arc::clone(&ctx),
            inbound: Arc::clone(&inbound),
        };
        let handler = Arc::new(HboneHandler {
            pod: Arc::clone(&ctx),
            proxy: Arc::clone(self),
        });
        let settings = Arc::new(self.hbone_settings());
        for listener in pod.hbone {
            let listener = Arc::new(tokio_listener(listener)?);
            let acceptor = TlsAcceptor::from(Arc::clone(&server));
            let (handler, settings) = (Arc::clone(&handler), Arc::clone(&settings));
            let (this, pod_ctx) = (Arc::clone(self), Arc::clone(&ctx));
            let identity = identity.clone();
            serving.tasks.push(tokio::spawn(self.accept_loop(
                listener,
                Unit::HboneConnection,
                Arc::clone(&ctx),
                move |tcp, peer, active| {
                    let (acceptor, handler) = (acceptor.clone(), Arc::clone(&handler));
                    let (settings, this) = (Arc::clone(&settings), Arc::clone(&this));
                    let (identity, pod) = (identity.clone(), Arc::clone(&pod_ctx));
                    tokio::spawn(async move {
                        // The pod's first certificate may still be on its way from the CA (a
                        // peer can connect as soon as the listener is bound): the handshake
                        // waits for it, within its deadline, rather than fail.
                        let certificate = this.mesh.certs.get(&identity);
                        let waited = settings.handshake_timeout;
                        let source = match tokio::time::timeout(waited, certificate).await {
                            Ok(Ok(_)) => {
                                hbone::serve_connection(acceptor, tcp, peer, &settings, handler)
                                    .await;
                                drop(active);
                                return;
                            }
                            Ok(Err(source)) => source,
                            Err(_) => CertError::Pending {
                                identity: identity.to_string(),
                                waited,
                            },
                        };
                        let uid = pod.workload.uid();
                        let context = Context {
                            direction: Direction::Inbound,
                            workload: &uid,
                            client: peer,
                            dst: None,
                            peer_identity: None,
                        };
                        let error = Error::NoCertificate { identity, source };
                        this.report("hbone", &error, None, &context);
                        drop(active);
                    });
                },
            )));
        }
        for listener in pod.outbound {
            let listener = Arc::new(tokio_listener(listener)?);
            let (this, outbound_ctx) = (Arc::clone(self), Arc::clone(&ctx));
            serving.tasks.push(tokio::spawn(self.accept_loop(
                listener,
                Unit::Outbound,
                Arc::clone(&ctx),
                move |tcp, peer, active| {
                    let (this, ctx) = (Arc::clone(&this), Arc::clone(&outbound_ctx));
                    tokio::spawn(async move {
                        this.outbound(&ctx, tcp, peer, active).await;
                    });
                },
            )));
        }
        let (this, inbound_ctx) = (Arc::clone(self), Arc::clone(&ctx));
        serving.tasks.push(tokio::spawn(self.accept_loop(
            inbound,
            Unit::Inbound,
            Arc::clone(&ctx),
            move |tcp, peer, active| {
                let (this, ctx) = (Arc::clone(&this), Arc::clone(&inbound_ctx));
                tokio::spawn(async move {
                    this.plaintext(&ctx, tcp, peer).await;
                    drop(active);
                });
            },
        )));
        Ok(serving)
    }

    /// How the pods' HBONE servers bound their connections.
    fn hbone_settings(&self) -> hbone::ServerSettings {
        hbone::ServerSettings {
            handshake_timeout: self.handshake_timeout,
            liveness: self.liveness,
            draining: self.draining(),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// Accepts connections until aborted: each is counted against the limits as a `unit` of
    /// `pod` (refused with a reset beyond them), gets TCP keepalive, and is handed to `handle`
    /// with what counts it. Accept errors never end the loop (see [`accept`]).
    fn accept_loop(
        self: &Arc<Self>,
        listener: Arc<TcpListener>,
        unit: Unit,
        pod: Arc<PodContext>,
        handle: impl Fn(tokio::net::TcpStream, SocketAddr, Active) + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = Arc::clone(self);
        async move {
            loop {
                let (stream, peer) = accept(&listener, unit.listener(), Some(&this.metrics)).await;
                // Outbound connections come from the pod itself: only connections into it
                // count against their source.
                let source = (unit != Unit::Outbound).then(|| forward::unmap(peer).ip());
                let Some(active) = this.track(unit, &pod, source) else {
                    forward::reset(stream);
                    continue;
                };
                if let Err(e) = this.liveness.apply(&stream) {
                    warn!(listener = unit.listener(), error = %e, "setting TCP keepalive failed");
                }
                handle(stream, peer, active);
            }
        }
    }
}
