//! Which node a URL names, and the TLS material for amqps:// (a CA bundle to
//! trust, a client certificate and key), read from files.

use std::path::Path;

use lapin::{
    tcp::{OwnedIdentity, OwnedTLSConfig},
    uri::AMQPUri,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use super::amqp_uri;
use crate::config::AmqpTlsFiles;

/// A TLS file setting that cannot work, with the setting's name.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {problem}")]
pub struct TlsFileError {
    pub setting: &'static str,
    pub problem: String,
}

/// `host:port` of the node a URL points at (the label in metrics and status).
pub fn node_name(url: &str) -> String {
    amqp_uri(url).map_or_else(|_| "unknown".to_string(), |uri| node_of(&uri))
}

/// `host:port` of a parsed URL (an IPv6 host in brackets).
pub(super) fn node_of(uri: &AMQPUri) -> String {
    let authority = &uri.authority;
    if authority.host.contains(':') {
        format!("[{}]:{}", authority.host, authority.port)
    } else {
        format!("{}:{}", authority.host, authority.port)
    }
}

/// Reads and checks the files: each must hold what its setting says, so a
/// wrong path or a key given without its certificate stops the relay at start.
pub fn tls_config(files: &AmqpTlsFiles) -> Result<OwnedTLSConfig, TlsFileError> {
    let cert_chain = match &files.ca {
        Some(path) => {
            let pem = read("amqp-ca-file", path)?;
            certificates("amqp-ca-file", path, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let identity = match (&files.cert, &files.key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let pem = read("amqp-cert-file", cert)?;
            certificates("amqp-cert-file", cert, &pem)?;
            let key_pem = read("amqp-key-file", key)?;
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsFileError {
                setting: "amqp-key-file",
                problem: format!(
                    "'{}' holds no usable PEM private key ({e:?}): give the client certificate's key, unencrypted",
                    key.display()
                ),
            })?;
            Some(OwnedIdentity::PKCS8 {
                pem: pem.into_bytes(),
                key: key_pem.into_bytes(),
            })
        }
        (Some(_), None) => {
            return Err(TlsFileError {
                setting: "amqp-key-file",
                problem: "missing: amqp-cert-file is set, give its private key too".to_string(),
            })
        }
        (None, Some(_)) => {
            return Err(TlsFileError {
                setting: "amqp-cert-file",
                problem: "missing: amqp-key-file is set, give its certificate too".to_string(),
            })
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn read(setting: &'static str, path: &Path) -> Result<String, TlsFileError> {
    std::fs::read_to_string(path).map_err(|e| TlsFileError {
        setting,
        problem: format!("cannot read '{}': {e}", path.display()),
    })
}

fn certificates(setting: &'static str, path: &Path, pem: &str) -> Result<(), TlsFileError> {
    let bad = |why: String| TlsFileError {
        setting,
        problem: format!(
            "'{}' {why}: give a PEM file of certificates",
            path.display()
        ),
    };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("cannot be read as PEM ({e:?})")))?;
    if certs.is_empty() {
        return Err(bad("holds no certificate".to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_host_and_port() {
        assert_eq!(node_name("amqp://u:p@10.1.2.3:5673/%2f"), "10.1.2.3:5673");
        assert_eq!(
            node_name("amqps://rabbit.internal/"),
            "rabbit.internal:5671"
        );
        assert_eq!(node_name("amqp://localhost/"), "localhost:5672");
        assert_eq!(node_name("amqp://[::1]:5681/"), "[::1]:5681");
    }

    #[test]
    fn tls_files_are_checked_with_their_setting_named() {
        let dir = std::env::temp_dir().join(format!("outbox-amqp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let files = |ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| AmqpTlsFiles {
            ca: ca.map(Path::to_path_buf),
            cert: cert.map(Path::to_path_buf),
            key: key.map(Path::to_path_buf),
        };
        assert!(tls_config(&files(None, None, None)).is_ok());
        let e = tls_config(&files(Some(&dir.join("missing.pem")), None, None)).unwrap_err();
        assert_eq!(e.setting, "amqp-ca-file");
        assert!(e.problem.contains("cannot read"), "{e}");
        let e = tls_config(&files(Some(&not_pem), None, None)).unwrap_err();
        assert!(e.problem.contains("holds no certificate"), "{e}");
        let e = tls_config(&files(None, Some(&not_pem), None)).unwrap_err();
        assert_eq!(e.setting, "amqp-key-file");
        let e = tls_config(&files(None, None, Some(&not_pem))).unwrap_err();
        assert_eq!(e.setting, "amqp-cert-file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
