//! The process's own logs (tracing → stderr, text or JSON) and the handle that changes the
//! filter at run time (`PUT /log-level`, a config reload).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("`{filter}` is not a log filter: {error}")]
    BadFilter { filter: String, error: tracing_subscriber::filter::ParseError },
    #[error("the logger is gone")]
    Gone,
}

/// Reads and replaces the live log filter.
#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    pub fn current(&self) -> String {
        self.handle.with_current(|f| f.to_string()).unwrap_or_default()
    }

    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let parsed = parse_filter(filter)?;
        self.handle.reload(parsed).map_err(|_| LogError::Gone)
    }
}

fn parse_filter(filter: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(filter.trim())
        .map_err(|error| LogError::BadFilter { filter: filter.trim().to_owned(), error })
}

/// Installs the global subscriber. Called once, by the binary, before anything logs.
pub fn init(filter: &str, format: LogFormat) -> Result<LogHandle, LogError> {
    let (filter_layer, handle) = reload::Layer::new(parse_filter(filter)?);
    let registry = tracing_subscriber::registry().with(filter_layer);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // A second init (tests that run two sidecars in one process) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Text => registry.with(fmt.with_ansi(false)).try_init(),
    };
    Ok(LogHandle { handle })
}
