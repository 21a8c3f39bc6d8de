//! Kernel redirection: loading, attaching and feeding mesh's eBPF programs, the
//! network-namespace plumbing they need, and enrolling pods.

mod netns;
mod pods;
mod programs;
mod succession;

pub use netns::{
    NetnsWorker, in_netns, local_addrs, marked_listener, marked_socket, netns_cookie, set_proc_root,
};
pub use pods::{
    EnrolledPod, PodError, PodKernelState, PodPorts, install, pod_addrs, prepare, retire,
};
pub use programs::{
    Attachment, CounterSnapshot, LoadOptions, OrigDstTable, Programs, RedirectError, remove_pins,
};
pub use succession::Succession;
