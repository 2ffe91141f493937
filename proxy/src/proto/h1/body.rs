//! HTTP/1.x bodies: decoding by the framing the head declared (length, chunked with
//! trailers, or until close), encoding for the next hop, and the channel that carries a body
//! from the connection task to whoever reads it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::head::{self, HeadLimits};
use crate::proto::body::BoxError;

/// How a message's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`, possibly with trailers.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// A fault in the client's own request body: the client's, never the upstream's.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientBodyError {
    #[error("malformed request body: {0}")]
    Malformed(String),
    #[error("the request body's chunk extensions exceed {limit} bytes")]
    ExtensionsTooLong { limit: usize },
    #[error("no request body bytes for {0:?}")]
    Timeout(Duration),
    #[error("the client closed the connection before its request body ended")]
    Aborted,
}

impl ClientBodyError {
    pub fn status(&self) -> http::StatusCode {
        match self {
            ClientBodyError::Malformed(_) | ClientBodyError::Aborted => {
                http::StatusCode::BAD_REQUEST
            }
            ClientBodyError::ExtensionsTooLong { .. } => http::StatusCode::PAYLOAD_TOO_LARGE,
            ClientBodyError::Timeout(_) => http::StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ClientBodyError::Malformed(_) => "malformed-body",
            ClientBodyError::ExtensionsTooLong { .. } => "chunk-extensions-too-long",
            ClientBodyError::Timeout(_) => "body-timeout",
            ClientBodyError::Aborted => "client-aborted",
        }
    }

    /// The client-body fault behind `error`, if that is what it is (through any wrapping, e.g.
    /// hyper's HTTP/2 client reporting that the body it was sending failed).
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cur {
            if let Some(found) = e.downcast_ref::<ClientBodyError>() {
                return Some(found);
            }
            cur = e.source();
        }
        None
    }
}

/// Most bytes of chunk extensions accepted in one body (and per chunk line); more is a flood.
pub const MAX_CHUNK_EXTENSIONS: usize = 4096;
/// Longest chunk-size line without its extensions.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What decoding found in the buffer.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    /// Read more, then decode again.
    NeedMore,
}

/// Decodes one body. Only `decode` changes state, and only from bytes already in the buffer,
/// so reading more can be cancelled at any point without losing a byte.
#[derive(Debug)]
pub struct Decoder {
    state: DecoderState,
    extension_bytes: usize,
    trailer_limits: HeadLimits,
}

#[derive(Debug)]
enum DecoderState {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing, trailer_limits: HeadLimits) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => DecoderState::Done,
            Framing::Length(n) => DecoderState::Length(n),
            Framing::Chunked => DecoderState::Chunked(Chunked::Size),
            Framing::Close => DecoderState::Close,
        };
        Self {
            state,
            extension_bytes: 0,
            trailer_limits,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, DecoderState::Done)
    }

    /// What the connection closing now means: the end of a close-delimited body, or a
    /// truncated one.
    pub fn at_eof(&mut self) -> Result<Decoded, ClientBodyError> {
        match self.state {
            DecoderState::Close | DecoderState::Done => {
                self.state = DecoderState::Done;
                Ok(Decoded::End)
            }
            _ => Err(ClientBodyError::Aborted),
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ClientBodyError> {
        loop {
            match &mut self.state {
                DecoderState::Done => return Ok(Decoded::End),
                DecoderState::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                DecoderState::Length(remaining) => {
                    let Some(data) = take(buf, remaining) else {
                        return Ok(Decoded::NeedMore);
                    };
                    if *remaining == 0 {
                        self.state = DecoderState::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                DecoderState::Chunked(Chunked::Size) => {
                    let Some(line_end) =
                        find_crlf(buf, MAX_CHUNK_SIZE_DIGITS + MAX_CHUNK_EXTENSIONS)?
                    else {
                        return Ok(Decoded::NeedMore);
                    };
                    let (size, ext) = chunk_size(&buf[..line_end])?;
                    self.extension_bytes += ext;
                    if self.extension_bytes > MAX_CHUNK_EXTENSIONS {
                        return Err(ClientBodyError::ExtensionsTooLong {
                            limit: MAX_CHUNK_EXTENSIONS,
                        });
                    }
                    buf.advance(line_end + 2);
                    self.state = DecoderState::Chunked(if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    });
                }
                DecoderState::Chunked(Chunked::Data(remaining)) => {
                    let Some(data) = take(buf, remaining) else {
                        return Ok(Decoded::NeedMore);
                    };
                    if *remaining == 0 {
                        self.state = DecoderState::Chunked(Chunked::DataEnd);
                    }
                    return Ok(Decoded::Data(data));
                }
                DecoderState::Chunked(Chunked::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ClientBodyError::Malformed(
                            "a chunk's data is not followed by CRLF".into(),
                        ));
                    }
                    buf.advance(2);
                    self.state = DecoderState::Chunked(Chunked::Size);
                }
                DecoderState::Chunked(Chunked::Trailers) => {
                    match head::parse_trailers(buf, self.trailer_limits) {
                        Ok(None) => return Ok(Decoded::NeedMore),
                        Ok(Some(trailers)) => {
                            self.state = DecoderState::Done;
                            if trailers.is_empty() {
                                return Ok(Decoded::End);
                            }
                            return Ok(Decoded::Trailers(trailers));
                        }
                        Err(e) => {
                            return Err(ClientBodyError::Malformed(format!("trailers: {e}")));
                        }
                    }
                }
            }
        }
    }
}

/// Up to `remaining` bytes off the front of `buf` (`None` when it is empty), counted off.
fn take(buf: &mut BytesMut, remaining: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*remaining)
        .unwrap_or(usize::MAX)
        .min(buf.len());
    *remaining -= n as u64;
    Some(buf.split_to(n).freeze())
}

/// The end of the line at the front of `buf` (index of its CR), refusing bare LFs and lines
/// longer than `max`.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, ClientBodyError> {
    for (i, &b) in buf.iter().enumerate().take(max + 2) {
        if b == b'\n' {
            return if i > 0 && buf[i - 1] == b'\r' {
                Ok(Some(i - 1))
            } else {
                Err(ClientBodyError::Malformed("bare LF in a chunk line".into()))
            };
        }
    }
    if buf.len() > max + 1 {
        return Err(ClientBodyError::ExtensionsTooLong {
            limit: MAX_CHUNK_EXTENSIONS,
        });
    }
    Ok(None)
}

/// A chunk-size line: hex digits, then optional `;extensions`. Returns the size and the
/// extensions' length.
fn chunk_size(line: &[u8]) -> Result<(u64, usize), ClientBodyError> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > MAX_CHUNK_SIZE_DIGITS {
        return Err(ClientBodyError::Malformed("invalid chunk size".into()));
    }
    let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap_or("x"), 16)
        .map_err(|_| ClientBodyError::Malformed("invalid chunk size".into()))?;
    let rest = &line[digits..];
    let ext = rest.trim_ascii_start();
    if !ext.is_empty() && (ext[0] != b';' || ext.iter().any(|&b| b < 0x20 && b != b'\t')) {
        return Err(ClientBodyError::Malformed("invalid chunk extension".into()));
    }
    Ok((size, rest.len()))
}

/// Appends a chunk's framing and data.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, with trailer fields when there are any.
pub fn encode_last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    if let Some(trailers) = trailers {
        super::write_fields(out, trailers);
    }
    out.extend_from_slice(b"\r\n");
}

/// A body fed, frame by frame, by a connection task.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    hint: SizeHint,
}

/// Frames into a `ChannelBody`; a few in flight at most, so a slow reader slows the sender.
pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

pub fn channel(framing: Framing) -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::channel(2);
    let hint = match framing {
        Framing::Length(n) => SizeHint::with_exact(n),
        _ => SizeHint::default(),
    };
    (tx, ChannelBody { rx, hint })
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let hint = &mut self.hint;
                if let Some(exact) = hint.exact() {
                    hint.set_exact(exact.saturating_sub(data.len() as u64));
                }
            }
        }
        polled
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// A body that failed on the upstream's side (a truncated or malformed response body).
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream response body: {0}")]
pub struct UpstreamBodyError(pub String);

/// Moves one body from a connection's read half into a `ChannelBody`, frame by frame, with
/// backpressure: a frame is read only once the reader has room for it. Each `step` is
/// cancel-safe (a step cut short loses nothing), so it can run in a `select!` beside the
/// response. When the reader goes away the rest of the body is read and dropped.
#[derive(Debug)]
pub struct Pump {
    decoder: Decoder,
    tx: Option<BodySender>,
    /// No progress for this long is a client fault (request bodies only).
    progress_timeout: Option<Duration>,
    /// Faults are the client's (a request body) or the upstream's (a response body).
    client: bool,
    failed: bool,
}

impl Pump {
    pub fn new(
        decoder: Decoder,
        tx: Option<BodySender>,
        progress_timeout: Option<Duration>,
        client: bool,
    ) -> Self {
        Self {
            decoder,
            tx,
            progress_timeout,
            client,
            failed: false,
        }
    }

    /// Whether more of the body is to be read.
    pub fn active(&self) -> bool {
        !self.decoder.is_done() && !self.failed
    }

    pub fn finished(&self) -> bool {
        self.decoder.is_done()
    }

    /// Stops handing frames on: the rest is read and dropped.
    pub fn discard(&mut self) {
        self.tx = None;
    }

    /// Reads and hands on the next frame (or the end).
    pub async fn step<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        buf: &mut BytesMut,
    ) -> Result<(), ClientBodyError> {
        let permit = match &self.tx {
            Some(tx) => tx.clone().reserve_owned().await.ok(),
            None => None,
        };
        if permit.is_none() {
            self.tx = None;
        }
        loop {
            let decoded = match self.decoder.decode(buf) {
                Ok(Decoded::NeedMore) => {
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(16 * 1024);
                    }
                    let read = rd.read_buf(buf);
                    let n = match self.progress_timeout {
                        Some(limit) => match tokio::time::timeout(limit, read).await {
                            Ok(r) => r,
                            Err(_) => {
                                return Err(self.fail(permit, ClientBodyError::Timeout(limit)));
                            }
                        },
                        None => read.await,
                    };
                    match n {
                        Ok(0) | Err(_) => match self.decoder.at_eof() {
                            Ok(decoded) => decoded,
                            Err(e) => return Err(self.fail(permit, e)),
                        },
                        Ok(_) => continue,
                    }
                }
                Ok(decoded) => decoded,
                Err(e) => return Err(self.fail(permit, e)),
            };
            match decoded {
                Decoded::Data(bytes) => {
                    if let Some(p) = permit {
                        p.send(Ok(Frame::data(bytes)));
                    }
                    if self.decoder.is_done() {
                        // The last bytes of a length-framed body: the reader sees its end now,
                        // not when the connection's next request comes.
                        self.tx = None;
                    }
                }
                Decoded::Trailers(trailers) => {
                    if let Some(p) = permit {
                        p.send(Ok(Frame::trailers(trailers)));
                    }
                    self.tx = None;
                }
                Decoded::End => {
                    drop(permit);
                    self.tx = None;
                }
                Decoded::NeedMore => continue,
            }
            return Ok(());
        }
    }

    fn fail(
        &mut self,
        permit: Option<mpsc::OwnedPermit<Result<Frame<Bytes>, BoxError>>>,
        error: ClientBodyError,
    ) -> ClientBodyError {
        self.failed = true;
        self.tx = None;
        if let Some(p) = permit {
            let boxed: BoxError = if self.client {
                Box::new(error.clone())
            } else {
                Box::new(UpstreamBodyError(error.to_string()))
            };
            p.send(Err(boxed));
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: HeadLimits = HeadLimits {
        max_bytes: 1024,
        max_headers: 8,
    };

    fn decode_all(
        framing: Framing,
        input: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>), ClientBodyError> {
        let mut d = Decoder::new(framing, L);
        let mut buf = BytesMut::from(input);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((data, trailers)),
                Decoded::NeedMore => match d.at_eof()? {
                    Decoded::End => return Ok((data, trailers)),
                    _ => unreachable!(),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers) = decode_all(
            Framing::Chunked,
            b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
        )
        .expect("valid");
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-sum"], "42");
    }

    #[test]
    fn bad_chunking_is_the_clients_fault() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(
                matches!(
                    decode_all(Framing::Chunked, bad),
                    Err(ClientBodyError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let flood = format!("1;{}\r\na\r\n", "e".repeat(MAX_CHUNK_EXTENSIONS + 10));
        assert!(matches!(
            decode_all(Framing::Chunked, flood.as_bytes()),
            Err(ClientBodyError::ExtensionsTooLong { .. })
        ));
        let many: String = (0..2000).map(|_| "1;abc\r\na\r\n").collect();
        assert!(matches!(
            decode_all(Framing::Chunked, many.as_bytes()),
            Err(ClientBodyError::ExtensionsTooLong { .. })
        ));
        assert_eq!(
            decode_all(Framing::Length(10), b"short"),
            Err(ClientBodyError::Aborted)
        );
        assert_eq!(
            decode_all(Framing::Close, b"until close").expect("valid").0,
            b"until close"
        );
    }

    #[test]
    fn chunks_encode_back() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"hello");
        let mut t = HeaderMap::new();
        t.insert("x-sum", "42".parse().expect("value"));
        encode_last_chunk(&mut out, Some(&t));
        assert_eq!(out, b"5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n");
    }
}
