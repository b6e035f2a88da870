//! The `shutdown` section: how long the process keeps serving while load balancers take it
//! out of rotation, and how long a drain may wait for in-flight requests.
//!
//! Not responsible for the drain itself (`crate::drain`, `crate::app`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::parse::{Ctx, Scalar, duration_str};

/// The contract's (INTERFACE.md): under Kubernetes' default `terminationGracePeriodSeconds`
/// of 30s, so a drain ends before the kubelet's SIGKILL with time left to exit.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Off by default: outside Kubernetes nothing needs telling, and a process that waits before
/// it drains surprises whoever pressed Ctrl-C. The Kubernetes manifests set 5s.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::ZERO;

/// A longer delay is a typo (`5m` for `5s`): endpoints controllers and cloud load balancers
/// act within seconds (Istio's `terminationDrainDuration` defaults to 5s), and the kubelet's
/// grace period would have killed the process long before.
pub const MAX_DRAIN_DELAY: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShutdown {
    drain_timeout: Option<Scalar>,
    drain_delay: Option<Scalar>,
}

pub(super) fn validate(raw: RawShutdown, cx: &mut Ctx) -> ShutdownConfig {
    let drain_delay = cx.duration("shutdown.drain_delay", raw.drain_delay.as_ref(), DEFAULT_DRAIN_DELAY);
    if drain_delay > MAX_DRAIN_DELAY {
        cx.bad(
            "shutdown.drain_delay",
            format!(
                "{} is longer than {}: load balancers stop sending within seconds",
                humantime::format_duration(drain_delay),
                humantime::format_duration(MAX_DRAIN_DELAY)
            ),
        );
    }
    ShutdownConfig {
        drain_timeout: cx.duration(
            "shutdown.drain_timeout",
            raw.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
        ),
        drain_delay,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShutdownConfig {
    /// Longest wait for in-flight requests once the drain begins, counted from the end of
    /// `drain_delay`. Default [`DEFAULT_DRAIN_TIMEOUT`], 20s.
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
    /// After SIGTERM, SIGINT or `POST /shutdown`: how long `/ready` answers 503 while
    /// everything is still served as usual (new connections too), so endpoints controllers
    /// and load balancers stop sending before the listeners close. Default
    /// [`DEFAULT_DRAIN_DELAY`], 0s (the drain begins at once); at most [`MAX_DRAIN_DELAY`].
    #[serde(with = "duration_str")]
    pub drain_delay: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Problem;
    use crate::config::tests::{SMALLEST, parse_str, smallest};

    #[test]
    fn default_is_what_the_smallest_config_gets() {
        assert_eq!(smallest().shutdown.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(smallest().shutdown.drain_delay, DEFAULT_DRAIN_DELAY);
        assert_eq!(DEFAULT_DRAIN_DELAY, Duration::ZERO, "the contract: no delay unless asked for");
    }

    #[test]
    fn drain_delay_is_read_and_shown_as_written() {
        let c = parse_str(&format!("{SMALLEST}shutdown: {{ drain_delay: 5s, drain_timeout: 20s }}\n"))
            .expect("valid");
        assert_eq!(c.shutdown.drain_delay, Duration::from_secs(5));
        let json = serde_json::to_value(&c.shutdown).expect("serialisable");
        assert_eq!(json["drain_delay"], "5s");
        let c = parse_str(&format!("{SMALLEST}shutdown: {{ drain_delay: 0 }}\n")).expect("valid");
        assert_eq!(c.shutdown.drain_delay, Duration::ZERO);
    }

    #[test]
    fn bad_drain_delays_are_named() {
        for (value, message) in [
            ("5", "`5` has no unit: write a duration like `5s` or `5ms`"),
            ("soon", "`soon` is not a duration"),
            ("10m", "10m is longer than 5m: load balancers stop sending within seconds"),
        ] {
            let err = parse_str(&format!("{SMALLEST}shutdown: {{ drain_delay: {value} }}\n")).unwrap_err();
            assert_eq!(err.problems.len(), 1, "for {value}: {:?}", err.problems);
            let Problem { path, message: got } = &err.problems[0];
            assert_eq!(path, "shutdown.drain_delay");
            assert!(got.starts_with(message), "for {value}: {got:?}");
        }
        assert!(parse_str(&format!("{SMALLEST}shutdown: {{ drain_delay: 5m }}\n")).is_ok());
    }
}
