//! Request timeout: the route's `timeout` bounds the time to the response headers; expiry is a
//! 504 from the proxy instead of a caller left hanging. A gRPC caller's `grpc-timeout` header
//! shortens it (never lengthens it): there is no point working past the caller's deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderMap;

use crate::respond::ProxyError;

/// The deadline for a request: the route's timeout, shortened by the caller's `grpc-timeout`.
pub fn deadline(route: Option<Duration>, headers: &HeaderMap) -> Option<Duration> {
    let caller = headers
        .get("grpc-timeout")
        .and_then(|v| grpc_timeout(v.as_bytes()));
    match (route, caller) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}

/// Runs `attempts` within `deadline`: past it, the proxy's 504.
///
/// A future of its own rather than an `async fn`: an `async fn` would keep `attempts` twice in
/// its state (the argument, and the timeout it moves into), which doubles every request's
/// future.
pub fn within<F>(deadline: Option<Duration>, attempts: F) -> Within<F> {
    Within {
        attempts,
        sleep: deadline.map(tokio::time::sleep),
        after: deadline.unwrap_or_default(),
    }
}

pin_project_lite::pin_project! {
    /// `attempts`, ended with `ProxyError::Timeout` when the deadline passes first.
    pub struct Within<F> {
        #[pin]
        attempts: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        after: Duration,
    }
}

impl<T, F: Future<Output = Result<T, ProxyError>>> Future for Within<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.attempts.poll(cx) {
            return Poll::Ready(out);
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(ProxyError::Timeout { after: *this.after })),
            _ => Poll::Pending,
        }
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
