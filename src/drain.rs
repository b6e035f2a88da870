//! The drain signal every long-lived task takes.
//!
//! Draining works by counting: each connection holds a `DrainWatch`; when the drain begins
//! they finish what is in flight and drop it, and `Drain::wait` returns once none is left.
//! `client` is the other end: `sidecar drain`, which asks a running process to begin one.

pub mod client;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// The side that starts a drain and waits for it.
pub struct Drain {
    tx: watch::Sender<bool>,
    flag: Arc<AtomicBool>,
}

/// The side every listener and connection holds.
#[derive(Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<bool>,
    /// The same fact as `rx`, readable per request without the watch's lock.
    flag: Arc<AtomicBool>,
}

impl Drain {
    pub fn new() -> (Drain, DrainWatch) {
        let (tx, rx) = watch::channel(false);
        let flag = Arc::new(AtomicBool::new(false));
        (Drain { tx, flag: flag.clone() }, DrainWatch { rx, flag })
    }

    /// Tells every holder to stop taking new work. Idempotent.
    pub fn start(&self) {
        self.flag.store(true, Ordering::Release);
        self.tx.send_replace(true);
    }

    /// Waits until every `DrainWatch` is dropped or `timeout` passes; true when all finished.
    pub async fn wait(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.tx.closed()).await.is_ok()
    }

    /// How many holders are still working (connections, listeners).
    pub fn remaining(&self) -> usize {
        self.tx.receiver_count()
    }
}

impl DrainWatch {
    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Resolves when the drain begins (at once if it already has).
    pub async fn signaled(&mut self) {
        let _ = self.rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_when_every_holder_is_gone() {
        let (drain, watch) = Drain::new();
        let mut held = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(held);
        });
        drain.start();
        assert!(drain.wait(Duration::from_secs(5)).await);
        task.await.unwrap();
    }
}
