//! Request timeout: the route's `timeout` bounds the time to the response headers; expiry is a
//! 504 from the proxy instead of a caller left hanging. A gRPC caller's `grpc-timeout` header
//! shortens it (never lengthens it): there is no point working past the caller's deadline.

use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, Service};

use crate::proto::body::{Body, ResponseFuture};
use crate::respond::ProxyError;
use crate::upstream::forward::Destination;

#[derive(Debug, Clone, Copy, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for Timeout<S>
where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = ResponseFuture,
        >,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let route = match req.extensions().get::<Destination>() {
            Some(Destination::Route(route)) => route.timeout(),
            _ => None,
        };
        let caller = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()));
        let limit = match (route, caller) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match limit {
                Some(after) => tokio::time::timeout(after, fut)
                    .await
                    .unwrap_or(Err(ProxyError::Timeout { after })),
                None => fut.await,
            }
        })
    }
}

/// Parses gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"5000u"), Some(Duration::from_millis(5)));
        for bad in [&b""[..], b"m", b"100", b"123456789m", b"10x", b"-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
