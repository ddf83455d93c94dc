//! Small helpers: quantiles, formatting, URLs, versions.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::Path,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Result};

/// Application connections for a steady-state rate: the one asked for that
/// rate, or (0 or none asked) one per 50 rows/s, at least 8 and at most 32.
pub(crate) fn steady_connections(asked: Option<usize>, rate: u64) -> usize {
    match asked {
        Some(n) if n > 0 => n,
        _ => ((rate / 50) as usize).clamp(8, 32),
    }
}

/// The payload the SQL setup writes too: the number, padded with dots.
pub(crate) fn fill_payload(buf: &mut Vec<u8>, i: u64, len: usize) {
    buf.clear();
    let _ = write!(buf, "{i}");
    buf.truncate(len);
    buf.resize(len, b'.');
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Nearest-rank quantile of sorted values.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// The same URL pointing at another database.
pub(crate) fn with_database(url: &str, database: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("database URL is not a postgres:// URL"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    Ok(format!("{scheme}://{authority}/{database}{query}"))
}

/// RabbitMQ's version from the server properties of connection.start.
pub(crate) fn rabbitmq_version(amqp_url: &str) -> Option<String> {
    if amqp_url.starts_with("amqps://") {
        return None;
    }
    let uri: lapin::uri::AMQPUri = amqp_url.parse().ok()?;
    let addr = (uri.authority.host.as_str(), uri.authority.port)
        .to_socket_addrs()
        .ok()?
        .next()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"AMQP\x00\x00\x09\x01").ok()?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let key = b"\x07versionS";
    loop {
        let n = stream.read(&mut buf[len..]).ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        if let Some(at) = buf[..len].windows(key.len()).position(|w| w == key) {
            let start = at + key.len();
            if len >= start + 4 {
                let size = u32::from_be_bytes(buf[start..start + 4].try_into().ok()?) as usize;
                if len >= start + 4 + size {
                    return Some(
                        String::from_utf8_lossy(&buf[start + 4..start + 4 + size]).into_owned(),
                    );
                }
            }
        }
        if len == buf.len() {
            return None;
        }
    }
}

/// The relay's tuning defaults, read from its --help.
pub(crate) fn relay_defaults(bin: &Path) -> String {
    let Ok(out) = Command::new(bin).args(["run", "--help"]).output() else {
        return "unknown".into();
    };
    let help = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    for flag in [
        "--batch-size",
        "--max-in-flight",
        "--poll-interval",
        "--retention",
    ] {
        let Some(at) = help.find(flag) else { continue };
        let rest = &help[at..];
        let end = rest[2..].find("\n  -").map_or(rest.len(), |e| e + 2);
        if let Some(d) = rest[..end].find("[default: ") {
            let value = &rest[..end][d + 10..];
            if let Some(close) = value.find(']') {
                found.push(format!("{} {}", &flag[2..], &value[..close]));
            }
        }
    }
    if found.is_empty() {
        "unknown".into()
    } else {
        found.join(", ")
    }
}

pub(crate) fn utc_now() -> String {
    let secs = unix_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

pub(crate) fn git_commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let head = Command::new("git")
        .args(["-C", dir, "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(head) = head else {
        return "unknown (not a git checkout)".into();
    };
    let dirty = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

pub(crate) fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x").unwrap(),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
        let mut p = Vec::new();
        fill_payload(&mut p, 42, 6);
        assert_eq!(p, b"42....");
    }
}
