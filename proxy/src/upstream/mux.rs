//! The calling side of HTTP/1.x multiplexed over HTTP/2 (`proto::mux`): per meshed endpoint,
//! shared mutual-TLS HTTP/2 connections, a new one only when every open one carries as many
//! streams as the peer allows.
//!
//! - The first request to an endpoint connects offering ALPN `sidemesh-h2` then `http/1.1`.
//!   A peer that answers `http/1.1` (a proxy from before, or one with multiplexing off) gets
//!   that request on that connection and HTTP/1.1 for a minute, then is asked again, so a
//!   rolling upgrade moves to multiplexing by itself.
//! - Finding a connection takes a plain mutex for a few instructions; only opening one waits
//!   (on an async lock, so concurrent first requests share the one connection).
//! - A stream reset is that request's 502 (`Upstream`, which counts against the endpoint and
//!   is retried on `reset`); a stream the peer refused, or a connection that closed before
//!   the stream opened, is a connect failure, safe to retry. A broken connection is dropped
//!   from the pool and the next request opens another.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;

use crate::proto::body::{Body, Guarded};
use crate::proto::h1::{Interim, InterimResponse};
use crate::proto::mux::{self, PumpError, RecvBody, Side};
use crate::respond::ProxyError;

/// How long a peer that answered `http/1.1` is not asked to multiplex again.
const RECHECK: Duration = Duration::from_secs(60);

/// An endpoint's multiplexed connections.
#[derive(Debug, Default)]
pub struct MuxPool {
    conns: Mutex<Vec<Arc<MuxConn>>>,
    connecting: tokio::sync::Mutex<()>,
    /// Until when the peer is taken not to multiplex.
    declined_until: Mutex<Option<Instant>>,
}

#[derive(Debug)]
pub struct MuxConn {
    sender: h2::client::SendRequest<Bytes>,
    streams: AtomicUsize,
    closed: Arc<AtomicBool>,
    last_used: AtomicU64,
    opened: Instant,
}

/// One stream's claim on its connection, released when the response body ends.
#[derive(Debug)]
pub struct Stream(Arc<MuxConn>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl MuxConn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    fn limit(&self) -> usize {
        self.sender
            .current_max_send_streams()
            .min(mux::MAX_STREAMS as usize)
            .max(1)
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.opened.elapsed().saturating_sub(Duration::from_millis(
            self.last_used.load(Ordering::Relaxed),
        ))
    }
}

/// What a multiplexed send did.
pub(crate) enum Sent {
    Done(Result<Response<Body>, ProxyError>),
    /// The peer does not multiplex: send the request over HTTP/1.1, on this connection when
    /// one was just opened for it.
    Declined(Request<Body>, Option<crate::proto::h1::client::Conn>),
}

/// A new connection's outcome, from the endpoint's connect.
pub(crate) enum Opened<IO> {
    Mux(IO),
    Http1(crate::proto::h1::client::Conn),
}

impl MuxPool {
    pub fn open_connections(&self) -> usize {
        self.lock().iter().filter(|c| c.usable()).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<MuxConn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection with a free stream; closed ones and ones idle past `idle` are let go.
    fn checkout(&self, idle: Duration) -> Option<(Stream, h2::client::SendRequest<Bytes>)> {
        let mut conns = self.lock();
        conns.retain(|c| {
            c.usable() && !(c.streams.load(Ordering::Relaxed) == 0 && c.idle_for() > idle)
        });
        let conn = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < c.limit())?;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some((Stream(conn.clone()), conn.sender.clone()))
    }

    fn declined(&self) -> bool {
        let until = self
            .declined_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    fn decline(&self) {
        *self
            .declined_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + RECHECK);
    }

    /// Sends `req` as a stream. `connect` opens a connection offering `sidemesh-h2`.
    pub(crate) async fn send<IO, C, F>(
        &self,
        endpoint: std::net::SocketAddr,
        idle: Duration,
        req: Request<Body>,
        connect: C,
    ) -> Sent
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        C: Fn() -> F,
        F: Future<Output = Result<Opened<IO>, ProxyError>>,
    {
        // One more round when a connection turned out closed before the stream opened.
        for round in 0..2 {
            let (stream, sender) = match self.checkout(idle) {
                Some(found) => found,
                None => {
                    if self.declined() {
                        return Sent::Declined(req, None);
                    }
                    let _one_at_a_time = self.connecting.lock().await;
                    match self.checkout(idle) {
                        Some(found) => found,
                        None if self.declined() => return Sent::Declined(req, None),
                        None => match connect().await {
                            Err(e) => return Sent::Done(Err(e)),
                            Ok(Opened::Http1(conn)) => {
                                self.decline();
                                return Sent::Declined(req, Some(conn));
                            }
                            Ok(Opened::Mux(io)) => match self.handshake(endpoint, io).await {
                                Err(e) => return Sent::Done(Err(e)),
                                Ok(()) => match self.checkout(idle) {
                                    Some(found) => found,
                                    None => {
                                        return Sent::Done(Err(not_sent(
                                            endpoint,
                                            "the new connection closed at once",
                                        )));
                                    }
                                },
                            },
                        },
                    }
                }
            };
            let sender = match sender.ready().await {
                Ok(sender) => sender,
                Err(e) => {
                    drop(stream);
                    if round == 0 {
                        continue;
                    }
                    return Sent::Done(Err(not_sent(endpoint, &e.to_string())));
                }
            };
            return Sent::Done(send_on(endpoint, stream, sender, req).await);
        }
        Sent::Done(Err(not_sent(endpoint, "the connection closed twice")))
    }

    async fn handshake<IO>(&self, endpoint: std::net::SocketAddr, io: IO) -> Result<(), ProxyError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(mux::STREAM_WINDOW)
            .initial_connection_window_size(mux::CONNECTION_WINDOW)
            .max_frame_size(mux::MAX_FRAME)
            .enable_push(false)
            .reset_stream_duration(mux::RESET_KEEP);
        let (sender, connection) =
            builder
                .handshake(io)
                .await
                .map_err(|e| ProxyError::Connect {
                    endpoint,
                    reason: format!("HTTP/2 handshake: {e}"),
                })?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "multiplexed upstream connection ended");
            }
            done.store(true, Ordering::Relaxed);
        });
        self.lock().push(Arc::new(MuxConn {
            sender,
            streams: AtomicUsize::new(0),
            closed,
            last_used: AtomicU64::new(0),
            opened: Instant::now(),
        }));
        Ok(())
    }
}

/// A failure before the peer saw the request: safe to retry, counted like a failed connect.
fn not_sent(endpoint: std::net::SocketAddr, why: &str) -> ProxyError {
    ProxyError::Connect {
        endpoint,
        reason: format!("multiplexed connection: {why}"),
    }
}

/// One stream: the head, the body pumped beside waiting for the answer, interim answers
/// relayed.
async fn send_on(
    endpoint: std::net::SocketAddr,
    stream: Stream,
    mut sender: h2::client::SendRequest<Bytes>,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let version = req.version();
    let interim = req.extensions().get::<Interim>().cloned();
    let (parts, body) = req.into_parts();
    let end = http_body::Body::is_end_stream(&body);
    let head = match mux::encode_request(parts, endpoint) {
        Ok(head) => head,
        Err(e) => {
            return Err(ProxyError::BadRequest { why: e.to_string() });
        }
    };
    let (mut response, send_stream) = match sender.send_request(head, end) {
        Ok(sent) => sent,
        Err(e) => return Err(not_sent(endpoint, &e.to_string())),
    };
    let mut pump = (!end).then(|| Box::pin(mux::pump(body, send_stream)));
    let mut interims_open = interim.is_some();
    let head = std::future::poll_fn(|cx| {
        while interims_open {
            match response.poll_informational(cx) {
                Poll::Ready(Some(Ok(info))) => {
                    if let Some(Interim(tx)) = &interim {
                        let (parts, ()) = info.into_parts();
                        let _ = tx.try_send(Box::new(InterimResponse {
                            status: parts.status,
                            headers: parts.headers,
                        }));
                    }
                }
                Poll::Ready(_) => interims_open = false,
                Poll::Pending => break,
            }
        }
        Pin::new(&mut response).poll(cx)
    });
    tokio::pin!(head);
    let answered = loop {
        let pumping = async {
            match pump.as_mut() {
                Some(p) => p.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            answered = &mut head => break answered,
            pumped = pumping => {
                pump = None;
                if let Err(PumpError::Body(e)) = pumped {
                    // The client's body broke: the stream is reset, and the fault is theirs.
                    return Err(ProxyError::upstream(endpoint, &*e));
                }
            }
        }
    };
    let resp = match answered {
        Ok(resp) => resp,
        Err(e) => return Err(stream_error(endpoint, &e)),
    };
    if let Some(pump) = pump {
        // The answer came before the whole request body: it keeps flowing (or is reset when
        // the peer no longer wants it).
        tokio::spawn(async move {
            if let Err(e) = pump.await {
                tracing::debug!(error = ?e, "multiplexed request body not completed");
            }
        });
    }
    let (mut parts, recv) = resp.into_parts();
    mux::restore_response(&mut parts, version);
    let body = Guarded::new(RecvBody::boxed(recv, Side::Response), stream).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// A stream that ended without an answer: refused (never processed) is a connect failure,
/// anything else the peer's reset or a broken connection, a 502.
fn stream_error(endpoint: std::net::SocketAddr, e: &h2::Error) -> ProxyError {
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return not_sent(endpoint, "the peer refused the stream");
    }
    ProxyError::Upstream {
        endpoint,
        reason: format!("multiplexed stream: {e}"),
    }
}
