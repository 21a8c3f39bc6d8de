//! Keeps the set of enrolled pods in line with the state: enrolls workloads that are placed on
//! this node and in the mesh, unenrolls the ones that left or changed, and serves each
//! enrolled pod's listeners through the proxy.

use std::{collections::HashMap, sync::Arc};

use tracing::{info, warn};

use crate::{
    proxy::{PodServing, Proxy},
    redirect::{self, Attachment, PodPorts, Programs},
    state::Workload,
};

struct Enrolled {
    workload: Arc<Workload>,
    cookie: u64,
    _serving: PodServing,
}

/// The enrolled pods of this node.
pub struct InPod {
    node: String,
    programs: Programs,
    proxy: Arc<Proxy>,
    mark: u32,
    ports: PodPorts,
    pods: HashMap<String, Enrolled>,
    failed: Vec<String>,
    next_id: u32,
    pruned: bool,
}

impl InPod {
    pub fn new(
        node: String,
        programs: Programs,
        proxy: Arc<Proxy>,
        mark: u32,
        ports: PodPorts,
    ) -> Self {
        Self {
            node,
            programs,
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
            .map(|(uid, p)| (uid.clone(), p.cookie))
            .collect();
        pods.sort();
        pods
    }

    /// Workloads that could not be enrolled at the last reconcile.
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
        let stale: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, pod)| desired.get(*uid).is_none_or(|w| **w != *pod.workload))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in stale {
            if let Some(pod) = self.pods.remove(&uid) {
                self.unenroll(&pod);
            }
        }
        self.failed.clear();
        let mut missing: Vec<&&Workload> = desired
            .iter()
            .filter(|(uid, _)| !self.pods.contains_key(*uid))
            .map(|(_, w)| w)
            .collect();
        missing.sort_by_key(|w| w.uid());
        for workload in missing {
            self.enroll(workload);
        }
        if !self.pruned {
            self.prune_leftovers();
            self.pruned = true;
        }
    }

    fn enroll(&mut self, workload: &Workload) {
        let uid = workload.uid();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let workload = Arc::new(workload.clone());
        let enrolled = redirect::enroll(
            &mut self.programs,
            Arc::clone(&workload),
            id,
            self.mark,
            self.ports,
        );
        let pod = match enrolled {
            Ok(pod) => pod,
            Err(e) => {
                warn!(workload = %uid, error = %crate::error_chain(&e), "enrollment failed; will retry");
                self.failed.push(uid);
                return;
            }
        };
        let cookie = pod.worker.cookie();
        let adopted = pod.attachment == Attachment::Adopted;
        match self.proxy.serve(pod) {
            Ok(serving) => {
                info!(
                    workload = %uid,
                    netns = %workload.netns.as_deref().unwrap_or(std::path::Path::new("")).display(),
                    ips = ?workload.ips,
                    adopted,
                    "pod enrolled"
                );
                self.pods.insert(
                    uid,
                    Enrolled {
                        workload,
                        cookie,
                        _serving: serving,
                    },
                );
            }
            Err(e) => {
                warn!(workload = %uid, error = %e, "serving the pod's listeners failed; will retry");
                if let Err(e) = redirect::unenroll(&mut self.programs, &workload, cookie) {
                    warn!(workload = %uid, error = %e, "rolling back");
                }
                self.failed.push(uid);
            }
        }
    }

    fn unenroll(&mut self, pod: &Enrolled) {
        let uid = pod.workload.uid();
        match redirect::unenroll(&mut self.programs, &pod.workload, pod.cookie) {
            Ok(()) => info!(workload = %uid, "pod unenrolled"),
            Err(e) => {
                warn!(workload = %uid, error = %crate::error_chain(&e), "unenrolling left kernel state behind");
            }
        }
    }

    /// Removes kernel state that a previous daemon left for pods that are no longer enrolled.
    fn prune_leftovers(&mut self) {
        let keep: Vec<u64> = self.pods.values().map(|p| p.cookie).collect();
        let mut removed = self.programs.prune_netns_links(&keep);
        if let Ok(cookies) = self.programs.enrolled_netns() {
            for cookie in cookies.into_iter().filter(|c| !keep.contains(c)) {
                if self.programs.unenroll_netns(cookie).is_ok() {
                    removed += 1;
                }
            }
        }
        if let Ok(addrs) = self.programs.pod_addrs() {
            for (key, _) in addrs.into_iter().filter(|(_, c)| !keep.contains(c)) {
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
