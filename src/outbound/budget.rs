//! The retry budget: retries may add at most `ratio` of the first tries seen over the last
//! `WINDOW`, plus `min_per_second` (as Linkerd's budget and Finagle's `RetryBudget`), so when
//! an upstream fails everything, retries add a fifth to its load instead of multiplying it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(10);
const SLOTS: usize = 10;

pub struct Budget {
    ratio: f64,
    min_per_second: u32,
    epoch: Instant,
    // One lock per call and per retry, held for a few adds: cheaper than a try's syscalls.
    slots: Mutex<[Slot; SLOTS]>,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Which second (since `epoch`) the counts are for.
    second: u64,
    firsts: u64,
    retries: u64,
}

impl Budget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Budget { ratio, min_per_second, epoch: Instant::now(), slots: Mutex::new([Slot::default(); SLOTS]) }
    }

    /// The slots, with the one for `now` current (emptied if it held an older second).
    fn with_slot<T>(&self, now: Instant, f: impl FnOnce(&mut [Slot; SLOTS], usize) -> T) -> T {
        let second = now.saturating_duration_since(self.epoch).as_secs() + 1;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let i = (second % SLOTS as u64) as usize;
        if slots[i].second != second {
            slots[i] = Slot { second, firsts: 0, retries: 0 };
        }
        f(&mut slots, i)
    }

    /// A first try went out at `now`.
    pub fn deposit(&self, now: Instant) {
        self.with_slot(now, |slots, i| slots[i].firsts += 1);
    }

    /// Whether a retry may go out at `now`; counts it when it may.
    pub fn withdraw(&self, now: Instant) -> bool {
        self.with_slot(now, |slots, i| {
            let current = slots[i].second;
            let live = slots.iter().filter(|s| s.second + SLOTS as u64 > current && s.second != 0);
            let (firsts, retries) = live.fold((0, 0), |(f, r), s| (f + s.firsts, r + s.retries));
            let allowed = self.ratio * firsts as f64 + (self.min_per_second as u64 * WINDOW.as_secs()) as f64;
            if (retries as f64) < allowed {
                slots[i].retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_ratio_and_floor() {
        let b = Budget::new(0.2, 1);
        let now = Instant::now();
        for _ in 0..100 {
            b.deposit(now);
        }
        // 20 % of 100 first tries, plus 1/s over the 10 s window.
        let granted = (0..100).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 30);
    }

    #[test]
    fn a_zero_budget_still_has_its_floor() {
        let b = Budget::new(0.0, 0);
        let now = Instant::now();
        b.deposit(now);
        assert!(!b.withdraw(now));
        // Retries age out with their window.
        let b = Budget::new(0.0, 1);
        let granted = (0..20).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 10);
        assert!(b.withdraw(now + WINDOW + Duration::from_secs(1)));
    }
}
