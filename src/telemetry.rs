//! Telemetry: the metrics registry, the process's own logs, and the access-log writer.
//!
//! Nothing here is awaited by the data plane: metrics are atomics, the access log is a
//! bounded channel that drops (and counts) rather than blocks.

pub mod access_log;
pub mod logging;
pub mod metrics;

pub use access_log::{AccessLog, AccessRecord};
pub use logging::LogHandle;
pub use metrics::LatencyHistogram;
