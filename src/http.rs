//! `/metrics`, `/healthz`, `/readyz` on the metrics address.
//!
//! The endpoint is reachable by anyone on the network, so it must hold against
//! slow and many clients: each connection has a deadline for its request
//! header and for its whole life, at most [`MAX_CONNECTIONS`] are served at
//! once (more are closed at accept), a request header is bounded in size, and
//! shutdown never waits on a client for more than [`CLOSE_GRACE`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::metrics::Metrics;

/// The loop turns at least every 10 s (its idle beat); 30 s of silence means
/// it is stuck.
const LIVENESS_WINDOW: Duration = Duration::from_secs(30);
/// A client must send a whole request header within this time (also the
/// longest a kept-alive connection may sit idle between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; further ones are closed as soon as accepted,
/// so descriptors and memory stay bounded whatever clients do.
pub const MAX_CONNECTIONS: usize = 64;
/// A request header larger than this is refused (hyper's buffer limit; a
/// scrape sends a few hundred bytes).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// A connection is asked to close after this long, whatever it is doing (a
/// client that reads its response byte by byte), and dropped `CLOSE_GRACE`
/// later.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// At shutdown (or a connection's end of life), responses in flight get this
/// long to finish; then the connection is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on metrics-addr {addr}: {source}; pick a free port with --metrics-addr")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds now (so a taken port fails at start), serves until `shutdown`
/// resolves, then ends within [`CLOSE_GRACE`]. Returns the address bound
/// (port 0 asks for any free port).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr), BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let task = tokio::spawn(accept_until(listener, app, shutdown));
    Ok((task, bound))
}

async fn accept_until(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: let some close first.
                tracing::warn!(error = %e, "metrics server cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max = MAX_CONNECTIONS,
                    "metrics server is at its connection cap; closing new connections"
                );
            }
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let mut closing = closing.clone();
        connections.spawn(async move {
            let _slot = slot;
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                _ = closing.wait_for(|c| *c) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(CLOSE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Dropping the set aborts what is left: no client delays the exit.
        connections.abort_all();
    }
}

/// OpenMetrics when the scraper's `Accept` lists it, else text 0.0.4.
async fn metrics_text(
    State(m): State<Arc<Metrics>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let (body, content_type) = m.encode_for(accept);
    ([(axum::http::header::CONTENT_TYPE, content_type)], body)
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.loop_alive(LIVENESS_WINDOW) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "relay loop has not turned for 30s\n",
        )
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}
