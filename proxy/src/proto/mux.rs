//! HTTP/1.x carried over HTTP/2 between two Sidemesh proxies.
//!
//! A calling proxy sends a meshed endpoint's HTTP/1.x requests as streams of one shared
//! mutual-TLS HTTP/2 connection (ALPN `sidemesh-h2`, offered beside `http/1.1` so a peer
//! without it answers the old way). What HTTP/2 cannot say is written into two headers the
//! receiving proxy removes again:
//!
//! - `sidemesh-orig-proto: HTTP/1.1` (or `HTTP/1.0`), with `; chunked` when the body came
//!   chunked (an empty chunked body stays chunked) and `; no-host` when an HTTP/1.0 request
//!   had no `Host` (HTTP/2 needs an authority; the application must not see one appear).
//! - `sidemesh-orig-target`: the request target as the client sent it (absolute form,
//!   characters `http::Uri` does not hold), only when it differs from `:path`.
//!
//! and on responses `sidemesh-orig-reason` (a reason phrase other than the standard one).
//! A body that breaks at its source ends with the trailer `sidemesh-aborted`, which the
//! receiving proxy turns back into a broken body (the client sees the same truncation).
//! Interim (1xx) responses travel as HTTP/2 informational headers. The receiving proxy
//! rebuilds the request its HTTP/1 server would have parsed, so the application sees the
//! same request line, fields and framing as it would without the mesh.
//!
//! This module is the codec: the headers, the body adapter, the body pump. The connection
//! pool is `upstream::mux`, the server `http::mux`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, Version};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;

use crate::proto::body::{Body, BoxError};
use crate::proto::h1::{self, Chunked, RawTarget, Reason};

pub const ORIG_PROTO: HeaderName = HeaderName::from_static("sidemesh-orig-proto");
pub const ORIG_TARGET: HeaderName = HeaderName::from_static("sidemesh-orig-target");
pub const ORIG_REASON: HeaderName = HeaderName::from_static("sidemesh-orig-reason");
/// A trailer that says the body broke off at its source (a truncated answer, an aborted
/// upload): the receiving proxy turns it back into a broken body. A stream reset would do
/// the same, but a reset sent right after the head can discard the head still queued.
pub const ABORTED: HeaderName = HeaderName::from_static("sidemesh-aborted");

/// HTTP/2 settings of a multiplexed connection, both ends. The stream window is well above
/// the 64 KiB default, so one large body keeps flowing at the pair's bandwidth-delay product;
/// the connection window is several streams' worth, so it does not stall the small requests
/// beside it.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
pub const MAX_FRAME: u32 = 64 << 10;
/// Streams one connection carries at once; a calling proxy opens another connection beyond.
pub const MAX_STREAMS: u32 = 256;
/// A stream's reset is kept this long to recognise late frames for it.
pub const RESET_KEEP: Duration = Duration::from_secs(1);

/// HTTP/2 carries no connection-specific fields (RFC 9113 section 8.2.2). Hop-by-hop
/// stripping removed them already on both sides; this keeps every stream legal.
fn strip_connection_fields(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// A request head that cannot be carried (it should not happen: the HTTP/1 server admitted
/// it), or a carried one that cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub &'static str);

/// The calling side: an HTTP/1.x request (as `headers::for_upstream` left it) into the head
/// of an HTTP/2 stream. The endpoint's address is the authority when the request has no
/// `Host` (HTTP/2 needs one; the receiving proxy does not pass it on).
pub fn encode_request(
    parts: http::request::Parts,
    endpoint: std::net::SocketAddr,
) -> Result<Request<()>, CodecError> {
    let http::request::Parts {
        method,
        uri,
        version,
        mut headers,
        extensions,
        ..
    } = parts;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let mut mark = String::with_capacity(24);
    mark.push_str(if version == Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    });
    if extensions.get::<Chunked>().is_some() {
        mark.push_str("; chunked");
    }
    if host.is_none() {
        mark.push_str("; no-host");
    }
    if let Some(raw) = extensions.get::<RawTarget>() {
        if raw.0 != path.as_bytes() {
            let value = HeaderValue::from_maybe_shared(raw.0.clone())
                .map_err(|_| CodecError("a request target that is no header value"))?;
            headers.insert(ORIG_TARGET, value);
        }
    }
    headers.insert(ORIG_PROTO, h1::value(&mark));
    strip_connection_fields(&mut headers);
    let authority = match host.and_then(|h| h.parse::<http::uri::Authority>().ok()) {
        Some(authority) => authority,
        None => endpoint
            .to_string()
            .parse()
            .map_err(|_| CodecError("no valid authority for the stream"))?,
    };
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| CodecError("no valid authority for the stream"))?;
    let mut head = Request::new(());
    *head.method_mut() = method;
    *head.uri_mut() = uri;
    *head.version_mut() = Version::HTTP_2;
    *head.headers_mut() = headers;
    Ok(head)
}

/// The receiving side: a stream's head back into the HTTP/1.x request the calling proxy's
/// HTTP/1 server had parsed. A stream without `sidemesh-orig-proto` is left as HTTP/2.
pub fn restore_request(parts: &mut http::request::Parts) -> Result<(), CodecError> {
    let Some(mark) = parts.headers.remove(ORIG_PROTO) else {
        return Ok(());
    };
    let mark = mark
        .to_str()
        .map_err(|_| CodecError("unreadable sidemesh-orig-proto"))?;
    let mut items = mark.split(';').map(str::trim);
    parts.version = match items.next() {
        Some("HTTP/1.1") => Version::HTTP_11,
        Some("HTTP/1.0") => Version::HTTP_10,
        _ => return Err(CodecError("unknown version in sidemesh-orig-proto")),
    };
    for flag in items {
        match flag {
            "chunked" => {
                parts.extensions.insert(Chunked);
            }
            // The authority HTTP/2 needed is not the application's: without Host the request
            // goes on without one, as it came.
            "no-host" => {}
            // Flags a newer proxy may add are ignored rather than refused.
            _ => {}
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let target = match parts.headers.remove(ORIG_TARGET) {
        Some(raw) => Bytes::copy_from_slice(raw.as_bytes()),
        None => Bytes::from(path.clone()),
    };
    // What routing and the stages read: the path in origin form, as the HTTP/1 server made
    // it (an absolute-form target's authority is in `Host` already: that server put it there).
    parts.uri = h1::routing_uri(&path);
    parts.extensions.insert(RawTarget(target));
    Ok(())
}

/// The receiving side, responding: a reason phrase other than the standard one goes along.
pub fn encode_response(parts: &mut http::response::Parts) {
    if let Some(reason) = parts.extensions.remove::<Reason>() {
        if let Ok(value) = HeaderValue::from_maybe_shared(reason.0) {
            parts.headers.insert(ORIG_REASON, value);
        }
    }
    strip_connection_fields(&mut parts.headers);
    parts.version = Version::HTTP_2;
}

/// The calling side, on the response: the reason phrase back, the version the client spoke.
pub fn restore_response(parts: &mut http::response::Parts, version: Version) {
    if let Some(reason) = parts.headers.remove(ORIG_REASON) {
        parts
            .extensions
            .insert(Reason(Bytes::copy_from_slice(reason.as_bytes())));
    }
    parts.version = version;
}

/// Which side a stream's body came from: a request body that breaks is the calling client's
/// fault (it aborted, and the calling proxy reset the stream), never the application's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// An HTTP/2 stream's body as the proxy's body type; received bytes are handed back to flow
/// control as they are read, so the window refills at the reader's pace.
#[derive(Debug)]
pub struct RecvBody {
    stream: h2::RecvStream,
    side: Side,
    data_done: bool,
}

impl RecvBody {
    pub fn boxed(stream: h2::RecvStream, side: Side) -> Body {
        Self {
            stream,
            side,
            data_done: false,
        }
        .boxed_unsync()
    }

    fn error(&self, e: h2::Error) -> BoxError {
        match self.side {
            Side::Request => Box::new(h1::ClientBodyError::Aborted),
            Side::Response => Box::new(e),
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match self.stream.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(self.error(e)))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.stream.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) if trailers.contains_key(ABORTED) => {
                Poll::Ready(Some(Err(match self.side {
                    Side::Request => Box::new(h1::ClientBodyError::Aborted),
                    Side::Response => "the upstream's response body broke off".into(),
                })))
            }
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(self.error(e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// Why a body pump stopped early.
#[derive(Debug)]
pub enum PumpError {
    /// The body being sent failed (its own source broke): the stream was reset.
    Body(BoxError),
    /// The peer reset the stream or the connection broke.
    Stream(h2::Error),
}

/// Sends `body` on `stream` as the peer's flow control allows, then its trailers or the end
/// of the stream. A body that fails ends with the `sidemesh-aborted` trailer, so the peer sees
/// a broken body and not a short one.
pub async fn pump(mut body: Body, mut stream: h2::SendStream<Bytes>) -> Result<(), PumpError> {
    loop {
        let frame = tokio::select! {
            biased;
            reset = std::future::poll_fn(|cx| stream.poll_reset(cx)) => {
                return Err(match reset {
                    Ok(reason) => PumpError::Stream(h2::Error::from(reason)),
                    Err(e) => PumpError::Stream(e),
                });
            }
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => {
                return stream
                    .send_data(Bytes::new(), true)
                    .map_err(PumpError::Stream);
            }
            Some(Err(e)) => {
                let mut aborted = HeaderMap::new();
                aborted.insert(ABORTED, HeaderValue::from_static("1"));
                if stream.send_trailers(aborted).is_err() {
                    stream.send_reset(h2::Reason::CANCEL);
                }
                return Err(PumpError::Body(e));
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                    let n = match granted {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Err(PumpError::Stream(e)),
                        None => {
                            return Err(PumpError::Stream(h2::Error::from(
                                h2::Reason::STREAM_CLOSED,
                            )));
                        }
                    };
                    let chunk = data.split_to(n.min(data.len()));
                    let last = data.is_empty() && body.is_end_stream();
                    stream.send_data(chunk, last).map_err(PumpError::Stream)?;
                    if last {
                        return Ok(());
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return stream.send_trailers(trailers).map_err(PumpError::Stream);
                }
            }
        }
    }
}

/// An interim response's head as HTTP/2 informational headers.
pub fn informational(status: http::StatusCode, headers: HeaderMap) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use std::net::SocketAddr;

    fn h1_request(target: &str, version: Version, host: Option<&str>) -> http::request::Parts {
        let mut req = Request::new(());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = h1::routing_uri(target);
        *req.version_mut() = version;
        if let Some(h) = host {
            req.headers_mut().insert(header::HOST, h1::value(h));
        }
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_static("a=1"));
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_static("b=2"));
        req.extensions_mut()
            .insert(RawTarget(Bytes::from(target.to_string())));
        req.into_parts().0
    }

    fn round_trip(parts: http::request::Parts) -> http::request::Parts {
        let head = encode_request(parts, SocketAddr::from(([10, 0, 0, 1], 8080))).expect("encodes");
        assert_eq!(head.version(), Version::HTTP_2);
        assert!(head.uri().scheme().is_some() && head.uri().authority().is_some());
        let (mut parts, ()) = head.into_parts();
        restore_request(&mut parts).expect("restores");
        parts
    }

    #[test]
    fn a_request_comes_back_as_it_was_sent() {
        let target = "/search?q={\"a\":<1>}";
        let sent = h1_request(target, Version::HTTP_11, Some("users.demo"));
        let back = round_trip(sent);
        assert_eq!(back.version, Version::HTTP_11);
        assert_eq!(back.extensions.get::<RawTarget>().expect("raw").0, target);
        assert_eq!(back.headers[header::HOST], "users.demo");
        assert_eq!(back.headers.get_all(header::COOKIE).iter().count(), 2);
        assert!(!back.headers.contains_key(ORIG_PROTO));
        assert!(!back.headers.contains_key(ORIG_TARGET));
        assert!(back.extensions.get::<Chunked>().is_none());
    }

    #[test]
    fn http_1_0_without_host_and_absolute_form_survive() {
        let back = round_trip(h1_request("/x", Version::HTTP_10, None));
        assert_eq!(back.version, Version::HTTP_10);
        assert!(!back.headers.contains_key(header::HOST));
        assert!(back.uri.authority().is_none());

        let abs = "http://users.demo:80/a?b";
        let back = round_trip(h1_request(abs, Version::HTTP_11, Some("users.demo:80")));
        assert_eq!(back.extensions.get::<RawTarget>().expect("raw").0, abs);
        assert_eq!(back.uri.path(), "/a");
    }

    #[test]
    fn chunked_framing_is_kept_and_the_mark_cannot_be_unknown() {
        let mut sent = h1_request("/", Version::HTTP_11, Some("a"));
        sent.extensions.insert(Chunked);
        let back = round_trip(sent);
        assert!(back.extensions.get::<Chunked>().is_some());

        let mut req = Request::new(());
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/3"));
        let (mut parts, ()) = req.into_parts();
        assert!(restore_request(&mut parts).is_err());
    }

    #[test]
    fn a_reason_phrase_goes_along() {
        let mut resp = Response::new(());
        resp.extensions_mut()
            .insert(Reason(Bytes::from_static(b"Fine Thanks")));
        let (mut parts, ()) = resp.into_parts();
        encode_response(&mut parts);
        assert_eq!(parts.headers[ORIG_REASON], "Fine Thanks");
        restore_response(&mut parts, Version::HTTP_11);
        assert_eq!(
            parts.extensions.get::<Reason>().expect("reason").0,
            "Fine Thanks"
        );
        assert!(!parts.headers.contains_key(ORIG_REASON));
    }
}
