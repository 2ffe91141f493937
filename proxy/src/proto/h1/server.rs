//! One HTTP/1.x client connection: requests read one after another (pipelined ones wait in
//! the buffer), each checked by the same rules, handed to the proxy's handler with a body
//! that streams as the client sends it, and answered in order.
//!
//! Timeouts, each with its flag: a started head must be complete within `header_timeout`;
//! an idle keep-alive connection is closed after `keepalive_timeout`; a request body that
//! makes no progress for `body_timeout` is answered 408.

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use super::body::{self as h1body, ClientBodyError, Decoder, Framing, Pump};
use super::head::{self, HeadError, HeadLimits, RequestHead};
use super::{Interim, InterimResponse, Io, OnUpgrade, RawTarget, Reason, TargetForm};
use crate::drain::Drain;
use crate::proto::body::{self, Body};
use crate::proto::rewind::Rewind;

/// The bounds of one client connection.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub limits: HeadLimits,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_timeout: Duration,
}

/// A request refused before the handler sees it. How it is answered (status, marker, words)
/// is decided where every other error is, in `respond::refusal`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The head breaks HTTP/1.1's grammar or rules.
    #[error("{0}")]
    Malformed(String),
    /// The head is beyond the proxy's size or count limits.
    #[error("request {0}")]
    TooLarge(HeadError),
    /// The head did not arrive in time.
    #[error("request head not complete after {0:?}")]
    HeadTimeout(Duration),
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Refusal::Malformed(message.into())
    }

    fn from_head(e: HeadError) -> Self {
        match e {
            HeadError::TooLarge { .. } | HeadError::TooManyHeaders { .. } => Refusal::TooLarge(e),
            HeadError::Malformed(why) => Self::bad(format!("malformed HTTP request: {why}")),
        }
    }
}

/// What admission made of a request head.
struct Admitted {
    parts: http::request::Parts,
    framing: Framing,
    keep_alive: bool,
}

/// Serves HTTP/1.x on `io` until the client closes, a request asks to close, a fault makes
/// the connection unusable, or the proxy drains.
///
/// `refused` turns every request the server itself refuses into the bytes of its answer.
pub async fn serve<I, H, F, R>(io: I, cfg: Config, mut drain: Drain, handler: H, refused: R)
where
    I: Io,
    H: Fn(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
    R: Fn(&Refusal) -> Vec<u8>,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = BytesMut::with_capacity(HEAD_READ);
    let mut first = true;
    // Interim answers of the request being handled; one channel for the connection's life,
    // as its requests are handled one at a time.
    let (interim_tx, mut interim_rx) = mpsc::channel(4);
    loop {
        let head = match read_head(&mut rd, &mut buf, &cfg, &mut drain, first).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(refusal) => {
                if let Some(refusal) = refusal {
                    refuse(&mut wr, &refused(&refusal)).await;
                }
                break;
            }
        };
        first = false;
        let method = head.method.clone();
        let version = head.version;
        let Admitted {
            mut parts,
            framing,
            keep_alive,
        } = match admit(head) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                refuse(&mut wr, &refused(&refusal)).await;
                break;
            }
        };

        let (body, mut pump) = match framing {
            Framing::Empty | Framing::Length(0) => (body::empty(), None),
            framing => {
                let (tx, rx) = h1body::channel(framing);
                let pump = Pump::new(
                    Decoder::new(framing, cfg.limits),
                    Some(tx),
                    Some(cfg.body_timeout),
                    true,
                );
                (rx.boxed_unsync(), Some(pump))
            }
        };
        parts.extensions.insert(Interim(interim_tx.clone()));
        let request = Request::from_parts(parts, body);

        // The handler runs while the request body streams in and interim answers go out.
        let response = {
            // Boxed: the handler's future is most of a request's state, and kept inline it
            // would be held by every connection, idle ones included.
            let mut handling = Box::pin(handler(request));
            loop {
                tokio::select! {
                    biased;
                    Some(interim) = interim_rx.recv() => {
                        if version == Version::HTTP_11
                            && write_interim(&mut wr, &interim).await.is_err()
                        {
                            return;
                        }
                    }
                    response = &mut handling => {
                        // Interim answers sent just before the final one still go first.
                        while let Ok(interim) = interim_rx.try_recv() {
                            if version == Version::HTTP_11
                                && write_interim(&mut wr, &interim).await.is_err()
                            {
                                return;
                            }
                        }
                        break response;
                    }
                    stepped = step(&mut pump, &mut rd, &mut buf), if pump_active(&pump) => {
                        if let Err(e) = stepped {
                            tracing::debug!(error = %e, "client request body failed");
                        }
                    }
                }
            }
        };
        // One sent after the final answer (a late retry, a dropped attempt) is not this
        // connection's next request's.
        while interim_rx.try_recv().is_ok() {}

        let keep_alive = keep_alive && !drain.is_draining();
        match respond_with(
            &mut wr, &mut pump, &mut rd, &mut buf, response, &method, version, keep_alive,
        )
        .await
        {
            Ok(Next::KeepAlive) => {}
            Ok(Next::Close) | Err(_) => {
                linger(rd, wr).await;
                return;
            }
            Ok(Next::Upgrade(upstream)) => {
                let client = Rewind::new(buf.split().freeze(), rd.unsplit(wr));
                tunnel(client, upstream).await;
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

fn pump_active(pump: &Option<Pump>) -> bool {
    pump.as_ref().is_some_and(Pump::active)
}

async fn step<R: AsyncRead + Unpin>(
    pump: &mut Option<Pump>,
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<(), ClientBodyError> {
    match pump {
        Some(p) => p.step(rd, buf).await,
        None => std::future::pending().await,
    }
}

/// How much a connection reads at a time while it waits for a head: most request heads come
/// in one read of this much, and an idle connection holds no larger buffer (a body's reads
/// size their own). Once the last request is done with the bytes, the same allocation is
/// reused in place.
const HEAD_READ: usize = 2 * 1024;

/// The next request head. `Ok(None)`: the connection ends quietly (closed, idle, draining).
/// `Err(Some)`: answered with a refusal; `Err(None)`: cut off without one.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    cfg: &Config,
    drain: &mut Drain,
    first: bool,
) -> Result<Option<RequestHead>, Option<Refusal>> {
    let mut deadline = None;
    loop {
        match head::parse_request(buf, cfg.limits) {
            Ok(Some(head)) => return Ok(Some(head)),
            Ok(None) => {}
            Err(e) => return Err(Some(Refusal::from_head(e))),
        }
        if buf.capacity() - buf.len() < HEAD_READ / 4 {
            buf.reserve(HEAD_READ);
        }
        if buf.is_empty() && deadline.is_none() {
            // Between requests: idle until the keep-alive timeout or a drain.
            let idle = if first {
                cfg.header_timeout
            } else {
                cfg.keepalive_timeout
            };
            tokio::select! {
                read = tokio::time::timeout(idle, rd.read_buf(buf)) => match read {
                    Ok(Ok(0) | Err(_)) | Err(_) => return Ok(None),
                    Ok(Ok(_)) => {}
                },
                () = drain.signaled() => return Ok(None),
            }
            deadline = Some(tokio::time::Instant::now() + cfg.header_timeout);
            continue;
        }
        let until =
            *deadline.get_or_insert_with(|| tokio::time::Instant::now() + cfg.header_timeout);
        match tokio::time::timeout_at(until, rd.read_buf(buf)).await {
            Ok(Ok(0) | Err(_)) => return Err(None),
            Ok(Ok(_)) => {}
            Err(_) => {
                return Err(Some(Refusal::HeadTimeout(cfg.header_timeout)));
            }
        }
    }
}

/// Checks a request head and makes the request the handler sees: the target's form and the
/// host rules (RFC 9112 section 3.2), the body's framing, the connection's fate.
fn admit(head: RequestHead) -> Result<Admitted, Refusal> {
    let RequestHead {
        method,
        target,
        version,
        mut headers,
    } = head;
    let framing = super::request_framing(version, &headers).map_err(Refusal::bad)?;
    let text = String::from_utf8_lossy(&target).into_owned();
    let form = super::target_form(&method, &target).map_err(Refusal::bad)?;

    // The one authority this request is for: the target's when it names one, else Host.
    let hosts: Vec<&HeaderValue> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(Refusal::bad("more than one Host header"));
    }
    let host = hosts
        .first()
        .map(|h| h.to_str().unwrap_or("\u{0}").to_string());
    let (uri, authority) = match &form {
        TargetForm::Absolute { authority, path } => {
            (super::routing_uri(path), Some(authority.clone()))
        }
        TargetForm::Authority => (super::routing_uri(&text), Some(text.clone())),
        TargetForm::Origin | TargetForm::Asterisk => {
            match &host {
                Some(h) => super::valid_authority(h, false)
                    .map_err(|why| Refusal::bad(format!("invalid Host header: {why}")))?,
                None if version == Version::HTTP_11 => {
                    return Err(Refusal::bad("an HTTP/1.1 request without a Host header"));
                }
                None => {}
            }
            (super::routing_uri(&text), None)
        }
    };
    if let Some(authority) = authority {
        // A proxy replaces Host with the target's authority (RFC 9112 section 3.2.2), so the
        // application sees the host the request was routed on.
        headers.insert(header::HOST, super::value(&authority));
    }

    let tokens = super::connection_tokens(&headers);
    let keep_alive = match version {
        Version::HTTP_10 => tokens.iter().any(|t| t == "keep-alive"),
        _ => !tokens.iter().any(|t| t == "close"),
    };

    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    request.extensions_mut().insert(RawTarget(target));
    if framing == Framing::Chunked {
        request.extensions_mut().insert(super::Chunked);
    }
    let (parts, ()) = request.into_parts();
    Ok(Admitted {
        parts,
        framing,
        keep_alive,
    })
}

enum Next {
    KeepAlive,
    Close,
    Upgrade(super::Upgraded),
}

/// Writes the response (head, then body as it streams), while the request body may still be
/// arriving. Decides the response's framing for this client.
#[allow(clippy::too_many_arguments)]
async fn respond_with<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    wr: &mut W,
    pump: &mut Option<Pump>,
    rd: &mut R,
    buf: &mut BytesMut,
    response: Response<Body>,
    method: &Method,
    version: Version,
    mut keep_alive: bool,
) -> std::io::Result<Next> {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    let upgrade = parts.extensions.remove::<OnUpgrade>();
    let switching = upgrade.is_some()
        && (status == StatusCode::SWITCHING_PROTOCOLS
            || (method == Method::CONNECT && status.is_success()));
    let no_body = super::response_framing(method, status, &HeaderMap::new())
        .is_ok_and(|f| f == Framing::Empty)
        || switching;
    let headers = &mut parts.headers;
    headers.remove(header::TRANSFER_ENCODING);
    let framing = if no_body {
        Framing::Empty
    } else if let Ok(Some(n)) = super::content_length(headers) {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Framing::Chunked
    } else {
        keep_alive = false;
        Framing::Close
    };
    if !switching {
        if !keep_alive {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else if version == Version::HTTP_10 {
            headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        }
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(super::reason_phrase(
        status,
        parts.extensions.get::<Reason>(),
    ));
    out.extend_from_slice(b"\r\n");
    super::write_fields(&mut out, &parts.headers);
    out.extend_from_slice(b"\r\n");

    if switching {
        wr.write_all(&out).await?;
        wr.flush().await?;
        drop(body);
        return match upgrade {
            Some(on) => match on.take().await {
                Some(upstream) => Ok(Next::Upgrade(upstream)),
                None => Ok(Next::Close),
            },
            None => Ok(Next::Close),
        };
    }

    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut complete = framing == Framing::Empty;
    if complete {
        wr.write_all(&out).await?;
        wr.flush().await?;
        out.clear();
    }
    while !complete {
        tokio::select! {
            biased;
            frame = body.frame() => match frame {
                None => {
                    if framing == Framing::Chunked {
                        h1body::encode_last_chunk(&mut out, None);
                    }
                    // A length-framed body that ended short is a truncated response: the
                    // client must see the connection close, as it would from the upstream.
                    if matches!(framing, Framing::Length(_)) && remaining != 0 {
                        wr.write_all(&out).await?;
                        return Ok(Next::Close);
                    }
                    complete = true;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match framing {
                        Framing::Chunked => h1body::encode_chunk(&mut out, &data),
                        Framing::Length(_) => {
                            let n = (data.len() as u64).min(remaining);
                            out.extend_from_slice(&data[..usize::try_from(n).unwrap_or(data.len())]);
                            remaining -= n;
                            if remaining == 0 {
                                complete = true;
                            }
                        }
                        _ => out.extend_from_slice(&data),
                    },
                    Err(frame) => {
                        if framing == Framing::Chunked {
                            h1body::encode_last_chunk(&mut out, frame.trailers_ref());
                        }
                        complete = true;
                    }
                },
                Some(Err(e)) => {
                    // The upstream's body broke mid-way: so does this one.
                    tracing::debug!(error = %e, "response body failed; closing the client connection");
                    wr.write_all(&out).await?;
                    wr.flush().await?;
                    return Ok(Next::Close);
                }
            },
            // The head waits for the first frame only while that frame is ready: written
            // together they are one write (and one TLS record); a body that is slow to start
            // (a stream of events, a long poll) must not hold its head back.
            () = std::future::ready(()), if !out.is_empty() => {}
            stepped = step(pump, rd, buf), if pump_active(pump) => {
                if let Err(e) = stepped {
                    tracing::debug!(error = %e, "client request body failed while the response streamed");
                    keep_alive = false;
                }
                continue;
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
            out.clear();
        }
    }
    if framing == Framing::Close {
        return Ok(Next::Close);
    }
    // The request body is not needed any more; what remains of it is read and dropped, a
    // little and briefly, or the connection is closed.
    if let Some(p) = pump.as_mut() {
        if !p.finished() {
            p.discard();
            let finished = tokio::time::timeout(Duration::from_secs(1), async {
                let mut budget = 16;
                while p.active() && budget > 0 {
                    if p.step(rd, buf).await.is_err() {
                        return false;
                    }
                    budget -= 1;
                }
                p.finished()
            })
            .await
            .unwrap_or(false);
            if !finished {
                return Ok(Next::Close);
            }
        }
    }
    Ok(if keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    })
}

async fn write_interim<W: AsyncWrite + Unpin>(
    wr: &mut W,
    interim: &InterimResponse,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(interim.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(interim.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    super::write_fields(&mut out, &interim.headers);
    out.extend_from_slice(b"\r\n");
    wr.write_all(&out).await?;
    wr.flush().await
}

async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, answer: &[u8]) {
    let _ = wr.write_all(answer).await;
    let _ = wr.flush().await;
}

/// Closes the connection after the last answer without losing it: the write side is shut,
/// then what the client still sends is read and dropped for a moment, so the kernel does not
/// reset the connection (and the answer with it) over unread bytes.
async fn linger<I: Io>(mut rd: ReadHalf<I>, mut wr: WriteHalf<I>) {
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut total = 0usize;
        while let Ok(n) = rd.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1 << 20 {
                break;
            }
        }
    })
    .await;
}

/// Bytes both ways between an upgraded client connection and the upstream.
async fn tunnel<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, mut upstream: super::Upgraded) {
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}
