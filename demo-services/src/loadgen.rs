//! loadgen: steady, mixed traffic against order-service, summarised once per second.
//!
//! Open loop: requests start at a fixed rate whatever the latency, as real callers do; at most
//! `max_in_flight` are outstanding, and a tick that finds them all busy is counted as `skipped`
//! rather than queued (so an overloaded target shows up instead of being hidden).
//! The mix: 70 % `POST /orders` (a share of them for an unknown user, answered 422), 30 %
//! `GET /orders/{id}` of an order created earlier.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::telemetry;

/// What to send, how fast and for how long.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// order-service base URL (or its sidecar's listener when meshed).
    #[arg(
        long,
        env = "ORDER_SERVICE_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub target: String,
    /// Requests started per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Stop after this long (e.g. `30s`); runs until interrupted when absent.
    #[arg(long, value_parser = crate::server::parse_duration)]
    pub duration: Option<Duration>,
    /// Most requests outstanding at once.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Share of orders placed for a user that does not exist (expect 422s).
    #[arg(long, default_value_t = 0.05)]
    pub unknown_user_share: f64,
    /// Sent as `x-client-id`, the key of the per-client rate limit example.
    #[arg(long, default_value = "loadgen")]
    pub client_id: String,
}

/// One second (or a whole run) of results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Seconds since the start, at the end of this window.
    pub elapsed_secs: u64,
    pub sent: u64,
    pub ok: u64,
    pub client_errors: u64,
    pub rate_limited: u64,
    pub server_errors: u64,
    /// Connection failures and the like: no HTTP status at all.
    pub transport_errors: u64,
    pub skipped: u64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    latencies: Vec<Duration>,
}

enum Outcome {
    Status(u16, Duration),
    Transport,
}

impl Summary {
    fn record(&mut self, outcome: &Outcome) {
        self.sent += 1;
        match *outcome {
            Outcome::Status(status, latency) => {
                match status {
                    200..=399 => self.ok += 1,
                    429 => {
                        self.client_errors += 1;
                        self.rate_limited += 1;
                    }
                    400..=499 => self.client_errors += 1,
                    _ => self.server_errors += 1,
                }
                self.latencies.push(latency);
            }
            Outcome::Transport => self.transport_errors += 1,
        }
    }

    fn finish(&mut self) {
        self.latencies.sort_unstable();
        self.p50 = percentile(&self.latencies, 0.50);
        self.p99 = percentile(&self.latencies, 0.99);
    }

    fn merge(&mut self, other: &Summary) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.client_errors += other.client_errors;
        self.rate_limited += other.rate_limited;
        self.server_errors += other.server_errors;
        self.transport_errors += other.transport_errors;
        self.skipped += other.skipped;
        self.latencies.extend_from_slice(&other.latencies);
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
}

struct Ms(Option<Duration>);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{:.1}ms", d.as_secs_f64() * 1000.0),
            None => f.write_str("-"),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "t={}s sent={} 2xx={} 4xx={} 429={} 5xx={} err={} skipped={} p50={} p99={}",
            self.elapsed_secs,
            self.sent,
            self.ok,
            self.client_errors,
            self.rate_limited,
            self.server_errors,
            self.transport_errors,
            self.skipped,
            Ms(self.p50),
            Ms(self.p99)
        )
    }
}

/// Runs the load until `args.duration` passes, calling `report` with each second's summary.
/// Returns the totals of the whole run.
pub async fn run(args: LoadgenArgs, mut report: impl FnMut(&Summary)) -> anyhow::Result<Summary> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        anyhow::bail!("--rate must be greater than 0, got {}", args.rate);
    }
    let target: Arc<str> = args.target.trim_end_matches('/').into();
    let _: http::Uri = target
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --target `{target}`: {e}"))?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let slots = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let last_order = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();

    let start = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seconds = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut window = Summary::default();
    let mut total = Summary::default();
    let mut rng = fastrand::Rng::new();
    // A bounded run sends exactly rate x duration requests, then waits for their answers.
    let limit = args
        .duration
        .map(|d| (d.as_secs_f64() * args.rate).round() as u64);
    let (mut started, mut finished) = (0u64, 0u64);
    let mut windows = 0;
    let mut flush = |window: &mut Summary, total: &mut Summary| {
        windows += 1;
        window.elapsed_secs = windows;
        total.merge(window);
        window.finish();
        report(window);
        *window = Summary::default();
    };

    while limit.is_none_or(|l| finished < l) {
        tokio::select! {
            _ = ticks.tick(), if limit.is_none_or(|l| started < l) => {
                started += 1;
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    window.skipped += 1;
                    finished += 1;
                    continue;
                };
                let req = next_request(&mut rng, &args, &target, last_order.load(Ordering::Relaxed));
                let (client, tx, last_order) = (client.clone(), tx.clone(), last_order.clone());
                tokio::spawn(async move {
                    let outcome = send(&client, req, &last_order).await;
                    drop(permit);
                    let _ = tx.send(outcome);
                });
            }
            Some(outcome) = rx.recv() => {
                window.record(&outcome);
                finished += 1;
            }
            _ = seconds.tick() => flush(&mut window, &mut total),
        }
    }
    if window.sent + window.skipped > 0 {
        flush(&mut window, &mut total);
    }
    total.elapsed_secs = start.elapsed().as_secs_f64().round() as u64;
    total.finish();
    Ok(total)
}

fn next_request(
    rng: &mut fastrand::Rng,
    args: &LoadgenArgs,
    target: &str,
    last_order: u64,
) -> Request<Full<Bytes>> {
    let builder = Request::builder().header("x-client-id", args.client_id.as_str());
    let built = if last_order > 0 && rng.f64() < 0.3 {
        builder
            .method(Method::GET)
            .uri(format!("{target}/orders/{}", rng.u64(1..=last_order)))
            .body(Full::default())
    } else {
        let user_id = if rng.f64() < args.unknown_user_share {
            1_000_000 + rng.u64(0..1000)
        } else {
            rng.u64(1..=3)
        };
        let body = serde_json::json!({
            "user_id": user_id,
            "items": [{ "sku": format!("sku-{}", rng.u32(1..=50)), "quantity": rng.u32(1..=3) }],
        });
        builder
            .method(Method::POST)
            .uri(format!("{target}/orders"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
    };
    built.expect("request parts are valid: the target was checked at start")
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    mut req: Request<Full<Bytes>>,
    last_order: &AtomicU64,
) -> Outcome {
    let span = tracing::info_span!(
        "loadgen",
        otel.name = %format!("{} {}", req.method(), if req.method() == Method::GET { "/orders/{id}" } else { "/orders" }),
        otel.kind = "client",
        http.request.method = %req.method(),
        url.full = %req.uri(),
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::inject(&span, req.headers_mut());
    let started = Instant::now();
    async {
        let resp = match client.request(req).await {
            Ok(resp) => resp,
            Err(_) => return Outcome::Transport,
        };
        let status = resp.status().as_u16();
        tracing::Span::current().record("http.response.status_code", i64::from(status));
        let Ok(body) = resp.into_body().collect().await else {
            return Outcome::Transport;
        };
        if status == 201 {
            if let Some(id) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
                .ok()
                .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
            {
                last_order.fetch_max(id, Ordering::Relaxed);
            }
        }
        Outcome::Status(status, started.elapsed())
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&ms, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
