//! Process-wide `tracing` set-up: text or JSON lines on stderr, filtered by directives that can
//! be changed at run time (admin `/logging`), and a panic hook that reports a panic (a bug) as
//! one log record in the same format instead of plain text in the middle of JSON lines.

use std::{
    io::IsTerminal as _,
    sync::{Arc, Mutex, PoisonError},
};

use tracing_subscriber::{EnvFilter, Registry, fmt, prelude::*, reload};

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("log filter `{filter}`")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global logger is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
    #[error("the logger is gone")]
    Reload(#[source] reload::Error),
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
}

impl LogHandle {
    /// The filter in force.
    #[must_use]
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the filter (`RUST_LOG` syntax). A bad filter changes nothing.
    pub fn set(&self, filter: &str) -> Result<(), LoggingError> {
        let parsed = parse(filter)?;
        self.handle.reload(parsed).map_err(LoggingError::Reload)?;
        filter.clone_into(&mut self.current.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(())
    }
}

fn parse(filter: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::builder()
        .parse(filter)
        .map_err(|source| LoggingError::Filter {
            filter: filter.to_owned(),
            source,
        })
}

/// Installs the global subscriber described by `config` (on stderr) and the panic hook.
pub fn init(config: &LogConfig) -> Result<LogHandle, LoggingError> {
    init_with_writer(config, std::io::stderr, std::io::stderr().is_terminal())
}

/// [`init`] with another destination than stderr (tests read the log back through it).
#[doc(hidden)]
pub fn init_with_writer<W>(
    config: &LogConfig,
    writer: W,
    ansi: bool,
) -> Result<LogHandle, LoggingError>
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let (filter, handle) = reload::Layer::new(parse(&config.filter)?);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_ansi(ansi)
                    .with_target(true),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_writer(writer))
            .try_init(),
    };
    result.map_err(LoggingError::AlreadyInstalled)?;
    std::panic::set_hook(Box::new(log_panic));
    Ok(LogHandle {
        handle,
        current: Arc::new(Mutex::new(config.filter.clone())),
    })
}

/// The panic hook: one `error` record (message `panic`) with the panic's message, where it
/// happened, the thread, and a backtrace when `RUST_BACKTRACE` asks for one.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned());
    let location = info.location().map(ToString::to_string).unwrap_or_default();
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("<unnamed>");
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(panic = %message, location, thread, backtrace = %backtrace, "panic");
    } else {
        tracing::error!(panic = %message, location, thread, "panic");
    }
}
