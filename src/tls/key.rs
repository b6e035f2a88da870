//! Reading a PEM private key so that its bytes end up in rustls and nowhere else.
//!
//! rustls-pki-types' PEM reader copies the base64 text into a buffer it frees without
//! zeroing, and `PrivateKeyDer` is not zeroed on drop either; a core dump after a rotation
//! showed both keys' PEM lines in freed heap (issue 9, bug 4). Here every buffer that holds
//! key material (the file, its base64, its DER) is `Zeroizing`, and rustls gets only a
//! borrowed DER to build its signing key from.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rustls::sign::SigningKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use zeroize::Zeroizing;

use super::TlsError;

/// The signing key in the first private-key section of the PEM file at `path`.
pub fn load(path: &Path) -> Result<Arc<dyn SigningKey>, TlsError> {
    let bad = |reason: &str| TlsError::BadKey { path: path.to_owned(), reason: reason.to_owned() };
    let pem =
        Zeroizing::new(std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error })?);
    let (label, b64) = section(&pem).ok_or_else(|| bad("no private-key section"))?;
    let mut der = Zeroizing::new(vec![0u8; b64.len() / 4 * 3 + 3]);
    let len = base64::engine::general_purpose::STANDARD
        .decode_slice(&b64[..], &mut der[..])
        .map_err(|_| bad("bad base64"))?;
    let der = &der[..len];
    let key = match label {
        Label::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
        Label::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
        Label::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
    };
    rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(&e.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Pkcs8,
    Pkcs1,
    Sec1,
}

/// The label and base64 body (whitespace removed) of the first private-key section.
fn section(pem: &[u8]) -> Option<(Label, Zeroizing<Vec<u8>>)> {
    let mut lines = pem.split(|b| *b == b'\n').map(|l| l.trim_ascii());
    let label = lines.by_ref().find_map(|l| match l {
        b"-----BEGIN PRIVATE KEY-----" => Some(Label::Pkcs8),
        b"-----BEGIN RSA PRIVATE KEY-----" => Some(Label::Pkcs1),
        b"-----BEGIN EC PRIVATE KEY-----" => Some(Label::Sec1),
        _ => None,
    })?;
    // Sized once: a growing Vec would leave copies behind in freed memory.
    let mut b64 = Zeroizing::new(Vec::with_capacity(pem.len()));
    for line in lines {
        if line.starts_with(b"-----END ") {
            return Some((label, b64));
        }
        b64.extend_from_slice(line);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_loads_and_garbage_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("sidecar-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::tls::certs::init(&dir).unwrap();
        // The dev CA's key is a PKCS#8 ECDSA P-256 key, like the workload keys.
        let key = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("PRIVATE KEY")))
            .unwrap();
        assert!(load(&key).is_ok());
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let err = load(&junk).err().unwrap().to_string();
        assert!(err.contains("junk.pem"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sections_are_found_by_label() {
        let (label, b64) = section(
            b"junk\r\n-----BEGIN EC PRIVATE KEY-----\r\nAAAA\r\nBBBB\r\n-----END EC PRIVATE KEY-----\r\n",
        )
        .unwrap();
        assert_eq!((label, &b64[..]), (Label::Sec1, &b"AAAABBBB"[..]));
        assert!(section(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_none());
    }
}
