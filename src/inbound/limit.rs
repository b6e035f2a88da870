//! A listener's connection limit: a count of open connections against a maximum that a
//! reload can change while connections are open.
//!
//! Not a `Semaphore`: shrinking one can only forget permits nobody holds, and a new one per
//! reload forgets the connections already open (issue 9, bug 1). Here the count is the
//! truth and the maximum is just compared with it, so a lower limit takes effect at once
//! for new connections and open ones finish undisturbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct ConnLimit {
    open: AtomicUsize,
    max: AtomicUsize,
}

/// One open connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit(Arc<ConnLimit>);

impl ConnLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnLimit { open: AtomicUsize::new(0), max: AtomicUsize::new(max) })
    }

    /// A place for one more connection, if the limit allows it.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ConnPermit(self.clone()))
    }

    /// A new maximum for connections accepted from now on.
    pub fn resize(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_holds_across_a_resize() {
        let limit = ConnLimit::new(2);
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        // A reload with the same limit: the two open connections still count.
        limit.resize(2);
        assert!(limit.try_acquire().is_none());
        // Lowered below what is open: nothing new until enough have closed.
        limit.resize(1);
        drop(a);
        assert!(limit.try_acquire().is_none());
        limit.resize(3);
        let _c = limit.try_acquire().unwrap();
        assert_eq!(limit.open(), 2);
    }
}
