//! One request on an upstream HTTP/1.x connection: the request written with its raw target
//! and its body's own framing, interim answers relayed, the response head handed back as soon
//! as it is read, both bodies streamed, and the connection offered back for reuse when both
//! ended cleanly.
//!
//! Most requests are whole when they are sent (a GET, a small POST) and most answers are whole
//! once their head is read: those are done in the caller's own task, with no task, channel or
//! split connection of their own. Only a body that is still coming (either way) gets a task
//! that owns the connection until it ends.

use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::oneshot;

use super::body::{self as h1body, ClientBodyError, Decoder, Framing, Pump};
use super::head::{self, HeadError, HeadLimits, ResponseHead};
use super::{Interim, InterimResponse, Io, OnUpgrade, RawTarget, Reason};
use crate::proto::body::{Body, BoxError};
use crate::proto::rewind::Rewind;

/// An upstream connection with the bytes already read from it.
pub struct Conn {
    pub io: Box<dyn Io>,
    pub buf: BytesMut,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl Conn {
    pub fn new(io: Box<dyn Io>) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection is still open: the upstream has neither closed it nor sent
    /// anything unasked.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut read = tokio::io::ReadBuf::new(&mut probe);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(
            std::pin::Pin::new(&mut self.io).poll_read(&mut cx, &mut read),
            std::task::Poll::Pending
        )
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The connection closed before any byte of a response: on a reused connection, the
    /// upstream had closed it while idle, and the request may go again on a new one.
    #[error("the connection closed before a response")]
    Closed {
        request_written: bool,
        /// A request without a body, kept encoded so that it can go again on a new
        /// connection (`resend`) without being rebuilt.
        resend: Option<Resend>,
    },
    #[error("{0}")]
    Io(std::io::Error),
    #[error("invalid response: {0}")]
    Protocol(String),
    #[error("response head refused: {0}")]
    Head(HeadError),
    #[error(transparent)]
    ClientBody(ClientBodyError),
    #[error("the request body failed: {0}")]
    Body(BoxError),
}

/// Settings of upstream exchanges.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Bounds on a response head (and trailers).
    pub limits: HeadLimits,
}

/// Called with the connection when the exchange ended cleanly and it may be reused.
pub type OnIdle = Box<dyn FnOnce(Conn) + Send>;

/// Sends `req` on `conn`; resolves with the response head, the body streaming after.
pub async fn send(
    conn: Conn,
    req: Request<Body>,
    cfg: Config,
    on_idle: OnIdle,
) -> Result<Response<Body>, SendError> {
    let mut ex = Exchange::new(conn, req);
    ex.writer.first_frames(&mut ex.body)?;
    if ex.writer.done {
        return whole_request(ex, cfg, on_idle).await;
    }
    let (tx, rx) = oneshot::channel();
    tokio::spawn(streaming_request(ex, cfg, tx, on_idle));
    rx.await.unwrap_or(Err(SendError::Closed {
        request_written: true,
        resend: None,
    }))
}

/// A request without a body, encoded, that an upstream connection closed under before any
/// answer (on a reused connection: the upstream closed it while it sat idle).
pub struct Resend {
    head: Vec<u8>,
    meta: Meta,
}

impl std::fmt::Debug for Resend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resend")
            .field("head_bytes", &self.head.len())
            .finish()
    }
}

/// Sends a request that `send` gave back in `SendError::Closed` again, on `conn`.
pub async fn resend(
    conn: Conn,
    again: Resend,
    cfg: Config,
    on_idle: OnIdle,
) -> Result<Response<Body>, SendError> {
    let ex = Exchange {
        conn,
        body: crate::proto::body::empty(),
        writer: BodyWriter::new(Framing::Empty, again.head),
        meta: again.meta,
    };
    whole_request(ex, cfg, on_idle).await
}

/// What an exchange needs from the request once its head is encoded.
struct Exchange {
    conn: Conn,
    body: Body,
    writer: BodyWriter,
    meta: Meta,
}

/// What reading the answer needs to know of the request.
struct Meta {
    expects_upgrade: bool,
    interim: Option<Interim>,
    method: Method,
    sent_version: Version,
}

impl Exchange {
    fn new(conn: Conn, req: Request<Body>) -> Self {
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(header::TRANSFER_ENCODING);
        let framing = match super::content_length(&parts.headers) {
            Ok(Some(n)) => Framing::Length(n),
            _ if parts.extensions.get::<super::Chunked>().is_some() => Framing::Chunked,
            _ if body.is_end_stream() => Framing::Empty,
            // An HTTP/1.0 upstream request has a length or no body: the server refuses chunked.
            _ => Framing::Chunked,
        };
        let writer = BodyWriter::new(framing, request_head(&parts, framing));
        let meta = Meta {
            expects_upgrade: crate::proto::headers::is_upgrade(&parts.headers)
                || parts.method == Method::CONNECT,
            interim: parts.extensions.remove::<Interim>(),
            method: parts.method,
            sent_version: parts.version,
        };
        Self {
            conn,
            body,
            writer,
            meta,
        }
    }
}

impl Meta {
    /// Relays an interim answer; `None` for the final head.
    fn interim(&self, head: ResponseHead) -> Option<ResponseHead> {
        if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
            if let Some(Interim(tx)) = &self.interim {
                let _ = tx.try_send(Box::new(InterimResponse {
                    status: head.status,
                    headers: head.headers,
                }));
            }
            return None;
        }
        Some(head)
    }
}

/// What the final response head means for the rest of the exchange.
struct Answer {
    response: Response<()>,
    /// The connection switches protocols (101, or a 2xx to CONNECT) and the caller asked to.
    upgrade: bool,
    framing: Framing,
    keep_alive: bool,
}

fn answer(ex: &Meta, head: ResponseHead) -> Result<Answer, SendError> {
    let status = head.status;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS
        || (ex.method == Method::CONNECT && status.is_success());
    if status == StatusCode::SWITCHING_PROTOCOLS && !ex.expects_upgrade {
        return Err(SendError::Protocol(
            "101 Switching Protocols to a request that asked for no upgrade".into(),
        ));
    }
    let framing = if switching {
        Framing::Empty
    } else {
        super::response_framing(&ex.method, status, &head.headers)
            .map_err(|why| SendError::Protocol(why.into()))?
    };
    let keep_alive = head.version == Version::HTTP_11
        && ex.sent_version == Version::HTTP_11
        && !super::connection_tokens(&head.headers)
            .iter()
            .any(|t| t == "close")
        && framing != Framing::Close;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = head.headers;
    if status
        .canonical_reason()
        .is_none_or(|r| r.as_bytes() != &head.reason[..])
    {
        response.extensions_mut().insert(Reason(head.reason));
    }
    Ok(Answer {
        response,
        upgrade: switching && ex.expects_upgrade,
        framing,
        keep_alive,
    })
}

/// The first write failed: on a reused connection the upstream may have closed it while it
/// sat idle, and nothing of the request reached it.
fn unwritten(e: SendError) -> SendError {
    match e {
        SendError::Io(e) => SendError::Closed {
            request_written: false,
            resend: None,
        }
        .or_io(e),
        other => other,
    }
}

/// The whole request is encoded: write it, read the answer's head, and return at once when
/// the answer's body is already here; a body still coming gets a task that reads it.
async fn whole_request(
    ex: Exchange,
    cfg: Config,
    on_idle: OnIdle,
) -> Result<Response<Body>, SendError> {
    let Exchange {
        mut conn,
        mut writer,
        meta,
        ..
    } = ex;
    let read = async {
        writer.flush(&mut conn.io).await.map_err(unwritten)?;
        loop {
            let head = read_response(&mut conn.io, &mut conn.buf, cfg.limits).await?;
            if let Some(head) = meta.interim(head) {
                break Ok(head);
            }
        }
    };
    let head = match read.await {
        Ok(head) => head,
        Err(SendError::Closed {
            request_written, ..
        }) if matches!(writer.framing, Framing::Empty | Framing::Length(0)) => {
            return Err(SendError::Closed {
                request_written,
                resend: Some(Resend {
                    head: writer.out,
                    meta,
                }),
            });
        }
        Err(e) => return Err(e),
    };
    let answer = answer(&meta, head)?;
    let (mut parts, ()) = answer.response.into_parts();
    if answer.upgrade {
        let (tx, rx) = oneshot::channel();
        parts.extensions.insert(OnUpgrade::new(rx));
        let _ = tx.send(Rewind::new(conn.buf.split().freeze(), conn.io));
        return Ok(Response::from_parts(parts, crate::proto::body::empty()));
    }
    let body = match answer.framing {
        Framing::Empty | Framing::Length(0) => crate::proto::body::empty(),
        Framing::Length(n) if conn.buf.len() as u64 >= n => {
            crate::proto::body::full(conn.buf.split_to(n as usize).freeze())
        }
        framing => {
            let (tx, rx) = h1body::channel(framing);
            let mut pump = Pump::new(Decoder::new(framing, cfg.limits), Some(tx), None, false);
            let keep_alive = answer.keep_alive;
            tokio::spawn(async move {
                while pump.active() {
                    if pump.step(&mut conn.io, &mut conn.buf).await.is_err() {
                        return;
                    }
                }
                if keep_alive && pump.finished() {
                    on_idle(conn);
                }
            });
            return Ok(Response::from_parts(parts, rx.boxed_unsync()));
        }
    };
    if answer.keep_alive {
        on_idle(conn);
    }
    Ok(Response::from_parts(parts, body))
}

/// The request head: the client's own target when there is one, its version, its fields,
/// and the framing its body had.
fn request_head(parts: &http::request::Parts, framing: Framing) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    match parts.extensions.get::<RawTarget>() {
        Some(raw) => out.extend_from_slice(&raw.0),
        None if parts.method == Method::CONNECT => {
            out.extend_from_slice(parts.uri.authority().map_or("", |a| a.as_str()).as_bytes())
        }
        None => out.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        ),
    }
    out.extend_from_slice(if parts.version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    super::write_fields(&mut out, &parts.headers);
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The request body is still coming: a task owns the connection, writes the body as it comes
/// while it reads the answer, and hands the response head back over `reply`.
async fn streaming_request(
    ex: Exchange,
    cfg: Config,
    reply: oneshot::Sender<Result<Response<Body>, SendError>>,
    on_idle: OnIdle,
) {
    let Exchange {
        conn,
        mut body,
        mut writer,
        meta,
    } = ex;
    let Conn { io, mut buf } = conn;
    let (mut rd, mut wr) = tokio::io::split(io);
    if let Err(e) = writer.flush(&mut wr).await {
        let _ = reply.send(Err(unwritten(e)));
        return;
    }
    // Until the response head: write the body as it comes, relay interim answers.
    let head = loop {
        tokio::select! {
            biased;
            read = read_response(&mut rd, &mut buf, cfg.limits) => match read {
                Ok(head) => if let Some(head) = meta.interim(head) { break head },
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            },
            written = writer.next(&mut body, &mut wr), if !writer.finished() => {
                if let Err(e) = written {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
    };
    let answer = match answer(&meta, head) {
        Ok(answer) => answer,
        Err(e) => {
            let _ = reply.send(Err(e));
            return;
        }
    };
    let (mut parts, ()) = answer.response.into_parts();
    if answer.upgrade {
        let (tx, rx) = oneshot::channel();
        parts.extensions.insert(OnUpgrade::new(rx));
        if reply
            .send(Ok(Response::from_parts(parts, crate::proto::body::empty())))
            .is_err()
        {
            return;
        }
        let _ = tx.send(Rewind::new(buf.split().freeze(), rd.unsplit(wr)));
        return;
    }
    let (resp_body, mut pump) = match answer.framing {
        Framing::Empty | Framing::Length(0) => (crate::proto::body::empty(), None),
        f => {
            let (tx, rx) = h1body::channel(f);
            let pump = Pump::new(Decoder::new(f, cfg.limits), Some(tx), None, false);
            (rx.boxed_unsync(), Some(pump))
        }
    };
    if reply
        .send(Ok(Response::from_parts(parts, resp_body)))
        .is_err()
    {
        return;
    }
    // Both bodies, until the response's ends.
    while let Some(p) = pump.as_mut().filter(|p| p.active()) {
        tokio::select! {
            stepped = p.step(&mut rd, &mut buf) => {
                if stepped.is_err() {
                    return;
                }
            }
            written = writer.next(&mut body, &mut wr), if !writer.finished() => {
                if written.is_err() {
                    writer.done = true;
                    writer.failed = true;
                    writer.out.clear();
                    writer.written = 0;
                }
            }
        }
    }
    if pump.as_ref().is_some_and(|p| !p.finished()) {
        return;
    }
    // The response is complete. A request body still being sent (the upstream answered
    // early) or a connection the upstream will close is not reused.
    if answer.keep_alive && writer.finished() && !writer.failed {
        on_idle(Conn {
            io: rd.unsplit(wr),
            buf,
        });
    }
}

impl SendError {
    fn or_io(self, e: std::io::Error) -> SendError {
        match e.kind() {
            std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof => self,
            _ => SendError::Io(e),
        }
    }
}

async fn read_response<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<ResponseHead, SendError> {
    use tokio::io::AsyncReadExt;
    let mut got_bytes = !buf.is_empty();
    loop {
        match head::parse_response(buf, limits) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err(SendError::Head(e)),
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        match rd.read_buf(buf).await {
            Ok(0) if !got_bytes => {
                return Err(SendError::Closed {
                    request_written: true,
                    resend: None,
                });
            }
            Ok(0) => {
                return Err(SendError::Protocol(
                    "the response head was cut short".into(),
                ));
            }
            Ok(_) => got_bytes = true,
            Err(e) if !got_bytes => {
                return Err(SendError::Closed {
                    request_written: true,
                    resend: None,
                }
                .or_io(e));
            }
            Err(e) => return Err(SendError::Io(e)),
        }
    }
}

/// Writes the request body in the framing its head announced.
struct BodyWriter {
    framing: Framing,
    remaining: u64,
    done: bool,
    failed: bool,
    /// Framed bytes not yet written, and how many of them were.
    out: Vec<u8>,
    written: usize,
}

impl BodyWriter {
    /// A writer whose `out` holds the encoded head, for a body in `framing`.
    fn new(framing: Framing, head: Vec<u8>) -> Self {
        Self {
            framing,
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            done: framing == Framing::Empty,
            failed: false,
            out: head,
            written: 0,
        }
    }

    /// Adds the frames of the body that are ready now (a body already in memory) to the head
    /// in `out`, so that head and body go in one write; a pending body is left to `next`.
    /// Stops at 64 KiB, or when the body ended (then `done`).
    fn first_frames(&mut self, body: &mut Body) -> Result<(), SendError> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while !self.done && self.out.len() < 64 * 1024 {
            match std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
                std::task::Poll::Ready(frame) => self.encode(frame)?,
                std::task::Poll::Pending => break,
            }
        }
        Ok(())
    }

    fn finished(&self) -> bool {
        self.done && self.written >= self.out.len()
    }

    /// Writes the next frame of `body`. Cancel-safe: a frame taken from the body stays in
    /// `out` until every byte of it is written, so a `select!` that drops this future
    /// mid-write loses nothing.
    async fn next<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        body: &mut Body,
        wr: &mut W,
    ) -> Result<(), SendError> {
        if self.written < self.out.len() {
            return self.flush(wr).await;
        }
        let frame = body.frame().await;
        self.out.clear();
        self.written = 0;
        self.encode(frame)?;
        self.flush(wr).await
    }

    /// Appends one frame (or the end) in the framing the head announced.
    fn encode(&mut self, frame: Option<Result<Frame<Bytes>, BoxError>>) -> Result<(), SendError> {
        match frame {
            None => {
                self.done = true;
                match self.framing {
                    Framing::Chunked => h1body::encode_last_chunk(&mut self.out, None),
                    Framing::Length(_) if self.remaining != 0 => {
                        return Err(SendError::Protocol(
                            "the request body ended before its Content-Length".into(),
                        ));
                    }
                    _ => {}
                }
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => match self.framing {
                    Framing::Chunked => h1body::encode_chunk(&mut self.out, &data),
                    _ => {
                        if data.len() as u64 > self.remaining {
                            self.done = true;
                            return Err(SendError::Protocol(
                                "the request body is longer than its Content-Length".into(),
                            ));
                        }
                        self.remaining -= data.len() as u64;
                        self.out.extend_from_slice(&data);
                    }
                },
                Err(frame) => {
                    self.done = true;
                    if self.framing == Framing::Chunked {
                        h1body::encode_last_chunk(&mut self.out, frame.trailers_ref());
                    }
                }
            },
            Some(Err(e)) => {
                self.done = true;
                return Err(match ClientBodyError::find(&*e) {
                    Some(fault) => SendError::ClientBody(fault.clone()),
                    None => SendError::Body(e),
                });
            }
        }
        Ok(())
    }

    async fn flush<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
    ) -> Result<(), SendError> {
        while self.written < self.out.len() {
            let n = wr
                .write(&self.out[self.written..])
                .await
                .map_err(SendError::Io)?;
            if n == 0 {
                return Err(SendError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        wr.flush().await.map_err(SendError::Io)
    }
}
