//! Separate pod networks on one link: clusters whose pod ranges do not route to each other,
//! joined only through addresses on the link (an east-west gateway listens on its node's).

use anyhow::{Context as _, bail};

use super::{Node, Testbed, net};

impl Testbed {
    /// Cuts the routes between the pod ranges of every node of `a` and every node of `b`
    /// (both ways, IPv4 and IPv6), as between clusters whose pod networks do not route to each
    /// other: a pod on one side can no longer reach a pod on the other, mesh or not. Node
    /// addresses stay reachable (east-west gateways listen on theirs), and so do the pods of
    /// nodes named in neither list.
    pub fn isolate(&self, a: &[&str], b: &[&str]) -> anyhow::Result<()> {
        for x in a {
            for y in b {
                if x == y {
                    bail!("node {x:?} cannot be isolated from itself");
                }
                let (x, y) = (self.node(x), self.node(y));
                unroute(x, y).with_context(|| format!("isolating {} from {}", x.name, y.name))?;
            }
        }
        Ok(())
    }
}

impl Node {
    /// The node's port on the fabric bridge (`n<index>`, in the netns of
    /// [`Testbed::spawn_on_link`]): a capture there sees everything the node sends and
    /// receives on the inter-node link.
    #[must_use]
    pub fn link_port(&self) -> String {
        format!("n{}", self.index)
    }
}

/// Deletes the routes each of `a` and `b` has to the other's pod range (IPv4 and IPv6). Nodes
/// have no default route, so the other's pods are then unreachable from this node and its
/// pods.
fn unroute(a: &Node, b: &Node) -> anyhow::Result<()> {
    for (from, to) in [(a, b), (b, a)] {
        let m = to.index;
        for (range, via) in [
            (
                format!("{}/24", net::pod_ipv4(m, 0)),
                net::node_ipv4(m).to_string(),
            ),
            (
                format!("{}/64", net::pod_ipv6(m, 0)),
                net::node_ipv6(m).to_string(),
            ),
        ] {
            net::run(
                "ip",
                &["-n", &from.place.netns, "route", "del", &range, "via", &via],
            )?;
        }
    }
    Ok(())
}
