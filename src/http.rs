//! `/metrics`, `/healthz`, `/readyz` on the metrics address.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::metrics::Metrics;

/// The loop turns at least every 10 s (its idle beat); 30 s of silence means
/// it is stuck.
const LIVENESS_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on metrics-addr {addr}: {source}; pick a free port with --metrics-addr")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds now (so a taken port fails at start), serves until `shutdown`
/// resolves. Returns the address bound (port 0 asks for any free port).
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
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok((task, bound))
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
