//! HTTP: serving a client connection that speaks HTTP/1.x or HTTP/2 (`serve`), and the
//! per-request handler that routes, authorizes, runs the pipeline and answers errors
//! (`handler`).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::state::Proxy;
use crate::telemetry::metrics::Direction;
use crate::upstream::endpoint::Endpoint;

mod handler;
pub mod mux;
mod serve;

pub use serve::serve;

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
    /// The local application's endpoint (inbound), looked up once per connection.
    app: Option<Arc<Endpoint>>,
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
        let app = match &target {
            Target::App(addr) => Some(proxy.registry.pinned(*addr, None)),
            _ => None,
        };
        Self {
            client,
            direction,
            target,
            peer_identity,
            client_requests,
            app,
        }
    }
}

/// The header that tells the application who called (inbound, mTLS callers only). One that
/// arrives from outside is removed, so the application can trust it.
pub const CLIENT_ID_HEADER: &str = "x-sidemesh-client-id";

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
