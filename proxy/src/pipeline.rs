//! The proxy's data path, in order, with why each stage is where it is. Every stage is a
//! plain function (async where it waits) over the request's typed context; this file is the
//! only place that calls them in sequence.
//!
//! ```text
//! per connection (conn/accept.rs)
//!  1. accept     a listener per direction (and per upstream in explicit mode); transparent
//!                mode reads the original destination (SO_ORIGINAL_DST), so the proxy knows
//!                where the application meant to go
//!  2. detect     HTTP/1, HTTP/2, TLS or opaque, within a timeout (proto/detect.rs): each
//!                needs a different server, and opaque bytes must pass untouched (conn/tcp.rs)
//!  3. serve      HTTP/1 (proto/h1) or HTTP/2 (hyper), with bounded heads and streams
//!                (http/serve.rs)
//!
//! per request (http/handler.rs, then `run` below)
//!  4. route      host -> service -> route -> destination, once, into the context
//!                (routing/); an unknown service is a 404 from the proxy
//!     authorize  inbound: the local service's policy decides on the caller's identity
//!                (stages/authorize.rs), before the request costs anything
//!  5. limit      token buckets per route (caller side) and per service (inbound): a 429
//!                with Retry-After before any upstream work is spent (stages/ratelimit.rs)
//!     shed       the adaptive concurrency limit (route, or the service inbound): beyond it
//!                a 503 at once, so an overloaded upstream is not handed a queue
//!                (stages/concurrency.rs); after the rate limit, whose refusals cost nothing
//!  6. timeout    the route's deadline over all attempts, so a slow upstream is a 504, not
//!                a hang (stages/timeout.rs)
//!  7. retry      retriable failures sent again within the route's budget, each attempt
//!                under the per-try timeout, to another endpoint than the last when one is
//!                healthy (stages/retry.rs)
//!  8. forward    weighted backend, its circuit breaker (requests, connections, pending),
//!                balanced endpoint, mutual TLS to meshed peers, pooled (or multiplexed)
//!                connection; outcomes feed outlier detection (upstream/)
//! ```
//!
//! Errors from any stage become a response in one place (`respond.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use sidemesh_config::MtlsMode;

use crate::proto::body::Body;
use crate::respond::ProxyError;
use crate::routing::destination::Destination;
use crate::stages::concurrency::{self, Concurrency};
use crate::stages::ratelimit::{self, Caller, Limiter};
use crate::stages::{retry, timeout};
use crate::state::Proxy;
use crate::telemetry::trace::AttemptParent;
use crate::upstream::forward::{self, Sender};

/// What the stages know about one request besides the request itself: set once by the
/// handler (from the connection and routing), read by the stages.
#[derive(Debug)]
pub struct Ctx {
    pub client: SocketAddr,
    /// The caller's SPIFFE ID (inbound mutual TLS only): rate-limit keys.
    pub peer_identity: Option<Arc<str>>,
    pub destination: Destination,
    /// The local service's inbound limit (inbound requests only).
    pub inbound_limit: Option<Arc<Limiter>>,
    /// The local service's adaptive concurrency limit (inbound requests only).
    pub inbound_concurrency: Option<Arc<Concurrency>>,
    /// The request's span, when tracing is on and the route retries: attempts are its
    /// children.
    pub attempt_parent: Option<AttemptParent>,
}

/// Stages 5 to 8 for one routed, admitted request.
pub async fn run(
    proxy: &Proxy,
    ctx: &Ctx,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let route = ctx.destination.route();

    // 5. Refuse over-limit requests before spending anything on them.
    let limiter = route
        .and_then(|r| r.limiter.as_ref())
        .or(ctx.inbound_limit.as_ref());
    let rate = match limiter {
        Some(limiter) => Some(ratelimit::admit(
            limiter,
            &Caller {
                ip: ctx.client.ip(),
                identity: ctx.peer_identity.as_deref(),
                headers: req.headers(),
            },
        )?),
        None => None,
    };

    // 5b. Beyond the adaptive limit, shed at once: the upstream is already as busy as its
    // latency allows.
    let limit = route
        .and_then(|r| r.concurrency.as_ref())
        .or(ctx.inbound_concurrency.as_ref());
    let admitted = match limit {
        Some(limit) => Some(concurrency::admit(limit)?),
        None => None,
    };

    // 6. The route's deadline covers every attempt below.
    let deadline = timeout::deadline(route.and_then(|r| r.timeout()), req.headers());
    let attempts = async {
        match route.and_then(|r| r.retry.as_deref()) {
            // 7. Retriable failures are sent again, within the budget.
            // Boxed: the attempts (and their backoff) would make every request's future
            // larger, retried route or not.
            Some(state) => {
                // Each attempt after the first goes elsewhere when it can.
                let last = std::sync::Mutex::new(None);
                Box::pin(retry::run(state, ctx.attempt_parent.as_ref(), req, |req| {
                    send(proxy, &ctx.destination, req, Some(&last))
                }))
                .await
            }
            None => send(proxy, &ctx.destination, req, None).await,
        }
    };
    let result = timeout::within(deadline, attempts).await;
    if let Some(admitted) = admitted {
        admitted.finish(&result);
    }
    let mut resp = result?;

    if let Some(rate) = rate {
        resp.headers_mut().insert("ratelimit-policy", rate.policy);
        resp.headers_mut().insert("ratelimit", rate.state);
    }
    Ok(resp)
}

/// Stage 8, one attempt: balance, then send, in mutual TLS to a meshed endpoint unless the
/// mesh has it disabled.
/// `last` (retried routes): the endpoint of the attempt before, avoided when another will
/// do; set to this attempt's.
async fn send(
    proxy: &Proxy,
    destination: &Destination,
    req: Request<Body>,
    last: Option<&std::sync::Mutex<Option<SocketAddr>>>,
) -> Result<Response<Body>, ProxyError> {
    let lock =
        |m: &std::sync::Mutex<Option<SocketAddr>>| *m.lock().unwrap_or_else(|p| p.into_inner());
    let avoid = last.and_then(lock);
    let (endpoint, balancer) = destination.pick(req.headers(), avoid)?;
    if let Some(last) = last {
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(endpoint.addr);
    }
    let tls = match &endpoint.identity {
        Some(_) if proxy.mtls() != MtlsMode::Disabled => {
            Some(proxy.identity.current().ok_or(ProxyError::NoCertificate {
                endpoint: endpoint.addr,
            })?)
        }
        _ => None,
    };
    let sender = Sender {
        pool: &proxy.pool,
        metrics: &proxy.metrics,
    };
    let failure_statuses = destination
        .route()
        .and_then(|r| r.config.as_ref())
        .map_or(&[][..], |c| &c.failure_statuses[..]);
    forward::send(sender, endpoint, balancer, tls, failure_statuses, req).await
}
