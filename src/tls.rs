//! What both TLS sides (PostgreSQL in `store`, RabbitMQ in `publisher`)
//! say alike: a refused server certificate in words ("not signed by a
//! trusted CA", "not for this host name"), and which hosts never leave this
//! machine (a plain connection to them exposes nothing).

use rustls::CertificateError;

/// What is wrong with a server certificate, in words ("certificate is not
/// signed by a trusted CA"); None for the cases rustls already words well.
pub fn describe_certificate_error(e: &CertificateError, host: &str) -> Option<String> {
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

/// localhost, 127.0.0.0/8 and ::1: traffic that never leaves the machine.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    #[test]
    fn the_names_a_certificate_is_for_are_shown_plain() {
        let e = CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("localhost").unwrap().to_owned(),
            presented: vec![
                "DnsName(\"wrong-host.invalid\")".to_string(),
                "IpAddress(10.0.0.1)".to_string(),
            ],
        };
        assert_eq!(
            describe_certificate_error(&e, "localhost").unwrap(),
            "certificate is not valid for host name 'localhost' (it is for wrong-host.invalid, 10.0.0.1)"
        );
    }
}
