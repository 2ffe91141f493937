//! Picking an endpoint of a service: power of two random choices over the fewest requests in
//! flight (default), round robin, or a consistent-hash ring on a header. Ejected endpoints
//! are skipped; when every endpoint is ejected the request fails with a 503 that says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sidemesh_config::LoadBalancer;

use crate::upstream::endpoint::{Endpoint, OutlierPolicy};

/// Virtual nodes per endpoint on the hash ring: enough for an even spread, few enough to
/// rebuild cheaply on every config change.
const VNODES: usize = 160;

#[derive(Debug)]
pub struct Balancer {
    pub service: String,
    pub policy: LoadBalancer,
    pub outlier: OutlierPolicy,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    /// Sorted `(hash, endpoint index)`; only for consistent hashing.
    ring: Vec<(u64, usize)>,
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
    AllEjected,
}

impl Balancer {
    pub fn new(
        service: String,
        policy: LoadBalancer,
        outlier: OutlierPolicy,
        endpoints: Vec<Arc<Endpoint>>,
    ) -> Self {
        let ring = match policy {
            LoadBalancer::ConsistentHash { .. } => build_ring(&endpoints),
            _ => Vec::new(),
        };
        Self {
            service,
            policy,
            outlier,
            endpoints,
            next: AtomicUsize::new(0),
            ring,
        }
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
        let n = self.endpoints.len();
        if n == 0 {
            return Err(PickError::NoEndpoints);
        }
        let picked = match (&self.policy, key) {
            (LoadBalancer::ConsistentHash { .. }, Some(key)) => self.pick_ring(hash(key)),
            (LoadBalancer::RoundRobin, _) => self.pick_round_robin(),
            _ => self.pick_p2c(),
        };
        picked
            .map(|i| &self.endpoints[i])
            .ok_or(PickError::AllEjected)
    }

    fn pick_round_robin(&self) -> Option<usize> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| !self.endpoints[i].is_ejected())
    }

    fn pick_p2c(&self) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 1 {
            return (!self.endpoints[0].is_ejected()).then_some(0);
        }
        let a = fastrand::usize(..n);
        let b = (a + 1 + fastrand::usize(..n - 1)) % n;
        let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
        match (ea.is_ejected(), eb.is_ejected()) {
            (false, false) => Some(if eb.in_flight() < ea.in_flight() {
                b
            } else {
                a
            }),
            (false, true) => Some(a),
            (true, false) => Some(b),
            // Both unlucky draws are ejected: fall back to any healthy endpoint.
            (true, true) => self.pick_round_robin(),
        }
    }

    fn pick_ring(&self, h: u64) -> Option<usize> {
        let start = self.ring.partition_point(|(point, _)| *point < h);
        let len = self.ring.len();
        (0..len)
            .map(|i| self.ring[(start + i) % len].1)
            .find(|&i| !self.endpoints[i].is_ejected())
    }
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
    use crate::upstream::endpoint::{Outcome, Registry};

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
        }
    }

    fn endpoints(registry: &Registry, n: u16) -> Vec<Arc<Endpoint>> {
        (1..=n)
            .map(|p| registry.get(SocketAddr::from(([10, 0, 0, 1], p)), None))
            .collect()
    }

    fn ring_of(eps: Vec<Arc<Endpoint>>) -> Balancer {
        Balancer::new(
            "s".into(),
            LoadBalancer::ConsistentHash {
                header: "x-user".into(),
            },
            policy(),
            eps,
        )
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
    fn ejected_endpoints_are_skipped_and_all_ejected_is_an_error() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 3);
        for lb in [LoadBalancer::LeastRequest, LoadBalancer::RoundRobin] {
            let b = Balancer::new("s".into(), lb.clone(), policy(), eps.clone());
            eps[0].report(Outcome::Failure, &policy());
            for _ in 0..100 {
                assert_ne!(b.pick(None).expect("pick").addr, eps[0].addr, "{lb:?}");
            }
        }
        eps[1].report(Outcome::Failure, &policy());
        eps[2].report(Outcome::Failure, &policy());
        let b = Balancer::new("s".into(), LoadBalancer::LeastRequest, policy(), eps);
        assert_eq!(b.pick(None).err(), Some(PickError::AllEjected));
        let empty = Balancer::new("s".into(), LoadBalancer::RoundRobin, policy(), Vec::new());
        assert_eq!(empty.pick(None).err(), Some(PickError::NoEndpoints));
    }

    #[test]
    fn least_request_prefers_the_less_busy_endpoint() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 2);
        let b = Balancer::new(
            "s".into(),
            LoadBalancer::LeastRequest,
            policy(),
            eps.clone(),
        );
        let _busy: Vec<_> = (0..5).map(|_| eps[0].start()).collect();
        for _ in 0..100 {
            assert_eq!(b.pick(None).expect("pick").addr, eps[1].addr);
        }
    }

    #[test]
    fn round_robin_takes_turns() {
        let registry = Registry::default();
        let eps = endpoints(&registry, 3);
        let b = Balancer::new("s".into(), LoadBalancer::RoundRobin, policy(), eps);
        let picks: Vec<u16> = (0..6)
            .map(|_| b.pick(None).expect("pick").addr.port())
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
    }
}
