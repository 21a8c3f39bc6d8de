//! Running code inside a pod's network namespace.
//!
//! `setns(2)` changes the namespace of the calling *thread*, so it never runs on a tokio worker.
//! A [`NetnsWorker`] is a dedicated thread that enters one namespace once and then creates
//! sockets there on request; sockets keep their namespace and are used from any thread
//! afterwards. The thread ends when the worker is dropped.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, mpsc},
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one network namespace.
#[derive(Debug)]
pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    cookie: u64,
    /// Sockets made ahead of need, so that a new connection takes one without a round trip to
    /// the namespace thread (see [`NetnsWorker::tcp_socket`]).
    spares: Arc<Mutex<Spares>>,
}

/// Spare sockets kept per namespace and address family.
const SPARES: usize = 8;

/// Unconnected marked sockets made in the namespace, by family (`[IPv4, IPv6]`).
#[derive(Debug, Default)]
struct Spares {
    mark: u32,
    sockets: [Vec<Socket>; 2],
    /// A refill is queued on the namespace thread.
    refilling: [bool; 2],
}

fn enter(path: &Path) -> io::Result<()> {
    let ns = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("setns into {}: {errno}", path.display()),
        )
    })
}

impl NetnsWorker {
    /// Starts a thread inside the network namespace at `path` and reads its cookie.
    pub fn start(path: &Path) -> io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<u64>>();
        let thread_path = path.to_owned();
        std::thread::Builder::new()
            .name("mesh-netns".to_owned())
            .spawn(move || {
                let entered = enter(&thread_path).and_then(|()| current_netns_cookie());
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })?;
        let cookie = ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread exited"))??;
        Ok(Self {
            jobs,
            path: path.to_owned(),
            cookie,
            spares: Arc::default(),
        })
    }

    /// The namespace's cookie (the key of the enrolled-netns map).
    #[must_use]
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the namespace thread and waits for its result without blocking the runtime.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("netns thread dropped the job"))
    }

    /// Runs `f` on the namespace thread, blocking the caller (not for async contexts).
    pub fn run_blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("netns thread dropped the job"))
    }

    /// A non-blocking TCP socket created in the namespace, carrying `mark`, ready to connect.
    ///
    /// Taken from the spares made ahead by the namespace thread when there is one (no round
    /// trip to that thread on the connection path); the spares are refilled in the background. The first request of a family, or one that finds none, waits for
    /// the thread.
    pub async fn tcp_socket(&self, v6: bool, mark: u32) -> io::Result<tokio::net::TcpSocket> {
        let family = usize::from(v6);
        let spare = {
            let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
            if spares.mark != mark {
                // Spares carry one mark; a different one (never in practice) starts over.
                *spares = Spares {
                    mark,
                    ..Spares::default()
                };
            }
            spares.sockets[family].pop()
        };
        let socket = match spare {
            Some(socket) => socket,
            None => self.run(move || marked_socket(v6, mark)).await??,
        };
        self.refill(v6, mark);
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// Queues making spare sockets of one family on the namespace thread, when some are missing
    /// and no refill is queued yet.
    fn refill(&self, v6: bool, mark: u32) {
        let family = usize::from(v6);
        {
            let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
            // Topped up after every use (one refill queued at a time), so at rest the pool is
            // always full: the daemon's descriptor count does not depend on how many spares
            // the last burst happened to leave.
            if spares.refilling[family] || spares.sockets[family].len() >= SPARES {
                return;
            }
            spares.refilling[family] = true;
        }
        let spares = Arc::clone(&self.spares);
        let job = Box::new(move || {
            let have = spares
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sockets[family]
                .len();
            // Made outside the lock; a failure (e.g. out of descriptors) just leaves fewer.
            let made: Vec<Socket> = (have..SPARES)
                .map_while(|_| marked_socket(v6, mark).ok())
                .collect();
            let mut spares = spares.lock().unwrap_or_else(PoisonError::into_inner);
            spares.refilling[family] = false;
            if spares.mark == mark {
                spares.sockets[family].extend(made);
            }
        });
        if self.jobs.send(job).is_err() {
            self.spares
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .refilling[family] = false;
        }
    }
}

/// A pod's sockets as the proxy asks for them: made in the pod's netns by its thread, carrying
/// the daemon's mark (the kernel implementation of [`crate::proxy::SocketFactory`]).
pub struct MarkedSockets {
    pub worker: Arc<NetnsWorker>,
    pub mark: u32,
}

impl crate::proxy::SocketFactory for MarkedSockets {
    fn tcp_socket(
        &self,
        v6: bool,
    ) -> crate::hbone::BoxFuture<'_, io::Result<tokio::net::TcpSocket>> {
        Box::pin(self.worker.tcp_socket(v6, self.mark))
    }
}

/// A non-blocking, close-on-exec TCP socket with `SO_MARK` set, in the calling thread's netns.
pub fn marked_socket(v6: bool, mark: u32) -> io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    Ok(socket)
}

/// Lets the kernel migrate connections queued on a closing `SO_REUSEPORT` listener to another
/// listener of the group (Linux 5.14, `Documentation/networking/ip-sysctl.rst`), in the calling
/// thread's netns, so an upgrade refuses no connection.
pub fn enable_request_migration() -> io::Result<()> {
    let root = PROC_ROOT.get().map_or(Path::new("/proc"), PathBuf::as_path);
    std::fs::write(root.join("sys/net/ipv4/tcp_migrate_req"), "1")
}

/// The procfs mount that sysctls are written through (sysctls under `net/` apply to the
/// writer's network namespace whatever the mount). In a container `/proc/sys` is read-only;
/// the host's `/proc` mounted elsewhere is not.
static PROC_ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the procfs mount used for sysctls (once, at start; default `/proc`).
pub fn set_proc_root(root: PathBuf) {
    let _ = PROC_ROOT.set(root);
}

/// A marked, non-blocking listening socket bound to `addr` in the calling thread's netns.
/// `dual_stack` makes an IPv6 wildcard socket accept IPv4 too.
pub fn marked_listener(addr: SocketAddr, mark: u32, dual_stack: bool) -> io::Result<Socket> {
    let socket = marked_socket(addr.is_ipv6(), mark)?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    socket.set_reuse_address(true)?;
    // A new daemon binds the same ports while the old one still runs (upgrade hand-over); the
    // kernel moves connections queued on a closing listener to the new one
    // (`net.ipv4.tcp_migrate_req`, set per pod netns at enrollment).
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

/// Runs `f` on a fresh thread inside the network namespace at `path` (one-off work; for repeated
/// work keep a [`NetnsWorker`]).
pub fn in_netns<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("mesh-netns".to_owned())
        .spawn(move || enter(&path).map(|()| f()))?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// The addresses of the calling thread's netns, loopback aside (IPv6 link-local included).
pub fn local_addrs() -> io::Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    let mut out: Vec<std::net::IpAddr> = addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The cookie of the network namespace at `path`.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    in_netns(path, current_netns_cookie)?
}

/// `SO_NETNS_COOKIE` (Linux 5.14) of a socket made in the calling thread's namespace.
pub(super) fn current_netns_cookie() -> io::Result<u64> {
    let sock = Socket::new(Domain::UNIX, Type::DGRAM, None)?;
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
