//! Standalone hosts: a VM or bare-metal machine joined to the cluster's link but belonging to
//! no node. A host is a network namespace of its own on the fabric bridge, with a cgroup for
//! host-level processes (its own `mesh-node`) and an `app` cgroup below it for the applications
//! (what its daemon's `redirect.cgroup` names).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{CmdOutput, Place, Proc, Testbed, net, process};

/// A standalone host of a running testbed.
#[derive(Debug)]
pub struct Host {
    pub(super) name: String,
    /// Last byte of its addresses on the link (254, 253, ...: never a node's).
    pub(super) index: u8,
    pub(super) place: Place,
    app: Place,
}

impl Host {
    pub(super) fn new(bed: &Testbed, name: &str, index: u8) -> Self {
        let place = Place {
            netns: format!("{}-{name}", bed.id),
            cgroup: bed.cgroup.join(name),
            logs: bed.tmp.join(name),
        };
        let app = Place {
            cgroup: place.cgroup.join("app"),
            logs: bed.tmp.join(format!("{name}-app")),
            ..place.clone()
        };
        Self {
            name: name.to_owned(),
            index,
            place,
            app,
        }
    }

    /// The host's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's IPv4 address (on the inter-node link).
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        net::node_ipv4(self.index)
    }

    /// The host's IPv6 address (on the inter-node link).
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        net::node_ipv6(self.index)
    }

    /// `ipv4:port` or `[ipv6]:port`.
    #[must_use]
    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 {
            self.ipv6().into()
        } else {
            self.ipv4().into()
        };
        SocketAddr::new(ip, port)
    }

    /// The host's network namespace (`/run/netns/<name>`).
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        net::netns_path(&self.place.netns)
    }

    /// The host's cgroup (host-level processes such as its daemon run here).
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.place.cgroup
    }

    /// The cgroup of the host's applications (below [`Host::cgroup`]).
    #[must_use]
    pub fn app_cgroup(&self) -> &Path {
        &self.app.cgroup
    }

    /// Starts a long-lived host-level process (the host's cgroup, not the applications').
    pub fn spawn(&self, argv: &[&str]) -> anyhow::Result<Proc> {
        process::spawn(&self.place, argv, &[])
    }

    /// Runs a host-level command to completion (killed after 30 s).
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<CmdOutput> {
        process::exec(&self.place, argv, process::EXEC_TIMEOUT)
    }

    /// Starts an application (in the `app` cgroup) and waits (5 s at most) until it prints
    /// `listening`.
    pub fn spawn_app_server(&self, argv: &[&str]) -> anyhow::Result<Proc> {
        let mut server = process::spawn(&self.app, argv, &[])?;
        server.wait_for_output("listening", Duration::from_secs(5))?;
        Ok(server)
    }

    /// Runs an application command (in the `app` cgroup) to completion (killed after 30 s).
    pub fn exec_app(&self, argv: &[&str]) -> anyhow::Result<CmdOutput> {
        process::exec(&self.app, argv, process::EXEC_TIMEOUT)
    }
}
