//! The proxy's data path, in order. Connection stages are plain async functions; request
//! stages are tower layers around the final `Forward` service.
//!
//! ```text
//! per connection (accept.rs)
//!  1. accept     a listener per direction (and per upstream in explicit mode); transparent
//!                mode reads the original destination (SO_ORIGINAL_DST), so the proxy knows
//!                where the application meant to go
//!  2. detect     HTTP/1, HTTP/2, TLS or opaque, within a timeout (detect.rs): each needs a
//!                different server, and opaque bytes must pass untouched (tcp.rs)
//!  3. serve      hyper, with bounded header size, header count and streams (http.rs)
//!
//! per request (http.rs, then `stack` below)
//!  4. route      host -> service -> route -> destination, once, into the request's
//!                extensions (snapshot.rs); an unknown service is a 404 from the proxy
//!  5. limit      token buckets per route (caller side) and per service (inbound): a 429
//!                with Retry-After before any upstream work is spent (ratelimit.rs)
//!  6. timeout    the route's deadline over all attempts, so a slow upstream is a 504, not
//!                a hang (timeout.rs)
//!  7. retry      retriable failures sent again within the route's budget, each attempt
//!                under the per-try timeout (retry.rs)
//!  8. forward    weighted backend, balanced endpoint, pooled connection; outcomes feed
//!                outlier detection (forward.rs, balance.rs, endpoint.rs)
//! ```
//!
//! Errors from any stage become a response in one place (`respond.rs`).

use std::sync::Arc;

use http::Request;
use tower::{Service, ServiceBuilder};

use crate::app::Proxy;
use crate::proto::body::{Body, ResponseFuture};
use crate::stages::ratelimit::{RateLimitLayer, RateLimitService};
use crate::stages::retry::{Retry, RetryLayer};
use crate::stages::timeout::{Timeout, TimeoutLayer};
use crate::upstream::forward::Forward;

/// The request stages after routing, outermost first.
///
/// The type is spelled out (not `impl Service`) because an opaque return type hides from rustc
/// that the response future is `Send` for hyper's HTTP/2 executor.
pub fn stack(proxy: Arc<Proxy>) -> RateLimitService<Timeout<Retry<Forward>>> {
    ServiceBuilder::new()
        // 5. Refuse over-limit requests before spending anything on them.
        .layer(RateLimitLayer)
        // 6. The route's deadline covers every attempt below.
        .layer(TimeoutLayer)
        // 7. Retriable failures are sent again, within the budget.
        .layer(RetryLayer)
        // 8. Balance and send.
        .service(Forward::new(proxy))
}

/// Runs one request through the stages. Every stage is always ready (none applies
/// backpressure through `poll_ready`), so the stack is called directly. Returning the concrete
/// boxed future keeps the caller's async state free of generic futures, which rustc cannot
/// always prove `Send` for hyper's HTTP/2 executor.
pub fn call(proxy: Arc<Proxy>, req: Request<Body>) -> ResponseFuture {
    stack(proxy).call(req)
}
