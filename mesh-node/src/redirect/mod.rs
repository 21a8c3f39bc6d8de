//! Kernel redirection: loading, attaching and feeding mesh's eBPF programs, and the
//! network-namespace plumbing they need.

mod netns;
mod programs;

pub use netns::{in_netns, netns_cookie};
pub use programs::{CounterSnapshot, Programs, RedirectError};
