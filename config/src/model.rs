//! The validated mesh: what the proxy and the control plane act on.
//!
//! Every reference is resolved (`ServiceId`), every default applied, every regex compiled.
//! A value of these types is known to be valid; the only way to get one is `validate`.

use std::fmt;
use std::net::SocketAddr;

use regex::Regex;
use serde::{Serialize, Serializer};

pub use crate::spec::{GrpcCode, MtlsMode, OtlpProtocol, Protocol, RateLimitScope, RetryOn};
use crate::units::{ByteSize, Duration, Rate};

/// A whole mesh, merged from all its documents.
#[derive(Debug, Clone, Serialize)]
pub struct Mesh {
    pub settings: MeshSettings,
    pub services: Vec<Service>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeshSettings {
    pub trust_domain: String,
    pub mtls: MtlsMode,
    pub tracing: Tracing,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tracing {
    pub otlp_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub sampling: f64,
}

/// A service's name and namespace; written `name.namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub name: String,
    pub namespace: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub id: ServiceId,
    pub service_account: String,
    /// The SPIFFE ID the service's proxy presents.
    pub identity: String,
    pub ports: Vec<Port>,
    pub endpoints: Vec<SocketAddr>,
    /// Each endpoint's balancing weight, in the order of `endpoints` (1 unless given).
    pub weights: Vec<u32>,
    pub load_balancer: LoadBalancer,
    pub outlier_detection: OutlierDetection,
    pub inbound: InboundPolicy,
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// Circuit-breaker thresholds; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CircuitBreaker {
    pub max_requests: Option<u32>,
    /// Per endpoint.
    pub max_connections: Option<u32>,
    /// Waiting for a connection under `max_connections`, for the whole service.
    pub max_pending_requests: u32,
}

/// An adaptive concurrency limit's settings, validated (`min <= initial <= max`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdaptiveConcurrency {
    pub initial_limit: u32,
    pub min_limit: u32,
    pub max_limit: u32,
    pub tolerance: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub trial_interval: Duration,
    /// 0 to 100.
    pub max_ejection_percent: u32,
    /// 0 to 100.
    pub panic_threshold: u32,
    pub interval: Duration,
    pub success_rate: Option<SuccessRate>,
    pub failure_percentage: Option<FailurePercentage>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SuccessRate {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    pub stdev_factor: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct FailurePercentage {
    /// 1 to 100.
    pub threshold: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Port {
    pub port: u16,
    pub name: Option<String>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    LeastRequest,
    RoundRobin,
    ConsistentHash { header: String },
    Random,
    WeightedRoundRobin,
    PeakEwma,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct InboundPolicy {
    pub authorization: Option<Authorization>,
    pub rate_limit: Option<RateLimit>,
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Authorization {
    /// Empty: any meshed caller.
    pub allow: Vec<IdentityPattern>,
    pub deny: Vec<IdentityPattern>,
}

/// An identity or a set of identities in an authorization list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    /// `*`: any meshed caller.
    Any,
    /// `spiffe://<td>/ns/<ns>/*`: every service account of a namespace.
    Namespace {
        trust_domain: String,
        namespace: String,
    },
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    Exact(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub name: String,
    /// The service whose callers this route governs.
    pub service: ServiceId,
    /// Any one must match; empty matches every request.
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub rate_limit: Option<RateLimit>,
    /// Application statuses that count as the endpoint failing (statuses only: connect
    /// failures and resets always count).
    pub failure_statuses: Vec<RetryOn>,
    pub adaptive_concurrency: Option<AdaptiveConcurrency>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteMatch {
    pub authority: Option<String>,
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(#[serde(serialize_with = "regex_source")] Regex),
}

#[derive(Debug, Clone, Serialize)]
pub struct HeaderMatch {
    /// Lowercase header name.
    pub name: String,
    pub value: HeaderValueMatch,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HeaderValueMatch {
    Present,
    Exact(String),
    Regex(#[serde(serialize_with = "regex_source")] Regex),
}

#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    pub service: ServiceId,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub retry_on: Vec<RetryOn>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget: RetryBudget,
    pub non_idempotent: bool,
    pub buffer_limit: ByteSize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct RateLimit {
    pub rate: Rate,
    pub burst: u32,
    pub key: RateLimitKey,
    pub scope: RateLimitScope,
    pub overrides: Vec<RateLimitOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitKey {
    None,
    Identity,
    SourceIp,
    /// Lowercase header name.
    Header(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct RateLimitOverride {
    pub key: String,
    pub rate: Rate,
    pub burst: u32,
}

fn regex_source<S: Serializer>(re: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

impl Mesh {
    pub fn service(&self, id: &ServiceId) -> Option<&Service> {
        self.services.iter().find(|s| &s.id == id)
    }

    /// The service `reference` names: `name.namespace`, or a bare `name` that is unique in
    /// the mesh or, among several namespaces, is in `namespace_hint`.
    pub fn find_service(&self, reference: &str, namespace_hint: Option<&str>) -> Option<&Service> {
        let (name, namespace) = match reference.split_once('.') {
            Some((n, ns)) => (n, Some(ns)),
            None => (reference, None),
        };
        let mut found = self
            .services
            .iter()
            .filter(|s| s.id.name == name && namespace.is_none_or(|ns| s.id.namespace == ns));
        let first = found.next()?;
        match found.next() {
            None => Some(first),
            Some(second) => [first, second]
                .into_iter()
                .chain(found)
                .find(|s| namespace_hint.is_some_and(|hint| s.id.namespace == hint)),
        }
    }

    /// Routes governing calls to `service`, in the order they were written.
    pub fn routes_for<'a>(&'a self, service: &'a ServiceId) -> impl Iterator<Item = &'a Route> {
        self.routes.iter().filter(move |r| &r.service == service)
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl Serialize for ServiceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Authorization {
    /// Whether a caller with `identity` (None: not meshed) may call. Deny wins over allow.
    pub fn allows(&self, identity: Option<&str>) -> bool {
        let Some(identity) = identity else {
            return false;
        };
        if self.deny.iter().any(|p| p.matches(identity)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|p| p.matches(identity))
    }
}

impl IdentityPattern {
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            IdentityPattern::Any => true,
            IdentityPattern::Exact(id) => id == identity,
            IdentityPattern::Namespace {
                trust_domain,
                namespace,
            } => identity
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.strip_prefix(trust_domain.as_str()))
                .and_then(|rest| rest.strip_prefix("/ns/"))
                .and_then(|rest| rest.strip_prefix(namespace.as_str()))
                .is_some_and(|rest| rest.starts_with("/sa/")),
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Any => f.write_str("*"),
            IdentityPattern::Namespace {
                trust_domain,
                namespace,
            } => write!(f, "spiffe://{trust_domain}/ns/{namespace}/*"),
            IdentityPattern::Exact(id) => f.write_str(id),
        }
    }
}

impl Serialize for IdentityPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The SPIFFE ID of a workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_deny_wins_and_namespaces_match_whole_segments() {
        let authz = Authorization {
            allow: vec![IdentityPattern::Namespace {
                trust_domain: "cluster.local".into(),
                namespace: "demo".into(),
            }],
            deny: vec![IdentityPattern::Exact(spiffe_id(
                "cluster.local",
                "demo",
                "intruder",
            ))],
        };
        assert!(authz.allows(Some(&spiffe_id("cluster.local", "demo", "order-service"))));
        assert!(!authz.allows(Some(&spiffe_id("cluster.local", "demo", "intruder"))));
        assert!(!authz.allows(Some(&spiffe_id("cluster.local", "demo2", "order-service"))));
        assert!(!authz.allows(Some(&spiffe_id("other.domain", "demo", "order-service"))));
        assert!(
            !authz.allows(None),
            "an unmeshed caller has no identity to allow"
        );
    }
}
