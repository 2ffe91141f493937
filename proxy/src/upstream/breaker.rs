//! Circuit-breaker thresholds per backend service (`circuitBreaker` in the YAML), kept by the
//! calling proxy on its own traffic: requests in flight to the service, connections open to
//! each of its endpoints, and requests waiting for one of those connections. A request that
//! would pass a threshold is refused at once with a marked 503 (`overflow`), so a slow
//! upstream costs its callers a quick answer instead of a queue without bound.
//!
//! The counts are atomics; a connection holds its slot for as long as it is open (pooled or
//! busy), through [`Slotted`], which wraps its socket.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use sidemesh_config::CircuitBreaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::respond::ProxyError;

/// Which threshold a request ran into, as metrics and the error body name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    MaxRequests,
    MaxConnections,
    MaxPendingRequests,
}

impl Threshold {
    pub const ALL: [Threshold; 3] = [
        Threshold::MaxRequests,
        Threshold::MaxConnections,
        Threshold::MaxPendingRequests,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Threshold::MaxRequests => "maxRequests",
            Threshold::MaxConnections => "maxConnections",
            Threshold::MaxPendingRequests => "maxPendingRequests",
        }
    }
}

/// One backend service's thresholds and counts.
#[derive(Debug)]
pub struct Breaker {
    pub service: Arc<str>,
    pub limits: CircuitBreaker,
    requests: AtomicUsize,
    pending: AtomicUsize,
    /// Overflows, in the order of [`Threshold::ALL`].
    overflows: [Counter; 3],
}

/// A request counted in flight to the service until it (and its response body) is done.
#[derive(Debug)]
pub struct RequestSlot(Arc<Breaker>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request waiting for a connection under `maxConnections`.
#[derive(Debug)]
pub struct PendingSlot<'a>(&'a Breaker);

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Breaker {
    /// `overflows`: one counter per threshold, in the order of [`Threshold::ALL`].
    pub fn new(service: Arc<str>, limits: CircuitBreaker, overflows: [Counter; 3]) -> Self {
        Self {
            service,
            limits,
            requests: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            overflows,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Counts a request in flight, or refuses it at `maxRequests`.
    pub fn admit(self: &Arc<Self>) -> Result<Option<RequestSlot>, ProxyError> {
        let Some(max) = self.limits.max_requests else {
            return Ok(None);
        };
        take(&self.requests, max as usize)
            .then(|| RequestSlot(self.clone()))
            .map(Some)
            .ok_or_else(|| self.overflow(Threshold::MaxRequests, max))
    }

    /// Counts a request as waiting for a connection, or refuses it: at `maxPendingRequests`,
    /// or at once when no request may wait (then it is `maxConnections` that refused it).
    pub fn wait(&self) -> Result<PendingSlot<'_>, ProxyError> {
        let max = self.limits.max_pending_requests;
        if max == 0 {
            return Err(self.overflow(
                Threshold::MaxConnections,
                self.limits.max_connections.unwrap_or(0),
            ));
        }
        take(&self.pending, max as usize)
            .then(|| PendingSlot(self))
            .ok_or_else(|| self.overflow(Threshold::MaxPendingRequests, max))
    }

    /// The error (and count) of a request refused at `threshold`.
    pub fn overflow(&self, threshold: Threshold, limit: u32) -> ProxyError {
        let at = Threshold::ALL.iter().position(|t| *t == threshold);
        if let Some(counter) = at.and_then(|i| self.overflows.get(i)) {
            counter.inc();
        }
        ProxyError::Overflow {
            service: self.service.to_string(),
            threshold: threshold.as_str(),
            limit,
        }
    }
}

/// Adds one to `count` unless it is at `max`.
fn take(count: &AtomicUsize, max: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < max).then(|| n + 1)
        })
        .is_ok()
}

/// An endpoint's open connections under `maxConnections`, and a wake-up for requests waiting
/// for one (a connection back in the pool, or one closed).
#[derive(Debug, Default)]
pub struct Slots {
    open: AtomicUsize,
    pub freed: Notify,
}

/// One open connection's place under `maxConnections`, given back when it closes.
#[derive(Debug)]
pub struct ConnSlot(Arc<Slots>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.freed.notify_one();
    }
}

impl Slots {
    /// A place for a new connection, unless `max` are open.
    pub fn try_open(self: &Arc<Self>, max: u32) -> Option<ConnSlot> {
        take(&self.open, max as usize).then(|| ConnSlot(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A connection's socket with its place under `maxConnections` (none when unlimited): the
/// place is given back when the socket is dropped, wherever that happens (the pool, a
/// multiplexed connection's task, a tunnel).
#[derive(Debug)]
pub struct Slotted<IO> {
    io: IO,
    _slot: Option<ConnSlot>,
}

impl<IO> Slotted<IO> {
    pub fn new(io: IO, slot: Option<ConnSlot>) -> Self {
        Self { io, _slot: slot }
    }

    pub fn inner(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Slotted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Slotted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(limits: CircuitBreaker) -> Arc<Breaker> {
        Arc::new(Breaker::new("s".into(), limits, Default::default()))
    }

    #[test]
    fn max_requests_counts_until_the_slot_is_dropped() {
        let b = breaker(CircuitBreaker {
            max_requests: Some(2),
            max_connections: None,
            max_pending_requests: 0,
        });
        let one = b.admit().expect("admitted").expect("counted");
        let _two = b.admit().expect("admitted").expect("counted");
        let err = b.admit().expect_err("refused");
        assert_eq!(err.code(), "overflow");
        assert!(err.to_string().contains("maxRequests (2)"), "{err}");
        drop(one);
        assert!(b.admit().expect("ok").is_some());
        assert_eq!(b.overflows[0].get(), 1);
    }

    #[test]
    fn no_waiting_is_an_overflow_of_connections_and_a_full_queue_of_pending() {
        let none = breaker(CircuitBreaker {
            max_requests: None,
            max_connections: Some(1),
            max_pending_requests: 0,
        });
        assert!(none.admit().expect("ok").is_none(), "unlimited requests");
        let err = none.wait().expect_err("refused");
        assert!(err.to_string().contains("maxConnections (1)"), "{err}");

        let one = breaker(CircuitBreaker {
            max_requests: None,
            max_connections: Some(1),
            max_pending_requests: 1,
        });
        let waiting = one.wait().expect("ok");
        let err = one.wait().expect_err("refused");
        assert!(err.to_string().contains("maxPendingRequests (1)"), "{err}");
        drop(waiting);
        assert!(one.wait().is_ok());
    }

    #[test]
    fn a_connection_slot_is_given_back_and_wakes_a_waiter() {
        let slots = Arc::new(Slots::default());
        let a = slots.try_open(1).expect("ok");
        assert!(slots.try_open(1).is_none());
        drop(a);
        assert_eq!(slots.open(), 0);
        // The wake-up is stored for the next waiter.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("ok");
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), slots.freed.notified())
                .await
                .expect("woken");
        });
    }
}
