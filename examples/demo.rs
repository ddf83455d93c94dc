//! The outbox pattern in one screen: a shop writes an order and its
//! `ProcessPayment` event in the same PostgreSQL transaction. The relay
//! publishes the event to RabbitMQ only if that transaction commits.
//!
//! Run it with `make demo`: scripts/demo.sh migrates schema `demo_shop`, starts
//! `outbox-relay run --schema demo_shop`, then runs this example.
//! Exits non-zero unless exactly the committed order's event arrives.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::json;
use tokio::time::{timeout_at, Instant};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

const SCHEMA: &str = "demo_shop";
const QUEUE: &str = "demo_shop.payments";
const WAIT_FOR_EVENT: Duration = Duration::from_secs(15);
/// Listen this much longer after the expected event, so a stray publish shows.
const GRACE: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<()> {
    let db_url = env_or(
        "OUTBOX_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let amqp_url = env_or("OUTBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");

    let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ (set OUTBOX_AMQP_URL)")?;
    let channel = amqp.create_channel().await?;
    declare_empty_queue(&channel).await?;

    let (mut db, connection) = tokio_postgres::connect(&db_url, NoTls)
        .await
        .context("connecting to PostgreSQL (set OUTBOX_DATABASE_URL)")?;
    tokio::spawn(connection);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS public.demo_shop_orders (
             id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             customer text NOT NULL,
             amount   numeric(10, 2) NOT NULL
         )",
    )
    .await?;

    println!("Each order and its payment event are written in ONE transaction:");
    let (kept_order, kept) = place_order(&mut db, "ada", 42.50, true).await?;
    println!("  committed    order {kept_order:<4} event {kept}  (must be published)");
    let (lost_order, lost) = place_order(&mut db, "bob", 17.25, false).await?;
    println!("  rolled back  order {lost_order:<4} event {lost}  (must never appear)");

    println!(
        "Listening on queue {QUEUE} (up to {}s):",
        WAIT_FOR_EVENT.as_secs()
    );
    let received = receive_events(&channel, kept).await?;
    println!("  {}", outbox_row_state(&db, kept).await?);
    amqp.close(200, "demo done".into()).await.ok();

    let got = |id: Uuid| received.iter().filter(|r| **r == id).count();
    if got(kept) == 1 && got(lost) == 0 {
        println!("PASS: the committed order's event arrived once; the rolled-back one never did.");
        Ok(())
    } else {
        println!(
            "FAIL: committed event received {} time(s) (want 1), rolled-back event {} time(s) (want 0). \
             Is `outbox-relay run --schema {SCHEMA}` running? Its log says why.",
            got(kept),
            got(lost)
        );
        std::process::exit(1);
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn declare_empty_queue(channel: &Channel) -> Result<()> {
    // The relay publishes to the default exchange with routing key = queue name.
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring queue {QUEUE}"))?;
    // Messages left by an earlier run would muddle the verdict.
    channel
        .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

/// Inserts an order and, in the same transaction, its outbox event; then
/// commits or rolls back both together. Returns the order id and message-id.
async fn place_order(
    db: &mut Client,
    customer: &str,
    amount: f64,
    commit: bool,
) -> Result<(i64, Uuid)> {
    let tx = db.transaction().await?;
    let order_id: i64 = tx
        .query_one(
            "INSERT INTO public.demo_shop_orders (customer, amount) VALUES ($1, $2::float8) RETURNING id",
            &[&customer, &amount],
        )
        .await?
        .get(0);
    let event = json!({ "order_id": order_id, "amount": amount });
    let enqueue =
        format!("SELECT {SCHEMA}.enqueue('', $1, $2::jsonb, '{{}}', $3, 'ProcessPayment')");
    let message_id: Uuid = tx
        .query_one(&enqueue, &[&QUEUE, &event, &format!("order-{order_id}")])
        .await
        .with_context(|| {
            format!("calling {SCHEMA}.enqueue: run `outbox-relay migrate --schema {SCHEMA}` first")
        })?
        .get(0);
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok((order_id, message_id))
}

/// Prints every message that arrives until `WAIT_FOR_EVENT` passes, or `GRACE`
/// after `expected` arrived, and returns their message-ids.
async fn receive_events(channel: &Channel, expected: Uuid) -> Result<Vec<Uuid>> {
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            "outbox-relay-demo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut received = Vec::new();
    let mut deadline = Instant::now() + WAIT_FOR_EVENT;
    while let Ok(Some(delivery)) = timeout_at(deadline, consumer.next()).await {
        let delivery = delivery.context("receiving from RabbitMQ")?;
        delivery.ack(BasicAckOptions::default()).await?;
        let props = &delivery.properties;
        let (id, kind) = (text_or_none(props.message_id()), text_or_none(props.kind()));
        println!(
            "  received message-id {id}  type {kind}  body {}",
            String::from_utf8_lossy(&delivery.data)
        );
        let id = Uuid::parse_str(id).unwrap_or_default();
        if id == expected {
            deadline = deadline.min(Instant::now() + GRACE);
        }
        received.push(id);
    }
    Ok(received)
}

fn text_or_none(value: &Option<ShortString>) -> &str {
    value.as_ref().map_or("(none)", ShortString::as_str)
}

/// The relay marks a row published only after the broker confirmed it.
async fn outbox_row_state(db: &Client, message_id: Uuid) -> Result<String> {
    let sql =
        format!("SELECT published_at IS NOT NULL FROM {SCHEMA}.messages WHERE message_id = $1");
    Ok(match db.query_opt(&sql, &[&message_id]).await? {
        Some(row) if row.get::<_, bool>(0) => {
            "outbox row: marked published after the broker's confirm"
        }
        Some(_) => "outbox row: still pending (not confirmed by the broker yet)",
        None => "outbox row: already removed (published, retention 0)",
    }
    .to_owned())
}
