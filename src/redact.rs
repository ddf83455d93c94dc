//! URLs redacted from one reading of them (never by scanning text), so a
//! password with URL syntax in it is never shown; and free text scrubbed of
//! the passwords a URL carries.

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

/// The user info of a URL as redaction reads it (up to the last '@'), so a
/// driver's check can refuse a URL that driver would cut elsewhere.
pub fn userinfo(url: &str) -> Option<&str> {
    UrlParts::parse(url).and_then(|p| p.userinfo)
}

/// Where the values of `password=` parameters lie. Found before the URL is cut
/// (a value may hold a raw '@' that would move the cut), each running to the
/// next '&' as tokio-postgres reads it.
pub fn password_params(url: &str) -> Vec<std::ops::Range<usize>> {
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
}
