//! One sink's HTTP/1.1 connection: kept alive between requests, made again after any failure,
//! TLS (with rotation) for https endpoints.
//!
//! A sink sends one request at a time (the order of deliveries is the order of checkpoints),
//! so one connection is all it needs; hyper's `conn::http1` is the whole client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt as _, Limited, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::config::logship::{Auth, SinkConfig};
use crate::files::FileWatcher;
use crate::tls::client::ClientTls;

/// Answers are read for their verdict (an Elasticsearch `_bulk` answer has one item per
/// record); more than this is not an answer we can use.
const MAX_ANSWER: usize = 16 << 20;

/// A body goes out in pieces of this size, a write each: the shipper's thread then returns to
/// user space (where the scheduler can hand the core to a proxy worker) every few tens of
/// microseconds instead of staying in the kernel for a whole megabyte.
const WRITE_PIECE: usize = 16 << 10;

type Pieces = std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>;
type Body = StreamBody<futures_util::stream::Iter<Pieces>>;

/// An answer: status, `Retry-After` as given, body.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Bytes,
}

pub struct Client {
    uri: http::Uri,
    authority: String,
    host: String,
    port: u16,
    tls: Option<Arc<ClientTls>>,
    headers: HeaderMap,
    timeout: Duration,
    conn: Option<SendRequest<Body>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not a usable URL")]
    Url(String),
    #[error("cannot read the credentials in {0}: {1}")]
    Secret(String, std::io::Error),
    #[error("header {0}: {1}")]
    Header(String, String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl Client {
    /// Must be called inside the runtime the client will run on (TLS rotation is a task).
    pub fn new(cfg: &SinkConfig, files: &FileWatcher) -> Result<Client, ClientError> {
        let url = cfg.request_url();
        let uri: http::Uri = url.parse().map_err(|_| ClientError::Url(url.clone()))?;
        let https = uri.scheme_str() == Some("https");
        let host =
            uri.host().ok_or_else(|| ClientError::Url(url.clone()))?.trim_matches(['[', ']']).to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let tls = if https {
            let files_cfg = cfg.tls.clone().unwrap_or(crate::config::UpstreamTls {
                ca: None,
                cert: None,
                key: None,
                server_name: None,
                identity: None,
            });
            Some(ClientTls::load(&files_cfg, &host, vec![b"http/1.1".to_vec()], files, &cfg.name)?)
        } else {
            None
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers.0 {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| ClientError::Header(k.clone(), e.to_string()))?;
            let mut value =
                HeaderValue::from_str(v).map_err(|e| ClientError::Header(k.clone(), e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let secret = |s: &crate::config::logship::Secret| {
            s.read().map_err(|e| ClientError::Secret(format!("sink {}", cfg.name), e))
        };
        let auth = match &cfg.auth {
            Auth::None => None,
            Auth::Bearer(t) => Some(format!("Bearer {}", secret(t)?)),
            Auth::Basic { user, password } => {
                use base64::Engine as _;
                let pair = format!("{user}:{}", secret(password)?);
                Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
            }
        };
        if let Some(a) = auth {
            let mut value = HeaderValue::from_str(&a)
                .map_err(|e| ClientError::Header("authorization".into(), e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        Ok(Client { uri, authority, host, port, tls, headers, timeout: cfg.request_timeout, conn: None })
    }

    /// POSTs `body`; an error is a failure to connect, send or read the answer in time (the
    /// connection is dropped and made again next time).
    pub async fn post(
        &mut self,
        body: Vec<u8>,
        content_type: &'static str,
        encoding: Option<&'static str>,
    ) -> Result<Answer, String> {
        match tokio::time::timeout(self.timeout, self.exchange(body, content_type, encoding)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(format!(
                    "no answer within request_timeout ({})",
                    humantime::format_duration(self.timeout)
                ))
            }
        }
    }

    async fn exchange(
        &mut self,
        body: Vec<u8>,
        content_type: &'static str,
        encoding: Option<&'static str>,
    ) -> Result<Answer, String> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        sender.ready().await.map_err(|e| format!("connection to {} failed: {e}", self.authority))?;
        let len = body.len();
        let body = Bytes::from(body);
        let pieces: Vec<_> = (0..len)
            .step_by(WRITE_PIECE)
            .map(|at| Ok(Frame::data(body.slice(at..len.min(at + WRITE_PIECE)))))
            .collect();
        let mut req = http::Request::post(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, len)
            .body(StreamBody::new(futures_util::stream::iter(pieces)))
            .map_err(|e| e.to_string())?;
        if let Some(enc) = encoding {
            req.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static(enc));
        }
        for (k, v) in &self.headers {
            req.headers_mut().insert(k, v.clone());
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request to {} failed: {e}", self.authority))?;
        let status = resp.status().as_u16();
        let retry_after =
            resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let keep = !resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {} failed: {e}", self.authority))?
            .to_bytes();
        if keep {
            self.conn = Some(sender);
        }
        Ok(Answer { status, retry_after, body })
    }

    async fn connect(&self) -> Result<SendRequest<Body>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some(tls) => {
                let (connector, name) = tls.connector();
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {} failed: {e}", self.authority))?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<S>(io: S) -> Result<SendRequest<Body>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
