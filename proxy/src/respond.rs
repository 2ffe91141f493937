//! The one place where a proxy error becomes a response: status, marker headers, a short body
//! that says why, and a log line.
//!
//! Every synthetic response carries `server: sidemesh` and `x-sidemesh-error: <code>`, so an
//! operator can tell a proxy 503 from an application 503. gRPC callers get a trailers-only
//! gRPC error (HTTP 200 with `grpc-status`), which is what gRPC clients understand.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::proto::body::{self, Body};
use crate::proto::detect::DetectError;
use crate::proto::h1::server::Refusal;

/// Which side of the proxy a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something the proxy refuses.
    Downstream,
    /// The proxy's own state (config, no endpoints, timeouts).
    Proxy,
    /// The upstream endpoint failed.
    Upstream,
}

/// Everything that can fail between accepting a request and returning its response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no service `{name}` in the mesh config")]
    UnknownService { name: String },
    #[error("service `{service}` has no endpoints")]
    NoEndpoints { service: String },
    #[error("every endpoint of `{service}` is ejected after failures")]
    AllEjected { service: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("mutual TLS with {endpoint} failed: {reason}")]
    Tls {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("no workload certificate yet: cannot call the meshed endpoint {endpoint}")]
    NoCertificate { endpoint: SocketAddr },
    #[error("{identity} is not allowed to call {service}")]
    Forbidden { identity: String, service: String },
    #[error("upstream {endpoint} failed: {reason}")]
    Upstream {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("upstream {endpoint} sent a response head beyond the proxy's limits: {reason}")]
    UpstreamHeadTooLarge {
        endpoint: SocketAddr,
        reason: String,
    },
    #[error("{0}")]
    ClientBody(crate::proto::h1::ClientBodyError),
    #[error(
        "`{service}` is at its circuit breaker's {threshold} ({limit}): refused at once rather than queued"
    )]
    Overflow {
        service: String,
        threshold: &'static str,
        limit: u32,
    },
    #[error(
        "{scope} is at its adaptive concurrency limit ({limit} requests in flight): shed at once"
    )]
    Overloaded { scope: String, limit: u32 },
    #[error("request timed out after {after:?}")]
    Timeout { after: Duration },
    #[error("bad request: {why}")]
    BadRequest { why: String },
    #[error("request {why}")]
    HeadersTooLarge { why: String },
    #[error("rate limit `{limit}` ({rate}) exceeded; retry in {retry_after:?}")]
    RateLimited {
        limit: String,
        rate: sidemesh_config::units::Rate,
        retry_after: Duration,
        headers: Box<RateHeaders>,
    },
}

impl ProxyError {
    /// Whether this failure is the endpoint's own, for outlier detection: a failed
    /// connection or exchange is; the client's faults, the proxy's limits and an answer the
    /// endpoint did give (however large its head) are not.
    pub fn counts_against_endpoint(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::Tls { .. } | ProxyError::Upstream { .. }
        )
    }

    /// An upstream exchange's failure, with a client-body fault found anywhere in its
    /// causes reported as the client's.
    pub fn upstream(endpoint: SocketAddr, error: &(dyn std::error::Error + 'static)) -> Self {
        match crate::proto::h1::ClientBodyError::find(error) {
            Some(fault) => ProxyError::ClientBody(fault.clone()),
            None => ProxyError::Upstream {
                endpoint,
                reason: error.to_string(),
            },
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::BadRequest { .. }
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::RateLimited { .. }
            | ProxyError::Forbidden { .. } => Side::Downstream,
            ProxyError::Connect { .. }
            | ProxyError::Tls { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamHeadTooLarge { .. } => Side::Upstream,
            _ => Side::Proxy,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownService { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoints { .. }
            | ProxyError::AllEjected { .. }
            | ProxyError::Overflow { .. }
            | ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. }
            | ProxyError::Tls { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamHeadTooLarge { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ClientBody(e) => e.status(),
            ProxyError::NoCertificate { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Short machine-readable reason, sent as `x-sidemesh-error`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::UnknownService { .. } => "unknown-service",
            ProxyError::NoEndpoints { .. } => "no-endpoints",
            ProxyError::AllEjected { .. } => "all-endpoints-ejected",
            ProxyError::Connect { .. } => "upstream-connect-failure",
            ProxyError::Upstream { .. } => "upstream-failure",
            ProxyError::UpstreamHeadTooLarge { .. } => "upstream-headers-too-large",
            ProxyError::ClientBody(e) => e.code(),
            ProxyError::Tls { .. } => "upstream-tls-failure",
            ProxyError::NoCertificate { .. } => "no-certificate",
            ProxyError::Forbidden { .. } => "forbidden",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Timeout { .. } => "request-timeout",
            ProxyError::BadRequest { .. } => "bad-request",
            ProxyError::HeadersTooLarge { .. } => "headers-too-large",
            ProxyError::RateLimited { .. } => "rate-limited",
        }
    }
}

/// Turns an error into the response the client sees, and logs it once.
pub fn error_response(error: &ProxyError, grpc: bool) -> Response<Body> {
    match error.side() {
        Side::Downstream => tracing::debug!(error = %error, "refused request"),
        // Shedding comes in floods, and each one is counted in metrics.
        _ if matches!(
            error,
            ProxyError::Overflow { .. } | ProxyError::Overloaded { .. }
        ) =>
        {
            tracing::debug!(error = %error, code = error.code(), "shed request")
        }
        _ => tracing::info!(error = %error, code = error.code(), "proxy answered with an error"),
    }
    let mut resp = if grpc {
        grpc_error(error.status(), error.code(), &error.to_string())
    } else {
        synthetic(error.status(), error.code(), &error.to_string())
    };
    if let ProxyError::RateLimited {
        retry_after,
        headers,
        ..
    } = error
    {
        let h = resp.headers_mut();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(ceil_secs(*retry_after)),
        );
        h.insert("ratelimit-policy", headers.policy.clone());
        h.insert("ratelimit", headers.state.clone());
    }
    resp
}

/// A plain-text response made by the proxy itself.
pub fn synthetic(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from(format!("sidemesh: {message}\n"))));
    *resp.status_mut() = status;
    mark(resp.headers_mut(), code);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A trailers-only gRPC error (HTTP 200, `grpc-status` in the headers).
fn grpc_error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let grpc_status = match status {
        StatusCode::NOT_FOUND => "12", // UNIMPLEMENTED: no such service here
        StatusCode::GATEWAY_TIMEOUT => "4", // DEADLINE_EXCEEDED
        StatusCode::BAD_REQUEST | StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE => {
            "13"
        } // INTERNAL
        StatusCode::TOO_MANY_REQUESTS => "8", // RESOURCE_EXHAUSTED
        StatusCode::FORBIDDEN => "7",  // PERMISSION_DENIED
        _ => "14",                     // UNAVAILABLE
    };
    let mut resp = Response::new(body::empty());
    let headers = resp.headers_mut();
    mark(headers, code);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from_static(grpc_status));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&format!("sidemesh: {message}"))) {
        headers.insert("grpc-message", v);
    }
    resp
}

/// The marker on every answer a Sidemesh proxy makes itself.
pub const ERROR_HEADER: &str = "x-sidemesh-error";

fn mark(headers: &mut http::HeaderMap, code: &'static str) {
    headers.insert(header::SERVER, HeaderValue::from_static("sidemesh"));
    headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII except `%` stays as is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `RateLimit-Policy` and `RateLimit` header values: on an admitted request's response and
/// on the 429 of a refused one.
#[derive(Debug, Clone, PartialEq)]
pub struct RateHeaders {
    pub policy: HeaderValue,
    pub state: HeaderValue,
}

/// Whole seconds, rounded up, at least 1 (as `Retry-After` and `t=` want).
pub fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// The answer to a request the HTTP/1 server refused before any handler saw it, and the
/// reason it is counted under (`connection_refused`).
pub fn head_refusal(refusal: &Refusal) -> (&'static str, Vec<u8>) {
    let (status, code) = match refusal {
        Refusal::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed-request"),
        Refusal::TooLarge(_) => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
        ),
        Refusal::HeadTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "header-timeout"),
    };
    tracing::debug!(%status, reason = %refusal, "refused a request");
    (code, raw_http1(status, code, &refusal.to_string()))
}

/// The answer to a connection refused during protocol detection, when it spoke HTTP/1
/// (`None`: closed without one), and the reason it is counted under.
pub fn detect_refusal(error: &DetectError) -> Option<(&'static str, Vec<u8>)> {
    let (status, code) = match error {
        DetectError::HeadTooLarge { .. } => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
        ),
        DetectError::Malformed { .. } => (StatusCode::BAD_REQUEST, "malformed-request"),
        DetectError::HeadTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "header-timeout"),
        DetectError::Closed | DetectError::Io(_) => return None,
    };
    tracing::debug!(error = %error, "refused a connection during detection");
    Some((code, raw_http1(status, code, &error.to_string())))
}

/// The answer to a plaintext HTTP/1 connection on a strict-mTLS inbound port.
pub fn plaintext_refusal() -> Vec<u8> {
    raw_http1(
        StatusCode::FORBIDDEN,
        "mtls-required",
        "this port only accepts mutual TLS from meshed proxies (mtls: strict)",
    )
}

/// Raw HTTP/1.1 bytes for errors found before hyper sees the connection (a malformed or
/// oversized request head, a client too slow to send one). The connection is closed after.
fn raw_http1(status: StatusCode, code: &'static str, message: &str) -> Vec<u8> {
    let body = format!("sidemesh: {message}\n");
    format!(
        "HTTP/1.1 {} {}\r\nserver: sidemesh\r\nx-sidemesh-error: {code}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}
