//! Phase 1, ceiling: a bare lapin publisher with confirms, no database
//! (also the bare side of the cold keyed backlog phase).

use std::{collections::VecDeque, time::Instant};

use anyhow::{Context, Result};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{FieldTable, LongString, ShortString},
    BasicProperties, Confirmation, Connection, ConnectionProperties,
};
use uuid::Uuid;

use super::Bench;
use crate::{
    consumer::Consumer,
    results::CeilingRun,
    sysinfo::CpuSnapshot,
    util::{fill_payload, unix_secs},
};

impl Bench {
    pub(crate) async fn ceiling_once(&self, _run: usize) -> Result<CeilingRun> {
        let queue = ShortString::from(self.args.queue.as_str());
        self.bare_publish(self.args.messages, "", &|_| queue.clone(), true)
            .await
    }

    /// Publishes `n` messages to `exchange` with the routing key of each, and
    /// waits for every confirm (and, with a consumer, for every delivery).
    pub(super) async fn bare_publish(
        &self,
        n: u64,
        exchange: &str,
        routing_key: &dyn Fn(u64) -> ShortString,
        with_consumer: bool,
    ) -> Result<CeilingRun> {
        self.purge().await?;
        let consumer = if with_consumer {
            Some(Consumer::start(&self.args.amqp_url, &self.args.queue, n).await?)
        } else {
            None
        };
        let conn = Connection::connect(
            &self.args.amqp_url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench ceiling publisher")),
        )
        .await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let window = self.args.ceiling_window.max(1);
        let exchange = ShortString::from(exchange);
        let before = CpuSnapshot::take(self.backend_pid);
        let t0 = Instant::now();
        let mut in_flight = VecDeque::with_capacity(window);
        let mut not_acked = 0u64;
        let timestamp = unix_secs();
        let mut payload = Vec::with_capacity(self.args.payload_bytes);
        for i in 1..=n {
            fill_payload(&mut payload, i, self.args.payload_bytes);
            // The same properties the relay sets for a plain row.
            let properties = BasicProperties::default()
                .with_message_id(ShortString::from(Uuid::new_v4().to_string()))
                .with_delivery_mode(2)
                .with_timestamp(timestamp)
                .with_headers(FieldTable::default());
            let confirm = channel
                .basic_publish(
                    exchange.clone(),
                    routing_key(i),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &payload,
                    properties,
                )
                .await
                .context("basic.publish")?;
            in_flight.push_back(confirm);
            if in_flight.len() >= window {
                // Window full: take confirms in order until half of it is free,
                // then publish a burst again (as the relay does with its batches):
                // one wake-up per burst rather than per message.
                while in_flight.len() > window / 2 {
                    let Some(front) = in_flight.pop_front() else {
                        break;
                    };
                    if !matches!(front.await.context("confirm")?, Confirmation::Ack(None)) {
                        not_acked += 1;
                    }
                }
            }
        }
        while let Some(front) = in_flight.pop_front() {
            if !matches!(front.await.context("confirm")?, Confirmation::Ack(None)) {
                not_acked += 1;
            }
        }
        let confirmed_s = t0.elapsed().as_secs_f64();
        let consumed = match &consumer {
            Some(consumer) => consumer
                .wait_all(n, self.args.stall_timeout, None, "bare publisher")
                .await
                .map(|at| (at - t0).as_secs_f64()),
            None => Ok(f64::NAN),
        };
        let after = CpuSnapshot::take(self.backend_pid);
        let _ = conn.close(200, ShortString::from("bench done")).await;
        if let Some(consumer) = consumer {
            consumer.close().await;
        }
        Ok(CeilingRun {
            confirmed_s,
            consumed_s: consumed?,
            not_acked,
            cpu: before.until(&after, t0, self.clk_tck),
        })
    }
}
