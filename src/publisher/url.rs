//! The broker URLs: read as lapin reads them (with the host mended), checked
//! once at start, and the warning for a plain `amqp://` connection off this
//! machine (`check` prints it, `run` logs it at start, in the same words).

use lapin::uri::AMQPUri;

use crate::{
    config::{AmqpTlsFiles, ConfigError},
    redact::{redact_url, scrub, url_secrets, userinfo},
    tls::is_loopback,
};

/// The URL as lapin's parser reads it, with the host mended: it reads the
/// host with `Url::domain()`, which is empty for an IP address, and then falls
/// back to "localhost", so `amqp://10.0.0.5/` would reach the local broker.
pub(super) fn amqp_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    let parsed = ::url::Url::parse(url).map_err(|e| e.to_string())?;
    if let Some(host) = parsed.host() {
        uri.authority.host = match host {
            ::url::Host::Domain(d) => d.to_string(),
            ::url::Host::Ipv4(ip) => ip.to_string(),
            ::url::Host::Ipv6(ip) => ip.to_string(),
        };
    }
    Ok(uri)
}

/// Parses the broker URL with lapin's own parser.
pub fn check_amqp_url(url: &str) -> Result<(), ConfigError> {
    const SETTING: &str = "amqp-url";
    let bad = |problem: String| ConfigError::new(SETTING, scrub(&problem, &url_secrets(url)));
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(ConfigError::new(SETTING, "not an amqp:// or amqps:// URL"));
    }
    let shown = redact_url(url);
    // lapin (the url crate) ends the user info at the first '/', '?' or '#';
    // `redact_url` at the last '@': without those characters in the user info
    // both read the same password.
    if userinfo(url).is_some_and(|u| u.contains(['/', '?', '#'])) {
        return Err(bad(format!(
            "'{shown}' is ambiguous: percent-encode '/', '?' and '#' in the user name and password (%2F, %3F, %23), and '@' after the host (%40)"
        )));
    }
    url.parse::<AMQPUri>().map_err(|e| {
        bad(format!(
            "'{shown}' cannot be read: {e}; expected amqp[s]://user:password@host:port/vhost?heartbeat=N"
        ))
    })?;
    Ok(())
}

/// The nodes of one `amqp-url` list are one cluster reached one way: a node
/// on plain `amqp://` beside `amqps://` ones would let fail-over downgrade
/// to plain text, and another vhost would publish to other exchanges.
pub fn check_amqp_nodes_agree(urls: &[String]) -> Result<(), ConfigError> {
    const SETTING: &str = "amqp-url";
    let Some((first, rest)) = urls.split_first() else {
        return Ok(());
    };
    let tls = |url: &str| url.starts_with("amqps://");
    let vhost = |url: &str| url.parse::<AMQPUri>().map(|u| u.vhost).unwrap_or_default();
    for other in rest {
        if tls(other) != tls(first) {
            let (secure, plain) = if tls(first) {
                (first, other)
            } else {
                (other, first)
            };
            return Err(ConfigError::new(
                SETTING,
                format!(
                    "'{}' is plain amqp:// but '{}' is amqps://: fail-over would downgrade to plain text; use amqps:// for every node",
                    redact_url(plain),
                    redact_url(secure)
                ),
            ));
        }
        if vhost(other) != vhost(first) {
            return Err(ConfigError::new(
                SETTING,
                format!(
                    "'{}' names vhost '{}' but '{}' names vhost '{}': the nodes of one amqp-url must share one vhost",
                    redact_url(first),
                    vhost(first),
                    redact_url(other),
                    vhost(other)
                ),
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_urls_keep_an_ip_address_host() {
        let host = |u: &str| amqp_uri(u).map(|u| u.authority.host);
        assert_eq!(
            host("amqp://u:p@10.1.2.3:5673/%2f").as_deref(),
            Ok("10.1.2.3")
        );
        assert_eq!(host("amqps://[::1]:5671/").as_deref(), Ok("::1"));
        assert_eq!(
            host("amqp://rabbit.internal/").as_deref(),
            Ok("rabbit.internal")
        );
        assert_eq!(host("amqp://u:p@127.0.0.1/").as_deref(), Ok("127.0.0.1"));
    }

    #[test]
    fn nodes_of_one_amqp_url_share_scheme_and_vhost() {
        let agree = |urls: &[&str]| {
            check_amqp_nodes_agree(&urls.iter().map(|u| u.to_string()).collect::<Vec<_>>())
        };
        assert!(agree(&["amqps://u:p@a/v", "amqps://u:p@b:5671/v"]).is_ok());
        assert!(agree(&["amqp://u:p@a", "amqp://u:p@b/%2f"]).is_ok());
        let mixed = agree(&["amqps://u:secret@a/v", "amqp://u:secret@b/v"])
            .expect_err("amqp:// beside amqps:// must be refused");
        assert!(mixed.problem.contains("downgrade"), "{mixed}");
        assert!(!mixed.problem.contains("secret"), "{mixed}");
        let vhosts = agree(&["amqp://u:p@a/one", "amqp://u:p@b/two"])
            .expect_err("two vhosts must be refused");
        assert!(
            vhosts.problem.contains("'one'") && vhosts.problem.contains("'two'"),
            "{vhosts}"
        );
    }

    #[test]
    fn amqp_urls_are_read_as_lapin_reads_them() {
        for ok in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqps://u:Se%2Fcr3t@broker/vhost?heartbeat=10",
            // The url crate takes a raw '@' in a password.
            "amqp://u:Se@cr3t@broker:5672/%2f",
            "amqp://broker",
        ] {
            assert!(check_amqp_url(ok).is_ok(), "{ok}: {:?}", check_amqp_url(ok));
        }
        for (bad, says) in [
            ("http://broker", "not an amqp://"),
            ("amqp://u:pw@broker:99999/%2f", "port"),
            ("amqp://u:Se/cr3t@broker/%2f", "%2F"),
            ("amqp://u:123/cr3t@broker/%2f", "%2F"),
            ("amqp://u:Se?cr3t@broker/%2f", "%3F"),
            ("amqp://u:Se#cr3t@broker/%2f", "%23"),
            ("amqp://u:pw@broker/%2f?heartbeat=soon", "cannot be read"),
        ] {
            let e = check_amqp_url(bad).expect_err(bad);
            assert_eq!(e.setting, "amqp-url");
            let line = e.to_string();
            assert!(line.contains(says), "{bad}: {line}");
            assert_eq!(line.lines().count(), 1, "{line}");
            assert!(!line.contains("cr3t"), "{line}");
        }
    }

    #[test]
    fn plain_amqp_off_this_machine_is_warned_about() {
        let none = AmqpTlsFiles::default();
        let said = broker_tls_warning("amqp://relay:s3cret@rabbit.example/%2f", &none).unwrap();
        assert_eq!(
            said,
            "amqp://relay:***@rabbit.example/%2f is plain amqp:// to rabbit.example: neither encrypted nor verified: use amqps:// (with amqp-ca-file for a private CA)"
        );
        assert_eq!(
            broker_tls_warning("amqps://rabbit.example/%2f", &none),
            None
        );
        assert_eq!(broker_tls_warning("amqp://127.0.0.1:5672/%2f", &none), None);
        let with_cert = AmqpTlsFiles {
            cert: Some("/etc/relay/client.pem".into()),
            ..Default::default()
        };
        let said = broker_tls_warning("amqp://localhost/%2f", &with_cert).unwrap();
        assert!(
            said.contains("the client certificate is not used"),
            "{said}"
        );
    }
}
