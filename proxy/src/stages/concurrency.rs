//! Adaptive concurrency: a limit on requests in flight that sets itself from measured latency
//! (`adaptiveConcurrency` on a service's `inbound`, or on a route), and sheds what is beyond
//! it at once with a marked 503 (`overloaded`).
//!
//! **The controller is Netflix's Gradient2, not Envoy's gradient filter.** Both compare the
//! latency now with a no-load latency and shrink the limit as the ratio grows. Envoy learns the
//! no-load latency by pinning the limit to a few requests for a moment every minute or so,
//! which sheds traffic on a schedule even when nothing is wrong; Gradient2 keeps a long-term
//! average of latency instead, and is never throttled to measure it. The price is that under
//! overload lasting minutes the long-term average creeps up (it remembers about 600 windows),
//! so the limit drifts up slowly; it is pulled back down quickly once latency falls.
//!
//! Per window (at least 10 answers and 100 ms, or 1 s with any), with `short` the window's
//! mean latency and `long` the exponential average of windows:
//! `gradient = clamp(tolerance * long / short, 0.5, 1)`,
//! `limit = 0.8 * limit + 0.2 * (limit * gradient + sqrt(limit))`, within `[min, max]`.
//! The `sqrt(limit)` is headroom that lets the limit grow while latency holds; a window in
//! which fewer than half the limit were in flight (the callers, not the upstream, set the
//! pace) leaves the limit where it is.
//!
//! Latency is measured to the response head; a request is in flight until then. Timeouts
//! count as the latency they waited; the proxy's own refusals and failed connections are not
//! samples, as they say nothing of how busy the upstream is.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use sidemesh_config::AdaptiveConcurrency;

use crate::respond::ProxyError;

/// Windows averaged into the long-term latency.
const LONG_WINDOWS: f64 = 600.0;
/// The first windows are averaged plainly, so one early sample does not set the baseline.
const WARMUP_WINDOWS: u32 = 10;
const MIN_SAMPLES: u32 = 10;
const MIN_WINDOW: Duration = Duration::from_millis(100);
const MAX_WINDOW: Duration = Duration::from_secs(1);
const SMOOTHING: f64 = 0.2;

/// One scope's limit: a service's inbound traffic, or a route's at a caller.
#[derive(Debug)]
pub struct Concurrency {
    /// What the error and `/config_dump` call it, e.g. "service `users` (inbound)".
    pub scope: String,
    pub settings: AdaptiveConcurrency,
    in_flight: AtomicUsize,
    /// The limit in force, read on every admission.
    limit: AtomicUsize,
    gradient: Mutex<Gradient>,
    shed: Counter,
    limit_gauge: Gauge,
}

#[derive(Debug)]
struct Gradient {
    limit: f64,
    long: f64,
    windows: u32,
    window_start: Instant,
    sum: f64,
    count: u32,
    peak_in_flight: usize,
}

/// A request let in: counted in flight until its answer's head, then a latency sample.
#[derive(Debug)]
pub struct Admitted {
    limit: Arc<Concurrency>,
    started: Instant,
    done: bool,
}

/// What `/config_dump` shows of a limit.
#[derive(Debug, Serialize)]
pub struct ConcurrencyState {
    pub scope: String,
    pub limit: usize,
    pub in_flight: usize,
    /// The long-term latency the limit is measured against, in milliseconds.
    pub long_rtt_ms: f64,
    pub settings: AdaptiveConcurrency,
}

impl Concurrency {
    pub fn new(
        scope: String,
        settings: AdaptiveConcurrency,
        shed: Counter,
        limit_gauge: Gauge,
    ) -> Self {
        limit_gauge.set(i64::from(settings.initial_limit));
        Self {
            scope,
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(settings.initial_limit as usize),
            gradient: Mutex::new(Gradient {
                limit: f64::from(settings.initial_limit),
                long: 0.0,
                windows: 0,
                window_start: Instant::now(),
                sum: 0.0,
                count: 0,
                peak_in_flight: 0,
            }),
            settings,
            shed,
            limit_gauge,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> ConcurrencyState {
        let long = self.gradient.lock().unwrap_or_else(|p| p.into_inner()).long;
        ConcurrencyState {
            scope: self.scope.clone(),
            limit: self.limit(),
            in_flight: self.in_flight(),
            long_rtt_ms: (long * 1000.0 * 100.0).round() / 100.0,
            settings: self.settings,
        }
    }

    /// One latency sample; closes the window (and moves the limit) when it is full.
    fn sample(&self, rtt: Duration, in_flight: usize) {
        let now = Instant::now();
        let mut g = self.gradient.lock().unwrap_or_else(|p| p.into_inner());
        g.sum += rtt.as_secs_f64();
        g.count += 1;
        g.peak_in_flight = g.peak_in_flight.max(in_flight);
        let open_for = now.duration_since(g.window_start);
        if !((g.count >= MIN_SAMPLES && open_for >= MIN_WINDOW) || open_for >= MAX_WINDOW) {
            return;
        }
        let short = (g.sum / f64::from(g.count)).max(1e-6);
        let peak = g.peak_in_flight;
        g.window_start = now;
        g.sum = 0.0;
        g.count = 0;
        g.peak_in_flight = 0;
        let limit = g.update(short, peak, &self.settings);
        self.limit.store(limit, Ordering::Relaxed);
        self.limit_gauge
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }
}

impl Gradient {
    /// A closed window of mean latency `short` with at most `peak` requests in flight:
    /// the new limit.
    fn update(&mut self, short: f64, peak: usize, settings: &AdaptiveConcurrency) -> usize {
        self.windows = self.windows.saturating_add(1);
        self.long = if self.windows <= WARMUP_WINDOWS {
            self.long + (short - self.long) / f64::from(self.windows)
        } else {
            let alpha = 2.0 / (LONG_WINDOWS + 1.0);
            self.long * (1.0 - alpha) + short * alpha
        };
        // Latency well below its long-term level (a past overload is over): let the
        // long-term level catch up faster than its average would.
        if self.long / short > 2.0 {
            self.long *= 0.95;
        }
        // The callers, not the upstream, set the pace: nothing to learn.
        if (peak as f64) < self.limit / 2.0 {
            return self.limit.round() as usize;
        }
        let gradient = (settings.tolerance * self.long / short).clamp(0.5, 1.0);
        let target = self.limit * gradient + self.limit.sqrt();
        self.limit = (self.limit * (1.0 - SMOOTHING) + target * SMOOTHING)
            .clamp(f64::from(settings.min_limit), f64::from(settings.max_limit));
        self.limit.round() as usize
    }
}

/// The stage: lets the request in under the limit, or sheds it at once.
pub fn admit(limit: &Arc<Concurrency>) -> Result<Admitted, ProxyError> {
    let max = limit.limit();
    let taken = limit
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        });
    match taken {
        Ok(_) => Ok(Admitted {
            limit: limit.clone(),
            started: Instant::now(),
            done: false,
        }),
        Err(_) => {
            limit.shed.inc();
            Err(ProxyError::Overloaded {
                scope: limit.scope.clone(),
                limit: u32::try_from(max).unwrap_or(u32::MAX),
            })
        }
    }
}

impl Admitted {
    /// The answer's head is here (or the request failed): a sample unless the result says
    /// nothing of the upstream's load.
    pub fn finish(mut self, result: &Result<http::Response<crate::proto::body::Body>, ProxyError>) {
        self.done = true;
        let in_flight = self.limit.in_flight.fetch_sub(1, Ordering::AcqRel);
        let counts = match result {
            Ok(_) | Err(ProxyError::Timeout { .. } | ProxyError::Upstream { .. }) => true,
            Err(_) => false,
        };
        if counts {
            self.limit.sample(self.started.elapsed(), in_flight);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // Cancelled (the client went away): out of flight, no sample.
        if !self.done {
            self.limit.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdaptiveConcurrency {
        AdaptiveConcurrency {
            initial_limit: 20,
            min_limit: 4,
            max_limit: 1000,
            tolerance: 1.5,
        }
    }

    fn gradient(limit: f64) -> Gradient {
        Gradient {
            limit,
            long: 0.0,
            windows: 0,
            window_start: Instant::now(),
            sum: 0.0,
            count: 0,
            peak_in_flight: 0,
        }
    }

    #[test]
    fn steady_latency_lets_the_limit_grow() {
        let mut g = gradient(20.0);
        let mut last = 20;
        for _ in 0..50 {
            last = g.update(0.010, 1000, &settings());
        }
        assert!(last > 40, "limit {last}");
    }

    #[test]
    fn latency_far_above_its_level_shrinks_the_limit_and_its_return_lets_it_grow() {
        let mut g = gradient(100.0);
        for _ in 0..20 {
            g.update(0.010, 1000, &settings());
        }
        let before = g.limit;
        let mut last = 0;
        for _ in 0..30 {
            last = g.update(0.200, 1000, &settings());
        }
        assert!((last as f64) < before / 3.0, "{before} -> {last}");
        assert!(last >= 4, "never below minLimit: {last}");
        let low = last;
        for _ in 0..30 {
            last = g.update(0.010, 1000, &settings());
        }
        assert!(last > low * 2, "back to normal latency: {low} -> {last}");
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let tight = AdaptiveConcurrency {
            initial_limit: 10,
            min_limit: 8,
            max_limit: 12,
            tolerance: 1.5,
        };
        let mut g = gradient(10.0);
        for _ in 0..10 {
            g.update(0.010, 1000, &tight);
        }
        for _ in 0..50 {
            assert!(g.update(0.010, 1000, &tight) <= 12);
        }
        for _ in 0..50 {
            assert!(g.update(0.500, 1000, &tight) >= 8);
        }
    }

    #[test]
    fn a_limit_the_callers_do_not_reach_stays_where_it_is() {
        let mut g = gradient(20.0);
        for _ in 0..50 {
            assert_eq!(g.update(0.010, 3, &settings()), 20);
        }
    }

    #[test]
    fn requests_beyond_the_limit_are_shed_at_once() {
        let limit = Arc::new(Concurrency::new(
            "service `s` (inbound)".into(),
            AdaptiveConcurrency {
                initial_limit: 2,
                min_limit: 1,
                max_limit: 10,
                tolerance: 1.5,
            },
            Counter::default(),
            Gauge::default(),
        ));
        let a = admit(&limit).expect("ok");
        let _b = admit(&limit).expect("ok");
        let err = admit(&limit).expect_err("refused");
        assert_eq!(err.code(), "overloaded");
        assert_eq!(limit.shed.get(), 1);
        drop(a);
        assert_eq!(limit.in_flight(), 1);
        assert!(admit(&limit).is_ok());
    }
}
