//! Retries: a failed attempt is sent again when the route's policy says the failure is
//! retriable, the method is safe to repeat, the body could be kept for replay, and the
//! route's retry budget allows it. Attempts wait an exponential backoff with full jitter (or
//! the upstream's `Retry-After`), each under the per-try timeout; the route timeout, applied
//! outside this stage, bounds them all. A response is only ever retried before it is returned,
//! so no byte of a failed attempt reaches the client.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use sidemesh_config::{GrpcCode, RetryOn, RetryPolicy};

use crate::proto::body::{self, Body, BoxError};
use crate::respond::ProxyError;
use crate::telemetry::trace::AttemptParent;

/// Sent upstream with each attempt's number (1, 2, ...).
pub const ATTEMPT_HEADER: &str = "x-sidemesh-attempt";

/// A route's retry policy with its budget and counters.
#[derive(Debug)]
pub struct RetryState {
    pub policy: RetryPolicy,
    /// The route's timeout: a `Retry-After` longer than this is not waited for.
    pub route_timeout: Option<Duration>,
    budget: Budget,
    pub retries: Counter,
    pub budget_exhausted: Counter,
}

impl RetryState {
    pub fn new(
        policy: RetryPolicy,
        route_timeout: Option<Duration>,
        retries: Counter,
        budget_exhausted: Counter,
    ) -> Self {
        Self {
            budget: Budget::new(
                policy.budget.ratio,
                policy.budget.min_per_second,
                policy.budget.window.get(),
            ),
            policy,
            route_timeout,
            retries,
            budget_exhausted,
        }
    }
}

/// Retries allowed: `min_per_second x window` plus `ratio x requests` over a sliding window
/// (ten buckets), so retries cannot multiply an outage.
#[derive(Debug)]
struct Budget {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    buckets: Mutex<VecDeque<(tokio::time::Instant, u64, u64)>>,
}

impl Budget {
    fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        Self {
            ratio,
            min_per_second,
            window,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    fn with_bucket<T>(
        &self,
        f: impl FnOnce(&mut (tokio::time::Instant, u64, u64), (u64, u64)) -> T,
    ) -> T {
        let now = tokio::time::Instant::now();
        let width = self.window / 10;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        while buckets
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) >= self.window)
        {
            buckets.pop_front();
        }
        if buckets
            .back()
            .is_none_or(|(t, _, _)| now.duration_since(*t) >= width)
        {
            buckets.push_back((now, 0, 0));
        }
        let totals = buckets
            .iter()
            .fold((0, 0), |(r, x), (_, req, ret)| (r + req, x + ret));
        let last = buckets.back_mut().expect("a bucket was just ensured");
        f(last, totals)
    }

    fn record_request(&self) {
        self.with_bucket(|b, _| b.1 += 1);
    }

    /// Takes one retry from the budget if there is one.
    fn try_retry(&self) -> bool {
        let floor = f64::from(self.min_per_second) * self.window.as_secs_f64();
        let ratio = self.ratio;
        self.with_bucket(|b, (requests, retries)| {
            let allowed = floor + ratio * requests as f64;
            if (retries as f64) < allowed {
                b.2 += 1;
                true
            } else {
                false
            }
        })
    }
}

fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The stage: sends `req` with `send`, and again while the failure is retriable and the
/// budget allows; `parent` (when tracing) gets one child span per attempt.
pub async fn run<F, Fut>(
    state: &RetryState,
    parent: Option<&AttemptParent>,
    req: Request<Body>,
    mut send: F,
) -> Result<Response<Body>, ProxyError>
where
    F: FnMut(Request<Body>) -> Fut,
    Fut: Future<Output = Result<Response<Body>, ProxyError>>,
{
    state.budget.record_request();
    let policy = &state.policy;
    // An upgrade's connection handle lives in this request's extensions: it is never replayed.
    let upgrade = crate::proto::headers::is_upgrade(req.headers());
    if upgrade || !(policy.non_idempotent || idempotent(req.method())) || policy.attempts <= 1 {
        return send(req).await;
    }
    let (mut parts, body) = req.into_parts();
    // The body is read here before any attempt: a client waiting for `100 Continue` gets it
    // from the proxy (it would otherwise wait for an upstream that has not seen the request).
    if expects_continue(&parts.headers) && !body.is_end_stream() {
        parts.headers.remove(http::header::EXPECT);
        if let Some(crate::proto::h1::Interim(tx)) =
            parts.extensions.get::<crate::proto::h1::Interim>()
        {
            let _ = tx.try_send(Box::new(crate::proto::h1::InterimResponse {
                status: http::StatusCode::CONTINUE,
                headers: http::HeaderMap::new(),
            }));
        }
    }
    let limit = usize::try_from(policy.buffer_limit.bytes()).unwrap_or(usize::MAX);
    let replay = match buffer(body, limit).await? {
        Ok(bytes) => bytes,
        Err(streaming) => {
            // Too large to keep: sent once, as a stream.
            return send(Request::from_parts(parts, streaming)).await;
        }
    };
    for attempt in 1..=policy.attempts {
        let mut req = Request::new(body::full(replay.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        req.headers_mut()
            .insert(ATTEMPT_HEADER, HeaderValue::from(attempt));
        *req.extensions_mut() = parts.extensions.clone();
        let span = parent.map(|parent| parent.start(attempt, req.headers_mut()));
        let result = match policy.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit.get(), send(req))
                .await
                .unwrap_or(Err(ProxyError::Timeout { after: limit.get() })),
            None => send(req).await,
        };
        if let Some(span) = span {
            match &result {
                Ok(resp) => span.finish(Ok(resp.status())),
                Err(e) => span.finish(Err(e.code())),
            }
        }
        if attempt == policy.attempts || !retriable(&result, &policy.retry_on) {
            return result;
        }
        let wait = match retry_after(&result) {
            Some(wait) if state.route_timeout.is_some_and(|t| wait >= t) => return result,
            Some(wait) => wait,
            None => backoff(policy, attempt),
        };
        if !state.budget.try_retry() {
            state.budget_exhausted.inc();
            tracing::debug!(attempt, "retry budget exhausted; returning the failure");
            return result;
        }
        state.retries.inc();
        drop(result);
        tokio::time::sleep(wait).await;
    }
    unreachable!("the last attempt always returns")
}

/// Full jitter: a uniform wait between 0 and `min(max, base x 2^(attempt-1))`.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .backoff_base
        .get()
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(policy.backoff_max.get());
    ceiling.mul_f64(fastrand::f64())
}

/// `Retry-After` (seconds) of an upstream 429 or 503.
fn retry_after(result: &Result<Response<Body>, ProxyError>) -> Option<Duration> {
    let resp = result.as_ref().ok()?;
    if !matches!(resp.status().as_u16(), 429 | 503) {
        return None;
    }
    let secs: u64 = resp
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

fn retriable(result: &Result<Response<Body>, ProxyError>, retry_on: &[RetryOn]) -> bool {
    let status = match result {
        Ok(resp) => resp.status().as_u16(),
        Err(ProxyError::Timeout { .. }) => 504,
        // A failed handshake is a failed connection: another endpoint may do.
        Err(ProxyError::Connect { .. } | ProxyError::Tls { .. }) => {
            return retry_on.contains(&RetryOn::ConnectFailure);
        }
        Err(ProxyError::Upstream { .. }) => return retry_on.contains(&RetryOn::Reset),
        Err(_) => return false,
    };
    let grpc = result
        .as_ref()
        .ok()
        .and_then(|r| r.headers().get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    retry_on.iter().any(|on| match on {
        RetryOn::ServerError => status >= 500,
        RetryOn::GatewayError => matches!(status, 502..=504),
        RetryOn::Status(code) => status == *code,
        RetryOn::Grpc(code) => grpc == Some(grpc_number(*code)),
        RetryOn::ConnectFailure | RetryOn::Reset => false,
    })
}

fn grpc_number(code: GrpcCode) -> i32 {
    code as i32
}

/// Reads the body into memory if it fits in `limit`; otherwise gives back a body that replays
/// what was read and streams the rest (that request is not retried).
async fn buffer(mut body: Body, limit: usize) -> Result<Result<Bytes, Body>, ProxyError> {
    if body.is_end_stream() {
        return Ok(Ok(Bytes::new()));
    }
    if body.size_hint().lower() > limit as u64 {
        return Ok(Err(body));
    }
    let mut kept = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(Ok(kept.freeze())),
            Some(Err(e)) => {
                return Err(match crate::proto::h1::ClientBodyError::find(&*e) {
                    Some(fault) => ProxyError::ClientBody(fault.clone()),
                    None => ProxyError::BadRequest {
                        why: format!("request body: {e}"),
                    },
                });
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if kept.len() + data.len() <= limit => kept.extend_from_slice(&data),
                Ok(data) => {
                    kept.extend_from_slice(&data);
                    return Ok(Err(
                        Prefixed::new(vec![Frame::data(kept.freeze())], body).boxed_unsync()
                    ));
                }
                Err(trailers) => {
                    // Request trailers are rare; such a body is passed on once, as it came.
                    let frames = vec![Frame::data(kept.freeze()), trailers];
                    return Ok(Err(Prefixed::new(frames, body).boxed_unsync()));
                }
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Frames already read, then the rest of the body.
    struct Prefixed {
        frames: VecDeque<Frame<Bytes>>,
        #[pin]
        rest: Body,
    }
}

impl Prefixed {
    fn new(frames: Vec<Frame<Bytes>>, rest: Body) -> Self {
        Self {
            frames: frames.into(),
            rest,
        }
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.rest.poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_the_floor_plus_a_share_of_requests() {
        // 20% of requests plus 1 a second over 10 s.
        let budget = Budget::new(0.2, 1, Duration::from_secs(10));
        for _ in 0..100 {
            budget.record_request();
        }
        let allowed = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(allowed, 30, "10 (floor: 1/s x 10 s) + 20 (20% of 100)");
        // Once the window has passed, the budget is back.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(budget.try_retry());
    }
}
