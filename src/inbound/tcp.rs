//! `protocol: tcp`: opaque bytes both ways between a client and the target.
//!
//! Half-close is honoured: when one side finishes sending, the other side's write half is
//! shut down and bytes keep flowing the other way (databases and request/response protocols
//! rely on it). A connection with no bytes either way for `limits.idle_timeout` is closed
//! (checked once per timeout period, so it goes between one and two periods).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use std::sync::atomic::Ordering;

use super::ListenerCtx;
use super::guard::ConnState;
use super::io::ServerIo;
use crate::telemetry::metrics::Reject;

pub async fn serve(client: TcpStream, peer: SocketAddr, ctx: &ListenerCtx) {
    let _ = client.set_nodelay(true);
    let Some(tls) = &ctx.tls else {
        return forward(client, peer, ctx).await;
    };
    let Some(accepted) = super::tls::accept(client, tls, ctx, peer).await else {
        return;
    };
    if !super::tls::allowed(tls, accepted.identity.as_deref()) {
        ctx.metrics.reject(Reject::IdentityNotAllowed);
        tracing::info!(%peer, identity = accepted.identity.as_ref().map(|i| &*i.id), "client identity not allowed; closing");
        return;
    }
    forward(accepted.stream, peer, ctx).await;
}

async fn forward<S: AsyncRead + AsyncWrite + Unpin>(client: S, peer: SocketAddr, ctx: &ListenerCtx) {
    let target = ctx.config.target;
    let connect = tokio::time::timeout(ctx.config.connect_timeout, TcpStream::connect(target)).await;
    let mut upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(listener = %ctx.config.name, %peer, %target, error = %e, "connect to target failed; closing client");
            return;
        }
        Err(_) => {
            tracing::warn!(listener = %ctx.config.name, %peer, %target, "connect to target timed out; closing client");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    // Counts reads and writes on the client side for the idle timeout.
    let state = ConnState::new();
    let mut client = ServerIo::new(client, None, state.clone());
    let idle_timeout = ctx.config.limits.idle_timeout;
    let mut copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut client, &mut upstream));
    let mut seen = state.activity.load(Ordering::Relaxed);
    // The drain lets open TCP connections run until `shutdown.drain_timeout`: the sidecar
    // cannot know where a message boundary of an opaque protocol is.
    loop {
        tokio::select! {
            res = &mut copy => {
                match res {
                    Ok((up, down)) => tracing::debug!(%peer, bytes_in = up, bytes_out = down, "tcp connection closed"),
                    Err(e) => tracing::debug!(%peer, error = %e, "tcp connection ended"),
                }
                return;
            }
            _ = tokio::time::sleep(idle_timeout) => {
                let now = state.activity.load(Ordering::Relaxed);
                if now == seen {
                    tracing::debug!(%peer, ?idle_timeout, "tcp connection idle; closing");
                    return;
                }
                seen = now;
            }
        }
    }
}
