//! TLS origination to an upstream (`outbound[].upstream.tls`): the rustls client config built
//! from the CA, cert and key files, rotated when they change like the inbound ones.
//!
//! The server is verified against `ca` (or the system's roots). With `identity` set, the
//! check is the workload identity, as a mesh does it: the chain must lead to the CA and the
//! certificate's SPIFFE ID (URI SAN; its DNS SAN when it has no URI) must be `identity`; the
//! host name is not checked, since SPIFFE certificates carry none. Without it, the server
//! name is (WebPKI rules). A mismatch fails the handshake: nothing is sent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::oneshot;

use super::PeerIdentity;
use super::server::{TlsError, certs, check_validity, provider};
use crate::config::UpstreamTls;
use crate::files::FileWatcher;
use crate::proxy::pool::TlsKey;

/// As for server files: a cert and key replaced one after the other are one change.
const SETTLE: Duration = Duration::from_millis(100);

/// The server's certificate names someone other than `identity`: the error inside the
/// failed handshake's `io::Error`, found again by `is_identity_mismatch`.
#[derive(Debug, thiserror::Error)]
#[error("the server's identity is {got:?}, not {want}")]
pub struct IdentityMismatch {
    pub want: String,
    pub got: Option<String>,
}

/// Whether a failed handshake failed on the identity check.
pub fn is_identity_mismatch(e: &std::io::Error) -> bool {
    let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
        e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return false;
    };
    other.0.downcast_ref::<IdentityMismatch>().is_some()
}

/// An upstream's TLS client state.
pub struct ClientTls {
    files: UpstreamTls,
    alpn: Vec<Vec<u8>>,
    server_name: ServerName<'static>,
    /// What a pooled connection made with this was checked against.
    key: TlsKey,
    current: ArcSwap<ClientConfig>,
    _watching: oneshot::Sender<()>,
}

impl ClientTls {
    /// `default_name`: the server name when `server_name` is not set (the first endpoint's
    /// host as written).
    /// `alpn`: what `upstream.http` lets the server choose (`h2`, `http/1.1`, or both).
    pub fn load(
        files: &UpstreamTls,
        default_name: &str,
        alpn: Vec<Vec<u8>>,
        watcher: &FileWatcher,
        upstream: &str,
    ) -> Result<Arc<Self>, TlsError> {
        let name = files.server_name.as_deref().unwrap_or(default_name);
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| TlsError::Ca {
            path: PathBuf::from(name),
            reason: format!("not a server name: {e}"),
        })?;
        let key = TlsKey { server_name: name.into(), identity: files.identity.as_deref().map(Into::into) };
        let (watching, dropped) = oneshot::channel();
        let tls = Arc::new(ClientTls {
            current: ArcSwap::from_pointee(build(files, &alpn)?),
            files: files.clone(),
            alpn,
            server_name,
            key,
            _watching: watching,
        });
        let paths = [files.ca.as_ref(), files.cert.as_ref(), files.key.as_ref()];
        let watch = watcher.watch(paths.into_iter().flatten().cloned().collect(), SETTLE);
        tokio::spawn(super::rotate(Arc::downgrade(&tls), watch, dropped, ("upstream", upstream.to_owned())));
        Ok(tls)
    }

    /// The server name and identity its connections are checked against (their pool key).
    pub fn key(&self) -> &TlsKey {
        &self.key
    }

    /// The connector with the current material, and the name to ask for.
    pub fn connector(&self) -> (tokio_rustls::TlsConnector, ServerName<'static>) {
        (tokio_rustls::TlsConnector::from(self.current.load_full()), self.server_name.clone())
    }
}

impl super::Rebuild for ClientTls {
    fn rebuild(&self) -> Result<(), TlsError> {
        self.current.store(Arc::new(build(&self.files, &self.alpn)?));
        Ok(())
    }
}

/// Checks the files without starting anything: what `sidecar check` runs.
pub fn check(files: &UpstreamTls) -> Result<(), TlsError> {
    build(files, &[]).map(|_| ())
}

fn build(files: &UpstreamTls, alpn: &[Vec<u8>]) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(path) => {
            for ca in certs(path)? {
                roots.add(ca).map_err(|e| TlsError::Ca { path: path.clone(), reason: e.to_string() })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::Ca {
                    path: PathBuf::from("system roots"),
                    reason: "no CA certificates found; set `ca`".to_owned(),
                });
            }
        }
    }
    let provider = Arc::new(provider());
    let verifier = Arc::new(Verifier {
        roots: Arc::new(roots),
        identity: files.identity.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert)?;
            check_validity(cert, &chain[0])?;
            let key = super::key::load(key)?;
            let certified = rustls::sign::CertifiedKey::new(chain, key);
            certified.keys_match().map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    TlsError::Mismatch { key: files.key.clone().unwrap_or_default(), cert: cert.clone() }
                }
                other => TlsError::Rustls(other),
            })?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// WebPKI chain verification against our roots, then the identity or the server name.
#[derive(Debug)]
struct Verifier {
    roots: Arc<RootCertStore>,
    identity: Option<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match &self.identity {
            None => verify_server_name(&cert, server_name)?,
            Some(want) => {
                let got = PeerIdentity::from_leaf(end_entity).map(|p| p.id.to_string());
                if got.as_deref() != Some(want.as_str()) {
                    let e = IdentityMismatch { want: want.clone(), got };
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(e),
                    ))));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
