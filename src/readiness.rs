//! Readiness as named tasks: each part of the process that must be up before the pod takes
//! traffic registers a name and marks itself ready (or not) through its handle; `/ready`
//! answers 200 when every one is ready and names those that are not.
//!
//! Handles are lock-free to set (the health checker sets its own every interval); the list
//! of tasks is locked only to register one and to answer `/ready` on the admin thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Readiness {
    tasks: Mutex<Vec<(&'static str, Arc<AtomicBool>)>>,
    draining: AtomicBool,
}

/// One task's say in readiness. Starts not ready.
#[derive(Clone)]
pub struct ReadyHandle(Arc<AtomicBool>);

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A task that must be ready before the pod is, by the name `/ready` shows.
    pub fn register(&self, name: &'static str) -> ReadyHandle {
        let flag = Arc::new(AtomicBool::new(false));
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push((name, flag.clone()));
        ReadyHandle(flag)
    }

    /// Not ready from now on, whatever the tasks say: the process is leaving.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// What keeps the pod from being ready; empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        if self.draining.load(Ordering::Acquire) {
            return vec!["draining"];
        }
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.iter().filter(|(_, ready)| !ready.load(Ordering::Acquire)).map(|(name, _)| *name).collect()
    }
}

impl ReadyHandle {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_task_is_and_names_those_that_are_not() {
        let r = Readiness::new();
        let inbound = r.register("inbound");
        let app = r.register("app");
        assert_eq!(r.not_ready(), ["inbound", "app"]);
        inbound.set(true);
        assert_eq!(r.not_ready(), ["app"]);
        app.set(true);
        assert!(r.not_ready().is_empty());
        app.set(false);
        assert_eq!(r.not_ready(), ["app"]);
        app.set(true);
        r.set_draining();
        assert_eq!(r.not_ready(), ["draining"]);
    }
}
