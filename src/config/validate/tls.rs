//! Outbound TLS: `[tls]`, the per-use `ca_file` overrides, client certificates, and the egress
//! proxy from `HTTPS_PROXY` / `NO_PROXY`. PEM files are read and checked here, so that
//! `vestibule check` names the key of a file that is missing, unreadable or not what it should be.

use super::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

pub(super) fn outbound_tls(
    raw: raw::OutboundTls,
    base: &Path,
    problems: &mut Problems,
) -> OutboundTls {
    let raw::OutboundTls {
        ca_file,
        system_roots,
    } = raw;
    OutboundTls {
        ca_file: ca_bundle(ca_file, "tls.ca_file", base, problems),
        system_roots: system_roots.unwrap_or(false),
    }
}

fn read(
    value: &str,
    path: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<(PathBuf, Vec<u8>)> {
    let file = base.join(value);
    match crate::config::read_file(&file, crate::config::MAX_FILE) {
        Ok(bytes) => Some((file, bytes)),
        Err(e) => {
            problems.add(path, format!("cannot read file {value:?}: {e}"));
            None
        }
    }
}

fn certificates(
    bytes: &[u8],
    value: &str,
    path: &str,
    problems: &mut Problems,
) -> Option<Vec<CertificateDer<'static>>> {
    match CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            problems.add(
                path,
                format!("{value:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
            );
            None
        }
        Err(e) => {
            problems.add(path, format!("{value:?} is not valid PEM: {e}"));
            None
        }
    }
}

/// A CA bundle: at least one certificate, each usable as a trust anchor.
pub(super) fn ca_bundle(
    value: Option<String>,
    path: &str,
    base: &Path,
    problems: &mut Problems,
) -> Option<CaBundle> {
    let value = value?;
    let (file, bytes) = read(&value, path, base, problems)?;
    let certs = certificates(&bytes, &value, path, problems)?;
    let mut store = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        if let Err(e) = store.add(cert.clone()) {
            problems.add(
                path,
                format!(
                    "certificate {} in {value:?} is not a usable CA certificate: {e}",
                    i + 1
                ),
            );
            return None;
        }
    }
    Some(CaBundle {
        path: file,
        certs: Arc::new(certs),
    })
}

/// A client certificate (`{table}.{cert_key}`) and its key (`{table}.{key_key}`): both or
/// neither, and the key must belong to the certificate. The key's content is never shown.
pub(super) fn client_identity(
    cert: Option<String>,
    key: Option<String>,
    table: &str,
    (cert_key, key_key): (&str, &str),
    base: &Path,
    problems: &mut Problems,
) -> Option<ClientIdentity> {
    let (cert_path, key_path) = (join(table, cert_key), join(table, key_key));
    let (cert, key) = match (cert, key) {
        (None, None) => return None,
        (Some(_), None) => {
            problems.add(
                key_path,
                format!("is required with {cert_key}: the PEM file of its private key"),
            );
            return None;
        }
        (None, Some(_)) => {
            problems.add(
                cert_path,
                format!("is required with {key_key}: the PEM file of the client certificate"),
            );
            return None;
        }
        (Some(c), Some(k)) => (c, k),
    };
    // Both files are watched: a pair renewed on disk is applied without SIGHUP, once both fit.
    let chain = read(&cert, &cert_path, base, problems).and_then(|(file, bytes)| {
        super::watched(&file, &bytes, problems);
        Some((file, certificates(&bytes, &cert, &cert_path, problems)?))
    });
    // The key's value may be the PEM key itself, written where its path belongs.
    if let Some(missing) = no_secret_file(&base.join(&key)) {
        problems.add(key_path, missing);
        return None;
    }
    let private = read(&key, &key_path, base, problems).and_then(|(file, bytes)| {
        super::watched(&file, &bytes, problems);
        match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(k) => Some((file, k)),
            Err(_) => {
                problems.add(
                    key_path.clone(),
                    format!("{key:?} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"),
                );
                None
            }
        }
    });
    let ((cert_file, chain), (key_file, private)) = (chain?, private?);
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Err(e) =
        rustls::sign::CertifiedKey::from_der(chain.clone(), private.clone_key(), &provider)
    {
        problems.add(
            key_path,
            format!("{key:?} does not fit the certificate in {cert:?} ({e}); give the key of that certificate"),
        );
        return None;
    }
    Some(ClientIdentity {
        cert_path: cert_file,
        key_path: key_file,
        chain: Arc::new(chain),
        key: Arc::new(private),
    })
}

/// `HTTPS_PROXY` / `NO_PROXY`, uppercase first. The proxy URL is never shown: it may carry a
/// password.
pub(super) fn egress(env: &dyn Fn(&str) -> Option<String>, problems: &mut Problems) -> Egress {
    let pick = |names: [&'static str; 2]| {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
    };
    let https_proxy = pick(["HTTPS_PROXY", "https_proxy"]).and_then(|(name, value)| {
        match url::Url::parse(&value) {
            Ok(u) if u.scheme() == "http" && u.host().is_some() => Some(Secret::new(value)),
            _ => {
                problems.add(
                    format!("environment {name}"),
                    "must be an http:// proxy URL such as \"http://proxy.internal:3128\" (value not shown: it may hold a password)",
                );
                None
            }
        }
    });
    Egress {
        https_proxy,
        no_proxy: pick(["NO_PROXY", "no_proxy"]).map(|(_, v)| v),
    }
}
