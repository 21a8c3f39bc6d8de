//! Process-wide `tracing` set-up: text or JSON lines on stderr, filtered by directives that can
//! be changed at run time (admin `/logging`).

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

/// Installs the global subscriber described by `config`.
pub fn init(config: &LogConfig) -> Result<LogHandle, LoggingError> {
    let (filter, handle) = reload::Layer::new(parse(&config.filter)?);
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::stderr().is_terminal();
    let result = match config.format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_target(true),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(LoggingError::AlreadyInstalled)?;
    Ok(LogHandle {
        handle,
        current: Arc::new(Mutex::new(config.filter.clone())),
    })
}
