//! Processes inside a testbed's pods and nodes: entered into the netns and cgroup between fork
//! and exec, output captured to files, killed when dropped.

use std::{
    ffi::CString,
    fs::{self, File},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{Place, net};

/// Time limit of [`exec`] unless a test asks for another.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The output if the command succeeded, else an error with its stderr.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.status.success() {
            Ok(self)
        } else {
            bail!("command failed ({}): {}", self.status, self.stderr.trim())
        }
    }
}

/// A long-lived process in a pod or node. Dropping it kills it.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    label: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

fn prepare(place: &Place, argv: &[&str]) -> anyhow::Result<(Command, PathBuf, PathBuf, String)> {
    let (program, rest) = argv.split_first().context("empty command")?;
    let base = Path::new(program)
        .file_name()
        .map_or_else(|| "cmd".into(), |s| s.to_string_lossy().into_owned());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let label = format!("{}.{seq}.{base}", place.logs.display());
    let stdout = PathBuf::from(format!("{label}.out"));
    let stderr = PathBuf::from(format!("{label}.err"));

    let netns: OwnedFd = File::open(net::netns_path(&place.netns))
        .with_context(|| format!("opening netns {}", place.netns))?
        .into();
    let procs: OwnedFd = fs::OpenOptions::new()
        .write(true)
        .open(place.cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", place.cgroup.display()))?
        .into();
    let zero = CString::new("0").expect("no NUL");

    let mut cmd = Command::new(program);
    cmd.args(rest)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout)?)
        .stderr(File::create(&stderr)?);
    // SAFETY: only async-signal-safe syscalls run between fork and exec (setns, write); the fds
    // and the C string were prepared before the fork and are moved into the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Writing "0" to cgroup.procs moves the writing process itself.
            if libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok((cmd, stdout, stderr, label))
}

/// Starts `argv` inside `place`.
pub fn spawn(place: &Place, argv: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Proc> {
    let (mut cmd, stdout, stderr, label) = prepare(place, argv)?;
    cmd.envs(env.iter().copied());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {argv:?} in {}", place.netns))?;
    Ok(Proc {
        child,
        label,
        stdout,
        stderr,
    })
}

/// Runs `argv` inside `place` to completion; kills it after `timeout`.
pub fn exec(place: &Place, argv: &[&str], timeout: Duration) -> anyhow::Result<CmdOutput> {
    let (mut cmd, stdout, stderr, _) = prepare(place, argv)?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {argv:?} in {}", place.netns))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{argv:?} in {} did not finish within {timeout:?}",
                place.netns
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let out = CmdOutput {
        status,
        stdout: fs::read_to_string(&stdout).unwrap_or_default(),
        stderr: fs::read_to_string(&stderr).unwrap_or_default(),
    };
    let _ = fs::remove_file(stdout);
    let _ = fs::remove_file(stderr);
    Ok(out)
}

impl Proc {
    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout so far.
    #[must_use]
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stdout or stderr contains `needle`. Fails if the process exits first or the
    /// time runs out.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {needle:?}; stderr:\n{}",
                    self.label,
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; stderr:\n{}",
                    self.label,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then SIGKILLs it.
    /// Returns how it exited.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// Sends `signal` (ignored if the process already exited).
    pub fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Waits for the process to exit on its own, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether it exited because of `signal`.
    #[must_use]
    pub fn killed_by(status: ExitStatus, signal: Signal) -> bool {
        status.signal() == Some(signal as i32)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prints the tail of every process log under `dir` (called when a test panics, before the
/// files are removed).
pub fn dump_logs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("---- {} ({} lines)", file.display(), lines.len());
        let (head, tail) = if lines.len() <= 60 {
            (&lines[..], &lines[..0])
        } else {
            (&lines[..30], &lines[lines.len() - 30..])
        };
        for line in head {
            eprintln!("{line}");
        }
        if !tail.is_empty() {
            eprintln!("[... {} lines ...]", lines.len() - 60);
        }
        for line in tail {
            eprintln!("{line}");
        }
    }
}
