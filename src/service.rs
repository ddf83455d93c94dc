//! `outbox-relay run`: starts the tasks, waits for SIGTERM/SIGINT, drains.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{
    config::RelayConfig,
    control::{self, ControlTask},
    housekeeping::HousekeepingTask,
    http,
    leases::LeaseState,
    metrics::Metrics,
    relay::Relay,
    store::{self, Session, SharedFloor},
    wakeup::Wakeup,
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] http::BindError),
    #[error(transparent)]
    Schema(#[from] store::MigrateError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

pub async fn run(cfg: RelayConfig) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    metrics.broker_nodes(&cfg.conn.amqp_nodes);
    warn_about_exposure(&cfg);
    check_schema_if_reachable(&cfg).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let (http, metrics_addr) = http::serve(cfg.metrics_addr, metrics.clone(), async move {
        let _ = http_stop.wait_for(|stop| *stop).await;
    })
    .await?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signals)?;

    let (lease_tx, lease_rx) = watch::channel(LeaseState::default());
    let (can_publish_tx, can_publish_rx) = watch::channel(false);
    let wakeup = Arc::new(Wakeup::default());
    let floor = Arc::new(SharedFloor::default());
    let control = tokio::spawn(
        ControlTask {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            leases: lease_tx,
            wakeup: wakeup.clone(),
            floor: floor.clone(),
            stop: stop_rx.clone(),
            metrics_addr,
            can_publish: can_publish_rx,
        }
        .run(),
    );
    let housekeeping = tokio::spawn(
        HousekeepingTask {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            stop: stop_rx.clone(),
            floor: floor.clone(),
            wakeup: wakeup.clone(),
        }
        .run(),
    );
    let mut relay = tokio::spawn(
        Relay::new(
            cfg.clone(),
            metrics.clone(),
            lease_rx,
            wakeup,
            floor,
            stop_rx,
            can_publish_tx,
        )
        .run(),
    );
    tracing::info!(
        instance = %cfg.instance_id,
        schema = %cfg.conn.schema,
        metrics_addr = %metrics_addr,
        "outbox relay started"
    );

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = &mut relay => "relay loop ended",
    };
    tracing::info!(signal, timeout = ?cfg.shutdown_timeout, "stopping: no new claims, draining in-flight confirms");
    metrics.set_stopping();
    let _ = stop_tx.send(true);
    if !relay.is_finished() {
        match tokio::time::timeout(cfg.shutdown_timeout, &mut relay).await {
            Ok(_) => tracing::info!("drained: every confirmed row is marked"),
            Err(_) => {
                relay.abort();
                tracing::warn!("shutdown-timeout reached before every confirm arrived; unconfirmed rows stay pending and will be published again");
            }
        }
    }
    let _ = control.await;
    let _ = housekeeping.await;
    // Only now, with nothing in flight, may a successor take our partitions.
    match tokio::time::timeout(
        std::time::Duration::from_secs(3),
        control::release_leases(&cfg),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!("leases released"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release leases; they lapse on their own")
        }
        Err(_) => tracing::warn!("releasing leases timed out; they lapse on their own"),
    }
    let _ = http.await;
    Ok(())
}

/// Settings that work but leave a connection unverified off this machine:
/// said at every start, in `check`'s words.
fn warn_about_exposure(cfg: &RelayConfig) {
    let exposure = &cfg.conn.exposure;
    for warning in exposure.database.iter().chain(&exposure.brokers) {
        tracing::warn!("insecure connection setting: {warning}");
    }
}

/// A missing or outdated schema is a setup error worth stopping for; an
/// unreachable database is not (the relay waits for it).
async fn check_schema_if_reachable(cfg: &RelayConfig) -> Result<(), RunError> {
    let connect = Session::connect(&cfg.conn.database_url, "outbox-relay check");
    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
        Ok(Ok(session)) => {
            let result = session.verify_schema(&cfg.conn.schema).await;
            result.map(|_| ()).map_err(RunError::Schema)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "database not reachable at start; will keep trying");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("database not reachable at start (timeout); will keep trying");
            Ok(())
        }
    }
}
