//! Outlier detection: which endpoints of a service take traffic, judged from their own
//! failures only, and never in a way that takes the whole service down.
//!
//! - **Consecutive failures** eject an endpoint for `baseEjection x 2^(n-1)` (capped). While
//!   ejected it gets one trial request every `trialInterval`; an answer readmits it at once,
//!   so an endpoint that was down is back within about a second of answering again.
//! - **Success rate** and **failure percentage** are judged once per `interval` over the
//!   window that just ended (by the first report after it), for endpoints with enough
//!   requests. Such an ejection runs its full length: one good trial says nothing of a rate.
//! - **Never an outage:** at most `maxEjectionPercent` of a service's endpoints are ejected at
//!   once (the default, 50, keeps one of one or two), and when fewer than `panicThreshold`
//!   percent are healthy the balancer ignores ejections and uses every endpoint ("panic",
//!   shown in `sidemesh_balancer_panic` and `/config_dump`).
//!
//! What counts as a failure is decided by `forward::classify`; this module only keeps score.
//! Counters are atomics on the endpoint (no lock on the request path); a window rolled by two
//! requests at once may lose a count, which a rate over a hundred requests does not notice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use crate::upstream::endpoint::Endpoint;

/// A service's outlier-detection settings, as validated from the YAML.
pub type OutlierPolicy = sidemesh_config::OutlierDetection;

/// How often the balancer recounts healthy endpoints for the panic threshold (ejections
/// also end by time, so a count made at ejection would go stale).
const RECOUNT: u64 = 100;

/// Outcome of one request, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The endpoint's own failure (see `forward::classify`).
    Failure,
}

/// Why an endpoint was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    ConsecutiveFailures = 1,
    SuccessRate = 2,
    FailurePercentage = 3,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive-failures",
            Reason::SuccessRate => "success-rate",
            Reason::FailurePercentage => "failure-percentage",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Reason::ConsecutiveFailures),
            2 => Some(Reason::SuccessRate),
            3 => Some(Reason::FailurePercentage),
            _ => None,
        }
    }
}

/// What a report changed, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Ejected(Reason),
    /// A trial request was answered: back in rotation.
    Readmitted,
    /// An ejection was due but would have passed `maxEjectionPercent`.
    Spared(Reason),
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process's epoch, at least 1 (0 means "never" below).
pub(crate) fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One endpoint's score.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    consecutive: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected (0: not ejected).
    ejected_until: AtomicU64,
    reason: AtomicU8,
    /// Ejections in a row, for the doubling interval.
    ejections: AtomicU32,
    /// When the next trial request may go (consecutive-failure ejections only).
    next_trial: AtomicU64,
    window: Window,
}

impl EndpointHealth {
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Why the endpoint is ejected, if it is.
    pub fn ejected_for(&self) -> Option<Reason> {
        if !self.is_ejected() {
            return None;
        }
        Reason::from_u8(self.reason.load(Ordering::Relaxed))
    }

    /// Claims this ejected endpoint's trial request if one is due; at most one caller per
    /// `interval` gets true.
    pub fn claim_trial(&self, interval: Duration) -> bool {
        if self.ejected_for() != Some(Reason::ConsecutiveFailures) {
            return false;
        }
        let now = now_ms();
        let due = self.next_trial.load(Ordering::Relaxed);
        now >= due
            && self
                .next_trial
                .compare_exchange(
                    due,
                    now.saturating_add(ms(interval)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn eject(&self, reason: Reason, policy: &OutlierPolicy) -> Duration {
        // Each ejection in a row lasts longer: base x 2^(n-1), capped.
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let interval = policy
            .base_ejection
            .get()
            .saturating_mul(1 << n)
            .min(policy.max_ejection.get());
        let now = now_ms();
        self.reason.store(reason as u8, Ordering::Relaxed);
        self.next_trial.store(
            now.saturating_add(ms(policy.trial_interval.get())),
            Ordering::Relaxed,
        );
        self.ejected_until
            .store(now.saturating_add(ms(interval)), Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        interval
    }

    fn readmit(&self) {
        self.ejected_until.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
    }
}

/// Requests and failures of the current window and of the one before it.
#[derive(Debug, Default)]
struct Window {
    index: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    last_ok: AtomicU64,
    last_failed: AtomicU64,
}

impl Window {
    fn roll(&self, index: u64) {
        let seen = self.index.load(Ordering::Relaxed);
        if seen == index
            || self
                .index
                .compare_exchange(seen, index, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let ok = self.ok.swap(0, Ordering::Relaxed);
        let failed = self.failed.swap(0, Ordering::Relaxed);
        // A window with no requests in between leaves nothing to judge.
        let (ok, failed) = if index == seen + 1 {
            (ok, failed)
        } else {
            (0, 0)
        };
        self.last_ok.store(ok, Ordering::Relaxed);
        self.last_failed.store(failed, Ordering::Relaxed);
    }

    fn record(&self, index: u64, outcome: Outcome) {
        self.roll(index);
        match outcome {
            Outcome::Success => self.ok.fetch_add(1, Ordering::Relaxed),
            Outcome::Failure => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// `(requests, failures)` of the window before `index`.
    fn last(&self, index: u64) -> (u64, u64) {
        self.roll(index);
        let ok = self.last_ok.load(Ordering::Relaxed);
        let failed = self.last_failed.load(Ordering::Relaxed);
        (ok + failed, failed)
    }
}

/// A service's outlier state: its policy, whether it is in panic, which window was judged.
#[derive(Debug)]
pub struct Outlier {
    pub policy: OutlierPolicy,
    panic: AtomicBool,
    counted_at: AtomicU64,
    judged: AtomicU64,
    panic_gauge: Gauge,
}

impl Outlier {
    pub fn new(policy: OutlierPolicy, panic_gauge: Gauge) -> Self {
        Self {
            policy,
            panic: AtomicBool::new(false),
            counted_at: AtomicU64::new(0),
            judged: AtomicU64::new(0),
            panic_gauge,
        }
    }

    /// Below the panic threshold of healthy endpoints: balance over all of them.
    pub fn in_panic(&self, endpoints: &[Arc<Endpoint>]) -> bool {
        let now = now_ms();
        let at = self.counted_at.load(Ordering::Relaxed);
        if now.saturating_sub(at) >= RECOUNT
            && self
                .counted_at
                .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.recount(endpoints);
        }
        self.panic.load(Ordering::Relaxed)
    }

    fn recount(&self, endpoints: &[Arc<Endpoint>]) {
        let n = endpoints.len();
        let healthy = endpoints.iter().filter(|e| !e.health.is_ejected()).count();
        let panic = n > 0 && healthy * 100 < self.policy.panic_threshold as usize * n;
        if self.panic.swap(panic, Ordering::Relaxed) != panic {
            self.panic_gauge.set(i64::from(panic));
            if panic {
                tracing::warn!(
                    healthy,
                    endpoints = n,
                    "fewer healthy endpoints than the panic threshold: balancing over all of them"
                );
            } else {
                tracing::info!(healthy, endpoints = n, "out of panic");
            }
        }
    }

    /// Records `outcome` of a request to `endpoint` (one of `endpoints`); `on_event` hears of
    /// every ejection and readmission this causes, of this endpoint or (when a window is
    /// judged) of others.
    pub fn report(
        &self,
        endpoints: &[Arc<Endpoint>],
        endpoint: &Endpoint,
        outcome: Outcome,
        on_event: impl FnMut(SocketAddr, Event),
    ) {
        self.report_at(now_ms(), endpoints, endpoint, outcome, on_event);
    }

    /// `report` at `now` (milliseconds of the process clock), which places it in a window.
    fn report_at(
        &self,
        now: u64,
        endpoints: &[Arc<Endpoint>],
        endpoint: &Endpoint,
        outcome: Outcome,
        mut on_event: impl FnMut(SocketAddr, Event),
    ) {
        let health = &endpoint.health;
        let window = ms(self.policy.interval.get()).max(1);
        let index = now / window;
        let judging =
            self.policy.success_rate.is_some() || self.policy.failure_percentage.is_some();
        if judging {
            health.window.record(index, outcome);
        }
        match outcome {
            Outcome::Success => {
                health.consecutive.store(0, Ordering::Relaxed);
                match health.ejected_for() {
                    Some(Reason::ConsecutiveFailures) => {
                        health.readmit();
                        self.recount(endpoints);
                        on_event(endpoint.addr, Event::Readmitted);
                    }
                    // Past a consecutive-failure ejection: the next one starts from the base.
                    None if health.reason.load(Ordering::Relaxed)
                        == Reason::ConsecutiveFailures as u8
                        && health.ejected_until.load(Ordering::Relaxed) != 0 =>
                    {
                        health.readmit();
                    }
                    _ => {}
                }
            }
            Outcome::Failure => {
                let failures = health.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= self.policy.consecutive_failures && !health.is_ejected() {
                    let event = self.try_eject(endpoints, endpoint, Reason::ConsecutiveFailures);
                    on_event(endpoint.addr, event);
                }
            }
        }
        let judged = self.judged.load(Ordering::Relaxed);
        if judging
            && index > judged
            && self
                .judged
                .compare_exchange(judged, index, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && judged != 0
        {
            self.judge(endpoints, index, &mut on_event);
        }
    }

    /// Ejects unless that would pass `maxEjectionPercent`.
    fn try_eject(&self, endpoints: &[Arc<Endpoint>], endpoint: &Endpoint, reason: Reason) -> Event {
        let n = endpoints.len();
        let ejected = endpoints.iter().filter(|e| e.health.is_ejected()).count();
        if (ejected + 1) * 100 > self.policy.max_ejection_percent as usize * n {
            endpoint.health.consecutive.store(0, Ordering::Relaxed);
            tracing::info!(
                endpoint = %endpoint.addr,
                reason = reason.as_str(),
                ejected,
                endpoints = n,
                "endpoint not ejected: the service is at its maxEjectionPercent"
            );
            return Event::Spared(reason);
        }
        let length = endpoint.health.eject(reason, &self.policy);
        tracing::warn!(endpoint = %endpoint.addr, reason = reason.as_str(), ejected_for = ?length, "endpoint ejected");
        self.recount(endpoints);
        Event::Ejected(reason)
    }

    /// Judges the window before `index`: success rates against the others', and failure
    /// percentages against the threshold.
    fn judge(
        &self,
        endpoints: &[Arc<Endpoint>],
        index: u64,
        on_event: &mut impl FnMut(SocketAddr, Event),
    ) {
        let scores: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| e.health.window.last(index))
            .collect();
        if let Some(sr) = self.policy.success_rate {
            let judged: Vec<(usize, f64)> = scores
                .iter()
                .enumerate()
                .filter(|(i, (total, _))| {
                    *total >= u64::from(sr.request_volume) && !endpoints[*i].health.is_ejected()
                })
                .map(|(i, (total, failed))| (i, 1.0 - *failed as f64 / *total as f64))
                .collect();
            if judged.len() >= sr.minimum_hosts as usize {
                let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / judged.len() as f64;
                let variance = judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>()
                    / judged.len() as f64;
                let floor = mean - sr.stdev_factor * variance.sqrt();
                for &(i, rate) in &judged {
                    if rate < floor {
                        let event = self.try_eject(endpoints, &endpoints[i], Reason::SuccessRate);
                        on_event(endpoints[i].addr, event);
                    } else if endpoints[i].health.reason.load(Ordering::Relaxed)
                        == Reason::SuccessRate as u8
                    {
                        // Judged and fine: the next rate ejection starts from the base.
                        endpoints[i].health.ejections.store(0, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some(fp) = self.policy.failure_percentage {
            let judged: Vec<(usize, u64, u64)> = scores
                .iter()
                .enumerate()
                .filter(|(i, (total, _))| {
                    *total >= u64::from(fp.request_volume) && !endpoints[*i].health.is_ejected()
                })
                .map(|(i, (total, failed))| (i, *total, *failed))
                .collect();
            if judged.len() >= fp.minimum_hosts as usize {
                for &(i, total, failed) in &judged {
                    if failed * 100 >= u64::from(fp.threshold) * total {
                        let event =
                            self.try_eject(endpoints, &endpoints[i], Reason::FailurePercentage);
                        on_event(endpoints[i].addr, event);
                    }
                }
            }
        }
    }

    /// The panic flag as last counted, for `/config_dump`.
    pub fn panicking(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::endpoint::Registry;
    use sidemesh_config::{FailurePercentage, SuccessRate};

    fn d(d: Duration) -> sidemesh_config::units::Duration {
        sidemesh_config::units::Duration::new(d).expect("non-zero")
    }

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 1000,
            base_ejection: d(Duration::from_secs(60)),
            max_ejection: d(Duration::from_secs(300)),
            trial_interval: d(Duration::from_secs(1)),
            max_ejection_percent: 50,
            panic_threshold: 50,
            interval: d(Duration::from_secs(10)),
            success_rate: None,
            failure_percentage: None,
        }
    }

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        let registry = Registry::default();
        (1..=n)
            .map(|p| registry.get(SocketAddr::from(([10, 0, 0, 2], p)), None))
            .collect()
    }

    /// Reports `per_endpoint` requests to each endpoint, failing `fails[i]` of each 100, in
    /// window `index`, then one in the next window, which judges this one.
    fn one_window(
        outlier: &Outlier,
        eps: &[Arc<Endpoint>],
        index: u64,
        fails: &[u64],
        per_endpoint: u64,
    ) -> Vec<(SocketAddr, Event)> {
        let mut events = Vec::new();
        let window = ms(outlier.policy.interval.get());
        for n in 0..per_endpoint {
            for (ep, fail) in eps.iter().zip(fails) {
                let outcome = if (n * fail / 100) != ((n + 1) * fail / 100) {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                outlier.report_at(index * window, eps, ep, outcome, |a, e| events.push((a, e)));
            }
        }
        outlier.report_at(
            (index + 1) * window,
            eps,
            &eps[1],
            Outcome::Success,
            |a, e| events.push((a, e)),
        );
        events
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_interval_and_success_resets_it() {
        let eps = endpoints(2);
        let mut p = policy();
        p.consecutive_failures = 3;
        p.base_ejection = d(Duration::from_millis(40));
        p.max_ejection = d(Duration::from_secs(1));
        let outlier = Outlier::new(p, Gauge::default());
        let mut events = Vec::new();
        let fail = |events: &mut Vec<Event>| {
            outlier.report(&eps, &eps[0], Outcome::Failure, |_, e| events.push(e));
        };
        fail(&mut events);
        fail(&mut events);
        assert!(events.is_empty());
        fail(&mut events);
        assert_eq!(events, [Event::Ejected(Reason::ConsecutiveFailures)]);
        assert!(eps[0].health.is_ejected());
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !eps[0].health.is_ejected(),
            "readmitted after the base interval"
        );
        for _ in 0..3 {
            fail(&mut events);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            eps[0].health.is_ejected(),
            "the second ejection in a row lasts twice as long"
        );
        std::thread::sleep(Duration::from_millis(40));
        outlier.report(&eps, &eps[0], Outcome::Success, |_, _| {});
        assert_eq!(
            eps[0].health.ejections.load(Ordering::Relaxed),
            0,
            "a success after the ejection resets the backoff"
        );
    }

    #[test]
    fn success_rate_ejects_the_endpoint_failing_30_percent_among_ones_failing_1() {
        let eps = endpoints(6);
        let mut p = policy();
        p.success_rate = Some(SuccessRate {
            minimum_hosts: 5,
            request_volume: 50,
            stdev_factor: 1.9,
        });
        let outlier = Outlier::new(p, Gauge::default());
        let events = one_window(&outlier, &eps, 1, &[30, 1, 1, 1, 1, 1], 100);
        assert_eq!(events, [(eps[0].addr, Event::Ejected(Reason::SuccessRate))]);
        assert_eq!(eps[0].health.ejected_for(), Some(Reason::SuccessRate));
        assert!(
            !eps[0].health.claim_trial(Duration::ZERO),
            "a rate ejection runs its length: no trials"
        );
    }

    #[test]
    fn too_few_requests_or_hosts_judge_nobody() {
        let eps = endpoints(6);
        let mut p = policy();
        p.success_rate = Some(SuccessRate {
            minimum_hosts: 5,
            request_volume: 500,
            stdev_factor: 1.9,
        });
        let outlier = Outlier::new(p, Gauge::default());
        let events = one_window(&outlier, &eps, 1, &[90, 1, 1, 1, 1, 1], 100);
        assert!(events.is_empty(), "under the request volume: {events:?}");
    }

    #[test]
    fn failure_percentage_ejects_past_the_threshold_within_max_ejection_percent() {
        let eps = endpoints(4);
        let mut p = policy();
        p.failure_percentage = Some(FailurePercentage {
            threshold: 50,
            minimum_hosts: 4,
            request_volume: 20,
        });
        let outlier = Outlier::new(p, Gauge::default());
        let events = one_window(&outlier, &eps, 1, &[80, 80, 80, 0], 40);
        assert_eq!(
            events,
            [
                (eps[0].addr, Event::Ejected(Reason::FailurePercentage)),
                (eps[1].addr, Event::Ejected(Reason::FailurePercentage)),
                (eps[2].addr, Event::Spared(Reason::FailurePercentage)),
            ],
            "50% of 4 endpoints at most"
        );
    }
}
