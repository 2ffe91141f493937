//! Serving a peer proxy's multiplexed connection (ALPN `sidemesh-h2`): every HTTP/2 stream
//! is restored to the HTTP/1.x request the calling proxy received (`proto::mux`) and goes
//! through the same handler as any request; interim responses go back as HTTP/2
//! informational headers, bodies stream both ways under HTTP/2 flow control.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::ConnInfo;
use super::handler::handle;
use crate::drain::Drain;
use crate::proto::body::Body;
use crate::proto::h1::{Interim, InterimResponse};
use crate::proto::mux::{self, RecvBody, Side};
use crate::respond::{self, ProxyError};
use crate::state::Proxy;

/// Interim responses one request may have queued (a burst of `103`s is bounded here).
const INTERIM_QUEUE: usize = 4;

pub async fn serve<I>(io: I, conn: ConnInfo, proxy: Arc<Proxy>, mut drain: Drain)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(mux::STREAM_WINDOW)
        .initial_connection_window_size(mux::CONNECTION_WINDOW)
        .max_frame_size(mux::MAX_FRAME)
        .max_concurrent_streams(mux::MAX_STREAMS.min(proxy.limits.max_concurrent_streams))
        .max_header_list_size(u32::try_from(header_list_ceiling(&proxy)).unwrap_or(u32::MAX))
        .reset_stream_duration(mux::RESET_KEEP);
    let handshake = tokio::time::timeout(proxy.timeouts.header, builder.handshake(io)).await;
    let mut connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "multiplexed connection: HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("multiplexed connection: no HTTP/2 preface in time");
            return;
        }
    };
    let conn = Arc::new(conn);
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept() => accepted,
            () = drain.signaled(), if !draining => {
                // GOAWAY: the calling proxy opens a new connection for new requests, these
                // finish.
                draining = true;
                connection.graceful_shutdown();
                continue;
            }
        };
        match accepted {
            Some(Ok((req, respond))) => {
                // Boxed before it is spawned: the task then moves a pointer, not the whole
                // request's state, each time it is stored and finished.
                tokio::spawn(Box::pin(stream(proxy.clone(), conn.clone(), req, respond)));
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "multiplexed connection ended with an error");
                break;
            }
            None => break,
        }
    }
}

/// The ceiling on a stream's header block: the proxy's own head limits (which the calling
/// proxy's HTTP/1 server applied already) with room for the carried marks.
fn header_list_ceiling(proxy: &Proxy) -> usize {
    (proxy.limits.max_header_bytes + 32 * proxy.limits.max_headers + 4096).saturating_mul(2)
}

async fn stream(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let (mut parts, recv) = req.into_parts();
    let restored = mux::restore_request(&mut parts);
    let carried_h1 = parts.version != http::Version::HTTP_2;
    let resp = match restored {
        Err(e) => respond::error_response(&ProxyError::BadRequest { why: e.to_string() }, false),
        Ok(()) if carried_h1 => {
            let (tx, mut interims) = mpsc::channel::<Box<InterimResponse>>(INTERIM_QUEUE);
            parts.extensions.insert(Interim(tx));
            let req = Request::from_parts(parts, RecvBody::boxed(recv, Side::Request));
            let answer = handle(proxy, conn, req);
            tokio::pin!(answer);
            let resp = loop {
                tokio::select! {
                    biased;
                    Some(interim) = interims.recv() => {
                        let head = mux::informational(interim.status, interim.headers);
                        if respond.send_informational(head).is_err() {
                            return;
                        }
                    }
                    resp = &mut answer => break resp,
                }
            };
            // Interim answers the application sent just before its final one go first.
            while let Ok(interim) = interims.try_recv() {
                let head = mux::informational(interim.status, interim.headers);
                if respond.send_informational(head).is_err() {
                    return;
                }
            }
            resp
        }
        Ok(()) => {
            handle(
                proxy,
                conn,
                Request::from_parts(parts, RecvBody::boxed(recv, Side::Request)),
            )
            .await
        }
    };
    send_response(resp, respond).await;
}

async fn send_response(resp: Response<Body>, mut respond: h2::server::SendResponse<Bytes>) {
    let (mut parts, body) = resp.into_parts();
    mux::encode_response(&mut parts);
    let end = http_body::Body::is_end_stream(&body);
    let head = Response::from_parts(parts, ());
    let stream = match respond.send_response(head, end) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "multiplexed stream: the response head was not sent");
            return;
        }
    };
    if end {
        return;
    }
    if let Err(e) = mux::pump(body, stream).await {
        // The response broke upstream (a truncated answer stays truncated: the stream is
        // reset), or the calling proxy went away.
        tracing::debug!(error = ?e, "multiplexed stream: the response body did not complete");
    }
}
