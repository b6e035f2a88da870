//! `protocol: tcp`: opaque bytes both ways between a client and the target.
//!
//! Half-close is honoured: when one side finishes sending, the other side's write half is
//! shut down and bytes keep flowing the other way (databases and request/response protocols
//! rely on it). A connection with no bytes either way for `limits.idle_timeout` is closed
//! (checked once per timeout period, so it goes between one and two periods).

use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::ListenerCtx;
use super::guard::ConnState;
use super::io::ServerIo;
use super::metrics::Reject;
use crate::proxy::connect::Connector;

pub async fn serve(client: TcpStream, ctx: &ListenerCtx) {
    let _ = client.set_nodelay(true);
    let Some(tls) = &ctx.tls else {
        return forward(client, ctx).await;
    };
    let Some(accepted) = super::tls::accept(client, tls, ctx).await else {
        return;
    };
    if !super::tls::allowed(tls, accepted.identity.as_deref()) {
        ctx.metrics.reject(Reject::IdentityNotAllowed);
        tracing::info!("client identity not allowed; closing");
        return;
    }
    forward(accepted.stream, ctx).await;
}

async fn forward<S: AsyncRead + AsyncWrite + Unpin>(client: S, ctx: &ListenerCtx) {
    let connected = match ctx.routes.as_ref().and_then(|r| r.only()) {
        // Outbound: an endpoint of the upstream, balanced, with ejection and TLS origination.
        Some(route) => route.upstream.connect_tcp().await.map_err(|e| e.to_string()),
        // The same dialling as the HTTP pool: failed attempts sent nothing, so they are retried.
        None => {
            let connector = Connector::new(ctx.config.target.clone());
            connector
                .connect(ctx.config.connect_timeout)
                .await
                .map(|io| io.into_inner())
                .map_err(|e| e.to_string())
        }
    };
    let mut upstream = match connected {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "closing the client: no connection to the target");
            return;
        }
    };
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
                    Ok((up, down)) => tracing::debug!(bytes_in = up, bytes_out = down, "tcp connection closed"),
                    Err(e) => tracing::debug!(error = %e, "tcp connection ended"),
                }
                return;
            }
            _ = tokio::time::sleep(idle_timeout) => {
                let now = state.activity.load(Ordering::Relaxed);
                if now == seen {
                    tracing::debug!(?idle_timeout, "tcp connection idle; closing");
                    return;
                }
                seen = now;
            }
        }
    }
}
