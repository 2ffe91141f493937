//! Reading HTTP/1.x message heads: one parser, with the same limits, for every request of
//! every connection (plaintext or mTLS, first or later), and for upstream responses.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Bounds on one head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// The start line and every field, in bytes (without the final empty line).
    pub max_bytes: usize,
    /// Header fields.
    pub max_headers: usize,
}

/// Why a head is refused. Each maps to one answer of the proxy (431 or 400 for requests, a
/// 502 for upstream responses).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("head larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("malformed head: {0}")]
    Malformed(String),
}

/// A request head as it arrived: the target is kept byte for byte.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub target: Bytes,
    pub version: Version,
    pub headers: HeaderMap,
}

/// A response head as it arrived, with its reason phrase.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub reason: Bytes,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Empty lines before a request line are ignored (RFC 9112 section 2.2); a few, not a flood.
const MAX_LEADING_EMPTY_LINES: usize = 8;

/// Where the head in `buf` ends (just past its empty line), or `None` while it is incomplete.
/// A line ending in a bare LF is refused: a peer that reads it as a line break and one that
/// does not would see different messages.
fn head_end(buf: &[u8], limits: HeadLimits) -> Result<Option<usize>, HeadError> {
    let scan = &buf[..buf.len().min(limits.max_bytes + 4)];
    let mut line_start = 0;
    for (i, &b) in scan.iter().enumerate() {
        if b == b'\n' {
            if i == 0 || scan[i - 1] != b'\r' {
                return Err(HeadError::Malformed("a line ends in a bare LF".into()));
            }
            if i == line_start + 1 {
                return Ok(Some(i + 1));
            }
            line_start = i + 1;
        } else if b == 0 {
            return Err(HeadError::Malformed("NUL in the head".into()));
        }
    }
    if buf.len() > limits.max_bytes + 2 {
        return Err(HeadError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    Ok(None)
}

fn skip_empty_lines(buf: &mut BytesMut) -> Result<(), HeadError> {
    let mut skipped = 0;
    while buf.starts_with(b"\r\n") {
        buf.advance(2);
        skipped += 1;
        if skipped > MAX_LEADING_EMPTY_LINES {
            return Err(HeadError::Malformed(
                "too many empty lines before the request".into(),
            ));
        }
    }
    if buf.first() == Some(&b'\n') {
        return Err(HeadError::Malformed("a line ends in a bare LF".into()));
    }
    Ok(())
}

fn version(v: Option<u8>) -> Version {
    match v {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// The fields of a head whose bytes are `src`: values (and the target, and the reason phrase)
/// are slices of `src`, not copies, so a head costs its map and no allocation per field.
fn header_map(fields: &[httparse::Header<'_>], src: &Bytes) -> Result<HeaderMap, HeadError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed(format!("invalid field name `{}`", field.name)))?;
        let value = HeaderValue::from_maybe_shared(src.slice_ref(field.value)).map_err(|_| {
            HeadError::Malformed(format!("invalid value in field `{}`", field.name))
        })?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Field slots on the stack: enough for almost every head, so parsing one allocates only
/// when it has more fields than this (and the limit allows more).
const INLINE_FIELDS: usize = 32;

/// Runs `parse` over field slots for at most `limits.max_headers` fields: on the stack, or
/// (for a head with more fields than fit there) on the heap, parsed again.
fn with_fields<'b, T>(
    limits: HeadLimits,
    mut parse: impl FnMut(&mut [httparse::Header<'b>]) -> Result<T, HeadError>,
) -> Result<T, HeadError> {
    let mut inline: [httparse::Header<'b>; INLINE_FIELDS] = [httparse::EMPTY_HEADER; INLINE_FIELDS];
    let slots = limits.max_headers.min(INLINE_FIELDS);
    match parse(&mut inline[..slots]) {
        Err(HeadError::TooManyHeaders { .. }) if limits.max_headers > INLINE_FIELDS => {
            parse(&mut vec![httparse::EMPTY_HEADER; limits.max_headers])
        }
        other => other,
    }
}

fn parse_error(e: httparse::Error, limits: HeadLimits) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders {
            limit: limits.max_headers,
        },
        other => HeadError::Malformed(other.to_string()),
    }
}

/// Takes one request head off the front of `buf`, or `None` while it is incomplete.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<Option<RequestHead>, HeadError> {
    skip_empty_lines(buf)?;
    let Some(end) = head_end(buf, limits)? else {
        return Ok(None);
    };
    // The head leaves the buffer whatever the outcome: a refused head ends the connection.
    let src = buf.split_to(end).freeze();
    let head = with_fields(limits, |fields| {
        let mut req = httparse::Request::new(fields);
        match req.parse(&src) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HeadError::Malformed("incomplete request line".into()));
            }
            Err(e) => return Err(parse_error(e, limits)),
        }
        let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
            .map_err(|_| HeadError::Malformed("invalid method".into()))?;
        let target = src.slice_ref(req.path.unwrap_or_default().as_bytes());
        if target.is_empty() {
            return Err(HeadError::Malformed("empty request target".into()));
        }
        Ok(RequestHead {
            method,
            target,
            version: version(req.version),
            headers: header_map(req.headers, &src)?,
        })
    })?;
    Ok(Some(head))
}

/// Takes one response head off the front of `buf`, or `None` while it is incomplete.
pub fn parse_response(
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<Option<ResponseHead>, HeadError> {
    let Some(end) = head_end(buf, limits)? else {
        return Ok(None);
    };
    let src = buf.split_to(end).freeze();
    let head = with_fields(limits, |fields| {
        let mut resp = httparse::Response::new(fields);
        match resp.parse(&src) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(HeadError::Malformed("incomplete status line".into()));
            }
            Err(e) => return Err(parse_error(e, limits)),
        }
        let status = resp
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| HeadError::Malformed("invalid status code".into()))?;
        Ok(ResponseHead {
            status,
            reason: src.slice_ref(resp.reason.unwrap_or_default().as_bytes()),
            version: version(resp.version),
            headers: header_map(resp.headers, &src)?,
        })
    })?;
    Ok(Some(head))
}

/// Trailer fields after a chunked body's last chunk: `None` while incomplete. `limits`
/// bound them as they bound a head.
pub fn parse_trailers(
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<Option<HeaderMap>, HeadError> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(HeaderMap::new()));
    }
    let Some(end) = head_end(buf, limits)? else {
        return Ok(None);
    };
    let src = buf.split_to(end).freeze();
    let map = with_fields(limits, |fields| {
        match httparse::parse_headers(&src, fields) {
            Ok(httparse::Status::Complete((_, parsed))) => header_map(parsed, &src),
            Ok(httparse::Status::Partial) => {
                Err(HeadError::Malformed("incomplete trailers".into()))
            }
            Err(e) => Err(parse_error(e, limits)),
        }
    })?;
    Ok(Some(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: HeadLimits = HeadLimits {
        max_bytes: 256,
        max_headers: 4,
    };

    fn req(bytes: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(bytes), L)
    }

    #[test]
    fn targets_methods_and_versions_are_kept_as_sent() {
        let head = req(b"\r\nget /q?x={\"a\":<1>} HTTP/1.0\r\nHost: a\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(head.method.as_str(), "get");
        assert_eq!(&head.target[..], b"/q?x={\"a\":<1>}");
        assert_eq!(head.version, Version::HTTP_10);
        assert_eq!(head.headers["host"], "a");
    }

    #[test]
    fn incomplete_heads_wait_and_bad_ones_are_refused() {
        assert!(matches!(req(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None)));
        assert!(matches!(
            req(b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            req(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            req(b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            req(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\n\r\n"),
            Err(HeadError::TooManyHeaders { limit: 4 })
        ));
        let big = format!("GET /{} HTTP/1.1\r\n", "a".repeat(300));
        assert!(matches!(
            req(big.as_bytes()),
            Err(HeadError::TooLarge { limit: 256 })
        ));
    }

    #[test]
    fn heads_with_more_fields_than_the_stack_holds_parse_within_the_limit() {
        let limits = HeadLimits {
            max_bytes: 8192,
            max_headers: 100,
        };
        let fields: String = (0..90).map(|i| format!("x-{i}: {i}\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
        let head = parse_request(&mut BytesMut::from(raw.as_bytes()), limits)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.headers.len(), 91);
        let over: String = (0..100).map(|i| format!("x-{i}: {i}\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{over}\r\n");
        assert_eq!(
            parse_request(&mut BytesMut::from(raw.as_bytes()), limits).err(),
            Some(HeadError::TooManyHeaders { limit: 100 })
        );
    }

    #[test]
    fn pipelined_heads_leave_the_next_one_in_the_buffer() {
        let mut buf = BytesMut::from(&b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n"[..]);
        let first = parse_request(&mut buf, L)
            .expect("valid")
            .expect("complete");
        assert_eq!(&first.target[..], b"/1");
        assert_eq!(&buf[..], b"GET /2 HTTP/1.1\r\n");
    }

    #[test]
    fn responses_keep_their_reason_and_trailers_parse() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 299 Fine Indeed\r\nA: 1\r\n\r\nrest"[..]);
        let head = parse_response(&mut buf, L)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status.as_u16(), 299);
        assert_eq!(&head.reason[..], b"Fine Indeed");
        assert_eq!(&buf[..], b"rest");
        let mut t = BytesMut::from(&b"grpc-status: 0\r\n\r\n"[..]);
        let trailers = parse_trailers(&mut t, L).expect("valid").expect("complete");
        assert_eq!(trailers["grpc-status"], "0");
        let mut none = BytesMut::from(&b"\r\n"[..]);
        assert!(
            parse_trailers(&mut none, L)
                .expect("valid")
                .expect("complete")
                .is_empty()
        );
    }
}
