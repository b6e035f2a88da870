//! A dev CA for people without a mesh: `sidecar certs init DIR` and `sidecar certs issue`.
//!
//! ECDSA P-256 throughout (fast handshakes, what meshes issue). Private keys are written
//! with mode 0600 from the start, never world-readable even for a moment.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// A dev CA lives ten years: long enough to forget about, and it is for development.
const CA_DAYS: i64 = 3650;
/// Workload certs live 90 days, like cert-manager's default; rotation is the point.
const LEAF_DAYS: i64 = 90;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const LEAF_CERT: &str = "tls.crt";
pub const LEAF_KEY: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path} already exists; remove it first (or pick another directory)")]
    Exists { path: PathBuf },
    #[error(transparent)]
    Rcgen(#[from] rcgen::Error),
    #[error("`{0}` is not a SPIFFE ID: expected spiffe://TRUST-DOMAIN/PATH")]
    BadSpiffe(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |error| CertsError::Io { path: path.to_owned(), error }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertsError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| match e
        .kind()
    {
        std::io::ErrorKind::AlreadyExists => CertsError::Exists { path: path.to_owned() },
        _ => CertsError::Io { path: path.to_owned(), error: e },
    })?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Writes `DIR/ca.crt` and `DIR/ca.key`.
pub fn init(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    for name in [CA_CERT, CA_KEY] {
        let p = dir.join(name);
        if p.exists() {
            return Err(CertsError::Exists { path: p });
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "Sidecar dev CA");
    params.distinguished_name.push(DnType::OrganizationName, "Sidecar");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_file(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    write_file(&dir.join(CA_CERT), &cert.pem(), 0o644)?;
    Ok(())
}

/// Writes `OUT/tls.crt`, `OUT/tls.key` and a copy of the CA as `OUT/ca.crt`: a workload
/// certificate for `spiffe` (URI SAN) and `dns` names, good for both server and client auth.
pub fn issue(ca_dir: &Path, spiffe: &str, dns: &[String], out: &Path) -> Result<(), CertsError> {
    let valid_spiffe = spiffe
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(domain, path)| !domain.is_empty() && !path.is_empty());
    if !valid_spiffe {
        return Err(CertsError::BadSpiffe(spiffe.to_owned()));
    }
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns.to_vec())?;
    params.subject_alt_names.insert(0, SanType::URI(spiffe.try_into()?));
    params.distinguished_name.push(DnType::CommonName, dns.first().map_or(spiffe, String::as_str));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(LEAF_DAYS);
    let cert = params.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    write_file(&out.join(LEAF_KEY), &key.serialize_pem(), 0o600)?;
    write_file(&out.join(LEAF_CERT), &cert.pem(), 0o644)?;
    write_file(&out.join(CA_CERT), &ca_pem, 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_then_issue_writes_private_keys_0600() {
        let dir = std::env::temp_dir().join(format!("sidecar-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = dir.join("ca");
        init(&ca).unwrap();
        assert!(matches!(init(&ca), Err(CertsError::Exists { .. })));
        let out = dir.join("web");
        issue(&ca, "spiffe://cluster.local/ns/default/sa/web", &["web.default.svc".into()], &out).unwrap();
        for key in [ca.join(CA_KEY), out.join(LEAF_KEY)] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let pem = std::fs::read(out.join(LEAF_CERT)).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        let id = crate::tls::PeerIdentity::from_leaf(&der).unwrap();
        assert_eq!(&*id.id, "spiffe://cluster.local/ns/default/sa/web");
        assert!(id.xfcc.to_str().unwrap().ends_with(";URI=spiffe://cluster.local/ns/default/sa/web"));
        assert!(matches!(issue(&ca, "http://x", &[], &dir.join("x")), Err(CertsError::BadSpiffe(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
