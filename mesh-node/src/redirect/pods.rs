//! Enrolling a pod: its listeners inside its netns, its addresses and netns cookie in the
//! kernel maps, and `sk_lookup` on its netns; and undoing all of it.
//!
//! Order matters. Enrolling creates the listeners first and turns on outbound capture last, so
//! no connection is steered to a listener that does not exist yet; unenrolling stops capture
//! first and closes the listeners last.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use mesh_common::NetnsInfo;
use tracing::warn;

use super::{Attachment, NetnsWorker, Programs, RedirectError, netns::marked_listener};
use crate::state::Workload;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("workload {uid} has no `netns`")]
    NoNetns { uid: String },
    #[error("workload {uid}: entering its netns")]
    Netns {
        uid: String,
        #[source]
        source: std::io::Error,
    },
    #[error("workload {uid}: listener {addr}")]
    Listen {
        uid: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("workload {uid}")]
    Redirect {
        uid: String,
        #[source]
        source: Box<RedirectError>,
    },
}

/// An enrolled pod's sockets and namespace thread, ready for the proxy.
#[derive(Debug)]
pub struct EnrolledPod {
    pub workload: Arc<Workload>,
    pub worker: Arc<NetnsWorker>,
    /// `127.0.0.1:15001` and, when the netns has IPv6, `[::1]:15001`.
    pub outbound: Vec<std::net::TcpListener>,
    /// `[::]:15006` (dual-stack), or `0.0.0.0:15006` without IPv6.
    pub inbound: std::net::TcpListener,
    /// `<pod IP>:15008` for each pod address (HBONE).
    pub hbone: Vec<std::net::TcpListener>,
    /// Whether the `sk_lookup` link was adopted from a previous daemon.
    pub attachment: Attachment,
}

/// Ports the daemon listens on in every enrolled pod.
#[derive(Clone, Copy, Debug)]
pub struct PodPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub hbone: u16,
}

/// Enrolls `workload`: see the module docs for the order of steps. On failure, whatever was
/// done is undone.
pub fn enroll(
    programs: &mut Programs,
    workload: Arc<Workload>,
    id: u32,
    mark: u32,
    ports: PodPorts,
) -> Result<EnrolledPod, PodError> {
    let uid = workload.uid();
    let path = workload
        .netns
        .clone()
        .ok_or_else(|| PodError::NoNetns { uid: uid.clone() })?;
    let worker = NetnsWorker::start(&path).map_err(|source| PodError::Netns {
        uid: uid.clone(),
        source,
    })?;
    match worker.run_blocking(super::netns::enable_request_migration) {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => {
            warn!(workload = %uid, error = %e, "cannot enable tcp_migrate_req; an upgrade may reset queued connections");
        }
    }
    let (outbound, inbound) = open_listeners(&worker, &uid, mark, ports)?;
    let hbone = workload
        .ips
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(*ip, ports.hbone);
            worker
                .run_blocking(move || marked_listener(addr, mark, false))
                .and_then(|r| r)
                .map(std::net::TcpListener::from)
                .map_err(|source| PodError::Listen {
                    uid: uid.clone(),
                    addr,
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cookie = worker.cookie();
    let redirect_err = |source| PodError::Redirect {
        uid: uid.clone(),
        source: Box::new(source),
    };
    let result = (|| {
        for ip in &workload.ips {
            programs.set_inbound_listener(*ip, &inbound)?;
            programs.add_pod_addr(*ip, cookie)?;
        }
        let attachment = programs.attach_netns(&path, cookie)?;
        programs.enroll_netns(
            cookie,
            NetnsInfo {
                workload_id: id,
                flags: 0,
            },
        )?;
        Ok(attachment)
    })();
    match result {
        Ok(attachment) => Ok(EnrolledPod {
            workload,
            worker: Arc::new(worker),
            outbound,
            inbound,
            hbone,
            attachment,
        }),
        Err(e) => {
            if let Err(undo) = unenroll(programs, &workload, cookie) {
                warn!(workload = %uid, error = %undo, "rolling back a failed enrollment");
            }
            Err(redirect_err(e))
        }
    }
}

fn open_listeners(
    worker: &NetnsWorker,
    uid: &str,
    mark: u32,
    ports: PodPorts,
) -> Result<(Vec<std::net::TcpListener>, std::net::TcpListener), PodError> {
    let listen = |addr: SocketAddr, dual: bool| {
        worker
            .run_blocking(move || marked_listener(addr, mark, dual))
            .and_then(|r| r)
            .map(std::net::TcpListener::from)
            .map_err(|source| PodError::Listen {
                uid: uid.to_owned(),
                addr,
                source,
            })
    };
    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports.outbound);
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), ports.outbound);
    let mut outbound = vec![listen(v4, false)?];
    match listen(v6, false) {
        Ok(l) => outbound.push(l),
        Err(e) => warn!(workload = uid, error = %e, "no IPv6 outbound listener"),
    }
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), ports.inbound);
    let inbound = match listen(any6, true) {
        Ok(l) => l,
        Err(_) => listen(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports.inbound),
            false,
        )?,
    };
    Ok((outbound, inbound))
}

/// Stops capturing the pod with netns `cookie` and removes its kernel state. Its listeners
/// close when the proxy drops them.
pub fn unenroll(
    programs: &mut Programs,
    workload: &Workload,
    cookie: u64,
) -> Result<(), RedirectError> {
    programs.unenroll_netns(cookie)?;
    programs.detach_netns(cookie)?;
    for ip in &workload.ips {
        programs.remove_pod_addr(*ip)?;
    }
    Ok(())
}
