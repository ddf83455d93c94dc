//! PostgreSQL TLS with libpq's `sslmode` meanings, over rustls.
//!
//! tokio-postgres itself knows only disable/prefer/require, so the URL's
//! `sslmode` and `sslrootcert` are read here and the URL handed on without them.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Encrypt when the server offers it, verify nothing (libpq's default).
    Prefer,
    /// Encrypt, verify nothing (libpq: require without a root certificate).
    Require,
    /// Encrypt and verify the chain, not the host name.
    VerifyCa,
    /// Encrypt and verify chain and host name.
    VerifyFull,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode '{0}' is not one of disable, prefer, require, verify-ca, verify-full")]
    UnknownMode(String),
    #[error("cannot read sslrootcert '{path}': {reason}")]
    RootCert { path: String, reason: String },
    #[error("no trusted root certificates: set sslrootcert in the database URL or install CA certificates")]
    NoRoots,
}

/// The URL without `sslmode`/`sslrootcert`, the mode, and the root cert path.
pub fn split_tls_params(url: &str) -> Result<(String, SslMode, Option<String>), TlsError> {
    // The query starts at the first '?' after the user info, which
    // tokio-postgres ends at the first '@': a password may hold a raw '?'.
    let authority = url.find('@').map_or(0, |at| at + 1);
    let (base, query) = match url[authority..].find('?') {
        Some(q) => (&url[..authority + q], &url[authority + q + 1..]),
        None => return Ok((url.to_string(), SslMode::Prefer, None)),
    };
    let mut mode = SslMode::Prefer;
    let mut root = None;
    let mut kept = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", v)) => {
                mode = match v {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(TlsError::UnknownMode(other.to_string())),
                }
            }
            Some(("sslrootcert", v)) => root = Some(v.to_string()),
            _ => kept.push(kv),
        }
    }
    // libpq: sslmode=require with a root certificate behaves like verify-ca.
    if mode == SslMode::Require && root.is_some() {
        mode = SslMode::VerifyCa;
    }
    let pg_mode = match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    kept.push(match pg_mode {
        "disable" => "sslmode=disable",
        "prefer" => "sslmode=prefer",
        _ => "sslmode=require",
    });
    Ok((format!("{base}?{}", kept.join("&")), mode, root))
}

pub fn connector(mode: SslMode, root_cert: Option<&str>) -> Result<MakeRustlsConnect, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|_| TlsError::NoRoots)?;
    let config = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = root_store(root_cert)?;
            if mode == SslMode::VerifyFull {
                builder.with_root_certificates(roots).with_no_client_auth()
            } else {
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|_| TlsError::NoRoots)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(path: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match path {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TlsError::RootCert {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: CertificateDer<'static> = cert.map_err(|e| TlsError::RootCert {
                    path: path.to_string(),
                    reason: format!("{e:?}"),
                })?;
                let _ = roots.add(cert);
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}

/// For prefer/require: libpq encrypts without verifying the server there too.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted root; the host name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_params_are_translated_for_tokio_postgres() {
        let (url, mode, root) =
            split_tls_params("postgres://u@h/db?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(root, None);
        assert_eq!(url, "postgres://u@h/db?application_name=x&sslmode=require");

        let (_, mode, root) =
            split_tls_params("postgres://h/db?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(mode, SslMode::VerifyCa);
        assert_eq!(root.as_deref(), Some("/ca.pem"));

        assert_eq!(
            split_tls_params("postgres://h/db").unwrap().1,
            SslMode::Prefer
        );
        assert!(split_tls_params("postgres://h/db?sslmode=bogus").is_err());

        // A raw '?' in the password is not the start of the query.
        let (url, mode, _) =
            split_tls_params("postgres://u:Se?cr3t@h/db?sslmode=verify-full").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(url, "postgres://u:Se?cr3t@h/db?sslmode=require");
        let (url, mode, _) = split_tls_params("postgres://u:Se?cr3t@h/db").unwrap();
        assert_eq!(mode, SslMode::Prefer);
        assert_eq!(url, "postgres://u:Se?cr3t@h/db");
    }
}
