//! Running code inside another network namespace.
//!
//! `setns(2)` changes the namespace of the calling *thread*, so it never runs on a tokio worker:
//! each call gets a dedicated short-lived thread that enters the namespace, runs the closure and
//! exits (taking its namespace with it). Sockets created there stay in that namespace and can be
//! used from any thread afterwards.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Runs `f` on a fresh thread inside the network namespace at `path` (for example
/// `/run/netns/NAME` or `/proc/PID/ns/net`).
pub fn in_netns<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = File::open(path)?;
    let path: PathBuf = path.to_owned();
    std::thread::Builder::new()
        .name("mesh-netns".to_owned())
        .spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
                io::Error::new(
                    io::Error::from(errno).kind(),
                    format!("setns into {}: {errno}", path.display()),
                )
            })?;
            Ok(f())
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// The cookie the kernel gives the network namespace at `path`: the key of the enrolled-netns
/// map, and what `bpf_get_netns_cookie` returns for sockets in it.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    in_netns(path, || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")
            .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
        socket_netns_cookie(&sock)
    })?
}

/// `SO_NETNS_COOKIE` (Linux 5.14+) of a socket.
fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits socklen_t");
    // SAFETY: valid fd, and `cookie`/`len` describe a writable 8-byte buffer.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
