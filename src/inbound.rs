//! The listeners: one accept loop per `inbound` listener, each connection handed to the
//! HTTP server (`http`) or the TCP forwarder (`tcp`). Outbound (ambassador) listeners run
//! here too, on the same server: their requests go to an `outbound::Upstream` instead of
//! the app.
//!
//! Listeners are keyed by their address. A reload updates a listener in place (the next
//! connection sees the new settings; open ones keep theirs), binds new addresses before
//! anything changes, and stops accepting on removed ones while their connections finish.

mod guard;
mod http;
mod io;
mod limit;
pub mod metrics;
mod sticky;
mod supervise;
mod tcp;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tracing::Instrument as _;

pub use self::limit::ConnLimit;
pub use self::metrics::Direction;
pub use self::metrics::{InboundMetrics, ListenerMetrics, Reject};
use crate::admin::Board;
use crate::config::{Config, HttpVersion, InboundConfig, InboundTls, OutboundConfig, Protocol};
use crate::drain::DrainWatch;
use crate::files::FileWatcher;
use crate::outbound::route::{Route, Routes};
use crate::outbound::{OutboundFamilies, Upstream, discovery};
use crate::proxy::pool::{Endpoint, EndpointKey, Pool, Proto};
use crate::telemetry::{AccessLog, Tracer};
use crate::tls::ServerTls;
use crate::tls::client::ClientTls;

/// Pending connections the kernel queues per listener (what nginx and Envoy use).
const BACKLOG: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("listener {name}: bind {addr}: {error}")]
    Bind { name: String, addr: SocketAddr, error: std::io::Error },
    #[error("listener {name}: TLS: {error}")]
    Tls { name: String, error: crate::tls::TlsError },
    #[error("outbound {name}: {error}")]
    Resolver { name: String, error: discovery::ResolverError },
}

/// The metric families listeners use, by direction.
pub struct Families {
    pub inbound: InboundMetrics,
    pub outbound: InboundMetrics,
    pub upstreams: OutboundFamilies,
}

impl Families {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        Families {
            inbound: InboundMetrics::register(registry),
            outbound: InboundMetrics::register_direction(registry, Direction::Outbound),
            upstreams: OutboundFamilies::register(registry),
        }
    }

    /// The latency families, which the exposition writes beside the registry.
    pub fn histograms(&self) -> Vec<Arc<crate::telemetry::histogram::HistogramFamily>> {
        vec![self.inbound.histograms(), self.outbound.histograms()]
    }
}

/// What every request reports to besides its listener's metrics.
#[derive(Clone)]
pub struct Recorders {
    pub access_log: AccessLog,
    pub tracer: Tracer,
    pub board: Arc<Board>,
}

/// Everything a new connection on one listener needs; replaced whole on reload, so open
/// connections keep the settings they started with.
pub struct ListenerCtx {
    pub config: InboundConfig,
    pub app_http: HttpVersion,
    pub metrics: Arc<ListenerMetrics>,
    /// The app, as HTTP/1.1 and as HTTP/2 (which one a request takes is `app_http`'s call).
    pub app_h1: Arc<Endpoint>,
    pub app_h2: Arc<Endpoint>,
    pub access_log: AccessLog,
    /// Trace context and span export (off without `telemetry.tracing`).
    pub tracer: Tracer,
    /// The admin page's view: failed requests are noted there.
    pub board: Arc<Board>,
    /// TLS termination, when configured; rotated in place when its files change.
    pub tls: Option<Arc<ServerTls>>,
    /// Outbound listeners: the upstreams requests go to instead of the app.
    pub routes: Option<Arc<Routes>>,
    http: http::Builders,
}

struct Running {
    ctx: watch::Sender<Arc<ListenerCtx>>,
    stop: watch::Sender<bool>,
    /// One limiter for the listener's life: a reload resizes it, so connections open
    /// before the reload still count (issue 9, bug 1).
    limit: Arc<ConnLimit>,
}

/// The set of running inbound listeners.
pub struct Inbound {
    families: Families,
    recorders: Recorders,
    drain: DrainWatch,
    running: HashMap<SocketAddr, Running>,
    pool: Arc<Pool>,
    /// Per listener name, resolved once for the process's life.
    metrics: HashMap<String, Arc<ListenerMetrics>>,
    /// Loaded TLS per listener address, reused by a reload that builds it from the same.
    tls: HashMap<SocketAddr, Arc<ServerTls>>,
    /// Per outbound listener name; kept by a reload that leaves its config as it was, so
    /// endpoint state (latency, ejections) and pooled connections survive it.
    upstreams: HashMap<String, Arc<Upstream>>,
    files: FileWatcher,
}

impl Inbound {
    pub fn new(families: Families, recorders: Recorders, files: FileWatcher, drain: DrainWatch) -> Self {
        let pool = Pool::new();
        tokio::spawn(Pool::reap(Arc::downgrade(&pool), drain.clone()));
        Inbound {
            families,
            recorders,
            drain,
            running: HashMap::new(),
            pool,
            metrics: HashMap::new(),
            tls: HashMap::new(),
            upstreams: HashMap::new(),
            files,
        }
    }

    /// Every listener of `config`, inbound first, then the outbound ones with the upstreams
    /// each serves (several when they share its address and route by host; the first names
    /// the listener).
    fn listeners(config: &Config) -> Vec<(InboundConfig, Vec<&OutboundConfig>)> {
        let mut out: Vec<(InboundConfig, Vec<&OutboundConfig>)> =
            config.inbound.iter().map(|l| (l.clone(), Vec::new())).collect();
        for o in &config.outbound {
            match out.iter_mut().find(|(l, _)| l.listen == o.listen) {
                Some((_, group)) => group.push(o),
                None => out.push((o.listener(), vec![o])),
            }
        }
        out
    }

    /// Makes the running listeners match `config`. New addresses are bound and TLS files
    /// loaded first: if anything fails, nothing changes and the error is returned.
    pub fn apply(&mut self, config: &Config) -> Result<(), ApplyError> {
        let listeners = Self::listeners(config);
        let mut bound = Vec::new();
        let mut tls = HashMap::new();
        let mut upstreams = HashMap::new();
        for (l, outbound) in &listeners {
            if !self.running.contains_key(&l.listen) {
                bound.push((l.listen, bind(l)?));
            }
            if let Some(files) = &l.tls {
                tls.insert(l.listen, self.load_tls(l, files)?);
            }
            for o in outbound {
                upstreams.insert(o.name.clone(), self.upstream(o)?);
            }
        }
        self.tls = tls;
        // Upstreams left out are dropped: their discovery ends, idle connections close.
        self.upstreams = upstreams;
        let mut keep = Vec::with_capacity(listeners.len());
        for (l, outbound) in &listeners {
            keep.push(l.listen);
            let ctx = Arc::new(self.ctx(l, outbound, config));
            if let Some(running) = self.running.get(&l.listen) {
                running.limit.resize(l.limits.max_connections);
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
            let limit = ConnLimit::new(l.limits.max_connections);
            if outbound.is_empty() {
                tracing::info!(listener = %l.name, addr = %l.listen, protocol = ?l.protocol, target = %l.target, "listening");
            } else {
                let upstreams: Vec<&str> = outbound.iter().map(|o| o.name.as_str()).collect();
                tracing::info!(listener = %l.name, addr = %l.listen, ?upstreams, "listening (outbound)");
            }
            tokio::spawn(accept_loop(listener, ctx_rx, stop_rx, limit.clone(), self.drain.clone()));
            self.running.insert(l.listen, Running { ctx: ctx_tx, stop: stop_tx, limit });
        }
        self.running.retain(|addr, running| {
            let kept = keep.contains(addr);
            if !kept {
                tracing::info!(%addr, "listener removed; its open connections carry on");
                running.stop.send_replace(true);
            }
            kept
        });
        // Endpoints no listener uses any more close their idle connections when dropped.
        let targets: Vec<_> = config.inbound.iter().map(|l| &l.target).collect();
        self.pool.retain(|k| targets.contains(&&k.addr));
        let names: Vec<&str> = listeners
            .iter()
            .flat_map(|(l, outbound)| {
                std::iter::once(l.name.as_str()).chain(outbound.iter().map(|o| o.name.as_str()))
            })
            .collect();
        self.metrics.retain(|name, _| names.contains(&name.as_str()));
        self.publish();
        Ok(())
    }

    /// Shows the admin page what runs now: listeners inbound first, each side by name.
    fn publish(&self) {
        let mut listeners: Vec<_> = self.metrics.values().cloned().collect();
        listeners.sort_by(|a, b| (a.direction(), &a.name).cmp(&(b.direction(), &b.name)));
        let mut upstreams: Vec<_> = self.upstreams.values().cloned().collect();
        upstreams.sort_by(|a, b| a.name.cmp(&b.name));
        self.recorders.board.publish(listeners, upstreams);
    }

    /// The running upstream for `o` when its config is unchanged, else a new one, with
    /// its discovery started (a resolv.conf that cannot be read fails the apply).
    fn upstream(&self, o: &OutboundConfig) -> Result<Arc<Upstream>, ApplyError> {
        if let Some(up) = self.upstreams.get(&o.name)
            && up.config() == o
        {
            return Ok(up.clone());
        }
        let err = |error| ApplyError::Resolver { name: o.name.clone(), error };
        let resolver = discovery::resolver(&o.upstream).map_err(err)?;
        let tls = match &o.upstream.tls {
            Some(files) => Some(
                ClientTls::load(
                    files,
                    &o.upstream.endpoints[0].host,
                    alpn(o.upstream.http),
                    &self.files,
                    &o.name,
                )
                .map_err(|error| ApplyError::Tls { name: o.name.clone(), error })?,
            ),
            None => None,
        };
        let up = Upstream::new(o.clone(), tls, self.families.upstreams.upstream(&o.name));
        let run = discovery::run(Arc::downgrade(&up), o.upstream.clone(), resolver, self.drain.clone());
        tokio::spawn(run.instrument(tracing::info_span!("discovery", upstream = %o.name)));
        Ok(up)
    }

    /// The listener's current TLS if it was built from the same files for the same ALPN
    /// list (which follows the protocol: issue 9, bug 2), else freshly loaded, with its
    /// files watched for rotation.
    fn load_tls(&mut self, l: &InboundConfig, files: &InboundTls) -> Result<Arc<ServerTls>, ApplyError> {
        let alpn = match l.protocol {
            Protocol::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Protocol::Tcp => Vec::new(),
        };
        if let Some(current) = self.tls.get(&l.listen)
            && current.files() == files
            && current.alpn() == alpn
        {
            return Ok(current.clone());
        }
        let expiry = self.listener_metrics(&l.name, Direction::Inbound).tls_enabled();
        ServerTls::load(files, alpn, expiry, &self.files, &l.name)
            .map_err(|error| ApplyError::Tls { name: l.name.clone(), error })
    }

    fn listener_metrics(&mut self, name: &str, direction: Direction) -> Arc<ListenerMetrics> {
        let families = match direction {
            Direction::Inbound => &self.families.inbound,
            Direction::Outbound => &self.families.outbound,
        };
        // A name that moved from one direction to the other gets the other's families.
        if let Some(m) = self.metrics.get(name)
            && m.direction() == direction
        {
            return m.clone();
        }
        let m = families.listener(name);
        self.metrics.insert(name.to_owned(), m.clone());
        m
    }

    fn ctx(&mut self, l: &InboundConfig, outbound: &[&OutboundConfig], config: &Config) -> ListenerCtx {
        let routes = (!outbound.is_empty()).then(|| {
            let mut routes = Routes::default();
            for o in outbound {
                let upstream = self.upstreams[&o.name].clone();
                routes.add(
                    &o.hosts,
                    Route { upstream, metrics: self.listener_metrics(&o.name, Direction::Outbound) },
                );
            }
            Arc::new(routes)
        });
        let direction = if routes.is_some() { Direction::Outbound } else { Direction::Inbound };
        let metrics = self.listener_metrics(&l.name, direction);
        if l.tls.is_some() {
            metrics.tls_enabled();
        }
        let endpoint = |proto| self.pool.endpoint(EndpointKey { addr: l.target.clone(), tls: None, proto });
        ListenerCtx {
            config: l.clone(),
            app_http: config.app.http,
            metrics,
            app_h1: endpoint(Proto::Http1),
            app_h2: endpoint(Proto::Http2),
            access_log: self.recorders.access_log.clone(),
            tracer: self.recorders.tracer.clone(),
            board: self.recorders.board.clone(),
            tls: self.tls.get(&l.listen).cloned(),
            routes,
            http: http::Builders::new(&l.limits),
        }
    }
}

/// What an upstream's TLS offers in ALPN: the protocols `upstream.http` allows, HTTP/2
/// first, so that under `auto` the server's choice is the answer.
fn alpn(http: HttpVersion) -> Vec<Vec<u8>> {
    match http {
        HttpVersion::Http1 => vec![b"http/1.1".to_vec()],
        HttpVersion::Http2 => vec![b"h2".to_vec()],
        HttpVersion::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
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
    limit: Arc<ConnLimit>,
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
        let Some(permit) = limit.try_acquire() else {
            ctx.metrics.reject(Reject::MaxConnections);
            tracing::debug!(%peer, listener = %ctx.config.name, "connection limit reached; refusing");
            drop(stream);
            continue;
        };
        let drain = drain.clone();
        // Every log line about this connection carries the listener and the peer.
        let span =
            tracing::info_span!("conn", listener = %ctx.config.name, %peer, identity = tracing::field::Empty);
        tokio::spawn(
            async move {
                ctx.metrics.open.inc();
                match ctx.config.protocol {
                    Protocol::Http => http::serve(stream, peer, ctx.clone(), drain).await,
                    Protocol::Tcp => tcp::serve(stream, &ctx).await,
                }
                ctx.metrics.open.dec();
                drop(permit);
            }
            .instrument(span),
        );
    }
    // Dropping the listener closes the socket: new connections are refused from here on.
}

#[cfg(test)]
mod tests;
