//! Telemetry: the metrics registry, the process's own logs, the access-log writer, and
//! trace context with span export.
//!
//! Nothing here is awaited by the data plane: metrics are atomics, the access log and span
//! export are bounded queues that drop (and count) rather than block.

pub mod access_log;
pub mod context;
pub mod histogram;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod pace;
pub mod process;
pub mod spans;

pub use access_log::{AccessLog, AccessRecord};
pub use histogram::LatencyHistogram;
pub use logging::LogHandle;
pub use spans::Tracer;
