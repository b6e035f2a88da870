//! The `runtime` section: the data plane's worker threads.
//!
//! Not responsible for building the runtimes or for counting the CPUs the process may use
//! when `worker_threads` is 0 (both in `crate::app`).

use serde::{Deserialize, Serialize};

use super::parse::Ctx;

/// The contract's (INTERFACE.md): 0 means one worker per CPU the process may use, which
/// follows the pod's CPU limit without the file repeating it.
pub const DEFAULT_WORKER_THREADS: usize = 0;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRuntime {
    worker_threads: Option<u64>,
}

pub(super) fn validate(raw: RawRuntime, cx: &mut Ctx) -> RuntimeConfig {
    let worker_threads = raw.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS as u64);
    if worker_threads > 1024 {
        cx.bad("runtime.worker_threads", format!("{worker_threads} is more than 1024"));
    }
    RuntimeConfig { worker_threads: worker_threads as usize }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuntimeConfig {
    /// Worker threads of the data plane. 0 (the default, [`DEFAULT_WORKER_THREADS`]): one per
    /// CPU this process may use.
    pub worker_threads: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::smallest;

    #[test]
    fn default_is_what_the_smallest_config_gets() {
        assert_eq!(smallest().runtime.worker_threads, DEFAULT_WORKER_THREADS);
    }
}
