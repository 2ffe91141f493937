//! The last request stage: pick a backend (weighted) and an endpoint (balancer), send the
//! request over a pooled connection, and report the outcome to outlier detection.
//! WebSocket upgrades and CONNECT tunnels get a dedicated upstream connection; the HTTP/1
//! server splices it to the client once the upstream agrees.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use sidemesh_config::MtlsMode;
use tower::Service;

use crate::app::Proxy;
use crate::proto::body::{Body, Guarded, ResponseFuture};
use crate::proto::headers;
use crate::respond::ProxyError;
use crate::routing::snapshot::RouteEntry;
use crate::upstream::balance::PickError;
use crate::upstream::endpoint::{Endpoint, Outcome};

/// The endpoint that answered, in the response's extensions (for spans).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamEndpoint(pub std::net::SocketAddr);

/// Where a request goes, decided by routing and handed to this stage in the request's extensions.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A route of a mesh service: its backends are balanced.
    Route(Arc<RouteEntry>),
    /// One address: the local application (inbound) or an unknown original destination.
    Direct(Arc<Endpoint>),
}

#[derive(Debug, Clone)]
pub struct Forward {
    proxy: Arc<Proxy>,
}

impl Forward {
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let proxy = self.proxy.clone();
        Box::pin(forward(proxy, req))
    }
}

async fn forward(proxy: Arc<Proxy>, mut req: Request<Body>) -> Result<Response<Body>, ProxyError> {
    let destination = req
        .extensions_mut()
        .remove::<Destination>()
        .expect("routing always sets a destination before forwarding");
    let (endpoint, balancer) = match &destination {
        Destination::Route(route) => {
            let balancer = route.backend().clone();
            let key = balancer
                .hash_header()
                .and_then(|h| req.headers().get(h))
                .map(|v| v.as_bytes());
            let endpoint = balancer.pick(key).map_err(|e| match e {
                PickError::NoEndpoints => ProxyError::NoEndpoints {
                    service: balancer.service.clone(),
                },
                PickError::AllEjected => ProxyError::AllEjected {
                    service: balancer.service.clone(),
                },
            })?;
            (endpoint.clone(), Some(balancer))
        }
        Destination::Direct(endpoint) => (endpoint.clone(), None),
    };
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

    // Meshed endpoints get mutual TLS unless the mesh has it disabled.
    let tls = match &endpoint.identity {
        Some(_) if proxy.mtls() != MtlsMode::Disabled => {
            Some(proxy.identity.current().ok_or(ProxyError::NoCertificate {
                endpoint: endpoint.addr,
            })?)
        }
        _ => None,
    };
    let sent = if upgrade {
        endpoint
            .send_upgrade(req, &proxy.pool, tls.as_deref())
            .await
    } else {
        endpoint.send(req, &proxy.pool, tls.as_deref()).await
    };
    let outcome = match &sent {
        Ok(resp) if resp.status().is_server_error() => Some(Outcome::Failure),
        Ok(_) => Some(Outcome::Success),
        Err(e) if e.counts_against_endpoint() => Some(Outcome::Failure),
        // The client's faults and answers beyond the proxy's limits say nothing of the
        // endpoint's health.
        Err(_) => None,
    };
    if let (Some(balancer), Some(outcome)) = (&balancer, outcome) {
        if endpoint.report(outcome, &balancer.outlier) {
            proxy.metrics.ejected(&balancer.service, endpoint.addr);
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
