//! Enrolling a pod: its listeners inside its netns, its addresses and netns cookie in the
//! kernel maps, and `sk_lookup` on its netns; replacing an enrollment; and undoing it.
//!
//! Enrolling is two steps so that nothing is steered to a listener that is not served yet:
//! [`prepare`] opens the listeners and reads the namespace's addresses (no kernel state is
//! touched; the proxy starts serving the listeners), then [`install`] writes the kernel state:
//! the pod's addresses, `sk_lookup` on its netns, outbound capture (the enrolled-netns entry),
//! and last the inbound listener entry.
//!
//! Kernel state is replaced, never removed first and re-added: a pod enrolled again (its
//! workload changed) is installed while its previous enrollment stays in force, and only then
//! is the previous state that the new one does not share retired ([`retire`]). If installing
//! fails, the previous state is left as it was, so there is no moment in which an enrolled pod
//! is reachable uncaptured.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
};

use mesh_common::{ADDR_HBONE, NetnsInfo};
use tracing::warn;

use super::{Attachment, NetnsWorker, Programs, RedirectError, netns::marked_listener};
use crate::workload::Workload;

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
    #[error("workload {uid}: reading the addresses of its netns")]
    Addresses {
        uid: String,
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

/// What the kernel holds for one enrolled pod: its netns cookie and its addresses with their
/// flags ([`ADDR_HBONE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodKernelState {
    pub cookie: u64,
    pub addrs: BTreeMap<IpAddr, u32>,
}

/// A pod's sockets and namespace thread, ready for the proxy (made by [`prepare`]).
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
    /// The kernel state [`install`] writes for the pod.
    pub state: PodKernelState,
}

/// Ports the daemon listens on in every enrolled pod.
#[derive(Clone, Copy, Debug)]
pub struct PodPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub hbone: u16,
}

/// Opens `workload`'s listeners inside its netns and reads the addresses of the netns. Touches
/// no kernel state.
pub fn prepare(
    workload: Arc<Workload>,
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
    let addrs = pod_addrs(&worker, &workload).map_err(|source| PodError::Addresses {
        uid: uid.clone(),
        source,
    })?;
    let state = PodKernelState {
        cookie: worker.cookie(),
        addrs,
    };
    Ok(EnrolledPod {
        workload,
        worker: Arc::new(worker),
        outbound,
        inbound,
        hbone,
        state,
    })
}

/// Every address of the pod: the ones its netns has now (loopback aside) and the ones its
/// workload lists; the listed ones carry [`ADDR_HBONE`] (the HBONE listener is bound there).
pub fn pod_addrs(
    worker: &NetnsWorker,
    workload: &Workload,
) -> std::io::Result<BTreeMap<IpAddr, u32>> {
    let mut addrs: BTreeMap<IpAddr, u32> = worker
        .run_blocking(super::netns::local_addrs)??
        .into_iter()
        .map(|ip| (ip, 0))
        .collect();
    for ip in &workload.ips {
        addrs.insert(*ip, ADDR_HBONE);
    }
    Ok(addrs)
}

/// Writes `state` into the kernel for `workload` (see the module docs for the order), with
/// `inbound` as the netns's capture listener. `current` is the pod's enrollment in force, if
/// any: on failure everything written is undone except what `current` holds.
pub fn install(
    programs: &mut Programs,
    workload: &Workload,
    state: &PodKernelState,
    inbound: &impl AsRawFd,
    id: u32,
    current: Option<&PodKernelState>,
) -> Result<Attachment, PodError> {
    let path = workload.netns.clone().ok_or_else(|| PodError::NoNetns {
        uid: workload.uid(),
    })?;
    let cookie = state.cookie;
    let result = (|| {
        for (ip, flags) in &state.addrs {
            programs.add_pod_addr(cookie, *ip, *flags)?;
        }
        let attachment = programs.attach_netns(&path, cookie)?;
        programs.enroll_netns(
            cookie,
            NetnsInfo {
                workload_id: id,
                flags: 0,
            },
        )?;
        programs.set_inbound_listener(cookie, inbound)?;
        Ok(attachment)
    })();
    result.map_err(|source| {
        if let Err(undo) = retire(programs, state, current) {
            warn!(workload = %workload.uid(), error = %undo, "rolling back a failed enrollment");
        }
        PodError::Redirect {
            uid: workload.uid(),
            source: Box::new(source),
        }
    })
}

/// Removes the kernel state of `state` that `keep` (the pod's enrollment that stays in force,
/// if any) does not hold too. Without `keep`, or with `keep` in another netns, this stops
/// capturing the pod (outbound first); its listeners close when the proxy drops them, which
/// removes the inbound listener entry.
pub fn retire(
    programs: &mut Programs,
    state: &PodKernelState,
    keep: Option<&PodKernelState>,
) -> Result<(), RedirectError> {
    match keep {
        Some(keep) if keep.cookie == state.cookie => {
            for ip in state.addrs.keys().filter(|ip| !keep.addrs.contains_key(ip)) {
                programs.remove_pod_addr(state.cookie, *ip)?;
            }
            for (ip, flags) in &keep.addrs {
                if state.addrs.get(ip) != Some(flags) {
                    programs.add_pod_addr(keep.cookie, *ip, *flags)?;
                }
            }
            Ok(())
        }
        _ => {
            programs.unenroll_netns(state.cookie)?;
            programs.detach_netns(state.cookie)?;
            for ip in state.addrs.keys() {
                programs.remove_pod_addr(state.cookie, *ip)?;
            }
            Ok(())
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
