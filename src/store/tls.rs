//! PostgreSQL over rustls, with libpq's `sslmode` meanings.
//!
//! tokio-postgres itself knows only disable/prefer/require, so the URL's
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are read here and the URL
//! handed on without them. A refused server certificate is reported by what
//! is wrong (not signed by a trusted CA, not for this host name) and what to
//! set.

use std::{error::Error as StdError, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::describe_certificate_error;

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

/// The files a database URL names: `sslrootcert` (CAs trusted for the
/// server; without it verify-ca/verify-full trust the system's CAs),
/// `sslcert` and `sslkey` (the client certificate and its key, PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTlsFiles {
    pub root_cert: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode '{0}' is not one of disable, prefer, require, verify-ca, verify-full")]
    UnknownMode(String),
    #[error("cannot read sslrootcert '{path}': {reason}")]
    RootCert { path: String, reason: String },
    #[error("no trusted root certificates: set sslrootcert in the database URL or install CA certificates")]
    NoRoots,
    #[error("cannot use {param} '{path}': {reason}")]
    ClientCert {
        param: &'static str,
        path: String,
        reason: String,
    },
    #[error("{given} is set without {missing}: give both the client certificate (sslcert) and its key (sslkey)")]
    ClientCertHalf {
        given: &'static str,
        missing: &'static str,
    },
}

/// The URL without the TLS parameters tokio-postgres does not know, the
/// mode, and the files the URL names (None: none). Boxed so that callers
/// take `files.as_deref()`.
pub fn split_tls_params(url: &str) -> Result<(String, SslMode, Option<Box<PgTlsFiles>>), TlsError> {
    // The query starts at the first '?' after the user info, which
    // tokio-postgres ends at the first '@': a password may hold a raw '?'.
    let authority = url.find('@').map_or(0, |at| at + 1);
    let (base, query) = match url[authority..].find('?') {
        Some(q) => (&url[..authority + q], &url[authority + q + 1..]),
        None => return Ok((url.to_string(), SslMode::Prefer, None)),
    };
    let mut mode = SslMode::Prefer;
    let mut files = PgTlsFiles::default();
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
            Some(("sslrootcert", v)) => files.root_cert = Some(decode_path(v)),
            Some(("sslcert", v)) => files.client_cert = Some(decode_path(v)),
            Some(("sslkey", v)) => files.client_key = Some(decode_path(v)),
            _ => kept.push(kv),
        }
    }
    // libpq: sslmode=require with a root certificate behaves like verify-ca.
    if mode == SslMode::Require && files.root_cert.is_some() {
        mode = SslMode::VerifyCa;
    }
    kept.push(match mode {
        SslMode::Disable => "sslmode=disable",
        SslMode::Prefer => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let files = (files != PgTlsFiles::default()).then(|| Box::new(files));
    Ok((format!("{base}?{}", kept.join("&")), mode, files))
}

/// A path as written in a URL query, percent-decoded as libpq does (a '%'
/// not followed by two hex digits stays as written).
fn decode_path(v: &str) -> String {
    crate::redact::percent_decode(v)
}

/// The rustls connector for `mode`: what it verifies, which roots it
/// trusts, which client certificate it presents.
pub fn connector(mode: SslMode, files: Option<&PgTlsFiles>) -> Result<MakeRustlsConnect, TlsError> {
    let files = files.cloned().unwrap_or_default();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|_| TlsError::NoRoots)?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            Arc::new(AcceptAnyCert(provider.clone()))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = root_store(files.root_cert.as_deref())?;
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|_| TlsError::NoRoots)?;
            Arc::new(Explained {
                inner,
                check_host: mode == SslMode::VerifyFull,
                roots: match &files.root_cert {
                    Some(path) => format!("sslrootcert '{path}'"),
                    None => "the system's CA certificates (no sslrootcert)".to_string(),
                },
            })
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&files.client_cert, &files.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let (chain, key_der) = client_identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::ClientCert {
                    param: "sslkey",
                    path: key.clone(),
                    reason: format!("{e}: give the key of the certificate in sslcert '{cert}'"),
                })?
        }
        (Some(_), None) => {
            return Err(TlsError::ClientCertHalf {
                given: "sslcert",
                missing: "sslkey",
            })
        }
        (None, Some(_)) => {
            return Err(TlsError::ClientCertHalf {
                given: "sslkey",
                missing: "sslcert",
            })
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The client certificate chain and key, read from PEM files.
fn client_identity(
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let unusable = |param: &'static str, path: &str, reason: String| TlsError::ClientCert {
        param,
        path: path.to_string(),
        reason,
    };
    let pem = std::fs::read(cert).map_err(|e| unusable("sslcert", cert, e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable("sslcert", cert, format!("not PEM ({e:?})")))?;
    if chain.is_empty() {
        return Err(unusable(
            "sslcert",
            cert,
            "holds no certificate: give a PEM file".to_string(),
        ));
    }
    let pem = std::fs::read(key).map_err(|e| unusable("sslkey", key, e.to_string()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        unusable(
            "sslkey",
            key,
            format!("holds no usable PEM private key ({e:?}): give the key unencrypted"),
        )
    })?;
    Ok((chain, key_der))
}

fn root_store(path: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match path {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TlsError::RootCert {
                path: path.to_string(),
                reason: e.to_string(),
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TlsError::RootCert {
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

/// verify-ca and verify-full: the chain must lead to a trusted root, and for
/// verify-full the certificate must name the host. A refusal says which of
/// the two failed and what to set.
#[derive(Debug)]
struct Explained {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_host: bool,
    /// Which roots were trusted, for the message.
    roots: String,
}

impl ServerCertVerifier for Explained {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(e)) => {
                let host = server_name.to_str();
                let said = match describe_certificate_error(&e, &host) {
                    Some(problem) => match e {
                        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                            format!("{problem}: set sslrootcert to the CA certificate that signed it (trusted now: {})", self.roots)
                        }
                        CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. } => format!(
                            "{problem}: connect with a host name the certificate lists, or use sslmode=verify-ca to check the chain only"
                        ),
                        _ => problem,
                    },
                    None => return Err(rustls::Error::InvalidCertificate(e)),
                };
                Err(refusal(format!("the database server's {said}")))
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A refusal in our words. rustls prints `Error::Other` as "other error: "
/// and the message; every other variant would print a debug form.
fn refusal(message: String) -> rustls::Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_params_are_translated_for_tokio_postgres() {
        let (url, mode, files) =
            split_tls_params("postgres://u@h/db?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(files, None);
        assert_eq!(url, "postgres://u@h/db?application_name=x&sslmode=require");

        let (_, mode, files) =
            split_tls_params("postgres://h/db?sslmode=require&sslrootcert=/ca.pem").unwrap();
        assert_eq!(mode, SslMode::VerifyCa);
        assert_eq!(
            files.as_deref().and_then(|f| f.root_cert.as_deref()),
            Some("/ca.pem")
        );

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

    #[test]
    fn client_certificate_params_are_taken_out_of_the_url() {
        let (url, mode, files) = split_tls_params(
            "postgres://relay@db/app?sslmode=verify-full&sslcert=/etc/relay/client.pem&sslkey=%2Fetc%2Frelay%2Fclient.key&sslrootcert=/etc/relay/ca.pem",
        )
        .unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(url, "postgres://relay@db/app?sslmode=require");
        assert_eq!(
            files.as_deref(),
            Some(&PgTlsFiles {
                root_cert: Some("/etc/relay/ca.pem".to_string()),
                client_cert: Some("/etc/relay/client.pem".to_string()),
                client_key: Some("/etc/relay/client.key".to_string()),
            })
        );
        // A client certificate alone does not make require verify anything.
        let (_, mode, _) =
            split_tls_params("postgres://db/app?sslmode=require&sslcert=/c.pem&sslkey=/k.pem")
                .unwrap();
        assert_eq!(mode, SslMode::Require);
    }

    #[test]
    fn half_a_client_certificate_or_a_missing_file_is_refused_with_the_param_named() {
        let half = |cert: Option<&str>, key: Option<&str>| PgTlsFiles {
            root_cert: None,
            client_cert: cert.map(str::to_string),
            client_key: key.map(str::to_string),
        };
        let refused = |files: PgTlsFiles| match connector(SslMode::Require, Some(&files)) {
            Ok(_) => panic!("{files:?} accepted"),
            Err(e) => e,
        };
        let e = refused(half(Some("/c.pem"), None));
        assert!(
            e.to_string().starts_with("sslcert is set without sslkey"),
            "{e}"
        );
        let e = refused(half(None, Some("/k.pem")));
        assert!(
            e.to_string().starts_with("sslkey is set without sslcert"),
            "{e}"
        );
        let e = refused(half(Some("/nonexistent/c.pem"), Some("/nonexistent/k.pem")));
        assert!(
            e.to_string()
                .starts_with("cannot use sslcert '/nonexistent/c.pem'"),
            "{e}"
        );
    }

    #[test]
    fn database_refusals_read_as_one_sentence() {
        let e = refusal("the database server's certificate is not signed by a trusted CA".into());
        assert_eq!(
            e.to_string(),
            "other error: the database server's certificate is not signed by a trusted CA"
        );
    }
}
