//! Fault injection: answer a share of requests with 503 (or gRPC UNAVAILABLE) and add latency.
//!
//! Applied as middleware to the API routes only, never to `/healthz`, so a "failing" service
//! still looks alive to its orchestrator, as a real partially failing service does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// What to inject. `fail_rate` is the share of requests failed, from 0.0 to 1.0.
#[derive(Debug)]
pub struct Faults {
    fail_rate: f64,
    latency: Option<Duration>,
    /// Sent as `Retry-After` (seconds) with injected HTTP 503s, when set.
    retry_after: Option<u64>,
    rng: Mutex<fastrand::Rng>,
}

impl Faults {
    /// `seed` makes the sequence of failures reproducible (for tests and demos).
    pub fn new(fail_rate: f64, latency: Option<Duration>, seed: Option<u64>) -> Self {
        let rng = seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Self {
            fail_rate: fail_rate.clamp(0.0, 1.0),
            latency,
            retry_after: None,
            rng: Mutex::new(rng),
        }
    }

    /// Injected HTTP 503s also say `Retry-After: <secs>`.
    pub fn with_retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }

    pub fn none() -> Self {
        Self::new(0.0, None, None)
    }

    fn should_fail(&self) -> bool {
        if self.fail_rate <= 0.0 {
            return false;
        }
        // A poisoned lock only means another request panicked mid-draw; the RNG is still usable.
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.f64() < self.fail_rate
    }
}

/// Middleware: sleeps `latency`, then fails the request with probability `fail_rate`.
pub async fn inject(State(faults): State<Arc<Faults>>, req: Request, next: Next) -> Response {
    if let Some(latency) = faults.latency {
        tokio::time::sleep(latency).await;
    }
    if !faults.should_fail() {
        return next.run(req).await;
    }
    tracing::info!(path = %req.uri().path(), "injected failure");
    if is_grpc(&req) {
        let status = tonic::Status::unavailable("injected failure (--fail-rate)");
        return status.into_http::<Body>().into_response();
    }
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({ "error": "injected failure (--fail-rate)" })),
    )
        .into_response();
    if let Some(secs) = faults.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_failures_are_reproducible_and_near_the_rate() {
        let count = |seed| {
            let f = Faults::new(0.3, None, Some(seed));
            (0..10_000).filter(|_| f.should_fail()).count()
        };
        assert_eq!(count(7), count(7));
        let failed = count(7) as f64 / 10_000.0;
        assert!((failed - 0.3).abs() < 0.02, "{failed}");
        assert_eq!(
            (0..1000).filter(|_| Faults::none().should_fail()).count(),
            0
        );
    }
}
