//! The routing language as written by operators: raw serde shapes, one per YAML object.
//!
//! These types only describe *shape* (unknown fields are refused, units are parsed); every
//! rule that relates one field to another lives in `validate`, which turns a `*Spec` into
//! its validated counterpart in `model`. Doc comments here become the JSON Schema
//! descriptions that editors show, so they are written for operators.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::units::{ByteSize, Duration, Rate};

/// One Sidemesh routing document. A mesh may be split over several documents and files.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Sidemesh routing configuration")]
pub struct MeshDocument {
    /// Always `sidemesh.io/v1`.
    pub api_version: ApiVersion,
    /// Always `Mesh`.
    pub kind: Kind,
    /// Mesh-wide settings. At most one document of a mesh may set them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshSettingsSpec>,
    /// The services of the mesh: where they listen and who may call them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// How calls to a service are matched and sent on: timeouts, retries, limits, splits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "sidemesh.io/v1")]
    V1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Kind {
    Mesh,
}

/// Settings that apply to every proxy of the mesh.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSettingsSpec {
    /// The SPIFFE trust domain of workload identities (`spiffe://<trustDomain>/ns/<ns>/sa/<sa>`). Default `cluster.local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Mutual TLS between proxies. Default `strict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Where proxies send their spans and how many they keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// How proxies treat plaintext between meshed workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mutually authenticated TLS is accepted on inbound ports.
    #[default]
    Strict,
    /// Both mTLS and plaintext are accepted (for migrations); metrics tell them apart.
    Permissive,
    /// No TLS between proxies.
    Disabled,
}

/// OpenTelemetry tracing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// OTLP collector endpoint, e.g. `http://jaeger-collector:4317`. No endpoint: no export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport. Default `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<OtlpProtocol>,
    /// Share of new traces that are sampled, from 0.0 to 1.0. Default 1.0. Parent decisions are always honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OtlpProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention).
    HttpProtobuf,
}

/// A workload of the mesh, as callers address it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service name, as callers address it (`http://<name>`). Lowercase DNS label.
    pub name: String,
    /// Kubernetes namespace. Default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service account the workload runs as; forms its identity. Default: the service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Ports the service listens on. None: a client-only workload (it calls other services
    /// and is never called).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Static endpoints for use without discovery, e.g. on a laptop: `ip:port`, or
    /// `{address: ip:port, weight: 3}` for `weightedRoundRobin`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointSpec>,
    /// How a caller's proxy picks an endpoint. Default `peakEwma`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// When callers stop sending to an endpoint that keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Policy enforced by the service's own proxy on calls it receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundSpec>,
    /// Bounds each caller's proxy keeps on its traffic to this service; a request beyond one is answered at once with a 503 (`x-sidemesh-error: overflow`). Off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
}

/// Circuit-breaker thresholds, kept by each calling proxy on its own traffic to the service,
/// e.g. `{maxRequests: 200, maxConnections: 50, maxPendingRequests: 20}`. A request that would
/// pass one is answered at once with a 503 marked `x-sidemesh-error: overflow`, instead of
/// waiting without bound behind an upstream that cannot keep up. Each is unlimited unless given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Most requests in flight to the service (all its endpoints together), 1 to 1000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Most connections open to each endpoint of the service, 1 to 100000. A request that finds them all busy waits for one (it is then pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Most requests of the service waiting for a connection under `maxConnections`, 0 to 1000000. Default with `maxConnections`: 0 (no waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}

/// A limit on requests in flight that adjusts itself from measured latency (Netflix's
/// Gradient2): while latency stays near its long-term level the limit grows; when it rises
/// past `tolerance` times that level the limit shrinks. Requests beyond the limit are refused
/// at once with a 503 marked `x-sidemesh-error: overloaded`. `{}` turns it on with defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdaptiveConcurrencySpec {
    /// The limit to start from, between `minLimit` and `maxLimit`. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_limit: Option<u32>,
    /// The limit never goes below this, at least 1. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_limit: Option<u32>,
    /// The limit never goes above this, at most 100000. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_limit: Option<u32>,
    /// How much latency may grow over its long-term level before the limit shrinks, as a ratio, 1 to 10. Default 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
}

/// A static endpoint: `ip:port`, or an address with a balancing weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EndpointSpec {
    /// `ip:port`, weight 1.
    Address(String),
    /// An address with its weight.
    Weighted(WeightedEndpointSpec),
}

/// An endpoint with a weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WeightedEndpointSpec {
    /// `ip:port`.
    pub address: String,
    /// Share of requests under `weightedRoundRobin`, 1 to 10000 (relative to the other endpoints). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl EndpointSpec {
    /// The `ip:port` text.
    pub fn address(&self) -> &str {
        match self {
            EndpointSpec::Address(a) => a,
            EndpointSpec::Weighted(w) => &w.address,
        }
    }
}

impl From<String> for EndpointSpec {
    fn from(address: String) -> Self {
        EndpointSpec::Address(address)
    }
}

/// A port of a service.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    /// Port number, 1 to 65535, unique within the service.
    pub port: u32,
    /// Optional name, unique within the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Protocol spoken on the port. Default `http`. `tcp` ports are forwarded byte for byte without detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2, detected per connection.
    #[default]
    Http,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque TCP: no protocol detection, no per-request features.
    Tcp,
}

/// Endpoint selection, e.g. `{policy: roundRobin}` or `{policy: consistentHash, header: x-user-id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// The selection policy.
    pub policy: LoadBalancerPolicy,
    /// Request header whose value is hashed; required by `consistentHash`, refused by the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerPolicy {
    /// Power of two random choices over the fewest requests in flight.
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
    /// Requests with the same `header` value go to the same endpoint (a hash ring).
    ConsistentHash,
    /// An endpoint drawn at random, every endpoint equally likely.
    Random,
    /// Each endpoint in turn, as often as its `weight` says (smooth: heavy endpoints' turns
    /// are spread out, not bunched).
    WeightedRoundRobin,
    /// Power of two random choices over latency: each endpoint's recent response time (a
    /// moving average that jumps to a slow answer at once) times its requests in flight, as
    /// linkerd2-proxy balances. The default.
    PeakEwma,
}

/// When callers stop sending to an endpoint that fails, and how they make sure this never
/// takes a whole service down. An endpoint's failures are only its own: failed connections,
/// resets, a peer proxy's report that its application is unreachable, and, on routes that list
/// them in `failureStatuses`, the application's 5xx answers. A client's faults (aborted or
/// malformed bodies, cancellations) and the proxy's own limits never count.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// Failures in a row that eject an endpoint, 1 to 1000. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// First ejection's length; each ejection in a row lasts twice as long as the last. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection: Option<Duration>,
    /// Longest ejection. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection: Option<Duration>,
    /// An endpoint ejected for failing in a row gets one trial request this often; an answer readmits it at once. Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_interval: Option<Duration>,
    /// Most endpoints of the service ejected at once, in percent (0 to 100). Default 50: a service of one or two endpoints always keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Below this share of healthy endpoints, in percent (0 to 100), ejections are ignored and every endpoint takes traffic. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    /// The window over which success rates and failure percentages are measured. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Eject endpoints whose success rate is far below the others'. Off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<SuccessRateSpec>,
    /// Eject endpoints whose failures pass a fixed percentage. Off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage: Option<FailurePercentageSpec>,
}

/// Success-rate ejection: over each `interval`, endpoints with at least `requestVolume`
/// requests are compared; one whose success rate is below the mean minus `stdevFactor`
/// standard deviations is ejected.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SuccessRateSpec {
    /// Endpoints with enough requests needed for a comparison, at least 2. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<u32>,
    /// Requests an endpoint needs in the interval to be judged, at least 1. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<u32>,
    /// How many standard deviations below the mean ejects, 0.1 to 10. Default 1.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdev_factor: Option<f64>,
}

/// Failure-percentage ejection: over each `interval`, an endpoint with at least
/// `requestVolume` requests of which `threshold` percent or more failed is ejected.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailurePercentageSpec {
    /// Failure percentage that ejects, 1 to 100. Default 85.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    /// Endpoints with enough requests needed before any is judged, at least 1. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<u32>,
    /// Requests an endpoint needs in the interval to be judged, at least 1. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<u32>,
}

/// What a service's own proxy enforces on the calls it receives.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundSpec {
    /// Which caller identities may call the service. No policy: any meshed caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationSpec>,
    /// Token bucket applied to calls the service receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// A self-adjusting limit on the calls the service's proxy lets in at once. Off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConcurrencySpec>,
}

/// Allow and deny lists of caller identities. Deny wins over allow.
///
/// An identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
/// `spiffe://<trust-domain>/ns/<namespace>/*` for a whole namespace, or `*` for any meshed caller.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSpec {
    /// Identities allowed to call. Empty or absent: any meshed caller that is not denied.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Identities refused even when allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// A route: which calls to `service` it matches, and how they are sent on.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    /// Route name, unique across the whole mesh (all files).
    pub name: String,
    /// The service whose callers this route governs (`name` or `name.namespace`).
    pub service: String,
    /// Conditions; a request matching any one of them takes this route. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchSpec>,
    /// Where matching requests go, split by weight. Default: the route's own service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,
    /// Deadline for the whole request including retries; expiry answers 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy for failed attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Token bucket applied by the caller's proxy to requests on this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Application answers on this route that count as the endpoint failing, for outlier detection: `5xx`, `gateway-error` (502/503/504) or status codes 500-599. Default none: an application's error on one URL is not a sick endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure_statuses: Vec<RetryOn>,
    /// A self-adjusting limit, kept by each caller's proxy, on this route's requests in flight. Off unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConcurrencySpec>,
}

/// One match condition; every field given must match.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// Host / `:authority` without port, e.g. `user-service` or `*.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Path: `{exact: /a}`, `{prefix: /a}` or `{regex: ^/a/[0-9]+$}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatchSpec>,
    /// HTTP method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header conditions; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatchSpec>,
}

/// A path condition: exactly one of `exact`, `prefix` or `regex`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatchSpec {
    /// The whole path equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The path starts with this, on a segment boundary (`/users` matches `/users/7`, not `/usersx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The whole path matches this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A header condition: `exact` value, `regex`, or neither for "present".
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatchSpec {
    /// Header name (case-insensitive).
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The whole value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A destination of a route, with its share of traffic.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendSpec {
    /// Target service (`name` or `name.namespace`).
    pub service: String,
    /// Target port; default the service's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Relative share of requests, greater than 0. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Retries of failed attempts, bounded by a budget.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Total attempts including the first, 1 to 10.
    pub attempts: u32,
    /// Conditions that make an attempt retriable. Default `[connect-failure, reset, gateway-error]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Deadline for each attempt; must not exceed the route timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Exponential backoff with full jitter between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    /// Caps retries as a share of requests so retries cannot multiply an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
    /// Also retry methods that are not idempotent (POST, PATCH). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_idempotent: Option<bool>,
    /// Request bodies up to this size are buffered so they can be replayed; larger ones are not retried. Default `64KiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_limit: Option<ByteSize>,
}

/// A retriable outcome: `5xx`, `gateway-error` (502/503/504), `reset`, `connect-failure`,
/// a status code such as `503`, or a gRPC code such as `unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryOn {
    ServerError,
    GatewayError,
    Reset,
    ConnectFailure,
    Status(u16),
    Grpc(GrpcCode),
}

/// gRPC status codes that may be listed in `retryOn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcCode {
    Cancelled = 1,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackoffSpec {
    /// First backoff ceiling. Default `25ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    /// Largest backoff ceiling. Default `250ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Retries allowed as a share of requests, 0.0 to 1.0. Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries always allowed per second regardless of ratio. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    /// Window over which requests and retries are counted. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
}

/// A token bucket: `rate` tokens per unit of time, holding at most `burst`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained rate, e.g. `100/s`.
    pub rate: Rate,
    /// Bucket size: requests admitted at once after a quiet period. Default: one second of `rate` (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One bucket for all (`none`), or one per `identity`, `sourceIp`, or `{header: <name>}`. Default `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKeySpec>,
    /// `local`: each proxy enforces `rate`. `global` (inbound only): `rate` is shared among the service's proxies. Default `local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
    /// Different limits for particular keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverrideSpec>,
}

/// What tells callers apart: `none`, `identity`, `sourceIp`, or `{header: <name>}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKeySpec {
    /// One bucket shared by every caller.
    None,
    /// One bucket per caller identity (SPIFFE ID).
    Identity,
    /// One bucket per caller IP address.
    SourceIp,
    /// One bucket per value of a request header.
    Header(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    #[default]
    Local,
    Global,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitOverrideSpec {
    /// The key value this override applies to (an identity, IP or header value).
    pub key: String,
    /// Rate for this key.
    pub rate: Rate,
    /// Burst for this key. Default: one second of `rate` (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

const GRPC_CODES: &[(&str, GrpcCode)] = &[
    ("cancelled", GrpcCode::Cancelled),
    ("deadline-exceeded", GrpcCode::DeadlineExceeded),
    ("resource-exhausted", GrpcCode::ResourceExhausted),
    ("internal", GrpcCode::Internal),
    ("unavailable", GrpcCode::Unavailable),
];

impl FromStr for RetryOn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let named = match s {
            "5xx" => Some(RetryOn::ServerError),
            "gateway-error" => Some(RetryOn::GatewayError),
            "reset" => Some(RetryOn::Reset),
            "connect-failure" => Some(RetryOn::ConnectFailure),
            _ => GRPC_CODES
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, code)| RetryOn::Grpc(*code)),
        };
        if let Some(named) = named {
            return Ok(named);
        }
        match s.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Ok(RetryOn::Status(code)),
            _ => Err(format!(
                "unknown retry condition `{s}`: expected 5xx, gateway-error, reset, connect-failure, \
                 an HTTP status code (100-599) or a gRPC code ({})",
                GRPC_CODES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryOn::ServerError => f.write_str("5xx"),
            RetryOn::GatewayError => f.write_str("gateway-error"),
            RetryOn::Reset => f.write_str("reset"),
            RetryOn::ConnectFailure => f.write_str("connect-failure"),
            RetryOn::Status(code) => write!(f, "{code}"),
            RetryOn::Grpc(code) => {
                let name = GRPC_CODES
                    .iter()
                    .find(|(_, c)| c == code)
                    .map_or("unknown", |(n, _)| *n);
                f.write_str(name)
            }
        }
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RetryOn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a retry condition such as `5xx`, `503` or `unavailable`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryOn, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RetryOn, E> {
                self.visit_str(&v.to_string())
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RetryOn, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl JsonSchema for RetryOn {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("RetryOn")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A retriable outcome: `5xx`, `gateway-error` (502/503/504), `reset`, `connect-failure`, an HTTP status code, or a gRPC code.",
            "anyOf": [
                { "enum": ["5xx", "gateway-error", "reset", "connect-failure",
                           "cancelled", "deadline-exceeded", "resource-exhausted", "internal", "unavailable"] },
                { "type": "integer", "minimum": 100, "maximum": 599 },
                { "type": "string", "pattern": "^[1-5][0-9][0-9]$" }
            ]
        })
    }
}

const KEY_KINDS: &[&str] = &["none", "identity", "sourceIp"];

impl Serialize for RateLimitKeySpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            RateLimitKeySpec::None => serializer.serialize_str("none"),
            RateLimitKeySpec::Identity => serializer.serialize_str("identity"),
            RateLimitKeySpec::SourceIp => serializer.serialize_str("sourceIp"),
            RateLimitKeySpec::Header(h) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("header", h)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for RateLimitKeySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RateLimitKeySpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`none`, `identity`, `sourceIp` or `{header: <name>}`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "none" => Ok(RateLimitKeySpec::None),
                    "identity" => Ok(RateLimitKeySpec::Identity),
                    "sourceIp" => Ok(RateLimitKeySpec::SourceIp),
                    "header" => Err(E::custom(
                        "a header key names its header: `key: {header: x-client-id}`",
                    )),
                    other => Err(E::unknown_variant(other, KEY_KINDS)),
                }
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom("expected `{header: <name>}`"));
                };
                if key != "header" {
                    return Err(de::Error::unknown_field(&key, &["header"]));
                }
                let header: String = map.next_value()?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("expected only `header`"));
                }
                Ok(RateLimitKeySpec::Header(header))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl JsonSchema for RateLimitKeySpec {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("RateLimitKeySpec")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "What tells callers apart: `none` (one shared bucket), `identity` (caller SPIFFE ID), `sourceIp`, or `{header: <name>}`.",
            "anyOf": [
                { "enum": KEY_KINDS },
                {
                    "type": "object",
                    "properties": { "header": { "type": "string", "description": "Request header whose value is the key." } },
                    "required": ["header"],
                    "additionalProperties": false
                }
            ]
        })
    }
}
