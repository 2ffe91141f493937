//! Where a request goes: a route of a mesh service (its backends balanced) or one address.

use std::sync::Arc;

use http::HeaderMap;

use crate::respond::ProxyError;
use crate::routing::snapshot::RouteEntry;
use crate::upstream::balance::{Balancer, PickError};
use crate::upstream::endpoint::Endpoint;

/// Routing's decision for one request.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A route of a mesh service: its backends are balanced.
    Route(Arc<RouteEntry>),
    /// One address: the local application (inbound) or an unknown original destination.
    Direct(Arc<Endpoint>),
}

impl Destination {
    pub fn route(&self) -> Option<&Arc<RouteEntry>> {
        match self {
            Destination::Route(route) => Some(route),
            Destination::Direct(_) => None,
        }
    }

    /// The endpoint for one attempt, and the balancer it came from: a backend by weight, then
    /// an endpoint by the backend's balancer (by the hash header's value when it has one),
    /// other than `avoid` (the endpoint the last attempt failed on) when another will do.
    pub fn pick(
        &self,
        headers: &HeaderMap,
        avoid: Option<std::net::SocketAddr>,
    ) -> Result<(&Arc<Endpoint>, Option<&Balancer>), ProxyError> {
        match self {
            Destination::Direct(endpoint) => Ok((endpoint, None)),
            Destination::Route(route) => {
                let balancer = route.backend();
                let key = balancer
                    .hash_header()
                    .and_then(|h| headers.get(h))
                    .map(|v| v.as_bytes());
                let endpoint = balancer.pick_avoiding(key, avoid).map_err(|e| match e {
                    PickError::NoEndpoints => ProxyError::NoEndpoints {
                        service: balancer.service.clone(),
                    },
                    PickError::AllEjected => ProxyError::AllEjected {
                        service: balancer.service.clone(),
                    },
                })?;
                Ok((endpoint, Some(balancer)))
            }
        }
    }
}
