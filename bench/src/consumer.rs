//! The consumer: counts and timestamps deliveries by message id.

use std::{
    collections::{hash_map::Entry, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use lapin::{
    options::BasicConsumeOptions,
    types::{FieldTable, LongString, ShortString},
    Connection, ConnectionProperties,
};
use uuid::Uuid;

use crate::relay::RelayProc;

struct Seen {
    first: HashMap<Uuid, SystemTime>,
    deliveries: u64,
    target: u64,
    first_at: Option<Instant>,
    done_at: Option<Instant>,
    error: Option<String>,
}

/// Counts and timestamps deliveries (auto-ack) by message id.
pub(crate) struct Consumer {
    conn: Connection,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    pub(crate) async fn start(url: &str, queue: &str, target: u64) -> Result<Self> {
        let conn = Connection::connect(
            url,
            ConnectionProperties::default()
                .with_connection_name(LongString::from("outbox-bench consumer")),
        )
        .await
        .context("consumer connection")?;
        let channel = conn.create_channel().await?;
        let mut stream = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(""),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("basic.consume")?;
        let seen = Arc::new(Mutex::new(Seen {
            first: HashMap::with_capacity(target.min(2_000_000) as usize),
            deliveries: 0,
            target,
            first_at: None,
            done_at: None,
            error: None,
        }));
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(delivery) = stream.next().await {
                let at = Instant::now();
                let wall = SystemTime::now();
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                match delivery {
                    Ok(d) => {
                        s.deliveries += 1;
                        s.first_at.get_or_insert(at);
                        let id = d
                            .properties
                            .message_id()
                            .as_ref()
                            .and_then(|m| Uuid::parse_str(m.as_str()).ok())
                            .unwrap_or_else(Uuid::new_v4);
                        if let Entry::Vacant(v) = s.first.entry(id) {
                            v.insert(wall);
                            if s.first.len() as u64 >= s.target && s.done_at.is_none() {
                                s.done_at = Some(at);
                            }
                        }
                    }
                    Err(e) => {
                        s.error = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        Ok(Self { conn, seen, task })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (deliveries, distinct message ids)
    pub(crate) fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.deliveries, s.first.len() as u64)
    }

    pub(crate) fn first_at(&self) -> Option<Instant> {
        self.lock().first_at
    }

    pub(crate) fn receipts(&self) -> HashMap<Uuid, SystemTime> {
        self.lock().first.clone()
    }

    /// Waits until `target` distinct messages arrived; returns when the last one did.
    pub(crate) async fn wait_all(
        &self,
        target: u64,
        stall: Duration,
        mut relay: Option<&mut RelayProc>,
        what: &str,
    ) -> Result<Instant> {
        {
            let mut s = self.lock();
            s.target = target;
            if s.first.len() as u64 >= target && s.done_at.is_none() {
                s.done_at = Some(Instant::now());
            }
        }
        let mut last_count = 0;
        let mut last_change = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let count = {
                let s = self.lock();
                if let Some(at) = s.done_at {
                    return Ok(at);
                }
                if let Some(e) = &s.error {
                    bail!("{what}: the consumer failed: {e}");
                }
                s.first.len() as u64
            };
            if count != last_count {
                last_count = count;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                bail!(
                    "{what}: stalled: {count} of {target} messages arrived, none in the last {stall:?}"
                );
            }
            if let Some(r) = relay.as_deref_mut() {
                if let Some(status) = r.exited() {
                    bail!("{what}: the relay exited ({status}) after {count} of {target} messages");
                }
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                progress!("{what}: {count}/{target} delivered");
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn close(self) {
        let _ = self.conn.close(200, ShortString::from("bench done")).await;
        self.task.abort();
    }
}
