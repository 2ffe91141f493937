//! Sending a request to the endpoint routing picked, over a pooled connection, and reporting
//! the outcome to outlier detection.
//! WebSocket upgrades and CONNECT tunnels get a dedicated upstream connection; the HTTP/1
//! server splices it to the client once the upstream agrees.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;

use crate::identity::workload::Credentials;
use crate::proto::body::{Body, Guarded};
use crate::proto::headers;
use crate::respond::ProxyError;
use crate::telemetry::metrics::Metrics;
use crate::upstream::balance::Balancer;
use crate::upstream::endpoint::{Endpoint, Outcome, PoolConfig};

/// The endpoint that answered, in the response's extensions (for spans).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamEndpoint(pub std::net::SocketAddr);

/// What sending needs from the proxy beyond the request: connection settings and where an
/// ejection is counted.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    pub pool: &'a PoolConfig,
    pub metrics: &'a Metrics,
}

/// Sends `req` to `endpoint` (picked from `balancer`, or a direct destination without one),
/// in mutual TLS when `tls` is given, and reports the outcome to outlier detection.
pub async fn send(
    sender: Sender<'_>,
    endpoint: &Arc<Endpoint>,
    balancer: Option<&Balancer>,
    tls: Option<Arc<Credentials>>,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let in_flight = endpoint.start();
    // Only upgrades the proxy can keep enforcing reach here (WebSocket: see
    // `headers::strip_hop_by_hop`), and CONNECT tunnels; both get their own connection.
    let upgrade = headers::is_upgrade(req.headers()) || req.method() == Method::CONNECT;
    let head = req.method() == Method::HEAD;

    let (mut parts, body) = req.into_parts();
    let version = if parts.version == Version::HTTP_2 && !upgrade {
        Version::HTTP_2
    } else if parts.version == Version::HTTP_10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    headers::for_upstream(&mut parts, version);
    let req = Request::from_parts(parts, body);

    let sent = if upgrade {
        endpoint
            .send_upgrade(req, sender.pool, tls.as_deref())
            .await
    } else {
        endpoint.send(req, sender.pool, tls.as_deref()).await
    };
    let outcome = match &sent {
        Ok(resp) if resp.status().is_server_error() => Some(Outcome::Failure),
        Ok(_) => Some(Outcome::Success),
        Err(e) if e.counts_against_endpoint() => Some(Outcome::Failure),
        // The client's faults and answers beyond the proxy's limits say nothing of the
        // endpoint's health.
        Err(_) => None,
    };
    if let (Some(balancer), Some(outcome)) = (balancer, outcome) {
        if endpoint.report(outcome, &balancer.outlier) {
            sender.metrics.ejected(&balancer.service, endpoint.addr);
        }
    }
    let resp = sent?;

    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // `x-sidemesh-error` means a Sidemesh proxy made this answer: one is believed only from
    // a peer proxy that proved its identity over mutual TLS, never from an application.
    if tls.is_none() {
        parts.headers.remove(crate::respond::ERROR_HEADER);
    }
    parts.extensions.insert(UpstreamEndpoint(endpoint.addr));
    // A response that cannot have a body (RFC 9110 section 6.4.1) has none, whatever its
    // Content-Length says: an HTTP/2 upstream's body would otherwise wait for those bytes.
    let bodiless =
        head || parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED;
    let incoming = if bodiless {
        crate::proto::body::empty()
    } else {
        incoming
    };
    let body = Guarded::new(incoming, in_flight).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}
