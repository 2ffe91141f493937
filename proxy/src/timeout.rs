//! Request timeout: the route's `timeout` bounds the time to the response headers; expiry is a
//! 504 from the proxy instead of a caller left hanging.

use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::body::{Body, ResponseFuture};
use crate::forward::Destination;
use crate::respond::ProxyError;

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
        let limit = match req.extensions().get::<Destination>() {
            Some(Destination::Route(route)) => route.timeout(),
            _ => None,
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
