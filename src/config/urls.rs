//! URLs: checked with the drivers' own parsers, and redacted from one reading
//! of them (never by scanning text), so a password with URL syntax in it is
//! never shown.

use super::ConfigError;
use crate::tls;

/// Parses the database URL as the relay will (libpq's sslmode handling, then
/// tokio-postgres), so that a URL that cannot work stops the command at start.
pub(super) fn check_database_url(url: &str) -> Result<(), ConfigError> {
    const SETTING: &str = "database-url";
    let bad = |problem: String| ConfigError::new(SETTING, scrub(&problem, &url_secrets(url)));
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(ConfigError::new(
            SETTING,
            "not a postgres:// or postgresql:// URL (key=value connection strings are not supported)",
        ));
    }
    let shown = redact_url(url);
    // tokio-postgres ends the user info at the first '@', `redact_url` at the
    // last: with one '@' at most both read the same password.
    if url.matches('@').count() > 1 {
        return Err(bad(format!(
            "'{shown}' holds more than one '@': percent-encode '@' in the password as %40"
        )));
    }
    if password_params(url)
        .into_iter()
        .any(|r| url[r].contains('@'))
    {
        return Err(bad(format!(
            "'{shown}': tokio-postgres would end the user info at the '@' of the password parameter: percent-encode it as %40"
        )));
    }
    let (pg_url, mode, files) =
        tls::split_tls_params(url).map_err(|e| bad(format!("'{shown}': {e}")))?;
    let config: tokio_postgres::Config = pg_url
        .parse()
        .map_err(|e| {
            bad(format!(
                "'{shown}' cannot be read: {}; expected postgres://user:password@host:port/dbname?sslmode=...",
                with_sources(&e)
            ))
        })?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(bad(format!(
            "'{shown}' names no host: use e.g. postgres://user@db.example:5432/app"
        )));
    }
    // Files named in the URL (sslrootcert, sslcert, sslkey) are read now, so a
    // wrong path stops the command here instead of failing every reconnect.
    if mode != tls::SslMode::Disable
        && (files.is_some() || matches!(mode, tls::SslMode::VerifyCa | tls::SslMode::VerifyFull))
    {
        tls::connector(mode, files.as_deref()).map_err(|e| bad(format!("'{shown}': {e}")))?;
    }
    Ok(())
}

/// The error's message and those of its sources: tokio-postgres keeps the
/// reason ("invalid value for option `port`") in the source.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses the broker URL with lapin's own parser.
pub(super) fn check_amqp_url(url: &str) -> Result<(), ConfigError> {
    const SETTING: &str = "amqp-url";
    let bad = |problem: String| ConfigError::new(SETTING, scrub(&problem, &url_secrets(url)));
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(ConfigError::new(SETTING, "not an amqp:// or amqps:// URL"));
    }
    let shown = redact_url(url);
    // lapin (the url crate) ends the user info at the first '/', '?' or '#';
    // `redact_url` at the last '@': without those characters in the user info
    // both read the same password.
    if UrlParts::parse(url)
        .and_then(|p| p.userinfo)
        .is_some_and(|u| u.contains(['/', '?', '#']))
    {
        return Err(bad(format!(
            "'{shown}' is ambiguous: percent-encode '/', '?' and '#' in the user name and password (%2F, %3F, %23), and '@' after the host (%40)"
        )));
    }
    url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
        bad(format!(
            "'{shown}' cannot be read: {e}; expected amqp[s]://user:password@host:port/vhost?heartbeat=N"
        ))
    })?;
    Ok(())
}

/// The nodes of one `amqp-url` list are one cluster reached one way: a node
/// on plain `amqp://` beside `amqps://` ones would let fail-over downgrade
/// to plain text, and another vhost would publish to other exchanges.
pub(super) fn check_amqp_nodes_agree(urls: &[String]) -> Result<(), ConfigError> {
    const SETTING: &str = "amqp-url";
    let Some((first, rest)) = urls.split_first() else {
        return Ok(());
    };
    let tls = |url: &str| url.starts_with("amqps://");
    let vhost = |url: &str| {
        url.parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_default()
    };
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

/// A URL cut where redaction needs it. The user info ends at the LAST '@':
/// passwords may hold raw '/', '?', '#' (tokio-postgres accepts them) or '@'
/// (the url crate does), so this span holds the password however a driver
/// reads it; at worst, when a path or query holds an '@' too, it hides more.
struct UrlParts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    /// Host list, with ports, as written.
    hosts: &'a str,
    /// Path, query and fragment, as written.
    tail: &'a str,
}

impl<'a> UrlParts<'a> {
    fn parse(url: &'a str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let plain_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !plain_scheme {
            return None;
        }
        let (userinfo, after) = match rest.rsplit_once('@') {
            Some((userinfo, after)) => (Some(userinfo), after),
            None => (None, rest),
        };
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        Some(Self {
            scheme,
            userinfo,
            hosts: &after[..end],
            tail: &after[end..],
        })
    }

    /// The password of the user info, as written.
    fn password(&self) -> Option<&'a str> {
        self.userinfo?.split_once(':').map(|(_, pw)| pw)
    }
}

/// Where the values of `password=` parameters lie. Found before the URL is cut
/// (a value may hold a raw '@' that would move the cut), each running to the
/// next '&' as tokio-postgres reads it.
fn password_params(url: &str) -> Vec<std::ops::Range<usize>> {
    let mut found = Vec::new();
    for (start, _) in url.match_indices(['?', '&']) {
        let rest = &url[start + 1..];
        let Some(eq) = rest.find('=') else { continue };
        let key = &rest[..eq];
        if key.contains(['?', '&']) || !is_password_key(key) {
            continue;
        }
        let from = start + 1 + eq + 1;
        let to = url[from..].find('&').map_or(url.len(), |i| from + i);
        found.push(from..to);
    }
    found
}

/// The URL with every `password=` value replaced by `***`.
fn mask_password_params(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for range in password_params(url) {
        if range.start < at {
            continue;
        }
        out.push_str(&url[at..range.start]);
        out.push_str("***");
        at = range.end;
    }
    out.push_str(&url[at..]);
    out
}

/// tokio-postgres percent-decodes keys, so `pass%77ord=` is a password too.
fn is_password_key(key: &str) -> bool {
    percent_decode(key)
        .to_ascii_lowercase()
        .contains("password")
}

/// The URL with its password, password parameters and anything that could be
/// one replaced by `***`, for logs, errors, `/metrics` and status output.
/// Text that does not read as a URL is hidden whole.
pub fn redact_url(url: &str) -> String {
    let masked = mask_password_params(url);
    let Some(parts) = UrlParts::parse(&masked) else {
        return "***".to_string();
    };
    let hidden = format!("{}://***", parts.scheme);
    let mut out = format!("{}://", parts.scheme);
    if let Some(userinfo) = parts.userinfo {
        let (user, has_password) = match userinfo.split_once(':') {
            Some((user, _)) => (user, true),
            None => (userinfo, false),
        };
        // A "user" holding URL syntax means the URL was not cut where its
        // writer meant: any part of it may be a secret.
        if user.contains(['/', '?', '#', '&', '=']) || user.contains(char::is_whitespace) {
            return hidden;
        }
        out.push_str(user);
        if has_password {
            out.push_str(":***");
        }
        out.push('@');
    }
    let hosts: Option<Vec<&str>> = parts.hosts.split(',').map(plain_host).collect();
    match hosts {
        Some(hosts) => out.push_str(&hosts.join(",")),
        // A "port" that is not a number is a password that lost its '@':
        // what follows may be the rest of it.
        None => return hidden,
    }
    out.push_str(parts.tail);
    out
}

/// `host`, `host:port` or `[v6]:port` as written; None when it is not one.
fn plain_host(chunk: &str) -> Option<&str> {
    let port = match chunk.strip_prefix('[') {
        Some(v6) => {
            let close = v6.find(']')?;
            match &v6[close + 1..] {
                "" => None,
                rest => Some(rest.strip_prefix(':')?),
            }
        }
        None => chunk.split_once(':').map(|(_, port)| port),
    };
    match port {
        Some(port) if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) => None,
        _ => Some(chunk),
    }
}

/// Every password a URL carries, as written and percent-decoded, so free text
/// (a driver's error) can be scrubbed of it. Text that does not read as a URL
/// is a secret whole.
pub fn url_secrets(url: &str) -> Vec<String> {
    let masked = mask_password_params(url);
    let Some(parts) = UrlParts::parse(&masked) else {
        return vec![url.to_string()];
    };
    let mut found: Vec<String> = password_params(url)
        .into_iter()
        .map(|range| url[range].to_string())
        .chain(parts.password().map(str::to_string))
        .filter(|s| !s.is_empty())
        .collect();
    let decoded: Vec<String> = found
        .iter()
        .map(|s| percent_decode(s))
        .filter(|d| !found.contains(d))
        .collect();
    found.extend(decoded);
    // Longest first, so a password that contains another is replaced whole.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found.dedup();
    found
}

/// Replaces each secret in `text` by `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
}

/// Percent-decoding as the drivers do it: a '%' not followed by two hex
/// digits stays as written, invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Base64 secrets hold '/', '+' and '='; others hold '?', '#' or '@'.
    const SECRETS: &[&str] = &["Se/cr3t+x=", "Se?cr3t", "Se#cr3t", "Se@cr3t", "S/e?c#r@t"];

    fn percent_encoded(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn assert_hidden(url: &str, secret: &str) {
        let shown = redact_url(url);
        assert!(!shown.contains(secret), "{url} shown as {shown}");
        // No fragment of the secret around its special character either.
        for part in secret.split(['/', '?', '#', '@', '+', '=']) {
            if part.len() >= 3 {
                assert!(!shown.contains(part), "{url} shown as {shown}");
            }
        }
    }

    #[test]
    fn redact_url_hides_passwords_everywhere() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=a&password=pw"),
            "postgres://db/x?user=a&password=***"
        );
        assert_eq!(
            redact_url("postgres://db/x?pass%77ord=pw"),
            "postgres://db/x?pass%77ord=***"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert!(!redact_url("postgres://u:p%40ss@h/x").contains("p%40ss"));
    }

    #[test]
    fn passwords_with_url_syntax_are_never_shown() {
        for secret in SECRETS {
            for pw in [secret.to_string(), percent_encoded(secret)] {
                for url in [
                    format!("postgres://u:{pw}@127.0.0.1/test"),
                    format!("postgresql://u:{pw}@db:5432/test?sslmode=require"),
                    format!("postgres://u:{pw}@h1:5432,h2:5433/test"),
                    format!("postgres://u:{pw}@[::1]:5432/test"),
                    format!("postgres://db/test?user=u&password={pw}"),
                    format!("postgres://u:{pw}@db/test?password={pw}&sslmode=require"),
                    format!("amqp://u:{pw}@127.0.0.1:5672/%2f"),
                    format!("amqps://u:{pw}@broker/vhost?heartbeat=10"),
                    format!("amqp://u:{pw}@broker"),
                ] {
                    assert_hidden(&url, secret);
                    assert_hidden(&url, &pw);
                }
            }
        }
        assert_eq!(
            redact_url("postgres://u:Se/cr3t@127.0.0.1/test"),
            "postgres://u:***@127.0.0.1/test"
        );
        assert_eq!(
            redact_url("amqp://u:S/e?c#r@t@broker:5672/%2f"),
            "amqp://u:***@broker:5672/%2f"
        );
    }

    #[test]
    fn text_that_is_not_a_url_is_hidden_whole() {
        assert_eq!(redact_url("host=db password=Se/cr3t"), "***");
        // A password that lost its '@' reads as a port.
        assert_eq!(redact_url("postgres://u:Se/cr3t"), "postgres://***");
        assert_eq!(redact_url("amqp://[::1:pw/x"), "amqp://***");
        assert_eq!(
            redact_url("postgres://u:pw@[::1]:5432,h:5433/x"),
            "postgres://u:***@[::1]:5432,h:5433/x"
        );
        // A '@' in the query makes everything before it user info: hidden.
        let shown = redact_url("postgres://db/x?password=Se/cr3t&application_name=a@b");
        assert!(!shown.contains("Se/cr3t"), "{shown}");
    }

    #[test]
    fn secrets_are_found_as_written_and_decoded() {
        let found = url_secrets("postgres://app:p%40ss-word@db:5432/x?sslmode=require");
        assert_eq!(
            found,
            vec!["p%40ss-word".to_string(), "p@ss-word".to_string()]
        );
        assert_eq!(
            scrub("auth failed for p@ss-word and p%40ss-word", &found),
            "auth failed for *** and ***"
        );
        assert_eq!(
            url_secrets("postgres://db/x?user=a&password=topsecret"),
            vec!["topsecret".to_string()]
        );
        assert_eq!(
            url_secrets("postgres://u:Se/cr3t@h/x"),
            vec!["Se/cr3t".to_string()]
        );
        assert!(url_secrets("amqp://guest@host/%2f").is_empty());
        assert_eq!(percent_decode("bad%zz%+1"), "bad%zz%+1");
        assert_eq!(percent_decode("trail%4"), "trail%4");
        assert_eq!(percent_decode("a%2Fb%3f"), "a/b?");
    }

    fn check_db(url: &str) -> Result<(), ConfigError> {
        check_database_url(url)
    }

    #[test]
    fn database_urls_are_read_as_tokio_postgres_reads_them() {
        for ok in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgresql://u:pw@db/app?sslmode=require&application_name=x",
            // tokio-postgres takes raw '/', '?' and '#' in a password.
            "postgres://u:Se/cr3t@127.0.0.1/test",
            "postgres://u:Se?cr3t@127.0.0.1/test?sslmode=disable",
            "postgres://u:Se#cr3t@127.0.0.1/test",
            "postgres://u:Se%40cr3t@127.0.0.1/test",
            "postgres://h1:5432,h2:5433/app",
            "postgres:///app?host=/var/run/postgresql",
        ] {
            assert!(check_db(ok).is_ok(), "{ok}: {:?}", check_db(ok));
        }
        for (bad, says) in [
            ("mysql://u@h/db", "not a postgres://"),
            ("host=h password=x", "not a postgres://"),
            ("postgres://u:pw@h:99999/db", "port"),
            ("postgres://u:pw@h:54x2/db", "port"),
            ("postgres://u:pw@h/db?sslmode=bogus", "sslmode 'bogus'"),
            ("postgres://u:pw@h/db?nonsense=1", "nonsense"),
            ("postgres://u:Se@cr3t@h/db", "%40"),
            ("postgres://h/db?user=u&password=Se@cr3t", "%40"),
            ("postgres:///db", "names no host"),
            (
                "postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "/nonexistent/ca.pem",
            ),
        ] {
            let e = check_db(bad).expect_err(bad);
            assert_eq!(e.setting, "database-url");
            let line = e.to_string();
            assert!(line.contains(says), "{bad}: {line}");
            assert_eq!(line.lines().count(), 1, "{line}");
            for secret in ["Se@cr3t", "cr3t"] {
                assert!(!line.contains(secret), "{line}");
            }
        }
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
}
