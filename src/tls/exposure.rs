//! Settings that work but expose the connection: an unverified database
//! connection or plain `amqp://` to a host off this machine. `check` prints
//! these as warnings and `run` logs them at start, in the same words.

use super::SslMode;
use crate::{
    config::{redact_url, AmqpTlsFiles},
    publisher::amqp_uri,
};

/// A warning when the database connection is not verified and leaves this
/// machine: `disable`, `prefer` and `require` (without sslrootcert) verify
/// nothing. Loopback hosts and Unix sockets never leave the machine.
pub fn database_tls_warning(url: &str) -> Option<String> {
    let (pg_url, mode, _) = super::split_tls_params(url).ok()?;
    let config: tokio_postgres::Config = pg_url.parse().ok()?;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) if !is_loopback(name) => Some(name.clone()),
            _ => None,
        })
        .chain(
            config
                .get_hostaddrs()
                .iter()
                .filter(|ip| !ip.is_loopback())
                .map(|ip| ip.to_string()),
        )
        .collect();
    if hosts.is_empty() {
        return None;
    }
    let hosts = hosts.join(", ");
    let fix = "use sslmode=verify-full with sslrootcert=<CA file> in the database URL";
    let said = match mode {
        SslMode::Disable => {
            format!("sslmode=disable: the connection to {hosts} is neither encrypted nor verified")
        }
        SslMode::Prefer => format!(
            "sslmode=prefer (the default): the connection to {hosts} is encrypted only if the server offers TLS, and the server is never verified"
        ),
        SslMode::Require => format!(
            "sslmode=require: the connection to {hosts} is encrypted but the server is not verified (anyone on the path can pose as it)"
        ),
        SslMode::VerifyCa | SslMode::VerifyFull => return None,
    };
    Some(format!("{said}: {fix}"))
}

/// A warning when a broker URL is plain `amqp://` to a host off this
/// machine, or names a client certificate it will not use.
pub fn broker_tls_warning(url: &str, tls: &AmqpTlsFiles) -> Option<String> {
    if url.starts_with("amqps://") {
        return None;
    }
    let host = amqp_uri(url).ok()?.authority.host;
    let shown = redact_url(url);
    if !is_loopback(&host) {
        return Some(format!(
            "{shown} is plain amqp:// to {host}: neither encrypted nor verified: use amqps:// (with amqp-ca-file for a private CA)"
        ));
    }
    tls.cert.as_ref().map(|cert| {
        format!(
            "amqp-cert-file '{}' is set but {shown} is plain amqp://: the client certificate is not used",
            cert.display()
        )
    })
}

/// localhost, 127.0.0.0/8 and ::1: traffic that never leaves the machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
