//! The last request stage: pick a backend (weighted) and an endpoint (balancer), send the
//! request over a pooled connection, and report the outcome to outlier detection.
//! HTTP/1.1 upgrades (WebSocket) get a dedicated upstream connection and are spliced.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use sidemesh_config::MtlsMode;
use tower::Service;

use crate::app::Proxy;
use crate::balance::PickError;
use crate::body::{self, Body, Guarded, ResponseFuture};
use crate::endpoint::{Endpoint, Outcome};
use crate::headers;
use crate::respond::ProxyError;
use crate::snapshot::RouteEntry;

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
    let upgrade = headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let version = if parts.version == Version::HTTP_2 && !upgrade {
        Version::HTTP_2
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
        Ok(resp) if resp.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    };
    if let Some(balancer) = &balancer {
        if endpoint.report(outcome, &balancer.outlier) {
            proxy.metrics.ejected(&balancer.service, endpoint.addr);
        }
    }
    let mut resp = sent?;

    if let (Some(downstream), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, resp.status())
    {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(splice(downstream, upstream, in_flight));
        let (mut parts, _) = resp.into_parts();
        parts.version = Version::HTTP_11;
        return Ok(Response::from_parts(parts, body::empty()));
    }

    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.extensions.insert(UpstreamEndpoint(endpoint.addr));
    let body = Guarded::new(incoming, in_flight)
        .map_err(body::BoxError::from)
        .boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// Copies bytes both ways between an upgraded client connection and the upstream.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: crate::endpoint::InFlight,
) {
    let (client, server) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
    drop(in_flight);
}
