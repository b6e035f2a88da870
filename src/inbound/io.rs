//! The client connection as hyper sees it: the socket, plus activity counting for the idle
//! timer and, on HTTP/1 connections, the framing guard that refuses smuggling attempts.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::guard::{ConnState, Guard, POISON};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct ServerIo<S> {
    inner: S,
    guard: Option<Guard>,
    /// Bytes of `POISON` still to hand to hyper after a refusal; then end of stream.
    poison: Option<&'static [u8]>,
    state: Arc<ConnState>,
}

impl<S> ServerIo<S> {
    pub fn new(inner: S, guard: Option<Guard>, state: Arc<ConnState>) -> Self {
        ServerIo { inner, guard, poison: None, state }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ServerIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.poison {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.poison = Some(&rest[n..]);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() == before {
            return Poll::Ready(Ok(()));
        }
        this.state.activity.fetch_add(1, Ordering::Relaxed);
        if let Some(guard) = &mut this.guard
            && let Err(v) = guard.scan(&buf.filled()[before..])
        {
            tracing::debug!(reason = v.what, "refusing request");
            this.state.refused.store(true, Ordering::Relaxed);
            buf.set_filled(before + v.at);
            let n = POISON.len().min(buf.remaining());
            buf.put_slice(&POISON[..n]);
            this.poison = Some(&POISON[n..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ServerIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.state.activity.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.state.activity.fetch_add(1, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// The client closed before sending anything.
    Closed,
}

/// Tells HTTP/2 prior knowledge from HTTP/1 by the first bytes, without consuming them.
/// Waits at most `timeout` for enough bytes to decide (`Err` on timeout).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Result<Detected, DetectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| DetectError::Timeout)?
            .map_err(DetectError::Io)?;
        if n == 0 {
            return Ok(Detected::Closed);
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Detected::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Detected::Http2);
        }
        // A prefix of the preface: rare (clients send it in one segment); wait for more.
        // peek does not consume, so readiness alone would spin.
        if tokio::time::Instant::now() >= deadline {
            return Err(DetectError::Timeout);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no request within the header timeout")]
    Timeout,
    #[error("reading the first bytes: {0}")]
    Io(io::Error),
}
