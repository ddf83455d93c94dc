//! A row turned into an AMQP message (routing, properties, headers), or the
//! reason it can never be one. No broker involved.

use std::time::UNIX_EPOCH;

use lapin::{
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
    BasicProperties,
};

use crate::rows::OutboxRow;

/// A row turned into an AMQP message, or the reason it can never be one.
pub struct Prepared {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) properties: BasicProperties,
}

/// Checks and converts a row without touching the broker.
pub fn prepare(row: &OutboxRow) -> Result<Prepared, String> {
    if let Some(defect) = &row.defect {
        return Err(defect.clone());
    }
    let short = |what: &str, v: &str| {
        ShortString::try_new(v).map_err(|_| {
            format!(
                "{what} is {} bytes, AMQP allows at most 255: shorten outbox row {}'s {what}",
                v.len(),
                row.id
            )
        })
    };
    let exchange = short("exchange", &row.exchange)?;
    let routing_key = short("routing_key", &row.routing_key)?;
    let timestamp = row
        .created_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(row.message_id.to_string()))
        .with_delivery_mode(2)
        .with_timestamp(timestamp)
        .with_headers(headers_table(&row.headers).map_err(|e| {
            format!(
                "headers of outbox row {} cannot be sent as AMQP headers: {e}",
                row.id
            )
        })?);
    if let Some(v) = &row.content_type {
        properties = properties.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &row.message_type {
        properties = properties.with_type(short("message_type", v)?);
    }
    if let Some(v) = &row.correlation_id {
        properties = properties.with_correlation_id(short("correlation_id", v)?);
    }
    Ok(Prepared {
        exchange,
        routing_key,
        properties,
    })
}

/// Bytes of the content-header frame that carries these properties: frame
/// type, channel and size (7), class, weight and body size (12), the
/// properties as lapin encodes them, and the frame end (1). RabbitMQ closes
/// the whole connection (501 FRAME_ERROR) for a frame over its `frame_max`.
pub fn header_frame_bytes(prepared: &Prepared) -> usize {
    const OVERHEAD: usize = 7 + 12 + 1;
    let encode = lapin::protocol::basic::gen_properties::<Vec<u8>>(&prepared.properties);
    match encode(Vec::new().into()) {
        Ok(written) => OVERHEAD + written.write.len(),
        // Encoding into a Vec cannot fail; were it to, the frame is not sent.
        Err(_) => usize::MAX,
    }
}

/// JSON object -> AMQP field table. Numbers keep their kind (integer or float).
pub fn headers_table(headers: &serde_json::Value) -> Result<FieldTable, String> {
    let serde_json::Value::Object(map) = headers else {
        return Err(format!(
            "headers must be a JSON object, found {}",
            json_kind(headers)
        ));
    };
    let mut table = FieldTable::default();
    for (k, v) in map {
        let key = ShortString::try_new(k.as_str())
            .map_err(|_| format!("header name '{}...' is over 255 bytes", truncate(k, 40)))?;
        table.insert(
            key,
            amqp_value(v).map_err(|e| format!("header '{k}': {e}"))?,
        );
    }
    Ok(table)
}

fn amqp_value(v: &serde_json::Value) -> Result<AMQPValue, String> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => AMQPValue::Void,
        J::Bool(b) => AMQPValue::Boolean(*b),
        J::Number(n) => {
            // jsonb keeps no int/float distinction and prints every value of
            // 2^63 or more as an integer: those cannot be carried exactly.
            if let Some(i) = n.as_i64() {
                AMQPValue::LongLongInt(i)
            } else if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.abs() < 2f64.powi(63)) {
                AMQPValue::Double(f)
            } else {
                return Err(format!(
                    "{n} does not fit a signed 64-bit integer: send it as a string"
                ));
            }
        }
        J::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        J::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(amqp_value)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        J::Object(_) => AMQPValue::FieldTable(headers_table(v)?),
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_keep_their_json_kinds() {
        let t = headers_table(&json!({"s": "x", "i": -3, "f": 1.5, "b": true, "n": null,
                                      "a": [1, "two"], "o": {"k": "v"}}))
        .unwrap();
        let get = |k: &str| {
            t.inner()
                .get(&ShortString::from(k))
                .cloned()
                .unwrap_or_else(|| panic!("missing {k}"))
        };
        assert_eq!(get("i"), AMQPValue::LongLongInt(-3));
        assert_eq!(get("f"), AMQPValue::Double(1.5));
        assert_eq!(get("b"), AMQPValue::Boolean(true));
        assert_eq!(get("n"), AMQPValue::Void);
        assert!(matches!(get("a"), AMQPValue::FieldArray(_)));
        assert!(matches!(get("o"), AMQPValue::FieldTable(_)));
    }

    #[test]
    fn the_header_frame_size_counts_every_encoded_byte() {
        let mut row = OutboxRow::defective(7, 0, None, String::new());
        row.defect = None;
        let bare = header_frame_bytes(&prepare(&row).unwrap());
        // flags 2, message_id 1+36, delivery_mode 1, timestamp 8, headers 4.
        assert_eq!(bare, 20 + 2 + 37 + 1 + 8 + 4);
        row.headers = json!({ "big": "x".repeat(200 * 1024) });
        let big = header_frame_bytes(&prepare(&row).unwrap());
        // key 1+3, type 1, long string 4+len.
        assert_eq!(big, bare + 4 + 1 + 4 + 200 * 1024);
    }

    #[test]
    fn headers_that_amqp_cannot_carry_are_refused_with_a_reason() {
        let e = headers_table(&json!([1, 2])).unwrap_err();
        assert!(e.contains("JSON object"), "{e}");
        let e = headers_table(&json!({"big": 18446744073709551615u64})).unwrap_err();
        assert!(e.contains("64-bit"), "{e}");
        let long = "k".repeat(256);
        assert!(headers_table(&json!({ long: 1 })).is_err());
    }
}
