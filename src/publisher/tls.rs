//! Which node a URL names, the TLS material for amqps:// (a CA bundle to
//! trust, a client certificate and key), read from files, and a refused
//! handshake in words that say which case it is (not signed by a trusted CA,
//! not for this host name, a plain-text port, a client certificate missing or
//! refused) and what to set.

use std::{error::Error as StdError, path::Path, sync::Arc};

use lapin::{
    tcp::{OwnedIdentity, OwnedTLSConfig},
    uri::AMQPUri,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    AlertDescription, CertificateError, InvalidMessage,
};

use super::amqp_uri;
use crate::{config::AmqpTlsFiles, tls::describe_certificate_error};

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

/// What went wrong when an amqps:// connect failed, and what to set, when
/// `e` (or an error it was caused by) is a TLS refusal; None otherwise.
/// `host` is the URL's host, `files` the amqp-ca/cert/key-file settings.
/// Call it for amqps:// URLs only: it reads a reset connection as the TLS 1.3
/// refusal of a client certificate whose alert was not read in time.
pub fn explain_amqp_tls_error(
    e: &(dyn StdError + 'static),
    host: &str,
    files: &AmqpTlsFiles,
) -> Option<String> {
    let ca_file = files.ca.as_deref();
    let Some(tls) = find_rustls_error(e) else {
        return is_reset(e).then(|| match &files.cert {
            None => "the broker reset the connection during the handshake (a broker that requires a client certificate may do so instead of sending its alert): set amqp-cert-file and amqp-key-file if it requires one".to_string(),
            Some(cert) => format!(
                "the broker reset the connection during the handshake (a broker that refuses a client certificate may do so instead of sending its alert): check that amqp-cert-file '{}' is signed by a CA the broker trusts",
                cert.display()
            ),
        });
    };
    let trusted = match ca_file {
        Some(path) => format!(
            "amqp-ca-file '{}' and the system's CA certificates",
            path.display()
        ),
        None => "the system's CA certificates (amqp-ca-file is not set)".to_string(),
    };
    Some(match tls {
        rustls::Error::InvalidCertificate(
            e @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
        ) => format!(
            "the broker's {}: set amqp-ca-file to the CA certificate that signed it (trusted now: {trusted})",
            describe_certificate_error(e, host)?
        ),
        rustls::Error::InvalidCertificate(
            e @ (CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }),
        ) => format!(
            "the broker's {}: connect with a host name the certificate lists",
            describe_certificate_error(e, host)?
        ),
        rustls::Error::InvalidCertificate(e) => match describe_certificate_error(e, host) {
            Some(problem) => format!("the broker's {problem}"),
            None => format!("the broker's certificate was refused: {e}"),
        },
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType)
        | rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. } => format!(
            "the server at '{host}' does not speak TLS on this port (it answered in plain text): use amqp:// for a plain-text port, or the broker's TLS port (5671 by default) for amqps://"
        ),
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure,
        ) => "the broker requires a client certificate: set amqp-cert-file and amqp-key-file".to_string(),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied),
        ) => format!(
            "the broker refused the client certificate (TLS alert {alert:?}): give in amqp-cert-file a valid certificate signed by a CA the broker trusts"
        ),
        other => format!("the TLS handshake with the broker failed: {other}"),
    })
}

/// Whether the connection was reset by the peer (somewhere in `e`'s causes).
fn is_reset(e: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        let io = err
            .downcast_ref::<std::io::Error>()
            .or_else(|| err.downcast_ref::<Arc<std::io::Error>>().map(|io| &**io));
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset) {
            return true;
        }
        current = err.source();
    }
    false
}

/// The rustls error that `e` is or was caused by, looking inside I/O errors
/// (the TLS streams wrap rustls errors in `std::io::Error`).
fn find_rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = find_rustls_error(inner) {
                    return Some(tls);
                }
            }
        }
        if let Some(io) = err.downcast_ref::<Arc<std::io::Error>>() {
            if let Some(tls) = io.get_ref().and_then(|inner| find_rustls_error(inner)) {
                return Some(tls);
            }
        }
        current = err.source();
    }
    None
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

    fn io_wrapped(e: rustls::Error) -> lapin::Error {
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn amqp_tls_refusals_say_which_case_and_what_to_set() {
        let explain = |e: rustls::Error, ca: Option<&str>| {
            let files = AmqpTlsFiles {
                ca: ca.map(Into::into),
                ..Default::default()
            };
            explain_amqp_tls_error(&io_wrapped(e), "broker.internal", &files)
                .expect("a TLS refusal")
        };
        let said = explain(
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            Some("/etc/relay/ca.pem"),
        );
        assert_eq!(
            said,
            "the broker's certificate is not signed by a trusted CA: set amqp-ca-file to the CA certificate that signed it (trusted now: amqp-ca-file '/etc/relay/ca.pem' and the system's CA certificates)"
        );
        let said = explain(
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            None,
        );
        assert!(
            said.starts_with(
                "the broker's certificate is not valid for host name 'broker.internal'"
            ),
            "{said}"
        );
        let said = explain(
            rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
            None,
        );
        assert!(said.contains("does not speak TLS on this port"), "{said}");
        let said = explain(
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            None,
        );
        assert!(said.contains("requires a client certificate"), "{said}");
        let said = explain(
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            None,
        );
        assert!(said.contains("refused the client certificate"), "{said}");

        // Not a TLS error: nothing to explain.
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let none = AmqpTlsFiles::default();
        assert_eq!(explain_amqp_tls_error(&refused, "h", &none), None);
        // TLS 1.3: a reset instead of the client-certificate alert.
        let reset = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let said = explain_amqp_tls_error(&reset, "h", &none).expect("a reset");
        assert!(
            said.ends_with("set amqp-cert-file and amqp-key-file if it requires one"),
            "{said}"
        );
        let with_cert = AmqpTlsFiles {
            cert: Some("/etc/relay/client.pem".into()),
            ..Default::default()
        };
        let said = explain_amqp_tls_error(&reset, "h", &with_cert).expect("a reset");
        assert!(
            said.ends_with("check that amqp-cert-file '/etc/relay/client.pem' is signed by a CA the broker trusts"),
            "{said}"
        );
    }
}
