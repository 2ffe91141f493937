//! Serving one client connection that speaks HTTP/1.1 or HTTP/2 (prior knowledge), and the
//! per-request handler that routes, runs the request stages, and answers errors.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::app::Proxy;
use crate::conn::detect::Protocol;
use crate::drain::Drain;
use crate::pipeline;
use crate::proto::body::{self, Body};
use crate::proto::headers;
use crate::respond::{self, ProxyError};
use crate::routing::snapshot::{RequestView, Snapshot};
use crate::telemetry::metrics::{Direction, RouteMetrics};
use crate::upstream::forward::Destination;

/// What the connection stages learned about a connection, for every request on it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub client: SocketAddr,
    pub direction: Direction,
    pub target: Target,
    /// The caller's SPIFFE ID, from its certificate (inbound mTLS only).
    pub peer_identity: Option<Arc<str>>,
    /// Inbound requests of this caller, counted per identity (made once per connection).
    client_requests: Option<prometheus_client::metrics::counter::Counter>,
}

impl ConnInfo {
    pub fn new(
        client: SocketAddr,
        direction: Direction,
        target: Target,
        peer_identity: Option<Arc<str>>,
        proxy: &Proxy,
    ) -> Self {
        let client_requests = (direction == Direction::Inbound)
            .then(|| proxy.metrics.inbound_client(peer_identity.as_deref()));
        Self {
            client,
            direction,
            target,
            peer_identity,
            client_requests,
        }
    }
}

/// The header that tells the application who called (inbound, mTLS callers only). One that
/// arrives from outside is removed, so the application can trust it.
pub const CLIENT_ID_HEADER: &str = "x-sidemesh-client-id";

/// The caller's identity, for the request stages (rate-limit keys).
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Arc<str>);

/// What the client is calling, as far as the connection tells.
#[derive(Debug, Clone)]
pub enum Target {
    /// An explicit per-service listener.
    Service(Arc<str>),
    /// The explicit outbound listener: the Host header names the service.
    ByAuthority,
    /// Transparent outbound: the original destination, used when the host is not in the mesh.
    OriginalDst(SocketAddr),
    /// Inbound: the local application.
    App(SocketAddr),
}

pub async fn serve<I>(
    io: I,
    protocol: Protocol,
    conn: ConnInfo,
    proxy: Arc<Proxy>,
    mut drain: Drain,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    match protocol {
        Protocol::Http2 => {
            let service = {
                let proxy = proxy.clone();
                service_fn(move |req: Request<Incoming>| {
                    let (proxy, conn) = (proxy.clone(), conn.clone());
                    async move {
                        Ok::<_, Infallible>(handle(proxy, conn, req.map(body::incoming)).await)
                    }
                })
            };
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                // The application's own `date` (or none) reaches the client, as without a
                // proxy; gRPC trailers-only answers get no `date` field in their metadata.
                .auto_date_header(false)
                .max_concurrent_streams(proxy.limits.max_concurrent_streams)
                // hyper's own refusal is a backstop beyond the proxy's limit, which the
                // handler applies with the marked 431 every other request gets.
                .max_header_list_size(
                    u32::try_from(h2_header_list_ceiling(&proxy.limits)).unwrap_or(u32::MAX),
                );
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = drain.signaled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        _ => {
            let cfg = crate::proto::h1::server::Config {
                limits: crate::proto::h1::head::HeadLimits {
                    max_bytes: proxy.limits.max_header_bytes,
                    max_headers: proxy.limits.max_headers,
                },
                header_timeout: proxy.timeouts.header,
                keepalive_timeout: proxy.timeouts.keepalive,
                body_timeout: proxy.timeouts.body,
            };
            crate::proto::h1::server::serve(
                io,
                cfg,
                drain,
                |req| handle(proxy.clone(), conn.clone(), req),
                |code| proxy.metrics.connection_refused(code),
            )
            .await;
        }
    }
}

/// hyper's HTTP/2 header-list bound: well above the proxy's own limit (which counts the
/// same way, RFC 9113 section 6.5.2), so the proxy's marked 431 is what clients see.
fn h2_header_list_ceiling(limits: &crate::config::Limits) -> usize {
    (limits.max_header_bytes + 32 * limits.max_headers).saturating_mul(2)
}

/// The checks every HTTP/2 request gets that the HTTP/1 parser applies to HTTP/1 heads:
/// the same size and count limits, and one authority (`:authority` and `Host` must agree).
fn admit_h2(proxy: &Proxy, parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.version != http::Version::HTTP_2 {
        return Ok(());
    }
    let limits = &proxy.limits;
    if parts.headers.len() > limits.max_headers {
        return Err(ProxyError::HeadersTooLarge {
            why: format!("more than {} header fields", limits.max_headers),
        });
    }
    let bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + parts.uri.authority().map_or(0, |a| a.as_str().len())
        + parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if bytes > limits.max_header_bytes + 32 * limits.max_headers {
        return Err(ProxyError::HeadersTooLarge {
            why: format!("request head larger than {} bytes", limits.max_header_bytes),
        });
    }
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::BadRequest {
            why: "more than one Host header".into(),
        });
    }
    if let (Some(authority), Some(host)) = (parts.uri.authority(), parts.headers.get(header::HOST))
    {
        if !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err(ProxyError::BadRequest {
                why: "`:authority` and `Host` name different hosts".into(),
            });
        }
    }
    if let Some(authority) = headers::authority(parts) {
        crate::proto::h1::valid_authority(authority, false).map_err(|why| {
            ProxyError::BadRequest {
                why: format!("invalid authority: {why}"),
            }
        })?;
    }
    Ok(())
}

/// One request: route it, run the request stages, turn any error into the proxy's response,
/// and record it.
async fn handle(proxy: Arc<Proxy>, conn: Arc<ConnInfo>, req: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    let snapshot = proxy.snapshot.load_full();
    let (mut parts, incoming) = req.into_parts();

    if let Err(e) = admit_h2(&proxy, &parts) {
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
        if let Err(e) = authorize(&snapshot, conn.peer_identity.as_deref()) {
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
            parts.extensions.insert(PeerIdentity(identity.clone()));
        }
    }
    if let Some(span) = &span {
        // Upstream sees this proxy's span as its parent; retries add one child per attempt.
        span.inject(&mut parts.headers);
        if matches!(&destination, Destination::Route(r) if r.retry.is_some()) {
            if let Some(parent) = span.attempt_parent() {
                parts.extensions.insert(parent);
            }
        }
    }
    parts.extensions.insert(destination);
    parts
        .extensions
        .insert(crate::stages::ratelimit::ClientAddr(conn.client));
    if conn.direction == Direction::Inbound {
        if let Some(limiter) = snapshot
            .local_service()
            .and_then(|s| s.inbound_limiter.clone())
        {
            parts
                .extensions
                .insert(crate::stages::ratelimit::InboundLimit(limiter));
        }
    }
    let req = Request::from_parts(parts, incoming);

    let resp = match pipeline::call(proxy.clone(), req).await {
        Ok(resp) => resp,
        Err(e) => {
            if let (
                Some(span),
                ProxyError::RateLimited {
                    limit, retry_after, ..
                },
            ) = (&span, &e)
            {
                span.event(
                    "rate-limited",
                    vec![
                        opentelemetry::KeyValue::new("sidemesh.rate_limit", limit.clone()),
                        opentelemetry::KeyValue::new(
                            "sidemesh.retry_after_ms",
                            i64::try_from(retry_after.as_millis()).unwrap_or(i64::MAX),
                        ),
                    ],
                );
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

/// Inbound authorization: the local service's policy, if it has one, decides; without one any
/// caller is allowed. Callers without an identity (plaintext) match no policy.
fn authorize(snapshot: &Snapshot, identity: Option<&str>) -> Result<(), ProxyError> {
    let Some(service) = snapshot.local_service() else {
        return Ok(());
    };
    match &service.authorization {
        Some(policy) if !policy.allows(identity) => Err(ProxyError::Forbidden {
            identity: identity.map_or_else(
                || "an unauthenticated (plaintext) caller".to_string(),
                str::to_string,
            ),
            service: service.id.to_string(),
        }),
        _ => Ok(()),
    }
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
            return Ok((
                Destination::Direct(proxy.registry.pinned(*addr, None)),
                metrics,
            ));
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
