//! Conditions the SQL of the relay, the operator commands and the schema's
//! functions share, spelled once. The files of `sql/` name them as
//! placeholders (`{{pending}}`, `{{pending m}}`), filled in by `store::migrations`
//! when they are applied; the statements of `store` call the functions below.
//!
//! The partial indexes of migration 1 carry `pending`: a statement uses them
//! only when its condition implies the index's. A change of meaning therefore
//! needs a numbered migration that re-creates those indexes (the upgrade test
//! compares an upgraded schema's indexes with a new one's).

/// A row the relay still has to publish: neither published nor parked.
/// `alias` qualifies the columns ("" for none).
pub fn pending(alias: &str) -> String {
    let q = if alias.is_empty() {
        String::new()
    } else {
        format!("{alias}.")
    };
    format!("{q}published_at IS NULL AND {q}dead_lettered_at IS NULL")
}

/// The query for the first pending row that is due now among `partitions`
/// (an SQL `smallint[]` expression) with an id of at least `from` (an SQL
/// expression; `None`: from the start): through the pending index in id order.
/// It yields no row when none is due, so a caller that needs one value wraps
/// it in parentheses as a scalar subquery.
pub fn first_due(schema: &str, partitions: &str, from: Option<&str>) -> String {
    let from = from
        .map(|f| format!(" AND m.id >= {f}"))
        .unwrap_or_default();
    format!(
        "SELECT m.id FROM {schema}.messages m
          WHERE {} AND m.available_at <= now()
            AND m.partition = ANY({partitions}){from}
          ORDER BY m.id LIMIT 1",
        pending("m")
    )
}

/// Fills in the placeholders of a `sql/` file: `{{pending}}` and
/// `{{pending ALIAS}}`. Anything else between `{{` and `}}` is left as is, so
/// PostgreSQL refuses it (the migrations' tests check no file has one).
pub fn expand(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let mut words = after[..end].split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("pending"), alias, None)
                if alias.is_none_or(|a| a.chars().all(|c| c.is_ascii_lowercase())) =>
            {
                out.push_str(&pending(alias.unwrap_or("")));
            }
            _ => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_the_one_spelling() {
        assert_eq!(
            expand("WHERE {{pending}} AND {{pending m}};"),
            "WHERE published_at IS NULL AND dead_lettered_at IS NULL \
             AND m.published_at IS NULL AND m.dead_lettered_at IS NULL;"
        );
        // JSON braces and unknown names stay as they are.
        assert_eq!(expand("'{}' {{x}} {{pending"), "'{}' {{x}} {{pending");
    }

    #[test]
    fn the_first_due_row_is_one_query_with_an_optional_lower_bound() {
        let from_start = first_due("s", "$1::smallint[]", None);
        assert!(from_start.starts_with("SELECT m.id FROM s.messages m"));
        assert!(from_start.contains(&pending("m")));
        assert!(from_start.contains("ANY($1::smallint[])"));
        assert!(!from_start.contains("m.id >="));
        assert!(from_start.ends_with("ORDER BY m.id LIMIT 1"));
        let from_floor = first_due("s", "h.partitions", Some("$4::int8"));
        assert!(from_floor.contains("ANY(h.partitions) AND m.id >= $4::int8"));
    }
}
