//! A lean HTTP/1.1 client for pooled app connections: the request written and the response
//! read inside the task of the request that uses the connection, with reused buffers and
//! no channels or connection task (hyper's client hands each request to a connection task
//! through an mpsc and the answer back through a oneshot: two extra task wake-ups per
//! request, measured in bench/PROFILE.md). The response body reads straight from the
//! socket as the client takes it, so a slow client stops the reads (backpressure for free).
//!
//! Not responsible for choosing or caching connections (`proxy::pool`) or for protocol
//! switches (WebSocket upgrades take a dedicated hyper connection).

mod body;
mod head;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use http::{Request, Response};
use hyper::body::Body as _;
use tokio::io::AsyncWrite;

pub use body::Body;

use super::body::RequestBody;
use super::pool::{Endpoint, Slot};
use crate::net::Stream;

/// Most bytes one read takes from the app, and so the most one connection buffers on its
/// way to a slow client (issue 9, bug 9: 16 KiB keeps 500 slow readers under 64 MiB).
const READ_SIZE: usize = 16 * 1024;
/// Largest response head accepted; the client side's default header limit.
const MAX_HEAD: usize = 64 * 1024;
/// Request body bytes encoded ahead of the socket before the body is polled again.
const WRITE_HIGH: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid response from the upstream: {0}")]
    Response(&'static str),
    #[error("invalid chunked body from the upstream: {0}")]
    Chunk(&'static str),
    #[error("the upstream closed the connection before the response ended")]
    Incomplete,
    #[error("the client's request body failed: {0}")]
    ClientBody(hyper::Error),
}

/// An HTTP/1.1 connection to an endpoint: the socket and the bytes read ahead of the
/// current response. Counted in its endpoint's connections for as long as it lives.
pub struct H1Conn {
    io: Stream,
    rbuf: BytesMut,
    endpoint: Arc<Endpoint>,
    _slot: Slot,
}

/// A request on its way: the encoded bytes not yet written and the body still to come.
/// Nothing in it belongs to a connection, so a request whose first write failed on a
/// reused connection can go out on another one as it is.
pub struct Outgoing {
    buf: BytesMut,
    body: Option<RequestBody>,
    chunked: bool,
    head_request: bool,
    /// Bytes that reached the socket: 0 means the app cannot have seen the request.
    written: u64,
    failed: bool,
}

impl Outgoing {
    pub fn new(req: Request<RequestBody>) -> Self {
        let (parts, body) = req.into_parts();
        Self::from_head(&parts, body)
    }

    /// The request from a borrowed head: an outbound call keeps its head for a retry and
    /// encodes each try from it, rather than cloning the head (a `HeaderMap` and its
    /// allocation) for every try and moving the copy down through the try's futures.
    pub fn from_head(parts: &http::request::Parts, body: RequestBody) -> Self {
        let empty = body.is_end_stream();
        let mut buf = BytesMut::new();
        let chunked = head::encode_request(&parts.method, &parts.uri, &parts.headers, empty, &mut buf);
        Outgoing {
            buf,
            body: (!empty).then_some(body),
            chunked,
            head_request: parts.method == http::Method::HEAD,
            written: 0,
            failed: false,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the whole request went out.
    fn done(&self) -> bool {
        !self.failed && self.body.is_none() && self.buf.is_empty()
    }

    /// Writes what is encoded and encodes more as the body yields it. `Ready(Ok)` once the
    /// whole request is written.
    fn poll_write(&mut self, cx: &mut Context<'_>, io: &mut Stream) -> Poll<Result<(), Error>> {
        loop {
            // Encode what the body has ready first, so a small body leaves with its head in
            // one write.
            if self.buf.len() < WRITE_HIGH
                && let Some(body) = &mut self.body
                && let Poll::Ready(frame) = Pin::new(body).poll_frame(cx)
            {
                self.encode(frame)?;
                continue;
            }
            if self.buf.is_empty() {
                return if self.body.is_none() { Poll::Ready(Ok(())) } else { Poll::Pending };
            }
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            self.buf.advance(n);
            self.written += n as u64;
        }
    }

    fn encode(
        &mut self,
        frame: Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>,
    ) -> Result<(), Error> {
        match frame {
            None => {
                if self.chunked {
                    self.buf.put_slice(b"0\r\n\r\n");
                }
                self.body = None;
            }
            Some(Err(e)) => return Err(Error::ClientBody(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) if self.chunked => {
                    put_hex(&mut self.buf, data.len());
                    self.buf.put_slice(b"\r\n");
                    self.buf.put_slice(&data);
                    self.buf.put_slice(b"\r\n");
                }
                Ok(data) => self.buf.put_slice(&data),
                Err(frame) => {
                    // Trailers end the body; only chunked framing can carry them.
                    if let (Ok(trailers), true) = (frame.into_trailers(), self.chunked) {
                        self.buf.put_slice(b"0\r\n");
                        for (name, value) in &trailers {
                            self.buf.put_slice(name.as_str().as_bytes());
                            self.buf.put_slice(b": ");
                            self.buf.put_slice(value.as_bytes());
                            self.buf.put_slice(b"\r\n");
                        }
                        self.buf.put_slice(b"\r\n");
                        self.body = None;
                        self.chunked = false;
                    }
                }
            },
        }
        Ok(())
    }
}

/// Why an exchange failed, and whether the request can go out on another connection.
pub struct Failed {
    pub error: Error,
    /// The request, when not a byte of it was written.
    pub unsent: Option<Outgoing>,
}

impl H1Conn {
    pub(super) fn new(io: Stream, endpoint: Arc<Endpoint>, slot: Slot) -> Self {
        H1Conn { io, rbuf: BytesMut::new(), endpoint, _slot: slot }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Whether the connection can carry a request: nothing arrived while it was idle (the
    /// app closed it, or sent bytes nobody asked for).
    pub fn is_usable(&self) -> bool {
        self.rbuf.is_empty() && self.io.is_quiet()
    }

    /// Sends `req` and reads the response head; the body streams from the connection, which
    /// it holds until it ends. The request body goes on being written while the response
    /// arrives (an app may answer before it has read everything).
    pub async fn send(mut self, mut out: Outgoing) -> Result<Response<Body>, Failed> {
        let head = poll_fn(|cx| self.poll_head(cx, &mut out)).await;
        match head {
            Ok(head) => {
                let mut resp = Response::new(());
                *resp.status_mut() = head.status;
                *resp.version_mut() = head.version;
                *resp.headers_mut() = head.headers;
                let keep_alive = head.keep_alive;
                Ok(resp.map(|()| Body::new(self, out, head.framing, keep_alive)))
            }
            Err(error) => {
                let unsent = (out.written == 0 && !matches!(error, Error::ClientBody(_))).then_some(out);
                Err(Failed { error, unsent })
            }
        }
    }

    fn poll_head(&mut self, cx: &mut Context<'_>, out: &mut Outgoing) -> Poll<Result<head::Head, Error>> {
        loop {
            if !out.done() {
                match out.poll_write(cx, &mut self.io) {
                    Poll::Ready(Err(e @ Error::ClientBody(_))) => return Poll::Ready(Err(e)),
                    // Nothing sent: the connection was dead; the caller may try another.
                    Poll::Ready(Err(e)) if out.written == 0 => return Poll::Ready(Err(e)),
                    // The app stopped reading, perhaps because it has answered: read on.
                    Poll::Ready(Err(_)) => out.failed = true,
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            if let Some(head) = head::parse_response(&mut self.rbuf, out.head_request, MAX_HEAD)? {
                return Poll::Ready(Ok(head));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(Error::Incomplete));
            }
        }
    }

    /// Reads up to `READ_SIZE` more bytes into the read buffer; `Ready(Ok(0))` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.rbuf.reserve(READ_SIZE);
        let mut limited = (&mut self.rbuf).limit(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut limited)
    }

    /// Whether the connection is to `endpoint` (outbound: the endpoint a try picked).
    pub fn is_to(&self, endpoint: &Arc<Endpoint>) -> bool {
        Arc::ptr_eq(&self.endpoint, endpoint)
    }

    /// Into its endpoint's idle queue, for any request to take.
    pub fn return_to_pool(self) {
        let endpoint = self.endpoint.clone();
        endpoint.put_idle(self);
    }
}

/// `n` in lower-case hex, as a chunk size line starts.
fn put_hex(buf: &mut BytesMut, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf.put_u8(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

#[cfg(test)]
mod tests;
