//! An upstream endpoint: its pooled connections, the requests in flight to it (for
//! least-request balancing), and its outlier-detection score (`outlier.rs`).
//!
//! Endpoints live in a registry keyed by address and survive config reloads, so pooled
//! connections and ejections are not lost when the routing YAML changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response, Version};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpStream;

use crate::identity::tls::{Carried, MaybeTls};
use crate::identity::workload::Credentials;
use crate::proto::body::Body;
use crate::proto::h1;
use crate::respond::ProxyError;
use crate::upstream::breaker::{Breaker, ConnSlot, Slots, Slotted};
use crate::upstream::mux::{MuxPool, Opened, Sent};
use crate::upstream::outlier::{EndpointHealth, Reason};

/// Connection settings shared by every endpoint.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// The mesh TLS handshake after a connect (see `Timeouts::tls_handshake`).
    pub tls_handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// Bounds on upstream HTTP/1 response heads.
    pub response_limits: crate::proto::h1::head::HeadLimits,
    /// HTTP/1.x to meshed peers multiplexed over HTTP/2 (`proto::mux`), and accepted so.
    pub mux: bool,
}

/// An endpoint's response time for latency-aware balancing: a moving average that decays
/// with time (`DECAY`), except that a slower answer than the estimate replaces it at once
/// (the "peak"), so one slow answer steers traffic away until faster ones bring it down.
/// Two atomics, updated without a lock: a lost update under a race costs one sample.
#[derive(Debug)]
pub struct PeakEwma {
    /// The estimate, in nanoseconds, as `f64` bits.
    estimate: AtomicU64,
    /// When it was last updated, in nanoseconds since `EPOCH`.
    stamp: AtomicU64,
}

/// How fast an estimate forgets: after this long without samples it has decayed by 1/e.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint that has not answered yet: low, so new endpoints are tried.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

impl Default for PeakEwma {
    fn default() -> Self {
        Self {
            estimate: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(nanos_since_epoch()),
        }
    }
}

fn nanos_since_epoch() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl PeakEwma {
    /// The estimate now, decayed by the time since its last sample, in nanoseconds.
    pub fn estimate(&self) -> f64 {
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let since = nanos_since_epoch().saturating_sub(self.stamp.load(Ordering::Relaxed));
        estimate * (-(since as f64) / DECAY.as_nanos() as f64).exp()
    }

    /// One answer's response time.
    pub fn observe(&self, rtt: Duration) {
        let now = nanos_since_epoch();
        let since = now.saturating_sub(self.stamp.swap(now, Ordering::Relaxed));
        let old = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let rtt = rtt.as_nanos() as f64;
        let next = if rtt > old {
            rtt
        } else {
            let keep = (-(since as f64) / DECAY.as_nanos() as f64).exp();
            old * keep + rtt * (1.0 - keep)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
    }
}

/// How one request reaches an endpoint: connection settings, the workload's credentials when
/// the endpoint is meshed (mutual TLS), and the backend's circuit breaker.
#[derive(Debug, Clone, Copy)]
pub struct Via<'a> {
    pub pool: &'a PoolConfig,
    pub tls: Option<&'a Credentials>,
    pub breaker: Option<&'a Breaker>,
}

impl Via<'_> {
    fn max_connections(&self) -> Option<u32> {
        self.breaker.and_then(|b| b.limits.max_connections)
    }
}

/// A new connection's socket, holding its place under `maxConnections`.
pub type Io = TokioIo<Slotted<MaybeTls<TcpStream>>>;

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The SPIFFE ID the endpoint's proxy must present; `None`: not meshed (plaintext).
    pub identity: Option<Arc<str>>,
    in_flight: AtomicUsize,
    /// Outlier detection's score of it.
    pub health: EndpointHealth,
    h1_idle: Mutex<Vec<(h1::client::Conn, Instant)>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
    /// HTTP/1.x multiplexed over HTTP/2 to a meshed peer.
    mux: MuxPool,
    /// Connections open under a circuit breaker's `maxConnections`.
    slots: Arc<Slots>,
    /// Response time estimate for `peakEwma` balancing.
    pub latency: PeakEwma,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
}

/// Decrements the in-flight count when the request (including its response body) is done.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, identity: Option<Arc<str>>) -> Self {
        Self {
            addr,
            identity,
            in_flight: AtomicUsize::new(0),
            health: EndpointHealth::default(),
            h1_idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            mux: MuxPool::default(),
            slots: Arc::default(),
            latency: PeakEwma::default(),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Sends a request over a pooled connection of the request's HTTP version. New
    /// connections use mesh TLS when `via.tls` is given.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        via: Via<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        match req.version() {
            Version::HTTP_2 => self.send_h2(req, via).await,
            _ => self.send_h1(req, via).await,
        }
    }

    /// A place for a new connection under `maxConnections`, or the overflow at once (for the
    /// connections no request waits for: multiplexed, HTTP/2, tunnels).
    fn slot_now(&self, via: &Via<'_>) -> Result<Option<ConnSlot>, ProxyError> {
        match (via.max_connections(), via.breaker) {
            (Some(max), Some(breaker)) => self
                .slots
                .try_open(max)
                .map(Some)
                .ok_or_else(|| breaker.overflow(super::breaker::Threshold::MaxConnections, max)),
            _ => Ok(None),
        }
    }

    /// A new connection: TCP, then mesh TLS when `via.tls` is given (this endpoint is
    /// meshed); `slot` is its place under `maxConnections`.
    pub async fn connect(
        &self,
        via: &Via<'_>,
        carried: Carried,
        slot: Option<ConnSlot>,
    ) -> Result<Io, ProxyError> {
        let pool = via.pool;
        self.connects.fetch_add(1, Ordering::Relaxed);
        let failed = |reason: String| {
            self.connect_failures.fetch_add(1, Ordering::Relaxed);
            ProxyError::Connect {
                endpoint: self.addr,
                reason,
            }
        };
        let stream =
            match tokio::time::timeout(pool.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(failed(e.to_string())),
                Err(_) => {
                    return Err(failed(format!(
                        "timed out after {:?}",
                        pool.connect_timeout
                    )));
                }
            };
        let _ = stream.set_nodelay(true);
        let (Some(credentials), Some(expected)) = (via.tls, &self.identity) else {
            return Ok(TokioIo::new(Slotted::new(MaybeTls::Plain(stream), slot)));
        };
        match crate::identity::tls::connect(
            &credentials.tls,
            stream,
            self.addr.ip(),
            expected,
            carried,
            pool.tls_handshake_timeout,
        )
        .await
        {
            Ok(stream) => Ok(TokioIo::new(Slotted::new(
                MaybeTls::Tls(Box::new(stream)),
                slot,
            ))),
            Err(e) => {
                self.connect_failures.fetch_add(1, Ordering::Relaxed);
                Err(ProxyError::Tls {
                    endpoint: self.addr,
                    reason: e.to_string(),
                })
            }
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        req: Request<Body>,
        via: Via<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let pool = via.pool;
        let cfg = h1::client::Config {
            limits: pool.response_limits,
        };
        let mut fresh = None;
        let req = match via.tls {
            Some(_) if pool.mux && self.identity.is_some() => {
                let connect = || async move {
                    let slot = self.slot_now(&via)?;
                    let io = Box::pin(self.connect(&via, Carried::Mux, slot)).await?;
                    Ok(match io.inner().inner().carried() {
                        Some(Carried::Mux) => Opened::Mux(io.into_inner()),
                        _ => Opened::Http1(h1::client::Conn::new(Box::new(io.into_inner()))),
                    })
                };
                match self
                    .mux
                    .send(self.addr, pool.idle_timeout, req, connect)
                    .await
                {
                    Sent::Done(result) => return result,
                    Sent::Declined(req, conn) => {
                        fresh = conn;
                        req
                    }
                }
            }
            _ => req,
        };
        let (conn, reused) = match fresh {
            Some(conn) => (conn, false),
            None => self.h1_conn(&via).await?,
        };
        // An idle connection the upstream closed at the same moment fails before any answer:
        // a request without a body is then sent again on a new connection.
        match h1::client::send(conn, req, cfg, self.on_idle(pool)).await {
            Ok(resp) => Ok(resp),
            Err(h1::client::SendError::Closed {
                resend: Some(again),
                ..
            }) if reused => {
                Box::pin(async {
                    let (conn, _) = self.h1_conn(&via).await?;
                    h1::client::resend(conn, again, cfg, self.on_idle(pool))
                        .await
                        .map_err(|e| self.h1_error(e))
                })
                .await
            }
            Err(e) => Err(self.h1_error(e)),
        }
    }

    /// A pooled HTTP/1.1 connection (`true`: reused) or a new one. At `maxConnections` the
    /// request waits, as one of at most `maxPendingRequests`, for a connection to come back
    /// to the pool or to close; the route's deadline bounds the wait.
    async fn h1_conn(
        self: &Arc<Self>,
        via: &Via<'_>,
    ) -> Result<(h1::client::Conn, bool), ProxyError> {
        let (Some(max), Some(breaker)) = (via.max_connections(), via.breaker) else {
            return Ok(match self.checkout_h1(via.pool) {
                Some(conn) => (conn, true),
                None => (self.connect_h1(via, None).await?, false),
            });
        };
        let mut waiting = None;
        loop {
            if let Some(conn) = self.checkout_h1(via.pool) {
                return Ok((conn, true));
            }
            if let Some(slot) = self.slots.try_open(max) {
                return Ok((self.connect_h1(via, Some(slot)).await?, false));
            }
            if waiting.is_none() {
                waiting = Some(breaker.wait()?);
            }
            // A wake-up given while nobody waited is kept for this wait, so none is lost
            // between the checks above and here.
            self.slots.freed.notified().await;
        }
    }

    fn h1_error(&self, error: h1::client::SendError) -> ProxyError {
        use h1::client::SendError;
        use h1::head::HeadError;
        match error {
            SendError::ClientBody(fault) => ProxyError::ClientBody(fault),
            SendError::Body(e) => match h1::ClientBodyError::find(&*e) {
                Some(fault) => ProxyError::ClientBody(fault.clone()),
                None => ProxyError::ClientBody(h1::ClientBodyError::Aborted),
            },
            SendError::Head(
                e @ (HeadError::TooLarge { .. } | HeadError::TooManyHeaders { .. }),
            ) => ProxyError::UpstreamHeadTooLarge {
                endpoint: self.addr,
                reason: format!("response {e}"),
            },
            other => ProxyError::Upstream {
                endpoint: self.addr,
                reason: other.to_string(),
            },
        }
    }

    /// Puts a connection whose exchange ended cleanly back in the idle pool.
    fn on_idle(self: &Arc<Self>, pool: &PoolConfig) -> h1::client::OnIdle {
        let this = Arc::downgrade(self);
        let max_idle = pool.max_idle;
        Box::new(move |conn| {
            if let Some(this) = this.upgrade() {
                let mut idle = this.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < max_idle {
                    idle.push((conn, Instant::now()));
                    drop(idle);
                    this.slots.freed.notify_one();
                }
            }
        })
    }

    /// A new HTTP/1.1 connection.
    async fn connect_h1(
        &self,
        via: &Via<'_>,
        slot: Option<ConnSlot>,
    ) -> Result<h1::client::Conn, ProxyError> {
        // Boxed, as every connect below: a connection is made once for many requests, and
        // its future (TCP, then a TLS handshake) would otherwise make every request's larger.
        let io = Box::pin(self.connect(via, Carried::Http1, slot)).await?;
        Ok(h1::client::Conn::new(Box::new(io.into_inner())))
    }

    fn checkout_h1(&self, pool: &PoolConfig) -> Option<h1::client::Conn> {
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((mut conn, since)) = idle.pop() {
            let idle = since.elapsed();
            // A connection used within the last second is taken as it is (a probe is a read
            // syscall per request): servers keep idle connections for seconds, and a request
            // without a body that meets a just-closed one is sent again on a new connection.
            if idle < pool.idle_timeout && (idle < Duration::from_secs(1) || conn.is_usable()) {
                return Some(conn);
            }
        }
        None
    }

    async fn send_h2(
        &self,
        req: Request<Body>,
        via: Via<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let pool = via.pool;
        let mut sender = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref().filter(|s| !s.is_closed()) {
                Some(sender) => sender.clone(),
                None => {
                    let place = self.slot_now(&via)?;
                    let io = Box::pin(self.connect(&via, Carried::Http2, place)).await?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .keep_alive_interval(pool.idle_timeout / 2)
                        .handshake(io)
                        .await
                        .map_err(|e| ProxyError::Connect {
                            endpoint: self.addr,
                            reason: e.to_string(),
                        })?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| ProxyError::upstream(self.addr, &e))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ProxyError::upstream(self.addr, &e))?;
        Ok(resp.map(crate::proto::body::incoming))
    }

    /// A dedicated HTTP/1.1 connection for an upgrade (WebSocket) or a `CONNECT` tunnel:
    /// never pooled.
    pub async fn send_upgrade(
        &self,
        req: Request<Body>,
        via: Via<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let slot = self.slot_now(&via)?;
        let conn = self.connect_h1(&via, slot).await?;
        let cfg = h1::client::Config {
            limits: via.pool.response_limits,
        };
        h1::client::send(conn, req, cfg, Box::new(drop))
            .await
            .map_err(|e| self.h1_error(e))
    }
}

/// What `/config_dump` shows of an endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// The SPIFFE ID its proxy must present (meshed endpoints only).
    pub identity: Option<String>,
    pub in_flight: usize,
    pub ejected: bool,
    /// Why it is ejected (`consecutive-failures`, `success-rate`, `failure-percentage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for: Option<Reason>,
    pub connects: u64,
    pub connect_failures: u64,
    /// Connections open under a circuit breaker's `maxConnections` (0 without one).
    #[serde(skip_serializing_if = "is_zero")]
    pub counted_connections: usize,
    /// Open HTTP/2 connections carrying this endpoint's HTTP/1.x requests (`proto::mux`).
    pub multiplexed_connections: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// An endpoint is its address and, when meshed, the identity its proxy must present.
type EndpointKey = (SocketAddr, Option<Arc<str>>);

/// Endpoints by address, shared across config versions.
///
/// Service endpoints are held by the snapshots that use them (the registry only keeps weak
/// references, so endpoints removed from the config go away). Direct destinations (the local
/// application, pass-through addresses) are in no snapshot, so they are pinned here, with a
/// bound, or their pooled connections would be dropped after every request.
#[derive(Debug, Default)]
pub struct Registry {
    endpoints: Mutex<HashMap<EndpointKey, Weak<Endpoint>>>,
    pinned: Mutex<HashMap<EndpointKey, Arc<Endpoint>>>,
}

/// Most pinned direct destinations; beyond it the least useful (idle) ones are let go.
const MAX_PINNED: usize = 1024;

impl Registry {
    /// The live endpoint for `addr` (a meshed one when its proxy's `identity` is known), or
    /// a new one.
    pub fn get(&self, addr: SocketAddr, identity: Option<Arc<str>>) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr, identity);
        if let Some(ep) = map.get(&key).and_then(Weak::upgrade) {
            return ep;
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        let ep = Arc::new(Endpoint::new(addr, key.1.clone()));
        map.insert(key, Arc::downgrade(&ep));
        ep
    }

    /// A direct destination, kept alive (and its connections pooled) across requests.
    /// `identity`: the address is a meshed proxy that must present it.
    pub fn pinned(&self, addr: SocketAddr, identity: Option<Arc<str>>) -> Arc<Endpoint> {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr, identity);
        if let Some(ep) = pinned.get(&key) {
            return ep.clone();
        }
        if pinned.len() >= MAX_PINNED {
            pinned.retain(|_, ep| ep.in_flight() > 0);
        }
        let ep = self.get(addr, key.1.clone());
        pinned.insert(key, ep.clone());
        ep
    }

    pub fn states(&self) -> Vec<EndpointState> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut states: Vec<EndpointState> = map
            .values()
            .filter_map(Weak::upgrade)
            .map(|ep| EndpointState {
                addr: ep.addr,
                identity: ep.identity.as_deref().map(str::to_string),
                in_flight: ep.in_flight(),
                ejected: ep.health.is_ejected(),
                ejected_for: ep.health.ejected_for(),
                connects: ep.connects.load(Ordering::Relaxed),
                connect_failures: ep.connect_failures.load(Ordering::Relaxed),
                counted_connections: ep.slots.open(),
                multiplexed_connections: ep.mux.open_connections(),
            })
            .collect();
        states.sort_by_key(|s| s.addr);
        states
    }
}
