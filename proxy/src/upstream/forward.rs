//! Sending a request to the endpoint routing picked, over a pooled connection, and reporting
//! the outcome to outlier detection.
//! WebSocket upgrades and CONNECT tunnels get a dedicated upstream connection; the HTTP/1
//! server splices it to the client once the upstream agrees.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use sidemesh_config::RetryOn;

use crate::identity::workload::Credentials;
use crate::proto::body::{Body, Guarded};
use crate::proto::headers;
use crate::respond::ProxyError;
use crate::telemetry::metrics::Metrics;
use crate::upstream::balance::Balancer;
use crate::upstream::endpoint::{Endpoint, PoolConfig, Via};
use crate::upstream::outlier::{Event, Outcome};

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

/// Codes a peer proxy marks its answer with when its application could not be reached or
/// failed it: the endpoint's failure (the peer itself is up). Every other marked answer is
/// the peer refusing the client (a limit, a denial, a bad request).
const PEER_ENDPOINT_FAILURES: [&str; 4] = [
    "upstream-connect-failure",
    "upstream-failure",
    "upstream-tls-failure",
    "overloaded",
];

/// Whether an attempt's result is the endpoint's own success or failure, or says nothing of
/// its health (`None`): a client's fault, the proxy's own limit or timeout, a peer proxy
/// refusing the client, or an application error on a route that does not count it
/// (`failure_statuses`). `peer` is true when the endpoint is a proxy that proved its identity,
/// whose `x-sidemesh-error` marker is then believed.
pub fn classify(
    sent: &Result<Response<Body>, ProxyError>,
    failure_statuses: &[RetryOn],
    peer: bool,
) -> Option<Outcome> {
    match sent {
        Ok(resp) => {
            let marker = peer
                .then(|| resp.headers().get(crate::respond::ERROR_HEADER))
                .flatten();
            let status = resp.status().as_u16();
            match marker {
                Some(code) if PEER_ENDPOINT_FAILURES.iter().any(|c| code == c) => {
                    Some(Outcome::Failure)
                }
                Some(_) => None,
                None if failure_statuses.iter().any(|on| match on {
                    RetryOn::ServerError => status >= 500,
                    RetryOn::GatewayError => matches!(status, 502..=504),
                    RetryOn::Status(code) => status == *code,
                    _ => false,
                }) =>
                {
                    Some(Outcome::Failure)
                }
                None => Some(Outcome::Success),
            }
        }
        Err(e) if e.counts_against_endpoint() => Some(Outcome::Failure),
        Err(_) => None,
    }
}

/// Sends `req` to `endpoint` (picked from `balancer`, or a direct destination without one),
/// in mutual TLS when `tls` is given, and reports the outcome to outlier detection, where
/// the route's `failure_statuses` say which application answers count as failures.
pub async fn send(
    sender: Sender<'_>,
    endpoint: &Arc<Endpoint>,
    balancer: Option<&Balancer>,
    tls: Option<Arc<Credentials>>,
    failure_statuses: &[RetryOn],
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    // The backend's `maxRequests` refuses before anything is sent.
    let breaker = balancer.and_then(|b| b.breaker.as_ref());
    let request_slot = match breaker {
        Some(breaker) => breaker.admit()?,
        None => None,
    };
    let in_flight = endpoint.start();
    // Only the latency-aware policy pays for the clock and the estimate.
    let started = balancer
        .filter(|b| b.policy == sidemesh_config::LoadBalancer::PeakEwma)
        .map(|_| std::time::Instant::now());
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

    let via = Via {
        pool: sender.pool,
        tls: tls.as_deref(),
        breaker: breaker.map(|b| &**b),
    };
    let sent = if upgrade {
        endpoint.send_upgrade(req, via).await
    } else {
        endpoint.send(req, via).await
    };
    if let Some(balancer) = balancer {
        if let (Some(started), true) = (started, sent.is_ok()) {
            endpoint.latency.observe(started.elapsed());
        }
        if let Some(outcome) = classify(&sent, failure_statuses, tls.is_some()) {
            let service = &balancer.service;
            balancer.report(endpoint, outcome, |addr, event| match event {
                Event::Ejected(reason) => sender.metrics.ejected(service, addr, reason.as_str()),
                Event::Readmitted => sender.metrics.readmitted(service, addr),
                Event::Spared(reason) => sender.metrics.spared(service, reason.as_str()),
            });
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
    let body = Guarded::new(incoming, (in_flight, request_slot)).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}
