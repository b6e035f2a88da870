//! Choosing an endpoint for each try, and the per-endpoint state the choice reads: a
//! peak-EWMA of response latency, requests outstanding, and outlier ejection.
//!
//! P2C-EWMA as Finagle and Linkerd do it: pick two endpoints at random and take the one with
//! the lower cost, latency × (outstanding + 1). A slow endpoint's cost rises at its first slow
//! answer (the "peak" part: a slower sample replaces the average at once, faster ones decay
//! into it over `DECAY`), so it gets less traffic within a few requests, and it is tried again
//! as its average decays. Not responsible for the endpoint set (`discovery`) or for retries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Balance, OutlierConfig};
use crate::proxy::pool::Endpoint;

/// How fast the latency average forgets (Linkerd's default decay).
const DECAY: Duration = Duration::from_secs(10);
/// The cost of an endpoint with no sample yet: optimistic enough that new endpoints are
/// tried, not so low that they take all the traffic at once (Linkerd's default RTT).
const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// One address of an upstream, as discovery found it.
pub struct Member {
    pub addr: SocketAddr,
    /// The address's connections as HTTP/1.1 and as HTTP/2 (which one a try takes is
    /// `upstream.http`'s call).
    pub h1: Arc<Endpoint>,
    pub h2: Arc<Endpoint>,
    outstanding: AtomicUsize,
    /// The latency average in nanoseconds (an `f64`'s bits) and when it last moved (ns
    /// since `born`). Two atomics rather than a lock: the pick reads two members' costs and
    /// each try writes one, and a race between two threads only loses one sample's weight.
    ewma_nanos: AtomicU64,
    ewma_at: AtomicU64,
    born: Instant,
    /// Failures in a row (connect failures, resets, 5xx); reset by a success.
    failures: AtomicU32,
    /// How many times it was ejected; each ejection lasts this many `base_ejection`s.
    ejections: AtomicU32,
    /// Milliseconds since the upstream's epoch until which it is (or was last) ejected.
    ejected_until: AtomicU64,
}

/// What one try's outcome means for its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Member {
    pub fn new(addr: SocketAddr, h1: Arc<Endpoint>, h2: Arc<Endpoint>) -> Arc<Self> {
        Arc::new(Member {
            addr,
            h1,
            h2,
            outstanding: AtomicUsize::new(0),
            ewma_nanos: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            ewma_at: AtomicU64::new(0),
            born: Instant::now(),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
        })
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The latency estimate the balancer uses.
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.ewma_nanos() as u64)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    fn ewma_nanos(&self) -> f64 {
        f64::from_bits(self.ewma_nanos.load(Ordering::Relaxed))
    }

    fn cost(&self) -> f64 {
        self.ewma_nanos() * (self.outstanding() + 1) as f64
    }

    /// Counts a try as outstanding until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A response head arrived after `rtt`, at `now`: fold it into the average.
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        let current = self.ewma_nanos();
        let sample = rtt.as_nanos() as f64;
        let now = now.saturating_duration_since(self.born).as_nanos() as u64;
        let at = self.ewma_at.fetch_max(now, Ordering::Relaxed);
        let next = if sample > current {
            sample
        } else {
            let elapsed = now.saturating_sub(at) as f64 / 1e9;
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            current * w + sample * (1.0 - w)
        };
        self.ewma_nanos.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Records an outcome; returns how long to eject the endpoint for when this failure is
    /// the one that crosses `consecutive_failures` (the caller checks `max_ejected`).
    pub fn record(&self, outcome: Outcome, outlier: &OutlierConfig, now_ms: u64) -> Option<Duration> {
        match outcome {
            Outcome::Success => {
                self.failures.store(0, Ordering::Relaxed);
                self.forgive(now_ms, outlier.base_ejection);
                None
            }
            Outcome::Failure => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if outlier.consecutive_failures == 0 || n < outlier.consecutive_failures {
                    return None;
                }
                let times = self.ejections.load(Ordering::Relaxed) + 1;
                Some((outlier.base_ejection * times).min(outlier.max_ejection))
            }
        }
    }

    /// Ejects until `until_ms`; the failure count starts again, so that after the ejection
    /// one more failure does not eject it at once, but a run of them does, for longer.
    pub fn eject(&self, until_ms: u64) {
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.ejected_until.store(until_ms, Ordering::Relaxed);
    }

    /// A success a `base_ejection` or more after the last ejection ended makes the next
    /// ejection one step shorter (as Envoy decrements its multiplier while a host stays
    /// healthy); the step is taken once per `base_ejection`.
    fn forgive(&self, now_ms: u64, base: Duration) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if self.ejections.load(Ordering::Relaxed) == 0 || now_ms < until + base.as_millis() as u64 {
            return;
        }
        if self.ejected_until.compare_exchange(until, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let _ = self.ejections.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }
}

/// One try outstanding on a member.
pub struct InFlight(Arc<Member>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks among `members` those not ejected and not `avoid` (the endpoint the last try
/// failed on, when another one exists).
pub struct Picker {
    /// A xorshift state: random enough to spread picks, with no lock and no RNG crate.
    seed: AtomicU64,
    next: AtomicUsize,
}

impl Picker {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new().build_hasher().finish() | 1;
        Picker { seed: AtomicU64::new(seed), next: AtomicUsize::new(0) }
    }

    fn random(&self) -> u64 {
        // Races between threads only repeat a value now and then: harmless for balancing.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x
    }

    pub fn pick(
        &self,
        how: Balance,
        members: &[Arc<Member>],
        now_ms: u64,
        avoid: Option<&Arc<Member>>,
    ) -> Option<Arc<Member>> {
        // One pass for what the choice needs: how many can take the try, and whether the one
        // to avoid is among them (it is avoided only when another one is left).
        let (mut usable, mut avoid_usable) = (0, false);
        for m in members.iter().filter(|m| !m.is_ejected(now_ms)) {
            usable += 1;
            avoid_usable |= avoid.is_some_and(|a| Arc::ptr_eq(a, m));
        }
        let skip_avoided = avoid_usable && usable >= 2;
        let n = usable - usize::from(skip_avoided);
        // Every member eligible (nothing ejected, nothing avoided: nearly every pick): index
        // straight in; else the i-th eligible one.
        let nth = |i: usize| {
            if n == members.len() {
                return members.get(i);
            }
            let avoided = |m: &Arc<Member>| skip_avoided && avoid.is_some_and(|a| Arc::ptr_eq(a, m));
            let eligible = |m: &&Arc<Member>| !m.is_ejected(now_ms) && !avoided(m);
            members.iter().filter(eligible).nth(i)
        };
        let chosen = match n {
            0 => None,
            1 => nth(0),
            _ => match how {
                Balance::RoundRobin => nth(self.next.fetch_add(1, Ordering::Relaxed) % n),
                Balance::P2cEwma => {
                    let r = self.random();
                    let a = (r % n as u64) as usize;
                    // A second index that differs from the first.
                    let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                    let (a, b) = (nth(a)?, nth(b)?);
                    Some(if a.cost() <= b.cost() { a } else { b })
                }
            },
        };
        chosen.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Addr;
    use crate::proxy::pool::{EndpointKey, Pool, Proto};

    fn members(n: u16) -> Vec<Arc<Member>> {
        let pool = Pool::new();
        (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i));
                let key = |proto| EndpointKey { addr: Addr::Tcp(addr), tls: None, proto };
                Member::new(addr, pool.endpoint(key(Proto::Http1)), pool.endpoint(key(Proto::Http2)))
            })
            .collect()
    }

    #[test]
    fn p2c_sends_less_to_the_slow_endpoint() {
        let m = members(3);
        let now = Instant::now();
        m[0].observe_latency(Duration::from_millis(200), now);
        m[1].observe_latency(Duration::from_millis(2), now);
        m[2].observe_latency(Duration::from_millis(2), now);
        let p = Picker::new();
        let mut hits = [0; 3];
        for _ in 0..3000 {
            let chosen = p.pick(Balance::P2cEwma, &m, 0, None).unwrap();
            hits[m.iter().position(|x| Arc::ptr_eq(x, &chosen)).unwrap()] += 1;
        }
        // Never chosen when compared with a fast one; both fast ones take traffic.
        assert_eq!(hits[0], 0, "{hits:?}");
        assert!(hits[1] > 500 && hits[2] > 500, "{hits:?}");
    }

    #[test]
    fn outstanding_requests_raise_the_cost() {
        let m = members(2);
        let _busy: Vec<_> = (0..5).map(|_| m[0].start()).collect();
        let p = Picker::new();
        for _ in 0..100 {
            assert!(Arc::ptr_eq(&p.pick(Balance::P2cEwma, &m, 0, None).unwrap(), &m[1]));
        }
    }

    #[test]
    fn ejected_and_avoided_endpoints_are_skipped() {
        let m = members(3);
        let outlier = OutlierConfig {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected: 0.5,
        };
        assert_eq!(m[0].record(Outcome::Failure, &outlier, 0), None);
        assert_eq!(m[0].record(Outcome::Failure, &outlier, 0), Some(Duration::from_secs(30)));
        m[0].eject(1000);
        let p = Picker::new();
        for _ in 0..100 {
            let chosen = p.pick(Balance::RoundRobin, &m, 500, Some(&m[1])).unwrap();
            assert!(Arc::ptr_eq(&chosen, &m[2]));
        }
        // After its time it is back; the next ejection lasts twice as long.
        assert!(!m[0].is_ejected(1000));
        m[0].record(Outcome::Failure, &outlier, 1000);
        assert_eq!(m[0].record(Outcome::Failure, &outlier, 1000), Some(Duration::from_secs(60)));
        // A success a base ejection after it ended: one step shorter again.
        m[0].record(Outcome::Success, &outlier, 1000 + 30_000);
        m[0].record(Outcome::Failure, &outlier, 1000 + 30_001);
        assert_eq!(m[0].record(Outcome::Failure, &outlier, 1000 + 30_001), Some(Duration::from_secs(30)));
        // The only endpoint left is used even if the last try failed on it.
        let one = &m[2..];
        assert!(p.pick(Balance::P2cEwma, one, 0, Some(&m[2])).is_some());
    }
}
