//! Protocol detection: read the first bytes of a connection and decide how to serve it.
//!
//! HTTP/2 is recognised by its connection preface, TLS by a handshake record header, and
//! HTTP/1.x by its request line (`token SP target SP HTTP/d.d`, after any empty lines, any
//! method case). Only the first line is read here: the request head is read and checked by
//! the HTTP/1 server (`h1::head`), with the limits every later request gets too. Anything
//! else is opaque TCP. A client that sends nothing within the detection timeout is
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
    #[error("request line longer than {limit} bytes")]
    HeadTooLarge { limit: usize },
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
    match request_line(buf, limits.max_head_bytes) {
        Some(true) => Ok(Some(Protocol::Http1)),
        None => Ok(None),
        Some(false) if limits.http_only => Err(DetectError::Malformed {
            reason: "not an HTTP request".into(),
        }),
        Some(false) => Ok(Some(Protocol::Opaque)),
    }
}

/// Whether `buf` starts with an HTTP/1 request line (`None`: not known yet).
fn request_line(buf: &[u8], max: usize) -> Option<bool> {
    const MAX_METHOD: usize = 32;
    let mut start = 0;
    while buf[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let line = &buf[start..];
    if line.is_empty() || line == b"\r" {
        return None;
    }
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    match line.iter().position(|&b| !tchar(b)) {
        Some(0) => return Some(false),
        Some(i) if line[i] != b' ' || i > MAX_METHOD => return Some(false),
        Some(_) => {}
        None => return (line.len() > MAX_METHOD).then_some(false),
    }
    let Some(end) = line.iter().position(|&b| b == b'\n') else {
        return (line.len() >= max).then_some(false);
    };
    let first = line[..end].strip_suffix(b"\r").unwrap_or(&line[..end]);
    let version = first.len().checked_sub(9).map(|at| &first[at..]);
    Some(version.is_some_and(|v| {
        v.starts_with(b" HTTP/") && v[6].is_ascii_digit() && v[7] == b'.' && v[8].is_ascii_digit()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DetectLimits {
        DetectLimits {
            first_byte: Duration::from_secs(1),
            head: Duration::from_secs(1),
            max_head_bytes: 1024,
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
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHo", l).ok().flatten(),
            Some(Protocol::Http1),
            "the request line decides"
        );
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
        assert_eq!(
            classify(b"GET /\r\n\r\n", l).ok().flatten(),
            Some(Protocol::Opaque),
            "HTTP/0.9 is not HTTP/1"
        );
        assert_eq!(
            classify(b"\r\nget / HTTP/1.1\r\n", l).ok().flatten(),
            Some(Protocol::Http1),
            "any method case, after an empty line: the HTTP/1 server decides the rest"
        );
        assert_eq!(classify(b"GET / HTTP/1.1", l).ok().flatten(), None);
        assert_eq!(
            classify(b"set key value\r\n", l).ok().flatten(),
            Some(Protocol::Opaque)
        );
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
