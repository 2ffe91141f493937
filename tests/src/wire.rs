//! HTTP/1 on the wire, for transparency tests: an application that records every byte it
//! receives and answers with scripted responses, a raw client, and a test-side reading of
//! messages into a comparable form (names lowercased, bodies de-chunked, the differences a
//! proxy intends to make taken out).
//!
//! The parser here is deliberately separate from the proxy's: a test that used the proxy's
//! own parser to check the proxy could not catch its mistakes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads as they arrived: (connection number, bytes).
type Reads = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

/// A body read off the wire: data, trailers, bytes used, whether it was complete.
type ReadBody = (Vec<u8>, Vec<(String, String)>, usize, bool);

/// An application on a raw socket: it records what arrives and answers each complete
/// request by its path (see [`scripted_response`]).
#[derive(Debug, Clone)]
pub struct RecordingApp {
    pub addr: SocketAddr,
    /// What arrived, read by read, with the connection it arrived on.
    received: Reads,
}

impl RecordingApp {
    pub async fn start() -> RecordingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = RecordingApp {
            addr,
            received: received.clone(),
        };
        tokio::spawn(async move {
            let mut next = 0;
            while let Ok((stream, _)) = listener.accept().await {
                next += 1;
                tokio::spawn(serve(stream, received.clone(), next));
            }
        });
        app
    }

    /// The bytes received since the last call, per connection (in the order connections
    /// first sent something). A pooled connection's later bytes start a new entry.
    pub fn take(&self) -> Vec<Vec<u8>> {
        let reads = std::mem::take(&mut *self.received.lock().expect("lock"));
        let mut order: Vec<usize> = Vec::new();
        let mut by_conn: std::collections::HashMap<usize, Vec<u8>> = Default::default();
        for (conn, bytes) in reads {
            if !by_conn.contains_key(&conn) {
                order.push(conn);
            }
            by_conn.entry(conn).or_default().extend_from_slice(&bytes);
        }
        order
            .into_iter()
            .filter_map(|c| by_conn.remove(&c))
            .collect()
    }
}

async fn serve(mut stream: TcpStream, received: Reads, conn: usize) {
    let mut seen = Vec::new();
    let mut answered = 0;
    let mut continued = 0;
    let mut buf = [0u8; 65536];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        seen.extend_from_slice(&buf[..n]);
        received
            .lock()
            .expect("lock")
            .push((conn, buf[..n].to_vec()));
        let (requests, partial) = parse_requests(&seen);
        while answered < requests.len() {
            let req = &requests[answered];
            answered += 1;
            let path = req.start.split(' ').nth(1).unwrap_or("").to_string();
            if path.starts_with("/respond/slow-body") {
                // A head at once, the body a second later (a stream of events, a long poll).
                let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                if stream.write_all(b"4\r\nlate\r\n0\r\n\r\n").await.is_err() {
                    return;
                }
                continue;
            }
            let out = scripted_response(&path, &req.start, req.header("upgrade"));
            if stream.write_all(&out).await.is_err() {
                return;
            }
            let said_close = out
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
            if path.starts_with("/respond/truncated") || said_close || req.closes() {
                let _ = stream.shutdown().await;
                return;
            }
        }
        if let Some(partial) = partial {
            let expects = partial
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
            if expects && continued < answered + 1 {
                continued = answered + 1;
                if stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// The answer the recording app gives to a request for `path`.
pub fn scripted_response(path: &str, start: &str, upgrade: Option<&str>) -> Vec<u8> {
    let body = format!("seen: {start}\n");
    let plain = |extra: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-App: recorder\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    if upgrade.is_some_and(|u| u.eq_ignore_ascii_case("h2c")) {
        // A naive application that takes any upgrade.
        return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            .to_vec();
    }
    match path {
        p if p.starts_with("/respond/trailers") => b"HTTP/1.1 200 OK\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n".to_vec(),
        p if p.starts_with("/respond/early-hints") => {
            let mut out = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec();
            out.extend(plain(""));
            out
        }
        p if p.starts_with("/respond/truncated") => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten.\n".to_vec()
        }
        p if p.starts_with("/respond/many-headers") => {
            let many: String = (0..150).map(|i| format!("X-Many-{i}: {i}\r\n")).collect();
            plain(&many)
        }
        p if p.starts_with("/respond/cookies") => plain("Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2; HttpOnly\r\n"),
        p if p.starts_with("/respond/reason") => {
            format!("HTTP/1.1 299 Quite Fine\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
        }
        p if p.starts_with("/respond/fake-marker") => plain("x-sidemesh-error: forbidden\r\n"),
        p if p.starts_with("/respond/101") => {
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n".to_vec()
        }
        p if p.starts_with("/respond/close-delimited") => {
            format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{body}").into_bytes()
        }
        _ if start.starts_with("HEAD ") => {
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes()
        }
        _ => plain(""),
    }
}

/// One HTTP/1 message as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The request line or status line, as sent.
    pub start: String,
    /// Fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// Whether the body was complete (a truncated response is not).
    pub complete: bool,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the message says the connection closes after it.
    pub fn closes(&self) -> bool {
        let tokens: Vec<String> = self
            .headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
            .collect();
        if self.start.ends_with("HTTP/1.0") || self.start.starts_with("HTTP/1.0") {
            !tokens.iter().any(|t| t == "keep-alive")
        } else {
            tokens.iter().any(|t| t == "close")
        }
    }

    /// Without the fields a proxy intends to add, remove or re-frame (the README's table),
    /// and in name order: the order of fields with different names carries no meaning
    /// (RFC 9110 section 5.3), the order of one name's values does and is kept.
    pub fn without(mut self, names: &[&str]) -> Message {
        self.headers.retain(|(n, _)| !names.contains(&n.as_str()));
        self.headers.sort_by(|a, b| a.0.cmp(&b.0));
        self
    }
}

/// Fields a meshed request gains or loses on purpose.
pub const REQUEST_DIFFERENCES: &[&str] = &[
    "x-forwarded-for",
    "x-sidemesh-client-id",
    "traceparent",
    "tracestate",
    "connection",
    "keep-alive",
];

/// Fields a meshed response gains or loses on purpose (`date` changes between two answers).
pub const RESPONSE_DIFFERENCES: &[&str] =
    &["date", "connection", "keep-alive", "transfer-encoding"];

fn fields(raw: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    raw.iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// Reads a body by its framing; `None` while incomplete.
fn read_body(
    bytes: &[u8],
    headers: &[(String, String)],
    close_delimited: bool,
) -> Option<ReadBody> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut at = 0;
        let mut body = Vec::new();
        loop {
            let line_end = bytes[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let line = std::str::from_utf8(&bytes[at..line_end]).ok()?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let end = bytes[at..].windows(2).position(|w| w == b"\r\n")? + at;
                    if end == at {
                        return Some((body, trailers, end + 2, true));
                    }
                    let line = String::from_utf8_lossy(&bytes[at..end]).into_owned();
                    let (n, v) = line.split_once(':')?;
                    trailers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                    at = end + 2;
                }
            }
            if bytes.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&bytes[at..at + size]);
            at += size + 2;
        }
    }
    if let Some(len) = get("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        if bytes.len() < len {
            return if close_delimited {
                Some((bytes.to_vec(), Vec::new(), bytes.len(), false))
            } else {
                None
            };
        }
        return Some((bytes[..len].to_vec(), Vec::new(), len, true));
    }
    if close_delimited {
        return Some((bytes.to_vec(), Vec::new(), bytes.len(), true));
    }
    Some((Vec::new(), Vec::new(), 0, true))
}

/// Requests in `bytes`, and the last one when it is not complete yet.
pub fn parse_requests(bytes: &[u8]) -> (Vec<Message>, Option<Message>) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        while bytes[at..].starts_with(b"\r\n") {
            at += 2;
        }
        let mut raw = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut raw);
        let Ok(httparse::Status::Complete(head)) = req.parse(&bytes[at..]) else {
            break;
        };
        let start = format!(
            "{} {} HTTP/1.{}",
            req.method.unwrap_or(""),
            req.path.unwrap_or(""),
            req.version.unwrap_or(1)
        );
        let headers = fields(req.headers);
        let message = Message {
            start,
            headers: headers.clone(),
            body: Vec::new(),
            trailers: Vec::new(),
            complete: false,
        };
        match read_body(&bytes[at + head..], &headers, false) {
            Some((body, trailers, used, complete)) => {
                out.push(Message {
                    body,
                    trailers,
                    complete,
                    ..message
                });
                at += head + used;
            }
            None => return (out, Some(message)),
        }
    }
    (out, None)
}

/// Responses in `bytes` (the answers to requests with these methods, in order). Interim
/// (1xx) responses are messages of their own.
pub fn parse_responses(bytes: &[u8], methods: &[&str]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut answered = 0;
    while at < bytes.len() {
        let mut raw = [httparse::EMPTY_HEADER; 256];
        let mut resp = httparse::Response::new(&mut raw);
        let Ok(httparse::Status::Complete(head)) = resp.parse(&bytes[at..]) else {
            out.push(Message {
                start: format!("unparsed: {}", String::from_utf8_lossy(&bytes[at..])),
                headers: Vec::new(),
                body: Vec::new(),
                trailers: Vec::new(),
                complete: false,
            });
            break;
        };
        let code = resp.code.unwrap_or(0);
        let start = format!(
            "HTTP/1.{} {} {}",
            resp.version.unwrap_or(1),
            code,
            resp.reason.unwrap_or("")
        );
        let headers = fields(resp.headers);
        let method = methods.get(answered).copied().unwrap_or("GET");
        let bodiless = (100..200).contains(&code) || code == 204 || code == 304 || method == "HEAD";
        let (body, trailers, used, complete) = if bodiless {
            (Vec::new(), Vec::new(), 0, true)
        } else {
            read_body(&bytes[at + head..], &headers, true).unwrap_or((
                bytes[at + head..].to_vec(),
                Vec::new(),
                bytes.len() - at - head,
                false,
            ))
        };
        if !(100..200).contains(&code) {
            answered += 1;
        }
        out.push(Message {
            start,
            headers,
            body,
            trailers,
            complete,
        });
        at += head + used;
    }
    out
}

/// Sends `request` on a new connection and reads until the server closes it or stays quiet
/// for `quiet`.
pub async fn exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    read_until_quiet(&mut stream, quiet).await
}

/// Everything `stream` sends until it closes or is quiet for `quiet`.
pub async fn read_until_quiet(stream: &mut TcpStream, quiet: Duration) -> Vec<u8> {
    let mut back = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => back.extend_from_slice(&buf[..n]),
            _ => return back,
        }
    }
}
