//! Who a verified client is: the SPIFFE ID in its certificate's URI SAN (or its first DNS
//! SAN when it has no URI), and the headers that tell the app.

use http::HeaderValue;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// A verified client's identity, computed once per connection.
#[derive(Debug)]
pub struct PeerIdentity {
    /// `spiffe://cluster.local/ns/default/sa/frontend`, or a DNS name.
    pub id: std::sync::Arc<str>,
    /// `x-client-identity`: the id alone.
    pub header: HeaderValue,
    /// `x-forwarded-client-cert` in Envoy's format: `Hash=<sha256 of the DER>;URI=<id>`
    /// (or `DNS=<name>`).
    pub xfcc: HeaderValue,
}

impl PeerIdentity {
    /// From the client's leaf certificate; `None` when it names nobody (no URI or DNS SAN).
    pub fn from_leaf(leaf: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
        let sans = cert.subject_alternative_name().ok().flatten()?;
        let names = &sans.value.general_names;
        let (kind, id) = names
            .iter()
            .find_map(|n| match n {
                GeneralName::URI(u) => Some(("URI", *u)),
                _ => None,
            })
            .or_else(|| {
                names.iter().find_map(|n| match n {
                    GeneralName::DNSName(d) => Some(("DNS", *d)),
                    _ => None,
                })
            })?;
        let hash = ring::digest::digest(&ring::digest::SHA256, leaf.as_ref());
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Some(PeerIdentity {
            id: id.into(),
            header: HeaderValue::from_str(id).ok()?,
            xfcc: HeaderValue::from_str(&format!("Hash={hex};{kind}={id}")).ok()?,
        })
    }
}
