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
/// the idle timeout (no bytes either way for `idle_timeout`, with no request waiting for its
/// response head: an idle keep-alive connection or a stalled response body) and the drain
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
            // No bytes either way for `idle_timeout`, and no request waiting for its response
            // head (those wait up to `request_timeout`): an idle keep-alive connection, or a
            // response whose body stalled (nginx's `proxy_read_timeout`, 60 s by default too).
            let idle = state.awaiting_head.load(Ordering::Relaxed) == 0
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::drain::Drain;

    /// A connection that runs until it is asked to shut down, then ends (if `obeys`).
    struct FakeConn {
        shut: bool,
        obeys: bool,
    }

    impl Future for FakeConn {
        type Output = Result<(), ()>;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            if self.shut && self.obeys { Poll::Ready(Ok(())) } else { Poll::Pending }
        }
    }

    fn shut(c: Pin<&mut FakeConn>) {
        c.get_mut().shut = true;
    }

    fn limits(header: u64, idle: u64) -> Limits {
        let mut l =
            crate::config::parse(std::path::Path::new("t"), "inbound: [{name: a, listen: 127.0.0.1:1}]")
                .unwrap()
                .inbound[0]
                .limits
                .clone();
        l.header_read_timeout = Duration::from_millis(header);
        l.idle_timeout = Duration::from_millis(idle);
        l
    }

    #[tokio::test]
    async fn a_head_not_finished_in_time_ends_the_connection() {
        let state = ConnState::new(); // a head is "started" from the connection's start
        let (_drain, watch) = Drain::new();
        let conn = FakeConn { shut: false, obeys: true };
        let ended = supervise(conn, shut, &state, &limits(100, 10_000), watch).await;
        assert_eq!(ended, Ok(Ended::HeaderTimeout));
    }

    #[tokio::test]
    async fn an_idle_connection_is_shut_down_then_closed() {
        let state = ConnState::new();
        state.head_started.store(0, Ordering::Relaxed);
        let (_drain, watch) = Drain::new();
        let started = Instant::now();
        let conn = FakeConn { shut: false, obeys: false };
        let ended = supervise(conn, shut, &state, &limits(10_000, 100), watch).await;
        assert_eq!(ended, Ok(Ended::Done));
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_request_waiting_for_its_head_is_not_idle() {
        let state = ConnState::new();
        state.head_started.store(0, Ordering::Relaxed);
        state.awaiting_head.store(1, Ordering::Relaxed);
        let (_drain, watch) = Drain::new();
        let conn = FakeConn { shut: false, obeys: true };
        let limits = limits(10_000, 50);
        let run = supervise(conn, shut, &state, &limits, watch);
        assert!(tokio::time::timeout(Duration::from_millis(300), run).await.is_err());
    }

    #[tokio::test]
    async fn the_drain_asks_the_connection_to_shut_down() {
        let state = ConnState::new();
        state.head_started.store(0, Ordering::Relaxed);
        let (drain, watch) = Drain::new();
        let conn = FakeConn { shut: false, obeys: true };
        let limits = limits(10_000, 10_000);
        let run = tokio::spawn(async move { supervise(conn, shut, &state, &limits, watch).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain.start();
        let ended = tokio::time::timeout(Duration::from_secs(1), run).await.unwrap().unwrap();
        assert_eq!(ended, Ok(Ended::Done));
    }
}
