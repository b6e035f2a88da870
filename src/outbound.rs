//! The ambassador: calls the app makes to an outbound listener on localhost, carried to the
//! named upstream's endpoints with balancing, timeouts, budgeted retries and ejection.
//!
//! Outbound listeners are served by the same HTTP server as inbound ones (`crate::inbound`:
//! accept loop, framing guard, limits, drain); what differs is the trip, which is here:
//! `Upstream::call` picks an endpoint (`balance`), sends the request on that endpoint's pool
//! (`proxy::pool`, the same HTTP/1.1 client inbound uses), judges the answer, and tries again
//! elsewhere when that is safe and the budget (`budget`) allows. The endpoint set comes from
//! `discovery`. Not responsible for headers or the response's way back (`inbound::http`).

mod balance;
mod budget;
pub mod discovery;
mod metrics;
pub mod route;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderName, Method, Request, Response};
use http_body_util::BodyExt as _;
use tokio::sync::watch;

use self::balance::{Member, Outcome, Picker};
use self::budget::Budget;
pub use self::metrics::{OutboundFamilies, UpstreamMetrics};
use crate::config::HttpVersion;
use crate::config::OutboundConfig;
use crate::net::Addr;
use crate::proxy::body::RequestBody;
use crate::proxy::body::Upstream as UpstreamBody;
use crate::proxy::connect::PoolError;
use crate::proxy::h1::Outgoing;
use crate::proxy::headers::to_absolute_form;
use crate::proxy::pool::{EndpointKey, H1Conn, Pool, Proto};
use crate::tls::client::ClientTls;
use http::uri::Scheme;

/// A request the app marks safe to send twice, whatever its method (a POST with an
/// idempotency key, say). Removed before the request leaves.
pub static RETRYABLE_HEADER: HeaderName = HeaderName::from_static("x-sidecar-retryable");

/// The latency a failed connection or exchange counts as, for balancing: an endpoint that
/// refuses connections answers in microseconds, and would otherwise win every P2C choice
/// (Finagle's "failure penalty"). Its average decays back as other samples come in.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Why a call got no usable answer: each becomes a local reply naming the upstream.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No endpoint to try: none resolved, or all ejected.
    #[error("upstream {upstream}: {why}")]
    Unavailable { upstream: Arc<str>, why: String },
    /// The last try's `per_try_timeout` expired.
    #[error("upstream {upstream}: per_try_timeout ({after:?}) expired")]
    PerTryTimeout { upstream: Arc<str>, after: Duration },
    /// The last try failed on its connection.
    #[error("upstream {upstream}: {source}")]
    Failed { upstream: Arc<str>, source: PoolError },
    /// The app's request body broke off while it was being read.
    #[error("request body: {0}")]
    ClientBody(hyper::Error),
}

/// One outbound listener's upstream: its endpoints, their state, and the call logic.
/// One endpoint as the admin page shows it.
#[derive(serde::Serialize)]
pub struct EndpointState {
    pub address: String,
    /// `healthy`, `ejected` or `draining`.
    pub state: &'static str,
    pub ewma_ms: f64,
    pub outstanding: usize,
}

pub struct Upstream {
    pub name: Arc<str>,
    config: OutboundConfig,
    /// What a request's `Host` becomes when the app addressed the sidecar itself
    /// (`localhost:15001`): the first endpoint as written, which virtual hosts expect.
    authority: http::HeaderValue,
    members: ArcSwap<Vec<Arc<Member>>>,
    /// Removed from the answer while requests were in flight on them.
    draining: Mutex<Vec<Arc<Member>>>,
    /// Why the set is empty, when it is (for the 503's body).
    empty_because: Mutex<String>,
    /// True once discovery has published its first set: until then a call waits for it.
    ready: watch::Sender<bool>,
    /// The same, read without the watch's lock on every call.
    resolved: AtomicBool,
    pool: Arc<Pool>,
    /// TLS origination to every endpoint, when configured.
    tls: Option<Arc<ClientTls>>,
    picker: Picker,
    budget: Budget,
    epoch: Instant,
    metrics: UpstreamMetrics,
}

impl Upstream {
    pub fn new(config: OutboundConfig, tls: Option<Arc<ClientTls>>, metrics: UpstreamMetrics) -> Arc<Self> {
        let first = &config.upstream.endpoints[0];
        let authority = http::HeaderValue::from_str(&first.to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("localhost"));
        Arc::new(Upstream {
            name: config.name.as_str().into(),
            authority,
            members: ArcSwap::from_pointee(Vec::new()),
            draining: Mutex::new(Vec::new()),
            empty_because: Mutex::new("its endpoints are not resolved yet".to_owned()),
            ready: watch::channel(false).0,
            resolved: AtomicBool::new(false),
            pool: Pool::new(),
            tls,
            picker: Picker::new(),
            budget: Budget::new(config.retry.budget, config.retry.min_retries_per_second),
            epoch: Instant::now(),
            metrics,
            config,
        })
    }

    pub fn config(&self) -> &OutboundConfig {
        &self.config
    }

    pub fn authority(&self) -> &http::HeaderValue {
        &self.authority
    }

    /// `t` as milliseconds since the upstream's epoch: how ejection times are kept.
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Discovery's new answer: members for new addresses, the same members (and their
    /// latency and ejection state) for addresses still there, the rest drained.
    pub(crate) fn publish(&self, addrs: &[SocketAddr], unresolved: usize, why: Option<String>) {
        let current = self.members.load();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let member = match current.iter().find(|m| m.addr == *addr) {
                Some(m) => m.clone(),
                None => {
                    let tls = self.tls.as_ref().map(|t| t.key().clone());
                    let key = |proto| EndpointKey { addr: Addr::Tcp(*addr), tls: tls.clone(), proto };
                    let endpoint = |proto| self.pool.endpoint_with(key(proto), self.tls.clone());
                    Member::new(*addr, endpoint(Proto::Http1), endpoint(Proto::Http2))
                }
            };
            next.push(member);
        }
        {
            let mut draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
            for gone in current.iter().filter(|m| !addrs.contains(&m.addr)) {
                tracing::info!(upstream = %self.name, endpoint = %gone.addr, in_flight = gone.outstanding(), "endpoint left the answer; draining it");
                draining.push(gone.clone());
            }
            draining.retain(|m| m.outstanding() > 0);
        }
        // Idle connections to addresses no longer in the set close with their endpoint.
        self.pool.retain(|k| matches!(k.addr, Addr::Tcp(a) if addrs.contains(&a)));
        if next.is_empty() {
            let why = why.unwrap_or_else(|| "no endpoint resolved".to_owned());
            *self.empty_because.lock().unwrap_or_else(|p| p.into_inner()) = why;
        }
        self.members.store(Arc::new(next));
        self.ready.send_replace(true);
        self.resolved.store(true, Ordering::Release);
        self.update_gauges(unresolved);
    }

    /// Each endpoint's state, for the admin page.
    pub fn endpoint_states(&self) -> Vec<EndpointState> {
        let now = self.ms(Instant::now());
        let state = |m: &Member, state| EndpointState {
            address: m.addr.to_string(),
            state,
            ewma_ms: m.ewma().as_secs_f64() * 1e3,
            outstanding: m.outstanding(),
        };
        let mut out: Vec<_> = self
            .members
            .load()
            .iter()
            .map(|m| state(m, if m.is_ejected(now) { "ejected" } else { "healthy" }))
            .collect();
        let draining = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(draining.iter().map(|m| state(m, "draining")));
        out
    }

    pub fn retries(&self) -> u64 {
        self.metrics.retries.get()
    }

    /// The last lookup failed (the last good set is still used).
    pub fn unresolved(&self) -> bool {
        self.metrics.unresolved() > 0
    }

    fn update_gauges(&self, unresolved: usize) {
        let now = self.ms(Instant::now());
        let members = self.members.load();
        let ejected = members.iter().filter(|m| m.is_ejected(now)).count();
        let draining = self.draining.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.metrics.set_endpoints(members.len() - ejected, ejected, draining, unresolved);
    }

    /// Sends `req` (origin-form, headers ready) to an endpoint, retrying where that is safe.
    /// `sticky`: the connection the app's connection used last; taken when the first try
    /// picks its endpoint (no pool queue touched), else given back to its pool.
    /// `now`: when the request arrived (read once for its metrics; the budget, the pick and
    /// the first try's latency reuse it rather than read the clock again).
    pub async fn call(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        mut sticky: Option<H1Conn>,
        mut now: Instant,
    ) -> Result<Response<UpstreamBody>, CallError> {
        let cfg = &self.config;
        let (mut parts, body) = req.into_parts();
        // Removed whatever it says: it is a word between the app and its sidecar.
        let marked = parts
            .headers
            .remove(&RETRYABLE_HEADER)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let retryable_request = is_idempotent(&parts.method) || marked;
        // Kept for a replay only when small and of known size; otherwise it streams once.
        // A request that is not safe to repeat is still kept for a connect failure, where
        // nothing was sent.
        let replay = if cfg.retry.attempts > 1 && (retryable_request || cfg.retry.on.connect_failure) {
            replayable(body, cfg.retry.max_body).await.map_err(CallError::ClientBody)?
        } else {
            Err(body)
        };
        let (mut body, replay) = match replay {
            Ok(bytes) => (None, Some(bytes)),
            Err(body) => (Some(body), None),
        };
        if !self.resolved.load(Ordering::Acquire) {
            let mut ready = self.ready.subscribe();
            let _ = tokio::time::timeout(cfg.connect_timeout, ready.wait_for(|r| *r)).await;
            now = Instant::now();
        }
        self.budget.deposit(now);
        let mut last: Option<Arc<Member>> = None;
        let mut attempt = 1;
        loop {
            let member = self.pick(last.as_ref(), now)?;
            let body = match (&replay, body.take()) {
                (Some(bytes), _) => RequestBody::full(bytes.clone()),
                (None, Some(b)) => b,
                (None, None) => unreachable!("a streamed body is sent once"),
            };
            let preferred = match sticky.take() {
                Some(c) if c.is_to(&member.h1) => Some(c),
                Some(c) => {
                    c.return_to_pool();
                    None
                }
                None => None,
            };
            let (outcome, ended) = self.try_once(&member, &parts, body, preferred, now).await;
            let can_retry = attempt < cfg.retry.attempts && replay.is_some();
            let verdict = self.judge(&outcome, retryable_request);
            self.record(&member, verdict.failure, ended);
            let retry = verdict.retry && can_retry && self.budget.withdraw(ended);
            match outcome {
                Ok(resp) if !retry => return Ok(resp),
                Err(e) if !retry => return Err(e),
                _ => {}
            }
            self.metrics.retries.inc();
            tracing::debug!(upstream = %self.name, endpoint = %member.addr, attempt, "retrying on another endpoint");
            tokio::time::sleep(crate::proxy::connect::jittered(cfg.retry.backoff * (1 << (attempt - 1))))
                .await;
            now = Instant::now();
            last = Some(member);
            attempt += 1;
        }
    }

    /// A connection for an outbound `tcp` listener: an endpoint picked like a request's,
    /// and another one tried when the connect fails (nothing was sent), up to `attempts`.
    pub async fn connect_tcp(self: &Arc<Self>) -> Result<crate::net::Stream, CallError> {
        let cfg = &self.config;
        let mut last: Option<Arc<Member>> = None;
        let mut attempt = 1;
        let mut started = Instant::now();
        self.budget.deposit(started);
        loop {
            let member = self.pick(last.as_ref(), started)?;
            let in_flight = member.start();
            let connected = member.h1.connect(cfg.connect_timeout).await;
            let ended = Instant::now();
            match connected {
                Ok(stream) => {
                    member.observe_latency(ended - started, ended);
                    self.record(&member, false, ended);
                    // Counted as outstanding for as long as the connection is open would keep
                    // long-lived connections from balancing; the connect is the try.
                    drop(in_flight);
                    return Ok(stream);
                }
                Err(source) => {
                    drop(in_flight);
                    member.observe_latency(FAILURE_PENALTY, ended);
                    self.metrics.connect_error(&source);
                    self.record(&member, true, ended);
                    let retry = cfg.retry.on.connect_failure && attempt < cfg.retry.attempts;
                    if !(retry && self.budget.withdraw(ended)) {
                        return Err(CallError::Failed { upstream: self.name.clone(), source });
                    }
                }
            }
            self.metrics.retries.inc();
            started = ended;
            last = Some(member);
            attempt += 1;
        }
    }

    /// A member for the next try, or why there is none (503 naming the upstream).
    fn pick(&self, avoid: Option<&Arc<Member>>, now: Instant) -> Result<Arc<Member>, CallError> {
        let members = self.members.load();
        self.picker
            .pick(self.config.balance, &members, self.ms(now), avoid)
            .ok_or_else(|| CallError::Unavailable { upstream: self.name.clone(), why: self.why_empty() })
    }

    fn why_empty(&self) -> String {
        let members = self.members.load();
        if members.is_empty() {
            return self.empty_because.lock().unwrap_or_else(|p| p.into_inner()).clone();
        }
        format!("all {} endpoints are ejected after consecutive failures", members.len())
    }

    /// One try, from `started`; with when it ended (the clock read once for both the
    /// latency sample and outlier detection).
    async fn try_once(
        &self,
        member: &Arc<Member>,
        head: &http::request::Parts,
        body: RequestBody,
        preferred: Option<H1Conn>,
        started: Instant,
    ) -> (Result<Response<UpstreamBody>, CallError>, Instant) {
        let _in_flight = member.start();
        let send = self.send(member, head, body, preferred);
        let result = match self.config.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r,
                Err(_) => {
                    let ended = Instant::now();
                    member.observe_latency(t, ended);
                    return (Err(CallError::PerTryTimeout { upstream: self.name.clone(), after: t }), ended);
                }
            },
            None => send.await,
        };
        let ended = Instant::now();
        let outcome = match result {
            Ok(resp) => {
                member.observe_latency(ended - started, ended);
                Ok(resp)
            }
            Err(source) => {
                // A failure answers fast, and must not look like a fast endpoint.
                member.observe_latency(FAILURE_PENALTY, ended);
                self.metrics.connect_error(&source);
                Err(CallError::Failed { upstream: self.name.clone(), source })
            }
        };
        (outcome, ended)
    }

    /// One try on `member`, in the protocol `upstream.http` asks for: HTTP/1.1 on a pooled
    /// connection, or a stream on the endpoint's shared HTTP/2 connection (`auto`: what a
    /// PING or, over TLS, ALPN found the endpoint speaks). `head` is the call's, borrowed:
    /// HTTP/1.1 encodes straight from it; HTTP/2 takes a copy it can rewrite.
    async fn send(
        &self,
        member: &Member,
        head: &http::request::Parts,
        body: RequestBody,
        preferred: Option<H1Conn>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let timeout = self.config.connect_timeout;
        let h2 = match self.config.upstream.http {
            HttpVersion::Http1 => false,
            HttpVersion::Http2 => true,
            HttpVersion::Auto => member.h2.speaks_h2(timeout).await,
        };
        if !h2 {
            // (An HTTP/2 try leaves `preferred` to be dropped: it goes back to its pool.)
            let out = Outgoing::from_head(head, body);
            return member.h1.send_encoded(out, preferred, timeout).await.map(|r| r.map(UpstreamBody::H1));
        }
        let scheme = if self.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
        let mut parts = clone_parts(head);
        to_absolute_form(&mut parts.uri, &mut parts.headers, &Addr::Tcp(member.addr), scheme);
        parts.version = http::Version::HTTP_2;
        member.h2.send_h2(Request::from_parts(parts, body), timeout).await.map(|r| r.map(UpstreamBody::Hyper))
    }

    /// Whether a try's outcome counts against its endpoint, and whether to try again.
    fn judge(&self, outcome: &Result<Response<UpstreamBody>, CallError>, retryable_request: bool) -> Verdict {
        let on = &self.config.retry.on;
        match outcome {
            Ok(resp) => {
                let status = resp.status().as_u16();
                Verdict {
                    failure: status >= 500,
                    retry: retryable_request && on.statuses.binary_search(&status).is_ok(),
                }
            }
            // Never sent: safe for any method.
            Err(CallError::Failed { source, .. }) if source.is_retryable() => {
                Verdict { failure: true, retry: on.connect_failure }
            }
            // The connection broke after the request went out: a reset, retried for requests
            // safe to repeat. An answer that was not HTTP is not retried: it was an answer.
            Err(CallError::Failed { source, .. }) => Verdict {
                failure: true,
                retry: on.reset && retryable_request && source.kind() != "app_invalid_response",
            },
            // As Envoy: a try that timed out counts as a 504 from that endpoint.
            Err(CallError::PerTryTimeout { .. }) => Verdict {
                failure: true,
                retry: retryable_request && (on.reset || on.statuses.binary_search(&504).is_ok()),
            },
            Err(_) => Verdict { failure: false, retry: false },
        }
    }

    /// Feeds the outcome to outlier detection: ejects the endpoint when it crosses
    /// `consecutive_failures`, unless that would eject more than `max_ejected`.
    fn record(self: &Arc<Self>, member: &Arc<Member>, failure: bool, at: Instant) {
        let outlier = &self.config.outlier;
        let outcome = if failure { Outcome::Failure } else { Outcome::Success };
        let now = self.ms(at);
        let Some(time) = member.record(outcome, outlier, now) else { return };
        let members = self.members.load();
        let ejected = members.iter().filter(|m| m.is_ejected(now)).count();
        // As Envoy: at least one endpoint may always be ejected.
        let allowed = ((members.len() as f64 * outlier.max_ejected).floor() as usize).max(1);
        if ejected >= allowed || member.is_ejected(now) {
            return;
        }
        member.eject(now + time.as_millis() as u64);
        tracing::warn!(upstream = %self.name, endpoint = %member.addr, for_ = ?time, failures = outlier.consecutive_failures, "endpoint ejected after consecutive failures");
        self.update_gauges(self.metrics.unresolved());
        let (me, member) = (Arc::downgrade(self), member.clone());
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            if let Some(me) = me.upgrade() {
                tracing::info!(upstream = %me.name, endpoint = %member.addr, "ejection over; endpoint back in rotation");
                me.update_gauges(me.metrics.unresolved());
            }
        });
    }
}

struct Verdict {
    failure: bool,
    retry: bool,
}

/// RFC 9110 §9.2.2: a repeat has the effect of one request.
fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// The body as bytes when it is empty or declares a length within `max`; else the body
/// back, untouched, to stream once.
async fn replayable(body: RequestBody, max: u64) -> Result<Result<Bytes, RequestBody>, hyper::Error> {
    if http_body::Body::is_end_stream(&body) {
        return Ok(Ok(Bytes::new()));
    }
    match body.exact_len() {
        Some(n) if n <= max => Ok(Ok(body.collect().await?.to_bytes())),
        _ => Ok(Err(body)),
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}
