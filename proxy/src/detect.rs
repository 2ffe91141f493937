//! Protocol detection: read the first bytes of a connection and decide how to serve it.
//!
//! HTTP/2 is recognised by its connection preface, TLS by a handshake record header, and
//! HTTP/1.x by a request line; an HTTP/1 request head is read whole here (bounded in size
//! and time), so a malformed or oversized first request gets a clear 400/431 from the proxy.
//! Anything else is opaque TCP. A client that sends nothing within the detection timeout is
//! also opaque (server-first protocols such as SMTP or MySQL), unless the port is HTTP-only.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello (from a peer proxy or a TLS client).
    Tls,
    /// Anything else, forwarded byte for byte.
    Opaque,
}

/// Why a connection is refused during detection; each maps to a response or a silent close.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    #[error("more than {limit} request headers")]
    TooManyHeaders { limit: usize },
    #[error("malformed HTTP request: {reason}")]
    Malformed { reason: String },
    #[error("request head not complete after {after:?}")]
    HeadTimeout { after: Duration },
    #[error("connection closed before a request")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Limits that bound how much detection reads, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct DetectLimits {
    /// No first byte by then: opaque (or closed on HTTP-only ports).
    pub first_byte: Duration,
    /// A started HTTP/1 request head must be complete by then.
    pub head: Duration,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// HTTP-only port: never fall back to opaque.
    pub http_only: bool,
}

/// Reads from `io` into `buf` until the protocol is known. The bytes read stay in `buf` to be
/// replayed to whatever serves the connection.
pub async fn sniff(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    limits: DetectLimits,
) -> Result<Protocol, DetectError> {
    // Phase 1: the first bytes.
    match tokio::time::timeout(limits.first_byte, read_more(io, buf, limits.max_head_bytes)).await {
        Ok(Ok(0)) => return Err(DetectError::Closed),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) if limits.http_only => {
            return Err(DetectError::HeadTimeout {
                after: limits.first_byte,
            });
        }
        Err(_) => return Ok(Protocol::Opaque),
    }
    // Phase 2: enough bytes to decide; a started request head must be complete in time.
    let deadline = tokio::time::Instant::now() + limits.head;
    loop {
        match classify(buf, limits)? {
            Some(protocol) => return Ok(protocol),
            None => {
                if buf.len() >= limits.max_head_bytes {
                    return Err(DetectError::HeadTooLarge {
                        limit: limits.max_head_bytes,
                    });
                }
                match tokio::time::timeout_at(deadline, read_more(io, buf, limits.max_head_bytes))
                    .await
                {
                    Ok(Ok(0)) => return Err(DetectError::Closed),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(DetectError::HeadTimeout { after: limits.head }),
                }
            }
        }
    }
}

async fn read_more(io: &mut TcpStream, buf: &mut BytesMut, max: usize) -> std::io::Result<usize> {
    // Most request heads are a few hundred bytes: start small, grow only for big ones.
    let room = max.saturating_sub(buf.len()).clamp(1, 8192);
    buf.reserve(room.min(buf.capacity().max(1024)));
    let mut limited = (&mut *io).take(room as u64);
    limited.read_buf(buf).await
}

/// `Some` when the bytes decide the protocol, `None` when more are needed.
fn classify(buf: &[u8], limits: DetectLimits) -> Result<Option<Protocol>, DetectError> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return Ok((buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2));
    }
    // TLS record: handshake (0x16), major version 3.
    if buf[0] == 0x16 {
        if buf.len() < 2 {
            return Ok(None);
        }
        if buf[1] == 0x03 {
            return Ok(Some(Protocol::Tls));
        }
    }
    if !looks_like_http1(buf) {
        return if limits.http_only {
            Err(DetectError::Malformed {
                reason: "not an HTTP request".into(),
            })
        } else {
            Ok(Some(Protocol::Opaque))
        };
    }
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Ok(Some(Protocol::Http1)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(DetectError::TooManyHeaders {
            limit: limits.max_headers,
        }),
        Err(e) => Err(DetectError::Malformed {
            reason: e.to_string(),
        }),
    }
}

/// An uppercase token (the method) followed by a space, or a prefix of one.
fn looks_like_http1(buf: &[u8]) -> bool {
    const MAX_METHOD: usize = 16;
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        if b == b' ' {
            return i > 0;
        }
        if !b.is_ascii_uppercase() && b != b'-' && b != b'_' {
            return false;
        }
    }
    buf.len() <= MAX_METHOD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DetectLimits {
        DetectLimits {
            first_byte: Duration::from_secs(1),
            head: Duration::from_secs(1),
            max_head_bytes: 1024,
            max_headers: 4,
            http_only: false,
        }
    }

    #[test]
    fn classifies_prefixes() {
        let l = limits();
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", l)
                .ok()
                .flatten(),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHo", l).ok().flatten(), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n", l).ok().flatten(), None);
        assert_eq!(
            classify(H2_PREFACE, l).ok().flatten(),
            Some(Protocol::Http2)
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01], l).ok().flatten(),
            Some(Protocol::Tls)
        );
        assert_eq!(
            classify(b"\x00\x01binary", l).ok().flatten(),
            Some(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"hello\n", l).ok().flatten(),
            Some(Protocol::Opaque)
        );
        assert!(matches!(
            classify(b"GET /\r\n\r\n", l),
            Err(DetectError::Malformed { .. })
        ));
        let many = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\n\r\n";
        assert!(matches!(
            classify(many, l),
            Err(DetectError::TooManyHeaders { limit: 4 })
        ));
        let http_only = DetectLimits {
            http_only: true,
            ..l
        };
        assert!(matches!(
            classify(b"\x00\x01", http_only),
            Err(DetectError::Malformed { .. })
        ));
    }
}
