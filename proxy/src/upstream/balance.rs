//! Picking an endpoint of a service: power of two random choices over latency (peak EWMA,
//! the default) or over the fewest requests in flight, round robin, random, smooth weighted round
//! robin, or a consistent-hash ring on a header. Ejected endpoints are skipped, except for the trial requests that let
//! them back (`outlier.rs`) and while the service is in panic (too few healthy endpoints:
//! every endpoint takes traffic). Only when every endpoint is ejected and panic is off
//! (`panicThreshold: 0`) does a request fail, with a 503 that says so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use sidemesh_config::LoadBalancer;

use crate::upstream::breaker::Breaker;
use crate::upstream::endpoint::Endpoint;
use crate::upstream::outlier::{Event, Outcome, Outlier, OutlierPolicy, Reason};

/// Virtual nodes per endpoint on the hash ring: enough for an even spread, few enough to
/// rebuild cheaply on every config change.
const VNODES: usize = 160;

/// Longest weighted round-robin schedule; larger weight sums are scaled down to it.
const MAX_SCHEDULE: u64 = 1 << 16;

#[derive(Debug)]
pub struct Balancer {
    pub service: String,
    pub policy: LoadBalancer,
    pub outlier: Outlier,
    /// The service's circuit-breaker thresholds, when it has them.
    pub breaker: Option<Arc<Breaker>>,
    endpoints: Vec<Arc<Endpoint>>,
    weights: Vec<u32>,
    next: AtomicUsize,
    /// Sorted `(hash, endpoint index)`; only for consistent hashing.
    ring: Vec<(u64, usize)>,
    /// Endpoint indexes in smooth weighted round-robin order; only for that policy.
    schedule: Vec<u32>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
    AllEjected,
}

/// Whether an endpoint may take this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Yes,
    /// Ejected, and this request is its trial.
    Trial,
    No,
}

/// What `/config_dump` shows of a service's balancer.
#[derive(Debug, Serialize)]
pub struct BalancerState {
    pub service: String,
    pub policy: LoadBalancer,
    /// Fewer healthy endpoints than `panicThreshold`: every endpoint takes traffic.
    pub panic: bool,
    pub healthy: usize,
    pub endpoints: Vec<BalancedEndpoint>,
    /// The circuit breaker's thresholds and counts now, when the service has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<BreakerState>,
}

#[derive(Debug, Serialize)]
pub struct BreakerState {
    pub limits: sidemesh_config::CircuitBreaker,
    pub requests: usize,
    pub pending: usize,
}

#[derive(Debug, Serialize)]
pub struct BalancedEndpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for: Option<Reason>,
}

impl Balancer {
    /// `weights[i]` is `endpoints[i]`'s (missing ones are 1); `panic_gauge` shows the
    /// service's panic state.
    pub fn new(
        service: String,
        policy: LoadBalancer,
        outlier: OutlierPolicy,
        endpoints: Vec<Arc<Endpoint>>,
        weights: Vec<u32>,
        panic_gauge: Gauge,
    ) -> Self {
        let weights: Vec<u32> = (0..endpoints.len())
            .map(|i| weights.get(i).copied().unwrap_or(1).max(1))
            .collect();
        let ring = match policy {
            LoadBalancer::ConsistentHash { .. } => build_ring(&endpoints),
            _ => Vec::new(),
        };
        let schedule = match policy {
            LoadBalancer::WeightedRoundRobin => build_schedule(&weights),
            _ => Vec::new(),
        };
        Self {
            service,
            policy,
            outlier: Outlier::new(outlier, panic_gauge),
            breaker: None,
            endpoints,
            weights,
            next: AtomicUsize::new(0),
            ring,
            schedule,
        }
    }

    /// With the service's circuit breaker (kept across config changes by the caller).
    pub fn with_breaker(mut self, breaker: Option<Arc<Breaker>>) -> Self {
        self.breaker = breaker;
        self
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The header consistent hashing reads, if that is the policy.
    pub fn hash_header(&self) -> Option<&str> {
        match &self.policy {
            LoadBalancer::ConsistentHash { header } => Some(header),
            _ => None,
        }
    }

    /// Picks an endpoint; `key` is the hash header's value for consistent hashing.
    pub fn pick(&self, key: Option<&[u8]>) -> Result<&Arc<Endpoint>, PickError> {
        self.pick_avoiding(key, None)
    }

    /// Picks an endpoint other than `avoid` (the one a retried request just failed on) when
    /// another healthy one exists: a retry that goes back to a refusing or stalled endpoint
    /// is a retry wasted, and least-request would often choose it (a refused connection is
    /// quick, so it has few requests in flight).
    pub fn pick_avoiding(
        &self,
        key: Option<&[u8]>,
        avoid: Option<SocketAddr>,
    ) -> Result<&Arc<Endpoint>, PickError> {
        if self.endpoints.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let panic = self.outlier.in_panic(&self.endpoints);
        let picked = match (&self.policy, key) {
            (LoadBalancer::ConsistentHash { .. }, Some(key)) => self.pick_ring(hash(key), panic),
            (LoadBalancer::RoundRobin, _) => self.pick_round_robin(panic),
            (LoadBalancer::Random, _) => self.scan(fastrand::usize(..self.endpoints.len()), panic),
            (LoadBalancer::WeightedRoundRobin, _) => self.pick_weighted(panic),
            (LoadBalancer::PeakEwma, _) => self.pick_two(panic, |e| {
                e.latency.estimate() * (e.in_flight() as f64 + 1.0)
            }),
            _ => self.pick_p2c(panic),
        };
        let picked = match (picked, avoid) {
            (Some(i), Some(avoid)) if self.endpoints[i].addr == avoid => {
                let n = self.endpoints.len();
                let start = fastrand::usize(..n);
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&j| {
                        self.endpoints[j].addr != avoid && self.admit(j, panic) == Admit::Yes
                    })
                    .or(Some(i))
            }
            (picked, _) => picked,
        };
        picked
            .map(|i| &self.endpoints[i])
            .ok_or(PickError::AllEjected)
    }

    /// Records a request's outcome against `endpoint`; `on_event` hears what it changed.
    pub fn report(
        &self,
        endpoint: &Endpoint,
        outcome: Outcome,
        on_event: impl FnMut(SocketAddr, Event),
    ) {
        self.outlier
            .report(&self.endpoints, endpoint, outcome, on_event);
    }

    pub fn state(&self) -> BalancerState {
        let endpoints: Vec<BalancedEndpoint> = self
            .endpoints
            .iter()
            .zip(&self.weights)
            .map(|(e, w)| BalancedEndpoint {
                addr: e.addr,
                weight: *w,
                ejected_for: e.health.ejected_for(),
            })
            .collect();
        BalancerState {
            service: self.service.clone(),
            policy: self.policy.clone(),
            panic: self.outlier.in_panic(&self.endpoints),
            healthy: endpoints.iter().filter(|e| e.ejected_for.is_none()).count(),
            circuit_breaker: self.breaker.as_ref().map(|b| BreakerState {
                limits: b.limits,
                requests: b.requests(),
                pending: b.pending(),
            }),
            endpoints,
        }
    }

    fn admit(&self, i: usize, panic: bool) -> Admit {
        let health = &self.endpoints[i].health;
        if panic || !health.is_ejected() {
            Admit::Yes
        } else if health.claim_trial(self.outlier.policy.trial_interval.get()) {
            Admit::Trial
        } else {
            Admit::No
        }
    }

    /// The first endpoint from `start` on that may take the request.
    fn scan(&self, start: usize, panic: bool) -> Option<usize> {
        let n = self.endpoints.len();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.admit(i, panic) != Admit::No)
    }

    fn pick_round_robin(&self, panic: bool) -> Option<usize> {
        self.scan(self.next.fetch_add(1, Ordering::Relaxed), panic)
    }

    fn pick_weighted(&self, panic: bool) -> Option<usize> {
        let len = self.schedule.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|i| self.schedule[(start + i) % len] as usize)
            .find(|&i| self.admit(i, panic) != Admit::No)
    }

    fn pick_p2c(&self, panic: bool) -> Option<usize> {
        self.pick_two(panic, |e| e.in_flight() as f64)
    }

    /// Power of two random choices: of two endpoints drawn at random, the one of lower
    /// `load`.
    fn pick_two(&self, panic: bool, load: impl Fn(&Endpoint) -> f64) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 1 {
            return (self.admit(0, panic) != Admit::No).then_some(0);
        }
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        match (self.admit(a, panic), self.admit(b, panic)) {
            (Admit::Yes, Admit::Yes) => {
                Some(if load(&self.endpoints[b]) < load(&self.endpoints[a]) {
                    b
                } else {
                    a
                })
            }
            // A due trial goes first: it is how an ejected endpoint comes back.
            (Admit::Trial, _) => Some(a),
            (_, Admit::Trial) => Some(b),
            (Admit::Yes, Admit::No) => Some(a),
            (Admit::No, Admit::Yes) => Some(b),
            // Both unlucky draws are ejected: fall back to any healthy endpoint.
            (Admit::No, Admit::No) => self.scan(a, panic),
        }
    }

    fn pick_ring(&self, h: u64, panic: bool) -> Option<usize> {
        let start = self.ring.partition_point(|(point, _)| *point < h);
        let len = self.ring.len();
        (0..len)
            .map(|i| self.ring[(start + i) % len].1)
            .find(|&i| self.admit(i, panic) != Admit::No)
    }
}

/// Smooth weighted round robin, laid out once: at each turn every endpoint gains its weight
/// and the one with the most goes, paying the total; heavy endpoints' turns are spread out.
fn build_schedule(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let weights: Vec<i64> = if total > MAX_SCHEDULE {
        weights
            .iter()
            .map(|w| (u64::from(*w) * MAX_SCHEDULE / total).max(1) as i64)
            .collect()
    } else {
        weights.iter().map(|w| i64::from(*w)).collect()
    };
    let gcd = weights.iter().fold(0, |g, w| gcd(g, *w)).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| w / gcd).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("a weighted balancer has endpoints");
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn build_ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let mut ring = Vec::with_capacity(endpoints.len() * VNODES);
    for (i, ep) in endpoints.iter().enumerate() {
        for v in 0..VNODES {
            ring.push((hash(format!("{}#{v}", ep.addr).as_bytes()), i));
        }
    }
    ring.sort_unstable();
    ring
}

/// FNV-1a with a final avalanche: stable across processes and releases, unlike `DefaultHasher`.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::upstream::endpoint::Registry;

    fn d(d: Duration) -> sidemesh_config::units::Duration {
        sidemesh_config::units::Duration::new(d).expect("non-zero")
    }

    /// One failure ejects for a minute; no trials within a test; nothing spared.
    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 1,
            base_ejection: d(Duration::from_secs(60)),
            max_ejection: d(Duration::from_secs(60)),
            trial_interval: d(Duration::from_secs(60)),
            max_ejection_percent: 100,
            panic_threshold: 0,
            interval: d(Duration::from_secs(10)),
            success_rate: None,
            failure_percentage: None,
        }
    }

    fn endpoints(registry: &Registry, n: u16) -> Vec<Arc<Endpoint>> {
        (1..=n)
            .map(|p| registry.get(SocketAddr::from(([10, 0, 0, 1], p)), None))
            .collect()
    }

    fn balancer(lb: LoadBalancer, policy: OutlierPolicy, eps: Vec<Arc<Endpoint>>) -> Balancer {
        Balancer::new("s".into(), lb, policy, eps, Vec::new(), Gauge::default())
    }

    fn ring_of(eps: Vec<Arc<Endpoint>>) -> Balancer {
        let lb = LoadBalancer::ConsistentHash {
            header: "x-user".into(),
        };
        balancer(lb, policy(), eps)
    }

    fn fail(b: &Balancer, ep: &Endpoint) -> Vec<Event> {
        let mut events = Vec::new();
        b.report(ep, Outcome::Failure, |_, e| events.push(e));
        events
    }

    #[test]
    fn a_retry_avoids_the_endpoint_it_failed_on_while_another_is_healthy() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 2);
        for lb in [
            LoadBalancer::LeastRequest,
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
        ] {
            let b = balancer(lb, policy(), eps.clone());
            for _ in 0..200 {
                let picked = b.pick_avoiding(None, Some(eps[0].addr)).expect("pick");
                assert_eq!(picked.addr, eps[1].addr);
            }
        }
        let one = balancer(
            LoadBalancer::LeastRequest,
            policy(),
            endpoints(&registry, 1),
        );
        let only = one.endpoints()[0].addr;
        assert_eq!(
            one.pick_avoiding(None, Some(only)).expect("pick").addr,
            only,
            "with no other endpoint the same one is tried again"
        );
    }

    #[test]
    fn peak_ewma_steers_away_from_a_slow_endpoint_and_its_peak_decays() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 3);
        for (i, ep) in eps.iter().enumerate() {
            let ms = if i == 2 { 50 } else { 2 };
            ep.latency.observe(std::time::Duration::from_millis(ms));
        }
        let b = balancer(LoadBalancer::PeakEwma, policy(), eps.clone());
        let slow = (0..3000)
            .filter(|_| b.pick(None).expect("pick").addr == eps[2].addr)
            .count();
        // The slow one wins only when both draws are it: never, as they are distinct.
        assert_eq!(
            slow, 0,
            "the 50 ms endpoint is never preferred to a 2 ms one"
        );

        // A fast answer after a slow one lowers the estimate gradually, a slow one at once.
        let e = &eps[0].latency;
        e.observe(std::time::Duration::from_millis(100));
        assert!((e.estimate() / 1e6 - 100.0).abs() < 1.0, "{}", e.estimate());
        e.observe(std::time::Duration::from_millis(1));
        assert!(
            e.estimate() / 1e6 > 90.0,
            "no sudden drop: {}",
            e.estimate()
        );
    }

    #[test]
    fn consistent_hashing_is_stable_and_moves_about_one_nth_of_keys() {
        let registry = Registry::default();
        let four = ring_of(endpoints(&registry, 4));
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let placed: Vec<SocketAddr> = keys
            .iter()
            .map(|k| four.pick(Some(k.as_bytes())).expect("pick").addr)
            .collect();
        for (k, addr) in keys.iter().zip(&placed).take(100) {
            assert_eq!(
                four.pick(Some(k.as_bytes())).expect("pick").addr,
                *addr,
                "same key, same endpoint"
            );
        }
        let mut load: HashMap<SocketAddr, usize> = HashMap::new();
        for addr in &placed {
            *load.entry(*addr).or_default() += 1;
        }
        for (addr, n) in &load {
            assert!(
                (1_800..=3_200).contains(n),
                "{addr} has {n} of 10000 keys: uneven ring"
            );
        }
        let five = ring_of(endpoints(&registry, 5));
        let moved = keys
            .iter()
            .zip(&placed)
            .filter(|(k, before)| five.pick(Some(k.as_bytes())).expect("pick").addr != **before)
            .count();
        // Ideal: 1/5 of keys move (to the new endpoint only).
        let share = moved as f64 / keys.len() as f64;
        assert!(
            (0.15..=0.25).contains(&share),
            "{share} of keys moved when adding a fifth endpoint"
        );
        let new = SocketAddr::from(([10, 0, 0, 1], 5));
        assert!(
            keys.iter().zip(&placed).all(|(k, before)| {
                let now = five.pick(Some(k.as_bytes())).expect("pick").addr;
                now == *before || now == new
            }),
            "keys only move to the new endpoint"
        );
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_all_ejected_is_an_error_without_panic() {
        for lb in [
            LoadBalancer::LeastRequest,
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::WeightedRoundRobin,
        ] {
            let registry = Registry::default();
            let eps = endpoints(&registry, 3);
            let b = balancer(lb.clone(), policy(), eps.clone());
            assert_eq!(
                fail(&b, &eps[0]),
                [Event::Ejected(Reason::ConsecutiveFailures)]
            );
            for _ in 0..100 {
                assert_ne!(b.pick(None).expect("pick").addr, eps[0].addr, "{lb:?}");
            }
            fail(&b, &eps[1]);
            fail(&b, &eps[2]);
            assert_eq!(b.pick(None).err(), Some(PickError::AllEjected), "{lb:?}");
        }
        let empty = balancer(LoadBalancer::RoundRobin, policy(), Vec::new());
        assert_eq!(empty.pick(None).err(), Some(PickError::NoEndpoints));
    }

    #[test]
    fn max_ejection_percent_spares_the_rest_and_the_default_keeps_one_of_two() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 2);
        let mut p = policy();
        p.max_ejection_percent = 50;
        let b = balancer(LoadBalancer::RoundRobin, p, eps.clone());
        assert_eq!(
            fail(&b, &eps[0]),
            [Event::Ejected(Reason::ConsecutiveFailures)]
        );
        assert_eq!(
            fail(&b, &eps[1]),
            [Event::Spared(Reason::ConsecutiveFailures)]
        );
        for _ in 0..10 {
            assert_eq!(b.pick(None).expect("pick").addr, eps[1].addr);
        }
        let one = endpoints(&Registry::default(), 1);
        let b = balancer(LoadBalancer::LeastRequest, p, one.clone());
        for _ in 0..10 {
            assert_eq!(
                fail(&b, &one[0]),
                [Event::Spared(Reason::ConsecutiveFailures)]
            );
            assert!(b.pick(None).is_ok(), "the only endpoint is never ejected");
        }
    }

    #[test]
    fn below_the_panic_threshold_every_endpoint_takes_traffic() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 10);
        let mut p = policy();
        p.max_ejection_percent = 60;
        p.panic_threshold = 50;
        let b = balancer(LoadBalancer::RoundRobin, p, eps.clone());
        let ejected = eps
            .iter()
            .filter(|e| fail(&b, e) == [Event::Ejected(Reason::ConsecutiveFailures)])
            .count();
        assert_eq!(ejected, 6, "60% of 10");
        let state = b.state();
        assert!(state.panic, "4 of 10 healthy is below 50%");
        assert_eq!(state.healthy, 4);
        let picked: std::collections::HashSet<SocketAddr> =
            (0..20).map(|_| b.pick(None).expect("pick").addr).collect();
        assert_eq!(picked.len(), 10, "in panic every endpoint is used");
    }

    #[test]
    fn an_ejected_endpoint_gets_one_trial_per_interval_and_an_answer_readmits_it() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 2);
        let mut p = policy();
        p.trial_interval = d(Duration::from_millis(30));
        let b = balancer(LoadBalancer::LeastRequest, p, eps.clone());
        fail(&b, &eps[0]);
        let to_ejected = |n| {
            (0..n)
                .filter(|_| b.pick(None).expect("pick").addr == eps[0].addr)
                .count()
        };
        assert_eq!(to_ejected(100), 0, "no trial before its interval");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(to_ejected(100), 1, "one trial once the interval is over");
        let mut events = Vec::new();
        b.report(&eps[0], Outcome::Success, |_, e| events.push(e));
        assert_eq!(events, [Event::Readmitted]);
        assert!(to_ejected(100) > 20, "readmitted: takes its share again");
    }

    #[test]
    fn least_request_prefers_the_less_busy_endpoint() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 2);
        let b = balancer(LoadBalancer::LeastRequest, policy(), eps.clone());
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        for _ in 0..100 {
            assert_eq!(b.pick(None).expect("pick").addr, eps[1].addr);
        }
    }

    #[test]
    fn round_robin_takes_turns() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 3);
        let b = balancer(LoadBalancer::RoundRobin, policy(), eps);
        let picks: Vec<u16> = (0..6)
            .map(|_| b.pick(None).expect("pick").addr.port())
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn weighted_round_robin_spreads_heavy_turns() {
        assert_eq!(build_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(build_schedule(&[2, 2]), [0, 1], "reduced by the gcd");
        let big = build_schedule(&[10_000; 10]);
        assert_eq!(big.len(), 10);
        let scaled = build_schedule(&[10_000, 10_000, 1]);
        assert!(scaled.len() as u64 <= MAX_SCHEDULE + 3);
    }
}
