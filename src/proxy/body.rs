//! Body types of the proxy: the request body sent on to the app, and the response body sent
//! back to the client, which also runs the request's end-of-life bookkeeping.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::{self, H1Conn};

/// What the request path learns about a request body while it streams to the app: its
/// size for the access log, and whether the client broke it off (a 400, not a 502). Whether
/// it went out whole is the app connection's own business (`proxy::h1`).
#[derive(Debug, Default)]
pub struct BodyStats {
    pub bytes: AtomicU64,
    pub errored: AtomicBool,
}

/// A client's request body on its way to the app. Streams frame by frame: hyper polls it
/// only when the app's connection can take more, which is the backpressure that keeps a
/// 1 GiB upload at a few buffers of memory.
pub struct RequestBody {
    /// `None`: a body made here with nothing in it (health checks, tests).
    inner: Option<Incoming>,
    /// A body kept whole so that a retry can send it again (outbound); taken when sent.
    full: Option<Bytes>,
    /// `None` for bodies that are empty from the start (most GETs): nothing to count.
    stats: Option<Arc<BodyStats>>,
}

impl RequestBody {
    pub fn new(inner: Incoming) -> (Self, Option<Arc<BodyStats>>) {
        let stats = (!inner.is_end_stream()).then(Arc::default);
        (RequestBody { inner: Some(inner), full: None, stats: stats.clone() }, stats)
    }

    /// A body with no bytes.
    pub fn empty() -> Self {
        RequestBody { inner: None, full: None, stats: None }
    }

    /// A body of `bytes`, already counted when they were read.
    pub fn full(bytes: Bytes) -> Self {
        RequestBody { inner: None, full: (!bytes.is_empty()).then_some(bytes), stats: None }
    }

    /// The length the client declared, when it did.
    pub fn exact_len(&self) -> Option<u64> {
        self.size_hint().exact()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(bytes) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let Some(inner) = &mut this.inner else { return Poll::Ready(None) };
        let res = ready!(Pin::new(&mut *inner).poll_frame(cx));
        if let Some(stats) = &this.stats {
            match &res {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Some(Err(_)) => stats.errored.store(true, Ordering::Relaxed),
                None => {}
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none() && self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.full, &self.inner) {
            (Some(b), _) => SizeHint::with_exact(b.len() as u64),
            (None, Some(inner)) => inner.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

/// Called once when a response body has been sent whole (`complete`) or dropped early,
/// with the app connection when it can carry another request.
pub trait OnEnd: Send + Unpin + 'static {
    fn on_end(self, bytes_out: u64, complete: bool, reusable: Option<H1Conn>);
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The app's response body as it arrives: over a pooled HTTP/1.1 connection (`proxy::h1`),
/// or from hyper (HTTP/2, and HTTP/1.1 connections that switched protocols).
pub enum Upstream {
    H1(h1::Body),
    Hyper(Incoming),
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match self.get_mut() {
            Upstream::H1(b) => ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(Into::into)),
            Upstream::Hyper(b) => ready!(Pin::new(b).poll_frame(cx)).map(|r| r.map_err(Into::into)),
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::H1(b) => b.is_end_stream(),
            Upstream::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::H1(b) => b.size_hint(),
            Upstream::Hyper(b) => b.size_hint(),
        }
    }
}

/// A response on its way to the client: the app's streamed body or a short local reply.
pub struct ResponseBody<E: OnEnd> {
    kind: Kind,
    bytes_out: u64,
    end: Option<E>,
}

enum Kind {
    Stream(Upstream),
    Full(Option<Bytes>),
}

impl<E: OnEnd> ResponseBody<E> {
    pub fn stream(inner: Upstream, end: E) -> Self {
        let mut b = ResponseBody { kind: Kind::Stream(inner), bytes_out: 0, end: Some(end) };
        b.finish_if_empty();
        b
    }

    pub fn full(data: Bytes, end: Option<E>) -> Self {
        let mut b = ResponseBody { kind: Kind::Full((!data.is_empty()).then_some(data)), bytes_out: 0, end };
        b.finish_if_empty();
        b
    }

    /// hyper never polls a body that says it is empty, so its bookkeeping runs now.
    fn finish_if_empty(&mut self) {
        if self.is_end_stream() {
            self.finish(true);
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(end) = self.end.take() {
            let reusable = match &mut self.kind {
                Kind::Stream(Upstream::H1(b)) if complete => b.take_reusable(),
                _ => None,
            };
            end.on_end(self.bytes_out, complete, reusable);
        }
    }
}

impl<E: OnEnd> Body for ResponseBody<E> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res: Option<Result<Frame<Bytes>, BoxError>> = match &mut this.kind {
            Kind::Stream(Upstream::H1(inner)) => {
                ready!(Pin::new(inner).poll_frame(cx)).map(|r| r.map_err(Into::into))
            }
            Kind::Stream(Upstream::Hyper(inner)) => {
                ready!(Pin::new(inner).poll_frame(cx)).map(|r| r.map_err(Into::into))
            }
            Kind::Full(data) => data.take().map(|d| Ok(Frame::data(d))),
        };
        match &res {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes_out += d.len() as u64;
                }
                if this.is_end_stream() {
                    this.finish(true);
                }
            }
            Some(Err(_)) => this.finish(false),
            None => this.finish(true),
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream(inner) => inner.is_end_stream(),
            Kind::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stream(inner) => inner.size_hint(),
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl<E: OnEnd> Drop for ResponseBody<E> {
    fn drop(&mut self) {
        // The client went away, or hyper dropped the body after an error.
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::BodyExt;

    use super::*;

    /// Records each `on_end` call.
    struct Record(Arc<Mutex<Vec<(u64, bool)>>>);

    impl OnEnd for Record {
        fn on_end(self, bytes_out: u64, complete: bool, _: Option<H1Conn>) {
            self.0.lock().unwrap().push((bytes_out, complete));
        }
    }

    #[tokio::test]
    async fn a_body_sent_whole_ends_once_complete_with_its_bytes() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let body = ResponseBody::full(Bytes::from_static(b"hello"), Some(Record(calls.clone())));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(*calls.lock().unwrap(), [(5, true)]);
    }

    #[test]
    fn an_empty_body_ends_at_once_and_a_dropped_one_is_incomplete() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        drop(ResponseBody::full(Bytes::new(), Some(Record(calls.clone()))));
        drop(ResponseBody::full(Bytes::from_static(b"x"), Some(Record(calls.clone()))));
        assert_eq!(*calls.lock().unwrap(), [(0, true), (0, false)]);
    }

    #[tokio::test]
    async fn a_request_body_is_counted_as_it_streams() {
        // An `Incoming` only comes from hyper: one real request over loopback.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = Mutex::new(Some(tx));
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let tx = tx.lock().unwrap().take();
                async move {
                    let (body, stats) = RequestBody::new(req.into_body());
                    let got = body.collect().await.unwrap().to_bytes();
                    let stats = stats.unwrap();
                    let _ = tx.unwrap().send((
                        got.len(),
                        stats.bytes.load(Ordering::Relaxed),
                        stats.errored.load(Ordering::Relaxed),
                    ));
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Empty::<Bytes>::new(),
                    ))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/")
            .header("host", "t")
            .body(http_body_util::Full::new(Bytes::from(vec![7u8; 3000])))
            .unwrap();
        send.send_request(req).await.unwrap();
        assert_eq!(rx.await.unwrap(), (3000, 3000, false));
        assert!(RequestBody::empty().is_end_stream());
    }
}
