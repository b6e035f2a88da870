//! W3C Trace Context (https://www.w3.org/TR/trace-context/) for the sidecar's own span on
//! each request: the caller's `traceparent` read, the sampling decision made, and the
//! `traceparent` the next hop gets written, naming the sidecar's span as its parent.
//!
//! Not responsible for recording or exporting spans (`telemetry::spans`). `tracestate` is
//! never parsed: it travels unchanged beside a valid `traceparent`, and is dropped with an
//! invalid one (the recommendation's §3.3.1: a vendor that cannot parse `traceparent` must
//! not trust `tracestate`).

use http::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The caller's trace, as its `traceparent` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// What the caller sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// No `traceparent`: the sidecar starts the trace.
    None,
    /// A `traceparent` that is not one (bad length, characters, all-zero ids, version `ff`,
    /// several headers): replaced by a new trace, never forwarded.
    Invalid,
    Valid(Parent),
}

/// Reads the request's `traceparent` (§3.2): version `00` exactly as specified, a later
/// version by its first four fields (forward compatibility, §4.3).
pub fn read(headers: &HeaderMap) -> Incoming {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let Some(value) = all.next() else { return Incoming::None };
    if all.next().is_some() {
        return Incoming::Invalid;
    }
    parse(value.as_bytes()).map_or(Incoming::Invalid, Incoming::Valid)
}

fn parse(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])? as u8;
    // `ff` is forbidden; version 00 has exactly four fields, later ones may add more after
    // a dash.
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex(&v[3..35])?;
    let span_id = hex(&v[36..52])? as u64;
    let flags = hex(&v[53..55])? as u8;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent { trace_id, span_id, sampled: flags & 1 == 1 })
}

/// Lower-case hex only: the recommendation forbids upper case in every field.
fn hex(s: &[u8]) -> Option<u128> {
    s.iter().try_fold(0u128, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | d as u128)
    })
}

/// The trace id a valid `traceparent` carries, as the access log writes it (tracing off:
/// the caller's trace is logged, and the header goes to the app unchanged).
pub fn caller_trace_id(headers: &HeaderMap) -> Option<u128> {
    match read(headers) {
        Incoming::Valid(p) => Some(p.trace_id),
        _ => None,
    }
}

/// A trace id as the access log and exemplars write it: 32 lower-case hex digits.
pub struct TraceHex([u8; 32]);

impl TraceHex {
    pub fn new(id: u128) -> Self {
        let mut b = [0u8; 32];
        put_hex(&mut b, &id.to_be_bytes());
        TraceHex(b)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits")
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Parent-based sampling with a ratio for new traces, as OpenTelemetry's
/// `ParentBased(TraceIdRatioBased)`: a caller's decision is kept, and a trace started here is
/// sampled when its id's low 63 bits fall under `ratio` of their range, so every sidecar with
/// the same ratio makes the same decision for the same trace.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    threshold: u64,
}

impl Sampler {
    pub fn new(ratio: f64) -> Self {
        let threshold = if ratio >= 1.0 { u64::MAX } else { (ratio.max(0.0) * (1u64 << 63) as f64) as u64 };
        Sampler { threshold }
    }

    fn new_trace(&self, trace_id: u128) -> bool {
        self.threshold == u64::MAX || ((trace_id as u64) >> 1) < self.threshold
    }
}

/// The sidecar's span for one request: its place in the trace and whether it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span, when the trace came in with the request.
    pub parent: Option<u64>,
    pub sampled: bool,
}

impl SpanContext {
    /// Starts the sidecar's span under what the caller sent.
    pub fn start(incoming: Incoming, sampler: &Sampler) -> Self {
        let span_id = nonzero_u64();
        match incoming {
            Incoming::Valid(p) => {
                SpanContext { trace_id: p.trace_id, span_id, parent: Some(p.span_id), sampled: p.sampled }
            }
            Incoming::None | Incoming::Invalid => {
                let trace_id = (nonzero_u64() as u128) << 64 | rand::random::<u64>() as u128;
                SpanContext { trace_id, span_id, parent: None, sampled: sampler.new_trace(trace_id) }
            }
        }
    }

    /// Rewrites the request's trace headers for the next hop: its parent is this span.
    pub fn propagate(&self, incoming: Incoming, headers: &mut HeaderMap) {
        if incoming == Incoming::Invalid {
            headers.remove(&TRACESTATE);
        }
        headers.insert(TRACEPARENT.clone(), self.traceparent());
    }

    /// `00-<trace-id>-<span-id>-<flags>`.
    pub fn traceparent(&self) -> HeaderValue {
        let mut b = [0u8; 55];
        b[..3].copy_from_slice(b"00-");
        put_hex(&mut b[3..35], &self.trace_id.to_be_bytes());
        b[35] = b'-';
        put_hex(&mut b[36..52], &self.span_id.to_be_bytes());
        b[52] = b'-';
        b[53] = b'0';
        b[54] = if self.sampled { b'1' } else { b'0' };
        HeaderValue::from_bytes(&b).expect("hex digits and dashes are a valid header value")
    }
}

/// Ids are random and never zero (zero means "invalid" in the recommendation).
fn nonzero_u64() -> u64 {
    loop {
        let v = rand::random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

/// Writes `bytes` as lower-case hex into `out` (twice their length), a byte at a time: the
/// request path writes 48 digits a request, and shifting a u128 per digit cost 400
/// instructions.
fn put_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[(b >> 4) as usize];
        pair[1] = DIGITS[(b & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(TRACEPARENT.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_the_recommendations_example() {
        let Incoming::Valid(p) = read(&headers(&[EXAMPLE])) else { panic!("valid") };
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
    }

    #[test]
    fn refuses_what_the_recommendation_refuses() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 with more
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  // short id
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // separator
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // later version, no dash
        ] {
            assert_eq!(read(&headers(&[bad])), Incoming::Invalid, "{bad}");
        }
        assert_eq!(read(&headers(&[EXAMPLE, EXAMPLE])), Incoming::Invalid, "two headers");
        assert_eq!(read(&HeaderMap::new()), Incoming::None);
        assert_eq!(caller_trace_id(&headers(&[EXAMPLE])), Some(0x4bf92f3577b34da6a3ce929d0e0e4736));
        assert_eq!(
            TraceHex::new(0x4bf92f3577b34da6a3ce929d0e0e4736).as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(caller_trace_id(&headers(&["garbage"])), None);
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert!(matches!(read(&headers(&[v])), Incoming::Valid(_)));
    }

    #[test]
    fn the_next_hop_gets_this_span_as_parent_and_tracestate_unchanged() {
        let mut h = headers(&[EXAMPLE]);
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("congo=t61rcWkgMzE"));
        let incoming = read(&h);
        let span = SpanContext::start(incoming, &Sampler::new(0.0));
        span.propagate(incoming, &mut h);
        let sent = h.get(&TRACEPARENT).unwrap().to_str().unwrap();
        assert_eq!(&sent[..36], &EXAMPLE[..36], "same version and trace id");
        assert_eq!(&sent[36..52], format!("{:016x}", span.span_id));
        assert_ne!(span.span_id, 0x00f067aa0ba902b7);
        assert!(sent.ends_with("-01"), "a sampled caller stays sampled whatever the ratio");
        assert_eq!(span.parent, Some(0x00f067aa0ba902b7));
        assert_eq!(h.get(&TRACESTATE).unwrap(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn an_invalid_traceparent_is_replaced_and_its_tracestate_dropped() {
        let mut h = headers(&["00-zz-00f067aa0ba902b7-01"]);
        h.insert(TRACESTATE.clone(), HeaderValue::from_static("congo=t61rcWkgMzE"));
        let incoming = read(&h);
        let span = SpanContext::start(incoming, &Sampler::new(1.0));
        span.propagate(incoming, &mut h);
        assert!(h.get(&TRACESTATE).is_none());
        assert_eq!(
            read(&h),
            Incoming::Valid(Parent { trace_id: span.trace_id, span_id: span.span_id, sampled: true })
        );
        assert_eq!(span.parent, None);
    }

    #[test]
    fn the_ratio_samples_about_its_share_of_new_traces() {
        let sampler = Sampler::new(0.25);
        let n = 20_000;
        let sampled = (0..n).filter(|_| SpanContext::start(Incoming::None, &sampler).sampled).count();
        let share = sampled as f64 / n as f64;
        assert!((0.22..0.28).contains(&share), "{share}");
        assert!(!SpanContext::start(Incoming::None, &Sampler::new(0.0)).sampled);
        assert!(SpanContext::start(Incoming::None, &Sampler::new(1.0)).sampled);
    }
}
