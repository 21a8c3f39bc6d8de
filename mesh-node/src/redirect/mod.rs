//! Kernel redirection: loading, attaching and feeding mesh's eBPF programs, the
//! network-namespace plumbing they need, enrolling pods, and the kernel implementations of the
//! proxy's seams ([`MarkedSockets`], [`PodOrigDst`]).

mod netns;
mod pods;
mod programs;
mod succession;

pub use netns::{
    MarkedSockets, NetnsWorker, in_netns, local_addrs, marked_listener, marked_socket,
    netns_cookie, set_proc_root,
};
pub use pods::{
    EnrolledPod, PodError, PodKernelState, PodPorts, install, pod_addrs, prepare, retire,
};
pub use programs::{
    Attachment, CounterSnapshot, LoadOptions, OrigDstTable, PodOrigDst, Programs, RedirectError,
    remove_pins,
};
pub use succession::Succession;
