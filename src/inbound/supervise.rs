//! The supervisor of one client connection: drives hyper's connection future while
//! enforcing the header timeout, the idle timeout and the drain. Knows nothing of requests
//! beyond the counters in `ConnState`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::guard::ConnState;
use crate::config::Limits;
use crate::drain::DrainWatch;

/// How a supervised connection ended, when not by hyper.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Done,
    HeaderTimeout,
}

/// Drives a connection while enforcing the header timeout (a request head must arrive
/// whole within `header_read_timeout` of its first byte, or of the connection's start),
/// the idle timeout (no request in flight and no bytes for `idle_timeout`) and the drain
/// (idle HTTP/1 closed, busy HTTP/1 closed after the current response, HTTP/2 GOAWAY).
/// One timer per connection, ticking at half the smaller timeout.
///
/// Written as a poll function rather than `select!`: the task wakes two or three times per
/// request, almost always for the connection, and `select!` would poll the drain signal (a
/// lock inside the watch) and the timer on every one of those wake-ups. Here each is polled
/// only to register this task's waker (once, and after each timer reset); a wake-up then
/// checks them with plain reads: the drain flag and the timer's elapsed bit.
pub async fn supervise<E, C: Future<Output = Result<(), E>>>(
    conn: C,
    shut_down: fn(std::pin::Pin<&mut C>),
    state: &ConnState,
    limits: &Limits,
    mut drain: DrainWatch,
) -> Result<Ended, E> {
    use std::task::Poll;

    let mut conn = std::pin::pin!(conn);
    let header_ms = limits.header_read_timeout.as_millis() as u64;
    let tick = (limits.header_read_timeout.min(limits.idle_timeout) / 2).max(Duration::from_millis(50));
    let mut sleep = std::pin::pin!(tokio::time::sleep(tick));
    let mut last_activity = state.activity.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    let mut shutting_down = false;
    let draining = drain.clone();
    let mut drained = std::pin::pin!(drain.signaled());
    let mut drain_armed = false;
    let mut timer_armed = false;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(res.map(|()| Ended::Done));
            }
            if !shutting_down {
                let drain_now = if drain_armed {
                    draining.is_draining()
                } else {
                    drain_armed = true;
                    drained.as_mut().poll(cx).is_ready()
                };
                if drain_now {
                    shutting_down = true;
                    shut_down(conn.as_mut());
                    continue; // the connection acts on it when polled
                }
            }
            if timer_armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            if !timer_armed {
                timer_armed = true;
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // The tick: check the timeouts, then re-arm the timer.
            let now = Instant::now();
            sleep.as_mut().reset((now + tick).into());
            timer_armed = false;
            let activity = state.activity.load(Ordering::Relaxed);
            if activity != last_activity {
                last_activity = activity;
                last_change = now;
            }
            let head = state.head_started.load(Ordering::Relaxed);
            if head != 0 && state.now_ms().saturating_sub(head) >= header_ms {
                return Poll::Ready(Ok(Ended::HeaderTimeout));
            }
            let idle = state.in_flight.load(Ordering::Relaxed) == 0
                && now.duration_since(last_change) >= limits.idle_timeout;
            if idle {
                if shutting_down {
                    return Poll::Ready(Ok(Ended::Done));
                }
                shutting_down = true;
                shut_down(conn.as_mut());
            }
        }
    })
    .await
}
