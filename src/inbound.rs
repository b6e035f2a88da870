//! Traffic coming into the pod: one accept loop per `inbound` listener, each connection
//! handed to the HTTP server (`http`) or the TCP forwarder (`tcp`).
//!
//! Listeners are keyed by their address. A reload updates a listener in place (the next
//! connection sees the new settings; open ones keep theirs), binds new addresses before
//! anything changes, and stops accepting on removed ones while their connections finish.

mod guard;
mod http;
mod io;
mod tcp;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};

use crate::config::{Config, HttpVersion, InboundConfig, InboundTls, Protocol};
use crate::drain::DrainWatch;
use crate::proxy::pool::Pool;
use crate::telemetry::metrics::{ListenerMetrics, Reject};
use crate::telemetry::{AccessLog, Metrics};
use crate::tls::ServerTls;

/// Pending connections the kernel queues per listener (what nginx and Envoy use).
const BACKLOG: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("listener {name}: bind {addr}: {error}")]
    Bind { name: String, addr: SocketAddr, error: std::io::Error },
    #[error("listener {name}: TLS: {error}")]
    Tls { name: String, error: crate::tls::TlsError },
}

/// Everything a connection on one listener needs; replaced whole on reload.
pub struct ListenerCtx {
    pub config: InboundConfig,
    pub app_http: HttpVersion,
    pub metrics: Arc<ListenerMetrics>,
    pub pool: Arc<Pool>,
    pub access_log: AccessLog,
    /// TLS termination, when configured; rotated in place by `tls::server::watch`.
    pub tls: Option<Arc<ServerTls>>,
    conn_limit: Arc<Semaphore>,
    http: http::Builders,
}

struct Running {
    ctx: watch::Sender<Arc<ListenerCtx>>,
    stop: watch::Sender<bool>,
}

/// The set of running inbound listeners.
pub struct Inbound {
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    drain: DrainWatch,
    running: HashMap<SocketAddr, Running>,
    pools: HashMap<(SocketAddr, Duration), Arc<Pool>>,
    /// Loaded TLS per listener address, reused by a reload that keeps the same files.
    tls: HashMap<SocketAddr, Arc<ServerTls>>,
}

impl Inbound {
    pub fn new(metrics: Arc<Metrics>, access_log: AccessLog, drain: DrainWatch) -> Self {
        Inbound {
            metrics,
            access_log,
            drain,
            running: HashMap::new(),
            pools: HashMap::new(),
            tls: HashMap::new(),
        }
    }

    /// Makes the running listeners match `config`. New addresses are bound and TLS files
    /// loaded first: if anything fails, nothing changes and the error is returned.
    pub fn apply(&mut self, config: &Config) -> Result<(), ApplyError> {
        let mut bound = Vec::new();
        let mut tls = HashMap::new();
        for l in &config.inbound {
            if !self.running.contains_key(&l.listen) {
                bound.push((l.listen, bind(l)?));
            }
            if let Some(files) = &l.tls {
                tls.insert(l.listen, self.load_tls(l, files)?);
            }
        }
        self.tls = tls;
        let mut keep = Vec::with_capacity(config.inbound.len());
        for l in &config.inbound {
            keep.push(l.listen);
            let ctx = Arc::new(self.ctx(l, config));
            if let Some(running) = self.running.get(&l.listen) {
                running.ctx.send_replace(ctx);
                continue;
            }
            let listener = bound
                .iter()
                .position(|(a, _)| *a == l.listen)
                .map(|i| bound.swap_remove(i).1)
                .expect("bound above");
            let (ctx_tx, ctx_rx) = watch::channel(ctx);
            let (stop_tx, stop_rx) = watch::channel(false);
            tokio::spawn(accept_loop(listener, ctx_rx, stop_rx, self.drain.clone()));
            tracing::info!(listener = %l.name, addr = %l.listen, protocol = ?l.protocol, target = %l.target, "listening");
            self.running.insert(l.listen, Running { ctx: ctx_tx, stop: stop_tx });
        }
        self.running.retain(|addr, running| {
            let kept = keep.contains(addr);
            if !kept {
                tracing::info!(%addr, "listener removed; its open connections carry on");
                running.stop.send_replace(true);
            }
            kept
        });
        // Pools no listener uses any more close their idle connections when dropped.
        let used: Vec<_> = config.inbound.iter().map(|l| (l.target, l.connect_timeout)).collect();
        self.pools.retain(|k, _| used.contains(k));
        Ok(())
    }

    /// The listener's current TLS if its files are unchanged, else freshly loaded ones
    /// (with a watcher for rotation).
    fn load_tls(&self, l: &InboundConfig, files: &InboundTls) -> Result<Arc<ServerTls>, ApplyError> {
        if let Some(current) = self.tls.get(&l.listen)
            && current.files() == files
        {
            return Ok(current.clone());
        }
        let alpn = match l.protocol {
            Protocol::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Protocol::Tcp => Vec::new(),
        };
        let expiry = self.metrics.listener(&l.name).cert_expiry();
        let loaded = ServerTls::load(files, alpn, expiry)
            .map_err(|error| ApplyError::Tls { name: l.name.clone(), error })?;
        tokio::spawn(crate::tls::server::watch(Arc::downgrade(&loaded), l.name.clone()));
        Ok(loaded)
    }

    fn ctx(&mut self, l: &InboundConfig, config: &Config) -> ListenerCtx {
        let pool = self
            .pools
            .entry((l.target, l.connect_timeout))
            .or_insert_with(|| Arc::new(Pool::new(l.target, l.connect_timeout)))
            .clone();
        ListenerCtx {
            config: l.clone(),
            app_http: config.app.http,
            metrics: self.metrics.listener(&l.name),
            pool,
            access_log: self.access_log.clone(),
            tls: self.tls.get(&l.listen).cloned(),
            conn_limit: Arc::new(Semaphore::new(l.limits.max_connections)),
            http: http::Builders::new(&l.limits),
        }
    }
}

fn bind(l: &InboundConfig) -> Result<TcpListener, ApplyError> {
    let err = |error| ApplyError::Bind { name: l.name.clone(), addr: l.listen, error };
    let socket = if l.listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    // A restarted sidecar must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(l.listen).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)
}

async fn accept_loop(
    listener: TcpListener,
    ctx: watch::Receiver<Arc<ListenerCtx>>,
    mut stop: watch::Receiver<bool>,
    mut drain: DrainWatch,
) {
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => break,
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning; the
                // connections already open keep being served.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let ctx = ctx.borrow().clone();
        let Ok(permit) = ctx.conn_limit.clone().try_acquire_owned() else {
            ctx.metrics.reject(Reject::MaxConnections);
            tracing::debug!(%peer, listener = %ctx.config.name, "connection limit reached; refusing");
            drop(stream);
            continue;
        };
        let drain = drain.clone();
        tokio::spawn(async move {
            ctx.metrics.open.inc();
            match ctx.config.protocol {
                Protocol::Http => http::serve(stream, peer, ctx.clone(), drain).await,
                Protocol::Tcp => tcp::serve(stream, peer, &ctx).await,
            }
            ctx.metrics.open.dec();
            drop(permit);
        });
    }
    // Dropping the listener closes the socket: new connections are refused from here on.
}
