//! Control-plane metrics, served at the admin port's `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connected: Gauge,
    pub pushes: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub config_errors: Counter,
    pub certificates_issued: Counter,
    pub certificates_refused: Counter,
    pub config_version: Gauge<u64, AtomicU64>,
    convergence: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidemesh_cp");
        let connected = Gauge::default();
        registry.register(
            "connected_proxies",
            "Proxies with an open stream",
            connected.clone(),
        );
        let pushes = Counter::default();
        registry.register("pushes", "Snapshots sent to proxies", pushes.clone());
        let acks = Counter::default();
        registry.register("acks", "Snapshots proxies applied", acks.clone());
        let nacks = Counter::default();
        registry.register("nacks", "Snapshots proxies refused", nacks.clone());
        let certificates_issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            certificates_issued.clone(),
        );
        let certificates_refused = Counter::default();
        registry.register(
            "certificates_refused",
            "Certificate requests refused (bad credential or request)",
            certificates_refused.clone(),
        );
        let config_errors = Counter::default();
        registry.register(
            "config_errors",
            "Config changes refused by validation",
            config_errors.clone(),
        );
        let config_version = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "config_version",
            "Version of the config in force",
            config_version.clone(),
        );
        let convergence = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "convergence_seconds",
            "From a config file change to every affected proxy's answer",
            convergence.clone(),
        );
        Self {
            registry,
            connected,
            pushes,
            acks,
            nacks,
            config_errors,
            certificates_issued,
            certificates_refused,
            config_version,
            convergence,
        }
    }

    pub fn converged(&self, took: Duration) {
        self.convergence.observe(took.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
