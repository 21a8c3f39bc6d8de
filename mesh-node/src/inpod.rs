//! Keeps the set of enrolled pods in line with the state: enrolls workloads that are placed on
//! this node and in the mesh, enrolls again the ones that changed (replacing their kernel
//! state, never removing it first), unenrolls the ones that left, serves each enrolled pod's
//! listeners through the proxy, and audits the kernel state of every enrolled pod (restoring
//! what another daemon, or anything else, removed).

use std::{collections::HashMap, sync::Arc};

use tracing::{info, warn};

use crate::{
    proxy::{PodListeners, PodServing, Proxy},
    redirect::{
        self, Attachment, MarkedSockets, NetnsWorker, OrigDstTable, PodKernelState, PodOrigDst,
        PodPorts, Programs, Succession,
    },
    workload::Workload,
};

struct Enrolled {
    workload: Arc<Workload>,
    worker: Arc<NetnsWorker>,
    state: PodKernelState,
    id: u32,
    serving: PodServing,
}

/// The enrolled pods of this node.
pub struct InPod {
    node: String,
    programs: Programs,
    succession: Succession,
    /// The kernel's original destinations of captured connections (each pod's view of it is
    /// the proxy's `OriginalDst`).
    orig_dst: Arc<OrigDstTable>,
    proxy: Arc<Proxy>,
    mark: u32,
    ports: PodPorts,
    pods: HashMap<String, Enrolled>,
    failed: Vec<String>,
    next_id: u32,
    pruned: bool,
}

/// What one audit of the kernel state found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// A newer daemon serves this node: it owns the kernel state, nothing was checked.
    pub superseded: bool,
    /// `(workload, what)` restored.
    pub repaired: Vec<(String, &'static str)>,
    /// `(workload, what)` missing and not restored.
    pub broken: Vec<(String, String)>,
}

impl InPod {
    pub fn new(
        node: String,
        programs: Programs,
        succession: Succession,
        orig_dst: Arc<OrigDstTable>,
        proxy: Arc<Proxy>,
        mark: u32,
        ports: PodPorts,
    ) -> Self {
        Self {
            node,
            programs,
            succession,
            orig_dst,
            proxy,
            mark,
            ports,
            pods: HashMap::new(),
            failed: Vec::new(),
            next_id: 1,
            pruned: false,
        }
    }

    /// This node's name.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The kernel object (for counters).
    #[must_use]
    pub fn programs(&self) -> &Programs {
        &self.programs
    }

    /// Which daemon of this node is the newest.
    #[must_use]
    pub fn succession(&self) -> &Succession {
        &self.succession
    }

    /// How many pods are enrolled and served.
    #[must_use]
    pub fn enrolled(&self) -> usize {
        self.pods.len()
    }

    /// `(workload, netns cookie)` of every enrolled pod.
    #[must_use]
    pub fn enrolled_pods(&self) -> Vec<(String, u64)> {
        let mut pods: Vec<_> = self
            .pods
            .iter()
            .map(|(uid, p)| (uid.clone(), p.state.cookie))
            .collect();
        pods.sort();
        pods
    }

    /// Workloads that could not be enrolled (or enrolled again) at the last reconcile.
    #[must_use]
    pub fn failed(&self) -> &[String] {
        &self.failed
    }

    /// Brings the enrolled set in line with `workloads`.
    pub fn reconcile(&mut self, workloads: &[Workload]) {
        self.proxy.set_workloads(workloads);
        let desired: HashMap<String, &Workload> = workloads
            .iter()
            .filter(|w| w.node == self.node && w.enrolled)
            .map(|w| (w.uid(), w))
            .collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !desired.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(pod) = self.pods.remove(&uid) {
                self.unenroll(&pod);
            }
        }
        self.failed.clear();
        let mut todo: Vec<&&Workload> = desired
            .iter()
            .filter(|(uid, w)| self.pods.get(*uid).is_none_or(|p| *p.workload != ***w))
            .map(|(_, w)| w)
            .collect();
        todo.sort_by_key(|w| w.uid());
        for workload in todo {
            self.enroll(workload);
        }
        if !self.pruned {
            self.prune_leftovers();
            self.pruned = true;
        }
    }

    /// Enrolls `workload`, or enrolls it again in place of its current enrollment, which stays
    /// in force until the new one is installed (and stays if that fails).
    fn enroll(&mut self, workload: &Workload) {
        let uid = workload.uid();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let workload = Arc::new(workload.clone());
        let current = self.pods.get(&uid).map(|p| p.state.clone());
        let replacing = if current.is_some() {
            "; its previous enrollment stays in force"
        } else {
            ""
        };
        let fail = |failed: &mut Vec<String>, what: &str, error: &str| {
            warn!(workload = %uid, error, "{what} failed{replacing}; will retry");
            failed.push(uid.clone());
        };
        let pod = match redirect::prepare(Arc::clone(&workload), self.mark, self.ports) {
            Ok(pod) => pod,
            Err(e) => return fail(&mut self.failed, "enrollment", &crate::error_chain(&e)),
        };
        let (state, worker) = (pod.state.clone(), Arc::clone(&pod.worker));
        let listeners = PodListeners {
            workload: Arc::clone(&workload),
            sockets: Arc::new(MarkedSockets {
                worker: Arc::clone(&pod.worker),
                mark: self.mark,
            }),
            orig_dst: Arc::new(PodOrigDst {
                table: Arc::clone(&self.orig_dst),
                cookie: state.cookie,
            }),
            outbound: pod.outbound,
            inbound: pod.inbound,
            hbone: pod.hbone,
        };
        let serving = match self.proxy.serve(listeners) {
            Ok(serving) => serving,
            Err(e) => {
                return fail(
                    &mut self.failed,
                    "serving the pod's listeners",
                    &e.to_string(),
                );
            }
        };
        let installed = redirect::install(
            &mut self.programs,
            &workload,
            &state,
            serving.inbound_listener(),
            id,
            current.as_ref(),
        );
        let attachment = match installed {
            Ok(attachment) => attachment,
            Err(e) => return fail(&mut self.failed, "enrollment", &crate::error_chain(&e)),
        };
        info!(
            workload = %uid,
            netns = %workload.netns.as_deref().unwrap_or(std::path::Path::new("")).display(),
            ips = ?workload.ips,
            addresses = ?state.addrs.keys().collect::<Vec<_>>(),
            adopted = attachment == Attachment::Adopted,
            replaced = current.is_some(),
            "pod enrolled"
        );
        serving.publish();
        let new = Enrolled {
            workload,
            worker,
            state,
            id,
            serving,
        };
        if let Some(old) = self.pods.insert(uid.clone(), new) {
            // The new state is in force: retire what of the old one it does not share. The
            // old listeners close when `old` is dropped.
            if let Err(e) =
                redirect::retire(&mut self.programs, &old.state, Some(&self.pods[&uid].state))
            {
                warn!(workload = %uid, error = %crate::error_chain(&e), "retiring the previous enrollment left kernel state behind");
            }
        }
    }

    fn unenroll(&mut self, pod: &Enrolled) {
        let uid = pod.workload.uid();
        match redirect::retire(&mut self.programs, &pod.state, None) {
            Ok(()) => info!(workload = %uid, "pod unenrolled"),
            Err(e) => {
                warn!(workload = %uid, error = %crate::error_chain(&e), "unenrolling left kernel state behind");
            }
        }
    }

    /// Checks the kernel state of every enrolled pod against what this daemon installed and
    /// restores what is missing: another daemon of this node (an upgrade's new one that was
    /// stopped again: a rollback) or an operator may have removed it. The pods' addresses are
    /// read again too (an address added to a pod's netns is recorded as the pod's). Nothing is
    /// checked while a newer daemon serves the node: it owns the kernel state then.
    pub fn audit(&mut self) -> Audit {
        let mut audit = Audit::default();
        if self.succession.superseded() {
            audit.superseded = true;
            return audit;
        }
        for (uid, pod) in &mut self.pods {
            let cookie = pod.state.cookie;
            match redirect::pod_addrs(&pod.worker, &pod.workload) {
                Ok(addrs) if addrs != pod.state.addrs => {
                    info!(workload = %uid, addresses = ?addrs.keys().collect::<Vec<_>>(), "the addresses of an enrolled pod changed");
                    let new = PodKernelState { cookie, addrs };
                    // Writes the new entries and removes the ones that went away.
                    let _ = redirect::retire(&mut self.programs, &pod.state, Some(&new));
                    pod.state = new;
                }
                Ok(_) => {}
                Err(e) => audit
                    .broken
                    .push((uid.clone(), format!("reading addresses: {e}"))),
            }
            let checks = audit_pod(&mut self.programs, pod);
            for (what, result) in checks {
                match result {
                    Ok(true) => {}
                    Ok(false) => audit.repaired.push((uid.clone(), what)),
                    Err(e) => audit
                        .broken
                        .push((uid.clone(), format!("{what}: {}", crate::error_chain(&e)))),
                }
            }
        }
        for (uid, what) in &audit.repaired {
            warn!(workload = %uid, state = what, "kernel state of an enrolled pod was missing; restored");
        }
        for (uid, what) in &audit.broken {
            warn!(workload = %uid, state = %what, "kernel state of an enrolled pod is missing and could not be restored");
        }
        audit
    }

    /// Removes kernel state that a previous daemon left for pods that are no longer enrolled.
    fn prune_leftovers(&mut self) {
        let keep: Vec<u64> = self.pods.values().map(|p| p.state.cookie).collect();
        let mut removed = self.programs.prune_netns_links(&keep);
        if let Ok(cookies) = self.programs.enrolled_netns() {
            for cookie in cookies.into_iter().filter(|c| !keep.contains(c)) {
                if self.programs.unenroll_netns(cookie).is_ok() {
                    removed += 1;
                }
            }
        }
        if let Ok(addrs) = self.programs.pod_addrs() {
            for (key, _) in addrs.into_iter().filter(|(k, _)| !keep.contains(&k.netns)) {
                if self.programs.remove_pod_key(&key).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            info!(
                removed,
                "removed kernel state left by a previous daemon for pods no longer enrolled"
            );
        }
    }

    /// Stops serving every pod but leaves the kernel state in place: while no daemon runs,
    /// enrolled pods fail closed, and the next daemon adopts the pinned programs.
    pub fn stop_serving(&mut self) {
        self.pods.clear();
    }
}

/// Checks one pod's kernel entries, restoring each missing one: `(what, Ok(present))`.
fn audit_pod(
    programs: &mut Programs,
    pod: &Enrolled,
) -> [(&'static str, Result<bool, redirect::RedirectError>); 4] {
    let cookie = pod.state.cookie;
    let addrs = (|| {
        let have = programs.addrs_of(cookie)?;
        let mut complete = true;
        for (ip, flags) in &pod.state.addrs {
            if !have.contains(&(*ip, *flags)) {
                programs.add_pod_addr(cookie, *ip, *flags)?;
                complete = false;
            }
        }
        Ok(complete)
    })();
    let outbound = programs.netns_enrolled(cookie).and_then(|present| {
        if !present {
            programs.enroll_netns(
                cookie,
                mesh_common::NetnsInfo {
                    workload_id: pod.id,
                    flags: 0,
                },
            )?;
        }
        Ok(present)
    });
    let lookup = if programs.netns_attached(cookie) {
        Ok(true)
    } else {
        match pod.workload.netns.as_deref() {
            Some(path) => programs.attach_netns(path, cookie).map(|_| false),
            None => Ok(true),
        }
    };
    // Only when no listener is there: a newer daemon's listener (an upgrade in progress)
    // is left alone.
    let listener = programs.has_inbound_listener(cookie).and_then(|present| {
        if !present {
            programs.set_inbound_listener(cookie, pod.serving.inbound_listener())?;
        }
        Ok(present)
    });
    [
        ("addresses", addrs),
        ("outbound capture", outbound),
        ("sk_lookup", lookup),
        ("inbound listener", listener),
    ]
}
