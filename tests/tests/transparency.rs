//! The mesh is invisible and cannot be bypassed. The same raw requests go to an application
//! directly and through a two-proxy mutual-TLS mesh; the bytes that reach the application and
//! the answers that reach the client must mean the same, case by case, except for the
//! differences the README's table lists. Applications: a recording raw-socket app (it keeps
//! every byte it receives), nginx, and Python's `http.server`. Requests the proxy must refuse
//! (ambiguous framing or hosts, odd targets) get its marked 400 and never reach the app.

use std::net::SocketAddr;
use std::time::Duration;

use sidemesh_tests::Proc;
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::wire::{
    self, Message, REQUEST_DIFFERENCES, RESPONSE_DIFFERENCES, RecordingApp, exchange,
    parse_requests, parse_responses,
};

const QUIET: Duration = Duration::from_millis(400);

fn yaml() -> String {
    "apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  trustDomain: cluster.local
  mtls: strict
services:
  - name: app
    namespace: demo
    ports: [{port: 8081}]
  - name: client
    namespace: demo
    ports: [{port: 8082}]
routes:
  - name: limited
    service: app.demo
    matches: [{path: {prefix: /limited}}]
    rateLimit: {rate: 1/s, burst: 1}
  - name: all
    service: app.demo
"
    .to_string()
}

/// A mesh of two proxies (client -> app) in strict mTLS, in front of `app`.
struct Pair {
    _mesh: Mesh,
    _app_proxy: Proc,
    client_proxy: Proc,
}

impl Pair {
    async fn start(app: SocketAddr) -> Pair {
        let mesh = Mesh::start(&yaml(), &[]);
        let app_proxy = mesh.proxy("app", Some(app), &[], &[]);
        let client_proxy = mesh.proxy("client", None, &["app"], &[]);
        mesh.wait_meshed(&client_proxy, "app", &app_proxy).await;
        Pair {
            _mesh: mesh,
            _app_proxy: app_proxy,
            client_proxy,
        }
    }

    /// The caller's listener for the app's service.
    fn entry(&self) -> SocketAddr {
        self.client_proxy.listener("upstream:app")
    }
}

fn methods_of(request: &[u8]) -> Vec<String> {
    let (reqs, partial) = parse_requests(request);
    reqs.iter()
        .chain(partial.iter())
        .map(|m| m.start.split(' ').next().unwrap_or("").to_string())
        .collect()
}

fn answers(bytes: &[u8], request: &[u8]) -> Vec<Message> {
    let methods = methods_of(request);
    let methods: Vec<&str> = methods.iter().map(String::as_str).collect();
    parse_responses(bytes, &methods)
        .into_iter()
        .map(|mut m| {
            // A proxy answers in its own HTTP version (RFC 9110 section 6.2): always 1.1.
            if let Some(rest) = m.start.strip_prefix("HTTP/1.0 ") {
                m.start = format!("HTTP/1.1 {rest}");
            }
            m.without(RESPONSE_DIFFERENCES)
        })
        .collect()
}

fn received(app: &RecordingApp) -> Vec<Message> {
    app.take()
        .iter()
        .flat_map(|c| {
            let (done, partial) = parse_requests(c);
            done.into_iter().chain(partial)
        })
        .map(|m| m.without(REQUEST_DIFFERENCES))
        .collect()
}

/// Every case that must pass unchanged: (name, raw request).
fn ordinary_cases() -> Vec<(&'static str, Vec<u8>)> {
    let many: String = (0..90)
        .map(|i| format!("X-Field-{i}: value {i}\r\n"))
        .collect();
    let large = format!("X-Large: {}\r\n", "v".repeat(10 * 1024));
    vec![
        ("GET", b"GET /plain?a=1&b=2 HTTP/1.1\r\nHost: app\r\nUser-Agent: raw\r\n\r\n".to_vec()),
        ("HEAD", b"HEAD /plain HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("POST with a length", b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\n\r\nhello world".to_vec()),
        ("POST chunked with extensions and trailers", b"POST /upload HTTP/1.1\r\nHost: app\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n".to_vec()),
        ("GET with a chunked body", b"GET /search HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n".to_vec()),
        ("GET with a length body", b"GET /search HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n\r\nbody".to_vec()),
        ("DELETE with a body", b"DELETE /thing HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\n{}".to_vec()),
        ("a lowercase method", b"get /plain HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a custom method", b"PURGE /cache HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("JSON with quotes and angle brackets in the query", b"GET /q?filter={\"name\":\"<b>\"}&x=`y` HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("UTF-8 in the path and a header", "GET /café/日本 HTTP/1.1\r\nHost: app\r\nX-Name: café\r\n\r\n".as_bytes().to_vec()),
        ("HTTP/1.0 without Host", b"GET /old HTTP/1.0\r\n\r\n".to_vec()),
        ("HTTP/1.0 keep-alive", b"GET /old HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\nGET /again HTTP/1.0\r\nHost: app\r\n\r\n".to_vec()),
        ("absolute form", b"GET http://app/absolute?x=1 HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("pipelined requests", b"GET /one HTTP/1.1\r\nHost: app\r\n\r\nPOST /two HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabcGET /three HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".to_vec()),
        ("an empty line before the request", b"\r\nGET /after-blank HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("many headers", format!("GET /many HTTP/1.1\r\nHost: app\r\n{many}\r\n").into_bytes()),
        ("a large header", format!("GET /large HTTP/1.1\r\nHost: app\r\n{large}\r\n").into_bytes()),
        ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("repeated fields", b"GET /repeat HTTP/1.1\r\nHost: app\r\nAccept: a\r\nAccept: b\r\nCookie: x=1\r\n\r\n".to_vec()),
        ("Connection naming Host", b"GET /conn HTTP/1.1\r\nHost: app\r\nConnection: host\r\n\r\n".to_vec()),
        ("response trailers", b"GET /respond/trailers HTTP/1.1\r\nHost: app\r\nTE: trailers\r\n\r\n".to_vec()),
        ("103 Early Hints", b"GET /respond/early-hints HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a truncated response", b"GET /respond/truncated HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a response with 150 headers", b"GET /respond/many-headers HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("several Set-Cookie", b"GET /respond/cookies HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a custom reason phrase", b"GET /respond/reason HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a close-delimited response", b"GET /respond/close-delimited HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_reach_the_app_and_answers_reach_the_client_as_they_would_directly() {
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    let mut failures = Vec::new();
    for (name, request) in ordinary_cases() {
        let direct = exchange(app.addr, &request, QUIET).await;
        let direct_seen = received(&app);
        let meshed = exchange(pair.entry(), &request, QUIET).await;
        let meshed_seen = received(&app);
        let (direct_answers, meshed_answers) =
            (answers(&direct, &request), answers(&meshed, &request));
        // A close-delimited answer is chunked for an HTTP/1.1 client: the same body, framed.
        if meshed_seen != direct_seen {
            failures.push(format!(
                "{name}: the app saw\n  direct: {direct_seen:?}\n  meshed: {meshed_seen:?}"
            ));
        }
        if meshed_answers != direct_answers {
            failures.push(format!(
                "{name}: the client got\n  direct: {direct_answers:?}\n  meshed: {meshed_answers:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_by_the_app_and_relayed() {
    use tokio::io::AsyncWriteExt;
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    for addr in [app.addr, pair.entry()] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"PUT /upload HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .await
            .expect("head");
        let interim = wire::read_until_quiet(&mut stream, QUIET).await;
        assert_eq!(
            String::from_utf8_lossy(&interim),
            "HTTP/1.1 100 Continue\r\n\r\n",
            "the app's 100 Continue, before any body was sent ({addr})"
        );
        stream.write_all(b"hello").await.expect("body");
        let rest = wire::read_until_quiet(&mut stream, QUIET).await;
        let text = String::from_utf8_lossy(&rest);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        let seen = received(&app);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            seen[0].header("expect"),
            Some("100-continue"),
            "the app decides: {seen:?}"
        );
        assert_eq!(seen[0].body, b"hello");
    }
}

/// (name, request, status, marker): refused by the proxy, never forwarded.
fn refused_cases() -> Vec<(&'static str, &'static [u8], u16, &'static str)> {
    vec![
        ("two Host headers", b"GET / HTTP/1.1\r\nHost: app\r\nHost: evil\r\n\r\n", 400, "malformed-request"),
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", 400, "malformed-request"),
        ("an empty Host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400, "malformed-request"),
        ("userinfo in Host", b"GET / HTTP/1.1\r\nHost: app@evil\r\n\r\n", 400, "malformed-request"),
        ("userinfo in an absolute target", b"GET http://app@evil/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "malformed-request"),
        ("a target without a slash", b"GET nopath HTTP/1.1\r\nHost: app\r\n\r\n", 400, "malformed-request"),
        ("authority form without CONNECT", b"GET evil:80 HTTP/1.1\r\nHost: app\r\n\r\n", 400, "malformed-request"),
        ("CONNECT to a path", b"CONNECT / HTTP/1.1\r\nHost: app\r\n\r\n", 400, "malformed-request"),
        ("both Content-Length and Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "malformed-request"),
        ("two different Content-Lengths", b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400, "malformed-request"),
        ("a coding other than chunked", b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "malformed-request"),
        ("Transfer-Encoding in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "malformed-request"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: app\r\nX-A: 1\r\n  folded\r\n\r\n", 400, "malformed-request"),
        ("a bare LF", b"GET / HTTP/1.1\nHost: app\n\n", 400, "malformed-request"),
        ("NUL in a field", b"GET / HTTP/1.1\r\nHost: app\r\nX-A: a\x00b\r\n\r\n", 400, "malformed-request"),
        ("a space before the colon", b"GET / HTTP/1.1\r\nHost: app\r\nX-A : 1\r\n\r\n", 400, "malformed-request"),
        ("a fragment", b"GET /a#b HTTP/1.1\r\nHost: app\r\n\r\n", 400, "malformed-request"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_requests_are_refused_with_the_proxys_marker_and_never_forwarded() {
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    let mut failures = Vec::new();
    for (name, request, status, marker) in refused_cases() {
        let back = exchange(pair.entry(), request, QUIET).await;
        let text = String::from_utf8_lossy(&back);
        let seen = received(&app);
        if !text.starts_with(&format!("HTTP/1.1 {status} "))
            || !text.contains(&format!("x-sidemesh-error: {marker}"))
            || !text.contains("server: sidemesh")
        {
            failures.push(format!("{name}: answered {text:?}"));
        }
        if !seen.is_empty() {
            failures.push(format!("{name}: reached the app: {seen:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_routed_authority_is_the_one_the_app_sees() {
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    // Absolute form: the target's authority wins over Host (RFC 9112 section 3.2.2).
    let _ = exchange(
        pair.entry(),
        b"GET http://app/x HTTP/1.1\r\nHost: evil\r\n\r\n",
        QUIET,
    )
    .await;
    let seen = received(&app);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("host"), Some("app"), "{seen:?}");
    // The caller's explicit outbound listener routes by authority: the app sees that one.
    let outbound = pair.client_proxy.listener("outbound");
    let back = exchange(
        outbound,
        b"GET http://app.demo/y HTTP/1.1\r\nHost: unknown\r\n\r\n",
        QUIET,
    )
    .await;
    assert!(
        String::from_utf8_lossy(&back).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&back)
    );
    let seen = received(&app);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("host"), Some("app.demo"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_upgrade_never_opens_an_unproxied_connection() {
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    // The app takes any upgrade; the proxy must not let it. Every request after the first on
    // this connection carries a forged identity and aims at a route limited to 1/s.
    let forged = "x-sidemesh-client-id: spiffe://cluster.local/ns/demo/sa/admin\r\n";
    let mut request = format!(
        "GET /limited HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n{forged}\r\n"
    );
    for _ in 0..5 {
        request.push_str(&format!(
            "GET /limited HTTP/1.1\r\nHost: app\r\n{forged}\r\n"
        ));
    }
    let back = exchange(pair.entry(), request.as_bytes(), Duration::from_secs(1)).await;
    let answers = parse_responses(&back, &["GET"; 6]);
    let statuses: Vec<&str> = answers.iter().map(|m| m.start.as_str()).collect();
    assert_eq!(
        answers.len(),
        6,
        "every request is answered by the proxy: {statuses:?}"
    );
    assert!(
        statuses[0].starts_with("HTTP/1.1 200"),
        "a plain request, not a switch: {statuses:?}"
    );
    assert!(
        statuses[1..].iter().all(|s| s.starts_with("HTTP/1.1 429")),
        "the rate limit holds on every request of the connection: {statuses:?}"
    );
    let seen = received(&app);
    assert_eq!(
        seen.len(),
        1,
        "only the admitted request reached the app: {seen:?}"
    );
    assert_eq!(seen[0].header("upgrade"), None, "{seen:?}");
    assert_eq!(seen[0].header("http2-settings"), None, "{seen:?}");
    assert_eq!(
        seen[0].header("x-sidemesh-client-id"),
        None,
        "the forged identity is replaced (and left out of the comparison): {seen:?}"
    );

    // An app that switches protocols unasked gets a marked 502, not a tunnel.
    let back = exchange(
        pair.entry(),
        b"GET /respond/101 HTTP/1.1\r\nHost: app\r\n\r\n",
        QUIET,
    )
    .await;
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(
        text.contains("x-sidemesh-error: upstream-failure"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxys_error_marker_cannot_be_forged_by_an_app() {
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    let back = exchange(
        pair.entry(),
        b"GET /respond/fake-marker HTTP/1.1\r\nHost: app\r\n\r\n",
        QUIET,
    )
    .await;
    let answer = &parse_responses(&back, &["GET"])[0];
    assert!(answer.start.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(answer.header("x-app"), Some("recorder"));
    assert_eq!(answer.header("x-sidemesh-error"), None, "{answer:?}");
    let _ = received(&app);

    // Nor can a client set the attempt number the app reads on retried routes.
    let _ = exchange(
        pair.entry(),
        b"GET /plain HTTP/1.1\r\nHost: app\r\nx-sidemesh-attempt: 7\r\n\r\n",
        QUIET,
    )
    .await;
    let seen = received(&app);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("x-sidemesh-attempt"), None, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_clients_body_faults_are_the_clients_and_never_eject_the_endpoint() {
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    let cases: [(&str, Vec<u8>, &str, &str); 3] = [
        (
            "a bad chunk size",
            b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                .to_vec(),
            "HTTP/1.1 400",
            "malformed-body",
        ),
        (
            "a chunk-extension flood",
            format!(
                "POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                "1;aaaaaaaaaaaaaaaaaaaa\r\nx\r\n".repeat(400)
            )
            .into_bytes(),
            "HTTP/1.1 413",
            "chunk-extensions-too-long",
        ),
        (
            "an aborted upload",
            b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\npartial".to_vec(),
            "",
            "",
        ),
    ];
    for round in 0..3 {
        for (name, request, status, marker) in &cases {
            if marker.is_empty() {
                let mut stream = tokio::net::TcpStream::connect(pair.entry())
                    .await
                    .expect("connect");
                tokio::io::AsyncWriteExt::write_all(&mut stream, request)
                    .await
                    .expect("write");
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(stream);
                continue;
            }
            let back = exchange(pair.entry(), request, QUIET).await;
            let text = String::from_utf8_lossy(&back);
            assert!(text.starts_with(status), "{name} (round {round}): {text}");
            assert!(
                text.contains(&format!("x-sidemesh-error: {marker}")),
                "{name}: {text}"
            );
        }
    }
    let _ = received(&app);
    // Nine client faults in a row, and the only endpoint still serves.
    let back = exchange(
        pair.entry(),
        b"GET /plain HTTP/1.1\r\nHost: app\r\n\r\n",
        QUIET,
    )
    .await;
    let text = String::from_utf8_lossy(&back);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "the endpoint was not ejected: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_stops_is_answered_408_after_the_body_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = RecordingApp::start().await;
    let mesh = Mesh::start(&yaml(), &[]);
    let app_proxy = mesh.proxy("app", Some(app.addr), &[], &[]);
    let client_proxy = mesh.proxy("client", None, &["app"], &["--body", "500ms"]);
    mesh.wait_meshed(&client_proxy, "app", &app_proxy).await;
    let mut stream = tokio::net::TcpStream::connect(client_proxy.listener("upstream:app"))
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nab")
        .await
        .expect("write");
    let back = wire::read_until_quiet(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("x-sidemesh-error: body-timeout"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Whether this process runs as root (from /proc, no libc call needed).
fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
            .unwrap_or(false)
    })
}

/// A free loopback port for a server of another project.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Requests for third-party servers: their answers must be the same through the mesh.
fn third_party_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("GET a file", b"GET /index.html HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("HEAD a file", b"HEAD /index.html HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a missing file", b"GET /missing HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("HTTP/1.0", b"GET /index.html HTTP/1.0\r\n\r\n".to_vec()),
        ("HTTP/1.0 keep-alive", b"GET /index.html HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n\r\n".to_vec()),
        ("pipelined", b"GET /index.html HTTP/1.1\r\nHost: app\r\n\r\nGET /missing HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".to_vec()),
        ("absolute form", b"GET http://app/index.html HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("quotes in the query", b"GET /index.html?q={\"a\":\"<b>\"} HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("a range", b"GET /index.html HTTP/1.1\r\nHost: app\r\nRange: bytes=0-4\r\n\r\n".to_vec()),
        ("a conditional request", b"GET /index.html HTTP/1.1\r\nHost: app\r\nIf-Modified-Since: Wed, 01 Jan 2070 00:00:00 GMT\r\n\r\n".to_vec()),
        ("POST to a file", b"POST /index.html HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc".to_vec()),
        ("a chunked POST", b"POST /index.html HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec()),
        ("an unknown method", b"BREW /index.html HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
        ("an echo of the request line", b"GET /echo/%7Bx%7D?a=\"b\" HTTP/1.1\r\nHost: app\r\n\r\n".to_vec()),
    ]
}

async fn compare_with(server: &str, app: SocketAddr, cases: &[(&'static str, Vec<u8>)]) {
    wait_listening(app).await;
    let pair = Pair::start(app).await;
    let mut failures = Vec::new();
    for (name, request) in cases {
        let direct = answers(&exchange(app, request, QUIET).await, request);
        let meshed = answers(&exchange(pair.entry(), request, QUIET).await, request);
        if direct != meshed {
            failures.push(format!(
                "{server}, {name}:\n  direct: {direct:?}\n  meshed: {meshed:?}"
            ));
        }
        if direct.is_empty() {
            failures.push(format!("{server}, {name}: no answer at all"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_answers_the_same_through_the_mesh() {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        sidemesh_tests::skip("nginx is not installed (apt-get install nginx-light)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("index.html"), "<h1>hello from nginx</h1>\n").expect("write");
    let port = free_port();
    let conf = format!(
        "daemon off;\n{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{port};\n    root {root};\n    location /echo/ {{ return 200 \"$request_method $request_uri $http_host\\n\"; }}\n  }}\n}}\n",
        d = dir.path().display(),
        root = root.display(),
        // As root, nginx's workers would drop to `nobody`, who cannot read the temporary folder.
        user = if runs_as_root() { "user root;\n" } else { "" },
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).expect("conf");
    let mut child = std::process::Command::new(nginx)
        .args([
            "-p",
            &dir.path().to_string_lossy(),
            "-c",
            &dir.path().join("nginx.conf").to_string_lossy(),
        ])
        .spawn()
        .expect("start nginx");
    let app = SocketAddr::from(([127, 0, 0, 1], port));
    compare_with("nginx", app, &third_party_cases()).await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn python_http_server_answers_the_same_through_the_mesh() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("index.html"),
        "<h1>hello from python</h1>\n",
    )
    .expect("write");
    let port = free_port();
    let mut child = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start python3 -m http.server");
    let app = SocketAddr::from(([127, 0, 0, 1], port));
    // `http.server` speaks HTTP/1.0 and closes after every answer, so a pipelined second
    // request is never answered directly; through the mesh it is (the proxy keeps the
    // client's connection whatever the upstream does: the README's table). Not compared.
    let cases: Vec<_> = third_party_cases()
        .into_iter()
        .filter(|(name, _)| !matches!(*name, "an echo of the request line" | "pipelined"))
        .collect();
    compare_with("python http.server", app, &cases).await;
    let _ = child.kill();
    let _ = child.wait();
}

/// A proxy in front of the recording app without mTLS, with `tweak` applied to its flags.
async fn single_proxy(
    app: &RecordingApp,
    tweak: impl FnOnce(&mut sidemesh_proxy::config::Args),
) -> sidemesh_tests::TestProxy {
    let yaml = format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: app\n    ports: [{{port: 80}}]\n    endpoints: [\"{}\"]\n",
        app.addr
    );
    sidemesh_tests::TestProxy::start(&yaml, "client", &["app"], tweak).await
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_close_after_the_keepalive_timeout_not_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = RecordingApp::start().await;
    let proxy = single_proxy(&app, |args| {
        args.timeouts.keepalive = Duration::from_millis(300);
        args.timeouts.header = Duration::from_secs(30);
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(proxy.upstream("app"))
        .await
        .expect("connect");
    stream
        .write_all(b"GET /plain HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .expect("write");
    let answered = std::time::Instant::now();
    // Everything the proxy sends until it closes: one answer, then the close.
    let back = wire::read_until_quiet(&mut stream, Duration::from_secs(10)).await;
    let idle = answered.elapsed();
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(parse_responses(&back, &["GET"]).len(), 1, "{text}");
    assert!(
        idle >= Duration::from_millis(300) && idle < Duration::from_secs(5),
        "closed after {idle:?} idle; keepalive is 300ms, the header timeout 30s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn listeners_queue_a_burst_of_new_connections() {
    let app = RecordingApp::start().await;
    let proxy = single_proxy(&app, |_| {}).await;
    let port = proxy.upstream("app").port();
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    // `ss` shows a listening socket's backlog in its Send-Q column.
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let backlog: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no listener on {port} in `ss`: {text}"));
    assert_eq!(backlog, somaxconn.min(4096), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_head_is_not_held_back_by_a_body_that_is_slow_to_start() {
    use tokio::io::AsyncWriteExt;
    let app = RecordingApp::start().await;
    let pair = Pair::start(app.addr).await;
    let mut stream = tokio::net::TcpStream::connect(pair.entry())
        .await
        .expect("connect");
    stream
        .write_all(b"GET /respond/slow-body HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .expect("write");
    // The app sends its head at once and its body a second later: the head is through
    // both proxies well before the body exists.
    let head = wire::read_until_quiet(&mut stream, Duration::from_millis(500)).await;
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the head came first: {head:?}"
    );
    assert!(!head.contains("late"), "{head:?}");
    let rest = wire::read_until_quiet(&mut stream, Duration::from_secs(3)).await;
    assert!(
        String::from_utf8_lossy(&rest).contains("late"),
        "then the body"
    );
}
