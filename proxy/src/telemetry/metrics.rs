//! Prometheus metrics, served at the admin port's `/metrics`.
//!
//! Per-route handles (`RouteMetrics`) are looked up once when a config version is compiled,
//! so recording a request is a few atomic adds: no label hashing on the hot path.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets, in seconds: 0.1 ms to about 13 s, doubling, so a proxy hop's tenths of a
/// millisecond are still told apart.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 18,
    ))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    direction: &'static str,
    service: String,
    route: String,
    status_class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLatencyLabels {
    direction: &'static str,
    service: String,
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    direction: &'static str,
    protocol: &'static str,
    /// `mtls` (between proxies) or `plaintext`.
    tls: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EjectionLabels {
    service: String,
    endpoint: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceReasonLabels {
    service: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceThresholdLabels {
    service: String,
    threshold: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Which way a request goes through this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the local application to another service.
    Outbound,
    /// From another service to the local application.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// All metrics of one proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    latency: HistogramFamily<RouteLatencyLabels>,
    open_connections: Family<DirectionLabels, Gauge>,
    connections: Family<ProtocolLabels, Counter>,
    refused_connections: Family<ReasonLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    readmissions: Family<EndpointLabels, Counter>,
    spared: Family<ServiceReasonLabels, Counter>,
    panic: Family<ServiceLabels, Gauge>,
    overflow: Family<ServiceThresholdLabels, Counter>,
    shed: Family<RouteLatencyLabels, Counter>,
    concurrency_limit: Family<RouteLatencyLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    config_version: Gauge<u64, AtomicU64>,
    rate_limited: Family<RouteLatencyLabels, Counter>,
    retries: Family<RouteLatencyLabels, Counter>,
    retry_budget_exhausted: Family<RouteLatencyLabels, Counter>,
    identity_expiry: Gauge<u64, AtomicU64>,
    identity_renewals: Family<ResultLabels, Counter>,
    inbound_clients: Family<ClientLabels, Counter>,
    denied: Counter,
    grpc_errors: Family<RouteLatencyLabels, Counter>,
    pub spans: crate::telemetry::trace::Counters,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientLabels {
    /// The caller's SPIFFE ID, or `unauthenticated` (plaintext, permissive mode).
    client_id: String,
}

/// Handles for one route in both directions, created on first use and then cached, so
/// `/metrics` lists only series that happened and recording stays a few atomic adds.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    outbound: Arc<DirectionMetrics>,
    inbound: Arc<DirectionMetrics>,
}

#[derive(Debug)]
struct DirectionMetrics {
    direction: Direction,
    service: String,
    route: String,
    requests: Family<RouteLabels, Counter>,
    latency_family: HistogramFamily<RouteLatencyLabels>,
    grpc_errors_family: Family<RouteLatencyLabels, Counter>,
    /// Indexed by status class: 1xx .. 5xx.
    by_class: [OnceLock<Counter>; 5],
    latency: OnceLock<Histogram>,
    grpc_errors: OnceLock<Counter>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sidemesh");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by direction, service, route and status class",
            requests.clone(),
        );
        let latency: HistogramFamily<RouteLatencyLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by direction, service and route",
            latency.clone(),
        );
        let open_connections = Family::<DirectionLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let connections = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "connections",
            "Client connections accepted, by detected protocol",
            connections.clone(),
        );
        let refused_connections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Client connections closed before a request: over the limit, malformed, too slow",
            refused_connections.clone(),
        );
        let ejections = Family::<EjectionLabels, Counter>::default();
        registry.register(
            "endpoint_ejections",
            "Endpoints ejected by outlier detection, by reason",
            ejections.clone(),
        );
        let readmissions = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "endpoint_readmissions",
            "Ejected endpoints back in rotation after answering a trial request",
            readmissions.clone(),
        );
        let spared = Family::<ServiceReasonLabels, Counter>::default();
        registry.register(
            "ejections_spared",
            "Ejections not made because the service was at its maxEjectionPercent",
            spared.clone(),
        );
        let panic = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "balancer_panic",
            "1 while fewer of a service's endpoints are healthy than its panicThreshold: every endpoint takes traffic",
            panic.clone(),
        );
        let overflow = Family::<ServiceThresholdLabels, Counter>::default();
        registry.register(
            "circuit_breaker_overflow",
            "Requests refused with 503 (`overflow`) at a backend's circuit-breaker threshold",
            overflow.clone(),
        );
        let shed = Family::<RouteLatencyLabels, Counter>::default();
        registry.register(
            "adaptive_concurrency_shed",
            "Requests refused with 503 (`overloaded`) beyond an adaptive concurrency limit",
            shed.clone(),
        );
        let concurrency_limit = Family::<RouteLatencyLabels, Gauge>::default();
        registry.register(
            "adaptive_concurrency_limit",
            "The adaptive concurrency limit in force (requests in flight)",
            concurrency_limit.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Routing config reloads, applied or refused",
            reloads.clone(),
        );
        let config_version = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "config_version",
            "Version of the routing config in force",
            config_version.clone(),
        );
        let rate_limited = Family::<RouteLatencyLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429 by a rate limit",
            rate_limited.clone(),
        );
        let retries = Family::<RouteLatencyLabels, Counter>::default();
        registry.register(
            "retries",
            "Attempts sent again after a retriable failure",
            retries.clone(),
        );
        let retry_budget_exhausted = Family::<RouteLatencyLabels, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Retriable failures returned as they were because the retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let identity_expiry = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "When the workload certificate in force expires (Unix time)",
            identity_expiry.clone(),
        );
        let identity_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "identity_renewals",
            "Workload certificate renewals, by result (`renewed` or `failed`)",
            identity_renewals.clone(),
        );
        let inbound_clients = Family::<ClientLabels, Counter>::default();
        registry.register(
            "inbound_requests_by_client",
            "Inbound requests by the caller's identity",
            inbound_clients.clone(),
        );
        let denied = Counter::default();
        registry.register(
            "denied_requests",
            "Inbound requests refused with 403 by the service's authorization policy",
            denied.clone(),
        );
        let grpc_errors = Family::<RouteLatencyLabels, Counter>::default();
        registry.register(
            "grpc_errors",
            "gRPC calls that failed on the server's side (UNKNOWN, DEADLINE_EXCEEDED, \
             UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS: the codes that map to HTTP 5xx) \
             with the status in the response headers, as in every trailers-only error answer; \
             counted in requests by their HTTP status, usually 200",
            grpc_errors.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "spans_exported",
            "Spans accepted by the OTLP collector",
            spans_exported.clone(),
        );
        let spans_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "spans_dropped",
            "Spans dropped: `queue-full` (the collector is slower than traffic) or `export-failed` (the collector is down or refused them)",
            spans_dropped.clone(),
        );
        // One guard at a time: `get_or_create` holds the family's lock until the statement ends.
        let dropped_queue_full = spans_dropped
            .get_or_create(&ReasonLabels {
                reason: "queue-full",
            })
            .clone();
        let dropped_export_failed = spans_dropped
            .get_or_create(&ReasonLabels {
                reason: "export-failed",
            })
            .clone();
        let spans = crate::telemetry::trace::Counters {
            exported: spans_exported,
            dropped_queue_full,
            dropped_export_failed,
        };
        Self {
            registry,
            spans,
            identity_expiry,
            identity_renewals,
            inbound_clients,
            denied,
            grpc_errors,
            requests,
            latency,
            open_connections,
            connections,
            refused_connections,
            ejections,
            readmissions,
            spared,
            panic,
            overflow,
            shed,
            concurrency_limit,
            reloads,
            config_version,
            rate_limited,
            retries,
            retry_budget_exhausted,
        }
    }

    /// (retries, budget exhausted) counters of an outbound route.
    pub fn retry_counters(&self, service: &str, route: &str) -> (Counter, Counter) {
        let labels = RouteLatencyLabels {
            direction: Direction::Outbound.as_str(),
            service: service.to_string(),
            route: route.to_string(),
        };
        (
            self.retries.get_or_create(&labels).clone(),
            self.retry_budget_exhausted.get_or_create(&labels).clone(),
        )
    }

    /// The 429 counter of one limit.
    pub fn rate_limited(&self, direction: Direction, service: &str, route: &str) -> Counter {
        self.rate_limited
            .get_or_create(&RouteLatencyLabels {
                direction: direction.as_str(),
                service: service.to_string(),
                route: route.to_string(),
            })
            .clone()
    }

    /// Handles for a route; called when a config version is compiled.
    pub fn route(&self, service: &str, route: &str) -> RouteMetrics {
        let direction = |direction| {
            Arc::new(DirectionMetrics {
                direction,
                service: service.to_string(),
                route: route.to_string(),
                requests: self.requests.clone(),
                latency_family: self.latency.clone(),
                grpc_errors_family: self.grpc_errors.clone(),
                by_class: Default::default(),
                latency: OnceLock::new(),
                grpc_errors: OnceLock::new(),
            })
        };
        RouteMetrics {
            outbound: direction(Direction::Outbound),
            inbound: direction(Direction::Inbound),
        }
    }

    pub fn connection_opened(
        &self,
        direction: Direction,
        protocol: &'static str,
        mtls: bool,
    ) -> ConnectionGuard {
        self.connections
            .get_or_create(&ProtocolLabels {
                direction: direction.as_str(),
                protocol,
                tls: if mtls { "mtls" } else { "plaintext" },
            })
            .inc();
        let gauge = self
            .open_connections
            .get_or_create(&DirectionLabels {
                direction: direction.as_str(),
            })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    pub fn identity_expiry(&self, unix_seconds: u64) {
        self.identity_expiry.set(unix_seconds);
    }

    pub fn identity_renewed(&self, ok: bool) {
        let result = if ok { "renewed" } else { "failed" };
        self.identity_renewals
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The counter of inbound requests from `client` (a SPIFFE ID, or `None`), to keep for a
    /// connection's life.
    pub fn inbound_client(&self, client: Option<&str>) -> Counter {
        self.inbound_clients
            .get_or_create(&ClientLabels {
                client_id: client.unwrap_or("unauthenticated").to_string(),
            })
            .clone()
    }

    /// An inbound request refused by the authorization policy.
    pub fn denied(&self) {
        self.denied.inc();
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.refused_connections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an ejection of `endpoint` of `service` by outlier detection, for `reason`.
    pub fn ejected(&self, service: &str, endpoint: std::net::SocketAddr, reason: &'static str) {
        self.ejections
            .get_or_create(&EjectionLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
                reason,
            })
            .inc();
    }

    /// Counts an ejected endpoint readmitted after answering a trial request.
    pub fn readmitted(&self, service: &str, endpoint: std::net::SocketAddr) {
        self.readmissions
            .get_or_create(&EndpointLabels {
                service: service.to_string(),
                endpoint: endpoint.to_string(),
            })
            .inc();
    }

    /// Counts an ejection not made because `service` is at its `maxEjectionPercent`.
    pub fn spared(&self, service: &str, reason: &'static str) {
        self.spared
            .get_or_create(&ServiceReasonLabels {
                service: service.to_string(),
                reason,
            })
            .inc();
    }

    /// A backend's overflow counters, in the order of `upstream::breaker::Threshold::ALL`
    /// (`names`).
    pub fn overflow_counters(&self, service: &str, names: [&'static str; 3]) -> [Counter; 3] {
        names.map(|threshold| {
            self.overflow
                .get_or_create(&ServiceThresholdLabels {
                    service: service.to_string(),
                    threshold,
                })
                .clone()
        })
    }

    /// An adaptive concurrency limit's shed counter and limit gauge.
    pub fn concurrency(
        &self,
        direction: Direction,
        service: &str,
        route: &str,
    ) -> (Counter, Gauge) {
        let labels = RouteLatencyLabels {
            direction: direction.as_str(),
            service: service.to_string(),
            route: route.to_string(),
        };
        (
            self.shed.get_or_create(&labels).clone(),
            self.concurrency_limit.get_or_create(&labels).clone(),
        )
    }

    /// The gauge that shows whether `service`'s balancer is in panic.
    pub fn panic_gauge(&self, service: &str) -> Gauge {
        self.panic
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .clone()
    }

    pub fn reload(&self, applied: bool, version: u64) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.config_version.set(version);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteMetrics {
    /// A gRPC call that failed with a `grpc-status` in the response headers.
    pub fn grpc_error(&self, direction: Direction) {
        let m = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        m.grpc_errors
            .get_or_init(|| {
                m.grpc_errors_family
                    .get_or_create(&RouteLatencyLabels {
                        direction: m.direction.as_str(),
                        service: m.service.clone(),
                        route: m.route.clone(),
                    })
                    .clone()
            })
            .inc();
    }

    pub fn record(&self, direction: Direction, status: http::StatusCode, latency: Duration) {
        let m = match direction {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        };
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        m.by_class[class]
            .get_or_init(|| {
                m.requests
                    .get_or_create(&RouteLabels {
                        direction: m.direction.as_str(),
                        service: m.service.clone(),
                        route: m.route.clone(),
                        status_class: CLASSES[class],
                    })
                    .clone()
            })
            .inc();
        m.latency
            .get_or_init(|| {
                m.latency_family
                    .get_or_create(&RouteLatencyLabels {
                        direction: m.direction.as_str(),
                        service: m.service.clone(),
                        route: m.route.clone(),
                    })
                    .clone()
            })
            .observe(latency.as_secs_f64());
    }
}

/// Decrements the open-connections gauge when the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
