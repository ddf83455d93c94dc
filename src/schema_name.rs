//! The one rule for the outbox schema's name, shared by the binary's settings,
//! `migrate` and the library's `enqueue`.
//!
//! Only plain lower-case identifiers that are not SQL keywords are accepted.
//! PostgreSQL reads such a name unquoted exactly as written, so every
//! statement pastes it without quotes: there is no quoting anywhere, and a
//! name can never change the SQL around it.

/// PostgreSQL's NAMEDATALEN - 1: longer names are silently truncated.
const MAX_LEN: usize = 63;

/// Keywords that cannot name a schema unquoted: PostgreSQL's "reserved" and
/// "reserved (can be function or type)" keywords (`pg_get_keywords()` catcode
/// R and T, PostgreSQL 13 to 17).
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Why a schema name was refused; the name is shown escaped, on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{shown}' {reason}", shown = name.escape_debug())]
pub struct InvalidSchemaName {
    pub name: String,
    pub reason: &'static str,
}

/// Accepts `name` if every statement may paste it unquoted.
pub(crate) fn validate(name: &str) -> Result<(), InvalidSchemaName> {
    let reason = if name.is_empty() || name.len() > MAX_LEN {
        Some("must be 1 to 63 bytes long")
    } else if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Some("is not a plain lower-case identifier: use a-z, 0-9 and _, not starting with a digit")
    } else if RESERVED.contains(&name) {
        Some("is an SQL keyword: choose another name")
    } else if name.starts_with("pg_") {
        Some("starts with pg_, which PostgreSQL reserves for system schemas")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidSchemaName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_lower_case_non_keywords_are_schema_names() {
        for good in ["outbox", "t_run_42", "_x", &"x".repeat(63), "users", "int"] {
            assert_eq!(validate(good), Ok(()), "{good} refused");
        }
        for bad in [
            "",
            "Outbox",
            "a-b",
            "1x",
            "a;drop",
            "a\"b",
            "a.b",
            "é",
            &"x".repeat(64),
            "user",
            "order",
            "pg_outbox",
        ] {
            assert!(validate(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_refused_name_is_shown_on_one_line() {
        let e = validate("a\nb").unwrap_err();
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        assert!(e.to_string().contains("a\\nb"), "{e}");
    }

    #[test]
    fn keyword_list_is_sorted_and_lower_case() {
        assert!(RESERVED.windows(2).all(|w| w[0] < w[1]));
        assert!(RESERVED
            .iter()
            .all(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
