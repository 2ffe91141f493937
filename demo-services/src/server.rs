//! What every demo service shares: its flags, binding, serving HTTP/1.1 and HTTP/2 (h2c, for
//! gRPC) on one port, and graceful shutdown on SIGTERM or Ctrl-C.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::telemetry::LogFormat;

/// Flags shared by user-service and order-service.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Share of requests answered 503 (gRPC UNAVAILABLE), from 0.0 to 1.0.
    #[arg(long, env = "FAIL_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub fail_rate: f64,
    /// Delay added to every request, e.g. `50ms`.
    #[arg(long, env = "LATENCY", value_parser = parse_duration)]
    pub latency: Option<Duration>,
    /// Injected 503s say `Retry-After: <seconds>` (none by default).
    #[arg(long, env = "RETRY_AFTER")]
    pub retry_after: Option<u64>,
    /// Seed for the failure draws, to make them reproducible.
    #[arg(long, env = "FAULT_SEED")]
    pub seed: Option<u64>,
    /// OTLP/gRPC collector for this service's own spans, e.g. `http://127.0.0.1:4317`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl CommonArgs {
    pub fn faults(&self) -> crate::faults::Faults {
        crate::faults::Faults::new(self.fail_rate, self.latency, self.seed)
            .with_retry_after(self.retry_after)
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("must be a number from 0.0 to 1.0, got `{s}`")),
    }
}

/// Durations use the routing language's units (`250ms`, `2s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<sidemesh_config::units::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

/// Binds `addr`, naming the address in the error (a port in use is the usual cause).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind {addr}: {e}"))
}

/// Serves `app` until `shutdown` completes, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}
