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
        self.proxy.publish(&self.ctx);
    }
}

impl Drop for PodServing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.proxy.withdraw(&self.ctx);
    }
}

impl Proxy {
    /// Makes a served workload known to the rest of the proxy, in place of a previous one
    /// of the same name.
    pub(super) fn publish(&self, ctx: &Arc<PodContext>) {
        self.directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .local
            .insert(ctx.workload.uid(), Arc::clone(ctx));
    }

    /// Forgets a served workload (unless a newer one of the same name replaced it) and
    /// releases its certificate.
    pub(super) fn withdraw(&self, ctx: &Arc<PodContext>) {
        let mut directory = self
            .directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let uid = ctx.workload.uid();
        // A newer enrollment of the same workload (a replacement) may already be served.
        if directory
            .local
            .get(&uid)
            .is_some_and(|served| Arc::ptr_eq(served, ctx))
        {
            directory.local.remove(&uid);
        }
        drop(directory);
        self.mesh.certs.release(&ctx.identity);
    }
}

pub(super) fn tokio_listener(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
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
            serving.tasks.push(tokio::spawn(self.hbone_accept_loop(
                listener,
                TlsAcceptor::from(Arc::clone(&server)),
                Arc::clone(&settings),
                Arc::clone(&ctx),
                Arc::clone(&handler),
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

    /// Accepts HBONE connections for `ctx` (a pod, or this gateway) on `listener` until
    /// aborted: each is counted against the limits, waits (within the handshake deadline) for
    /// `ctx`'s certificate, and is served with `handler` handling its streams.
    pub(super) fn hbone_accept_loop<H: hbone::Handler>(
        self: &Arc<Self>,
        listener: Arc<TcpListener>,
        acceptor: TlsAcceptor,
        settings: Arc<hbone::ServerSettings>,
        ctx: Arc<PodContext>,
        handler: Arc<H>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (this, pod) = (Arc::clone(self), Arc::clone(&ctx));
        self.accept_loop(
            listener,
            Unit::HboneConnection,
            ctx,
            move |tcp, peer, active| {
                let (acceptor, handler) = (acceptor.clone(), Arc::clone(&handler));
                let (settings, this) = (Arc::clone(&settings), Arc::clone(&this));
                let pod = Arc::clone(&pod);
                tokio::spawn(async move {
                    // The first certificate may still be on its way from the CA (a peer can
                    // connect as soon as the listener is bound): the handshake waits for it,
                    // within its deadline, rather than fail.
                    let identity = pod.identity.clone();
                    let certificate = this.mesh.certs.get(&identity);
                    let waited = settings.handshake_timeout;
                    let source = match tokio::time::timeout(waited, certificate).await {
                        Ok(Ok(_)) => {
                            hbone::serve_connection(acceptor, tcp, peer, &settings, handler).await;
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
        )
    }

    /// How the pods' HBONE servers bound their connections.
    pub(super) fn hbone_settings(&self) -> hbone::ServerSettings {
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
