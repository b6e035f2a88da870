//! The `shutdown` section: how long a drain may wait for in-flight requests.
//!
//! Not responsible for the drain itself (`crate::drain`, `crate::app`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str};

/// The contract's (INTERFACE.md): under Kubernetes' default `terminationGracePeriodSeconds`
/// of 30s, so a drain ends before the kubelet's SIGKILL with time left to exit.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShutdown {
    drain_timeout: Option<Scalar>,
}

pub(super) fn validate(raw: RawShutdown, cx: &mut Ctx) -> ShutdownConfig {
    ShutdownConfig {
        drain_timeout: cx.duration(
            "shutdown.drain_timeout",
            raw.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
        ),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShutdownConfig {
    /// Longest wait for in-flight requests after a drain begins. Default
    /// [`DEFAULT_DRAIN_TIMEOUT`], 20s.
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::smallest;

    #[test]
    fn default_is_what_the_smallest_config_gets() {
        assert_eq!(smallest().shutdown.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    }
}
