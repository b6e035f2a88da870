//! `protocol: tcp`: opaque bytes both ways between a client and the target.
//!
//! Half-close is honoured: when one side finishes sending, the other side's write half is
//! shut down and bytes keep flowing the other way (databases and request/response protocols
//! rely on it).

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::ListenerCtx;
use crate::drain::DrainWatch;

pub async fn serve(mut client: TcpStream, peer: SocketAddr, ctx: &ListenerCtx, _drain: DrainWatch) {
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
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // The drain lets open TCP connections run until `shutdown.drain_timeout`: the sidecar
    // cannot know where a message boundary of an opaque protocol is.
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(%peer, bytes_in = up, bytes_out = down, "tcp connection closed"),
        Err(e) => tracing::debug!(%peer, error = %e, "tcp connection ended"),
    }
}
