//! The per-request handler: admit, route, authorize, then the pipeline; every error becomes
//! the proxy's response (`respond`), and every request is recorded and traced.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, header};

use super::{CLIENT_ID_HEADER, ConnInfo, Target};
use crate::pipeline::{self, Ctx};
use crate::proto::body::Body;
use crate::proto::headers;
use crate::respond::{self, ProxyError};
use crate::routing::destination::Destination;
use crate::routing::snapshot::{RequestView, Snapshot};
use crate::stages::authorize;
use crate::state::Proxy;
use crate::telemetry::metrics::{Direction, RouteMetrics};

/// One request: route it, run the request stages, turn any error into the proxy's response,
/// and record it.
pub(super) async fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Body>,
) -> Response<Body> {
    let started = Instant::now();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    let snapshot = proxy.snapshot.load_full();
    let (mut parts, incoming) = req.into_parts();

    if let Err(e) = super::serve::admit_h2(&proxy, &parts) {
        return respond::error_response(&e, grpc);
    }
    let (destination, metrics) = match route(&proxy, &snapshot, &conn, &parts) {
        Ok(found) => found,
        Err(e) => return respond::error_response(&e, grpc),
    };
    headers::strip_hop_by_hop(&mut parts.headers);
    // The attempt number is the calling proxy's to set: from anyone else it is removed.
    if conn.direction == Direction::Outbound || conn.peer_identity.is_none() {
        parts.headers.remove(crate::stages::retry::ATTEMPT_HEADER);
    }
    let span = start_span(&proxy, &snapshot, &conn, &parts, &destination);
    if conn.direction == Direction::Inbound {
        if let Some(counter) = &conn.client_requests {
            counter.inc();
        }
        let denied = snapshot.local_service().and_then(|local| {
            let policy = local.authorization.as_ref()?;
            authorize::check(policy, &local.id, conn.peer_identity.as_deref()).err()
        });
        if let Some(e) = denied {
            proxy.metrics.denied();
            let resp = respond::error_response(&e, grpc);
            if let Some(metrics) = &metrics {
                record(metrics, conn.direction, grpc, &resp, started.elapsed());
            }
            if let (Some(span), ProxyError::Forbidden { identity, .. }) = (span, &e) {
                span.event(
                    "denied",
                    vec![opentelemetry::KeyValue::new(
                        "sidemesh.peer.identity",
                        identity.clone(),
                    )],
                );
                span.finish(e.status(), None);
            }
            return resp;
        }
        headers::append_forwarded_for(&mut parts.headers, conn.client.ip());
        parts.headers.remove(CLIENT_ID_HEADER);
        if let Some(identity) = &conn.peer_identity {
            if let Ok(value) = http::HeaderValue::from_str(identity) {
                parts.headers.insert(CLIENT_ID_HEADER, value);
            }
        }
    }
    let mut attempt_parent = None;
    if let Some(span) = &span {
        // Upstream sees this proxy's span as its parent; retries add one child per attempt.
        span.inject(&mut parts.headers);
        if matches!(&destination, Destination::Route(r) if r.retry.is_some()) {
            attempt_parent = span.attempt_parent();
        }
    }
    let inbound_limit = match conn.direction {
        Direction::Inbound => snapshot
            .local_service()
            .and_then(|s| s.inbound_limiter.clone()),
        Direction::Outbound => None,
    };
    let inbound_concurrency = match conn.direction {
        Direction::Inbound => snapshot
            .local_service()
            .and_then(|s| s.inbound_concurrency.clone()),
        Direction::Outbound => None,
    };
    let ctx = Ctx {
        client: conn.client,
        peer_identity: conn.peer_identity.clone(),
        destination,
        inbound_limit,
        inbound_concurrency,
        attempt_parent,
    };
    let req = Request::from_parts(parts, incoming);

    let resp = match pipeline::run(&proxy, &ctx, req).await {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(span) = &span {
                shed_event(span, &e);
            }
            respond::error_response(&e, grpc)
        }
    };
    if let Some(metrics) = metrics {
        record(&metrics, conn.direction, grpc, &resp, started.elapsed());
    }
    if let Some(span) = span {
        let endpoint = resp
            .extensions()
            .get::<crate::upstream::forward::UpstreamEndpoint>()
            .map(|e| e.0);
        span.finish(resp.status(), endpoint);
    }
    resp
}

/// The span event of a request the proxy refused for load: rate-limited, shed by the
/// adaptive concurrency limit, or over a circuit breaker's threshold.
fn shed_event(span: &crate::telemetry::trace::RequestSpan, error: &ProxyError) {
    use opentelemetry::KeyValue;
    match error {
        ProxyError::RateLimited {
            limit, retry_after, ..
        } => span.event(
            "rate-limited",
            vec![
                KeyValue::new("sidemesh.rate_limit", limit.clone()),
                KeyValue::new(
                    "sidemesh.retry_after_ms",
                    i64::try_from(retry_after.as_millis()).unwrap_or(i64::MAX),
                ),
            ],
        ),
        ProxyError::Overloaded { scope, limit } => span.event(
            "overloaded",
            vec![
                KeyValue::new("sidemesh.concurrency.scope", scope.clone()),
                KeyValue::new("sidemesh.concurrency.limit", i64::from(*limit)),
            ],
        ),
        ProxyError::Overflow {
            service,
            threshold,
            limit,
        } => span.event(
            "overflow",
            vec![
                KeyValue::new("sidemesh.circuit_breaker.service", service.clone()),
                KeyValue::new("sidemesh.circuit_breaker.threshold", *threshold),
                KeyValue::new("sidemesh.circuit_breaker.limit", i64::from(*limit)),
            ],
        ),
        _ => {}
    }
}

/// Records a request: its HTTP status and latency and, for a gRPC call that failed on the
/// server's side (a `grpc-status` in the headers, as in every trailers-only error answer),
/// a gRPC error.
fn record(
    metrics: &crate::telemetry::metrics::RouteMetrics,
    direction: Direction,
    grpc: bool,
    resp: &Response<Body>,
    latency: std::time::Duration,
) {
    metrics.record(direction, resp.status(), latency);
    if grpc
        && resp
            .headers()
            .get("grpc-status")
            .is_some_and(|status| grpc_server_error(status.as_bytes()))
    {
        metrics.grpc_error(direction);
    }
}

/// The gRPC codes that map to HTTP 5xx: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS. The others are the caller's (NOT_FOUND, INVALID_ARGUMENT, ...) or
/// backpressure (RESOURCE_EXHAUSTED), like HTTP 4xx, and do not count against a service.
fn grpc_server_error(status: &[u8]) -> bool {
    matches!(status, b"2" | b"4" | b"12" | b"13" | b"14" | b"15")
}

/// The request's span, when tracing is on: named after the route that matched (inbound, the
/// local service's route for this path).
fn start_span(
    proxy: &Proxy,
    snapshot: &Snapshot,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    destination: &Destination,
) -> Option<crate::telemetry::trace::RequestSpan> {
    if !proxy.tracing.is_on() {
        return None;
    }
    let host = headers::authority(parts)
        .map(headers::host_of)
        .unwrap_or_default();
    let inbound_route;
    let route = match destination {
        Destination::Route(route) => Some(route),
        Destination::Direct(_) if conn.direction == Direction::Inbound => {
            inbound_route = snapshot.local_service().map(|s| {
                s.route(&RequestView {
                    host,
                    path: parts.uri.path(),
                    method: parts.method.as_str(),
                    headers: &parts.headers,
                })
                .clone()
            });
            inbound_route.as_ref()
        }
        Destination::Direct(_) => None,
    };
    proxy
        .tracing
        .start_request(crate::telemetry::trace::RequestStart {
            direction: conn.direction,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host,
            peer: conn.client.ip(),
            route: route.map_or("passthrough", |r| &*r.name),
            route_template: route.and_then(|r| r.template.as_deref()),
            peer_identity: conn.peer_identity.as_deref(),
            headers: &parts.headers,
        })
}

/// Routing: which service, which route, or which single address this request goes to.
fn route(
    proxy: &Proxy,
    snapshot: &Snapshot,
    conn: &ConnInfo,
    parts: &http::request::Parts,
) -> Result<(Destination, Option<RouteMetrics>), ProxyError> {
    let host = headers::authority(parts)
        .map(headers::host_of)
        .unwrap_or_default();
    let service = match &conn.target {
        Target::App(addr) => {
            let metrics = snapshot
                .local_service()
                .map(|s| s.default_route().metrics.clone());
            let app = match &conn.app {
                Some(app) => app.clone(),
                None => proxy.registry.pinned(*addr, None),
            };
            return Ok((Destination::Direct(app), metrics));
        }
        Target::Service(name) => {
            snapshot
                .service_named(name)
                .ok_or_else(|| ProxyError::UnknownService {
                    name: name.to_string(),
                })?
        }
        Target::ByAuthority => snapshot
            .service_for_host(&headers::lowercase(host))
            .ok_or_else(|| ProxyError::UnknownService {
                name: host.to_string(),
            })?,
        Target::OriginalDst(addr) => match snapshot.service_for_host(&headers::lowercase(host)) {
            Some(service) => service,
            // Not a mesh service: pass through to where the client was going.
            // Not a mesh service by name: pass through to where the client was going, in mutual
            // TLS when that address is a meshed proxy.
            None => {
                let meshed = snapshot.meshed.get(addr).cloned();
                return Ok((
                    Destination::Direct(proxy.registry.pinned(*addr, meshed)),
                    None,
                ));
            }
        },
    };
    let view = RequestView {
        host,
        path: parts.uri.path(),
        method: parts.method.as_str(),
        headers: &parts.headers,
    };
    let route = service.route(&view).clone();
    let metrics = route.metrics.clone();
    Ok((Destination::Route(route), Some(metrics)))
}
