//! When a telemetry writer thread (access log, span export) looks at its queue again.
//!
//! Records arrive once a request, tens of thousands a second. A thread that blocks on its
//! channel is woken by the request path for nearly every record: a futex call and a context
//! switch per request on the worker's core, which cost more than writing the record (issue
//! 12: tracing and access logs on took small GETs from 41–52k to 21k req/s). So these
//! threads never block on the queue: they drain what is there, then sleep a tick, and the
//! request path's `try_send` never has a sleeper to wake.
//!
//! Once nothing has come for a second, though, the thread blocks on its queue: an idle
//! sidecar's telemetry threads then sleep until there is work (a pod's sidecar idles far more
//! than it runs), and only the first record after a quiet spell wakes one. The records after
//! it find the thread ticking again.

use std::time::{Duration, Instant};

/// Between looks while records came in the last second: the queues hold 2,048 to 16,384
/// records, which at 100k req/s is more than 20 ms.
pub const TICK: Duration = Duration::from_millis(10);
/// Quiet for this long, the thread blocks on its queue instead of ticking.
const IDLE_AFTER: Duration = Duration::from_secs(1);

pub struct Pace {
    last_record: Instant,
}

impl Default for Pace {
    fn default() -> Self {
        Pace { last_record: Instant::now() - IDLE_AFTER }
    }
}

impl Pace {
    /// Records were taken from the queue.
    pub fn busy(&mut self) {
        self.last_record = Instant::now();
    }

    /// Nothing came for a while: block on the queue rather than tick.
    pub fn is_idle(&self) -> bool {
        self.last_record.elapsed() >= IDLE_AFTER
    }
}
