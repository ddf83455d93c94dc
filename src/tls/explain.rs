//! A refused TLS handshake in words that say which case it is (not signed by
//! a trusted CA, not for this host name, a plain-text port, a client
//! certificate missing or refused) and what to set.

use std::{error::Error as StdError, sync::Arc};

use rustls::{AlertDescription, CertificateError, InvalidMessage, OtherError};

use crate::config::AmqpTlsFiles;

/// A refusal in our words. rustls prints `Error::Other` as "other error: "
/// and the message; every other variant would print a debug form.
pub(super) fn refusal(message: String) -> rustls::Error {
    #[derive(Debug)]
    struct Refusal(String);
    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl StdError for Refusal {}
    rustls::Error::Other(OtherError(Arc::new(Refusal(message))))
}

/// What is wrong with a server certificate, in words ("certificate is not
/// signed by a trusted CA"); None for the cases rustls already words well.
pub(super) fn describe_certificate_error(e: &CertificateError, host: &str) -> Option<String> {
    Some(match e {
        CertificateError::UnknownIssuer => "certificate is not signed by a trusted CA".to_string(),
        CertificateError::BadSignature => {
            "certificate's signature does not verify against a trusted CA".to_string()
        }
        CertificateError::NotValidForName => {
            format!("certificate is not valid for host name '{host}'")
        }
        CertificateError::NotValidForNameContext { presented, .. } => format!(
            "certificate is not valid for host name '{host}' (it is for {})",
            presented
                .iter()
                .map(|name| plain_name(name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate has expired".to_string()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate is not valid yet (check the clocks)".to_string()
        }
        _ => return None,
    })
}

/// `wrong-host.invalid` from rustls' `DnsName("wrong-host.invalid")` (and
/// the address from `IpAddress(..)`); anything else as written.
fn plain_name(presented: &str) -> &str {
    match (presented.find('('), presented.rfind(')')) {
        (Some(open), Some(close)) if open < close => presented[open + 1..close].trim_matches('"'),
        _ => presented,
    }
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
