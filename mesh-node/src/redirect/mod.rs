//! Kernel redirection: loading, attaching and feeding mesh's eBPF programs, the
//! network-namespace plumbing they need, and enrolling pods.

mod addr;
mod netns;
mod pods;
mod programs;

pub use netns::{
    NetnsWorker, in_netns, marked_listener, marked_socket, netns_cookie, set_proc_root,
};
pub use pods::{EnrolledPod, PodError, PodPorts, enroll, unenroll};
pub use programs::{
    Attachment, CounterSnapshot, LoadOptions, OrigDstTable, Programs, RedirectError, remove_pins,
};
