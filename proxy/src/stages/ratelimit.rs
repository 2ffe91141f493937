//! Rate limiting: token buckets (governor), per route on the caller's side and per service on
//! the receiving side, keyed by nothing, the caller's identity, its IP or a header value.
//!
//! Over the limit, the request is answered 429 by the proxy with `Retry-After` and the IETF
//! `RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers); allowed
//! responses carry the same headers so clients can pace themselves.
//!
//! Buckets read tokio's clock: real time in production, simulated time under
//! `tokio::time::pause()` in tests.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::respond::{ProxyError, RateHeaders, ceil_secs};

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use sidemesh_config::units::Rate;
use sidemesh_config::{RateLimit, RateLimitKey};

/// Keys a limiter tracks before idle ones are evicted.
const MAX_KEYS: usize = 100_000;
/// Every this many checks, keys whose bucket is full again are dropped.
const EVICT_EVERY: u64 = 4096;

/// governor's clock on tokio's time.
#[derive(Debug, Clone)]
pub struct TokioClock {
    epoch: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.epoch)
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;
type Keyed = RateLimiter<String, DashMapStateStore<String>, TokioClock, StateInformationMiddleware>;

/// A per-key override: its own bucket, rate and policy header.
#[derive(Debug)]
struct Override {
    limiter: Direct,
    rate: Rate,
    burst: u32,
    policy: HeaderValue,
}

/// `RateLimit-Policy` for the token bucket that is enforced: `q` requests per `w` seconds
/// such that a client that sends `q` at once and then waits `w` is never refused. The window
/// is the time the bucket takes to refill (`burst / rate`, at least one second) and the quota
/// what the bucket holds (`burst`), or less when a one-second window refills fewer.
fn policy_header(name: &str, rate: Rate, burst: u32) -> HeaderValue {
    // In integers (nanoseconds), so 100/min with a burst of 20 is exactly 12 s, not 13.
    const NS: u128 = 1_000_000_000;
    let per = rate.per().as_nanos().max(1);
    let count = u128::from(rate.count().max(1));
    let burst = u128::from(burst.max(1));
    let window = (burst * per).div_ceil(count * NS).max(1);
    let quota = burst.min(count * window * NS / per).max(1);
    header(&format!("\"{name}\";q={quota};w={window}"))
}

/// `"name";r=<remaining>;t=<seconds>`, built without the formatting machinery: it is made
/// for every request through a limited route.
fn state_header(name: &str, remaining: u32, secs: u64) -> HeaderValue {
    let mut s = String::with_capacity(name.len() + 32);
    s.push('"');
    s.push_str(name);
    s.push_str("\";r=");
    push_number(&mut s, u64::from(remaining));
    s.push_str(";t=");
    push_number(&mut s, secs);
    header(&s)
}

fn push_number(s: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        s.push(char::from(d));
    }
}

/// One configured limit (a route's or a service's inbound limit).
#[derive(Debug)]
pub struct Limiter {
    name: String,
    spec: RateLimit,
    clock: TokioClock,
    shared: Direct,
    keyed: Keyed,
    /// `RateLimit-Policy` of the main limit; fixed, so made once.
    policy: HeaderValue,
    overrides: HashMap<String, Override>,
    checks: AtomicU64,
    limited: Counter,
}

/// What the limiter decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allowed {
        remaining: u32,
        headers: RateHeaders,
    },
    Limited {
        retry_after: Duration,
        headers: RateHeaders,
    },
}

/// What tells callers apart, as the request and its connection show it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub ip: IpAddr,
    pub identity: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
}

fn quota(rate: Rate, burst: u32) -> Quota {
    let period = Duration::from_nanos(
        u64::try_from(rate.per().as_nanos() / u128::from(rate.count().max(1)))
            .unwrap_or(u64::MAX)
            .max(1),
    );
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

impl Limiter {
    pub fn new(name: &str, spec: &RateLimit, limited: Counter) -> Self {
        let clock = TokioClock {
            epoch: tokio::time::Instant::now(),
        };
        let q = quota(spec.rate, spec.burst);
        Self {
            name: name.to_string(),
            shared: RateLimiter::direct_with_clock(q, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            keyed: RateLimiter::dashmap_with_clock(q, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            policy: policy_header(name, spec.rate, spec.burst),
            overrides: spec
                .overrides
                .iter()
                .map(|o| {
                    let limiter =
                        RateLimiter::direct_with_clock(quota(o.rate, o.burst), clock.clone())
                            .with_middleware::<StateInformationMiddleware>();
                    let over = Override {
                        limiter,
                        rate: o.rate,
                        burst: o.burst,
                        policy: policy_header(name, o.rate, o.burst),
                    };
                    (o.key.clone(), over)
                })
                .collect(),
            clock,
            spec: spec.clone(),
            checks: AtomicU64::new(0),
            limited,
        }
    }

    /// The key this caller's requests are counted under (`None`: the shared bucket).
    fn key(&self, caller: &Caller<'_>) -> Option<String> {
        match &self.spec.key {
            RateLimitKey::None => None,
            // Callers without mTLS have no identity; all of them share one bucket.
            RateLimitKey::Identity => {
                Some(caller.identity.unwrap_or("unauthenticated").to_string())
            }
            RateLimitKey::SourceIp => Some(caller.ip.to_string()),
            RateLimitKey::Header(name) => Some(
                caller
                    .headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            ),
        }
    }

    pub fn check(&self, caller: &Caller<'_>) -> Decision {
        let key = self.key(caller);
        let (outcome, rate, burst, policy) =
            match key.as_deref().and_then(|k| self.overrides.get(k)) {
                Some(o) => (
                    o.limiter.check().map(|s| s.remaining_burst_capacity()),
                    o.rate,
                    o.burst,
                    &o.policy,
                ),
                None => {
                    let outcome = match &key {
                        None => self.shared.check().map(|s| s.remaining_burst_capacity()),
                        Some(k) => {
                            self.evict_idle_keys();
                            self.keyed
                                .check_key(k)
                                .map(|s| s.remaining_burst_capacity())
                        }
                    };
                    (outcome, self.spec.rate, self.spec.burst, &self.policy)
                }
            };
        match outcome {
            Ok(remaining) => {
                // Seconds until the bucket is full again.
                let period = quota(rate, burst).replenish_interval();
                let refill = period.saturating_mul(burst.saturating_sub(remaining));
                Decision::Allowed {
                    remaining,
                    headers: RateHeaders {
                        policy: policy.clone(),
                        state: state_header(&self.name, remaining, ceil_secs(refill)),
                    },
                }
            }
            Err(not_until) => {
                self.limited.inc();
                let wait = not_until.wait_time_from(self.clock.now());
                Decision::Limited {
                    retry_after: wait,
                    headers: RateHeaders {
                        policy: policy.clone(),
                        state: state_header(&self.name, 0, ceil_secs(wait)),
                    },
                }
            }
        }
    }

    /// Keeps the keyed store bounded: buckets that are full again are indistinguishable from
    /// new ones and can go.
    fn evict_idle_keys(&self) {
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n % EVICT_EVERY == 0 || self.keyed.len() > MAX_KEYS {
            self.keyed.retain_recent();
            self.keyed.shrink_to_fit();
        }
    }

    /// Keys tracked now (for tests and `/config_dump`).
    pub fn tracked_keys(&self) -> usize {
        self.keyed.len()
    }
}

/// Rate limiters by scope and settings: a reload that keeps a limit keeps its buckets (a
/// fresh limiter would hand every client a new burst). Circuit breakers and adaptive
/// concurrency limits are kept beside them, for the same reason.
#[derive(Debug, Default)]
pub struct Limiters {
    limiters: crate::keep::Kept<Limiter>,
    /// Circuit breakers by service and thresholds: their counts of requests in flight.
    pub breakers: crate::keep::Kept<crate::upstream::breaker::Breaker>,
    /// Adaptive concurrency limits by scope and settings: the limit they learned.
    pub concurrency: crate::keep::Kept<crate::stages::concurrency::Concurrency>,
}

impl Limiters {
    /// The limiter for `scope` (e.g. `outbound/users/route-name`) with these settings.
    pub fn limiter(
        &self,
        scope: &str,
        name: &str,
        spec: &sidemesh_config::RateLimit,
        limited: prometheus_client::metrics::counter::Counter,
    ) -> std::sync::Arc<Limiter> {
        let key = format!(
            "{scope}|{}",
            serde_json::to_string(spec).unwrap_or_default()
        );
        self.limiters
            .get_or(key, || Limiter::new(name, spec, limited))
    }
}

/// The stage: a 429 from the proxy when `caller` is over `limiter`'s limit, before any
/// upstream work; otherwise the `RateLimit` headers for the response.
pub fn admit(limiter: &Limiter, caller: &Caller<'_>) -> Result<RateHeaders, ProxyError> {
    match limiter.check(caller) {
        Decision::Allowed { headers, .. } => Ok(headers),
        Decision::Limited {
            retry_after,
            headers,
        } => Err(ProxyError::RateLimited {
            limit: limiter.name.clone(),
            rate: limiter.spec.rate,
            retry_after,
            headers: Box::new(headers),
        }),
    }
}

fn header(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("\"default\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(yaml_limit: &str) -> RateLimit {
        let doc = format!(
            "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: s\n    ports: [{{port: 80}}]\n    inbound:\n      rateLimit: {yaml_limit}\n"
        );
        let mesh = sidemesh_config::parse_str("t.yaml", &doc).expect("valid");
        mesh.services[0].inbound.rate_limit.clone().expect("limit")
    }

    fn caller(ip: [u8; 4], identity: Option<&str>, headers: &http::HeaderMap) -> Caller<'static> {
        let headers: &'static http::HeaderMap = Box::leak(Box::new(headers.clone()));
        let identity: Option<&'static str> =
            identity.map(|s| &*Box::leak(s.to_string().into_boxed_str()));
        Caller {
            ip: IpAddr::from(ip),
            identity,
            headers,
        }
    }

    /// 100/s with a burst of 10 over a simulated 10 s: the burst plus 100 a second.
    #[tokio::test(start_paused = true)]
    async fn admits_the_rate_plus_the_burst_within_one_percent() {
        let limiter = Limiter::new("r", &limit("{rate: 100/s, burst: 10}"), Counter::default());
        let none = http::HeaderMap::new();
        let c = caller([10, 0, 0, 1], None, &none);
        let mut admitted = 0u32;
        // Ask 1000 times a second (every millisecond) for 10 simulated seconds.
        for _ in 0..10_000 {
            if matches!(limiter.check(&c), Decision::Allowed { .. }) {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let expected = 10.0 + 100.0 * 10.0;
        let error = (f64::from(admitted) - expected).abs() / expected;
        assert!(
            error <= 0.01,
            "admitted {admitted}, expected about {expected}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_identity_keys_isolate_callers_and_overrides_apply() {
        let spec = limit(
            "{rate: 10/s, burst: 2, key: identity, overrides: [{key: 'spiffe://cluster.local/ns/demo/sa/batch', rate: 100/s, burst: 50}]}",
        );
        let limiter = Limiter::new("inbound", &spec, Counter::default());
        let none = http::HeaderMap::new();
        let noisy = caller(
            [10, 0, 0, 1],
            Some("spiffe://cluster.local/ns/demo/sa/noisy"),
            &none,
        );
        let quiet = caller(
            [10, 0, 0, 1],
            Some("spiffe://cluster.local/ns/demo/sa/quiet"),
            &none,
        );
        let batch = caller(
            [10, 0, 0, 1],
            Some("spiffe://cluster.local/ns/demo/sa/batch"),
            &none,
        );
        assert!(matches!(limiter.check(&noisy), Decision::Allowed { .. }));
        assert!(matches!(limiter.check(&noisy), Decision::Allowed { .. }));
        assert!(
            matches!(limiter.check(&noisy), Decision::Limited { .. }),
            "the noisy caller's burst of 2 is spent"
        );
        assert!(
            matches!(limiter.check(&quiet), Decision::Allowed { .. }),
            "another identity has its own bucket"
        );
        let batch_ok = (0..50)
            .filter(|_| matches!(limiter.check(&batch), Decision::Allowed { .. }))
            .count();
        assert_eq!(
            batch_ok, 50,
            "the override's burst of 50 applies to its key"
        );
        assert_eq!(
            limiter.tracked_keys(),
            2,
            "overridden keys have their own limiter"
        );
    }

    #[test]
    fn the_policy_header_describes_the_bucket() {
        let rate = |s: &str| s.parse::<Rate>().expect("rate");
        assert_eq!(policy_header("a", rate("100/s"), 10), "\"a\";q=10;w=1");
        assert_eq!(policy_header("a", rate("1/s"), 5), "\"a\";q=5;w=5");
        assert_eq!(policy_header("a", rate("10/min"), 1), "\"a\";q=1;w=6");
        assert_eq!(policy_header("a", rate("1/s"), 1), "\"a\";q=1;w=1");
        assert_eq!(policy_header("a", rate("100/min"), 20), "\"a\";q=20;w=12");
    }

    #[tokio::test(start_paused = true)]
    async fn headers_say_the_policy_the_remaining_and_when_to_retry() {
        let limiter = Limiter::new(
            "orders",
            &limit("{rate: 6000/min, burst: 2, key: {header: x-client-id}}"),
            Counter::default(),
        );
        let mut h = http::HeaderMap::new();
        h.insert("x-client-id", HeaderValue::from_static("c1"));
        let c = caller([10, 0, 0, 1], None, &h);
        match limiter.check(&c) {
            Decision::Allowed { remaining, headers } => {
                assert_eq!(remaining, 1);
                // 100/s with a bucket of 2: two at once, refilled within a second.
                assert_eq!(headers.policy, "\"orders\";q=2;w=1");
                assert_eq!(headers.state, "\"orders\";r=1;t=1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            limiter.check(&c),
            Decision::Allowed { remaining: 0, .. }
        ));
        match limiter.check(&c) {
            Decision::Limited {
                retry_after,
                headers,
            } => {
                // 6000/min is one token every 10 ms.
                assert!(
                    retry_after <= Duration::from_millis(10) && retry_after > Duration::ZERO,
                    "{retry_after:?}"
                );
                assert_eq!(
                    ceil_secs(retry_after),
                    1,
                    "Retry-After is whole seconds, at least 1"
                );
                assert_eq!(headers.state, "\"orders\";r=0;t=1");
            }
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            matches!(limiter.check(&c), Decision::Allowed { .. }),
            "a token came back after 10 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_evicted() {
        let limiter = Limiter::new(
            "r",
            &limit("{rate: 100/s, burst: 5, key: sourceIp}"),
            Counter::default(),
        );
        let none = http::HeaderMap::new();
        for i in 0..5000u32 {
            let c = caller([10, 1, (i >> 8) as u8, (i & 0xff) as u8], None, &none);
            limiter.check(&c);
        }
        assert!(limiter.tracked_keys() > 900, "recent keys are tracked");
        // Once every bucket has refilled, the next sweep forgets them.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..EVICT_EVERY {
            limiter.check(&caller([10, 2, 0, 1], None, &none));
        }
        assert!(
            limiter.tracked_keys() < 10,
            "{} keys still tracked",
            limiter.tracked_keys()
        );
    }
}
