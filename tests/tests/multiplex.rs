//! HTTP/1.x multiplexed over HTTP/2 between two proxies (ALPN `sidemesh-h2`): requests of
//! many client connections share one mutual-TLS connection per endpoint and reach the
//! application as they were sent; bodies stream both ways; a large upload and a stalled
//! large download do not hold back small requests beside them; upgrades keep a connection of
//! their own; a broken shared connection is the proxy's 502 for the requests on it, and the
//! mesh recovers; a proxy with multiplexing off (as before it existed) interoperates both ways.
//! The transparency suite (`transparency.rs`) runs through the same multiplexing pair.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::wire::{self, RecordingApp, exchange, parse_requests, parse_responses};
use sidemesh_tests::{Proc, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const QUIET: Duration = Duration::from_millis(400);
const BIG: usize = 32 << 20;

fn yaml() -> &'static str {
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
  - name: all
    service: app.demo
    timeout: 60s
"
}

/// client proxy -> app proxy -> `app`, each proxy with its own extra flags.
struct Pair {
    mesh: Mesh,
    app_proxy: Proc,
    client_proxy: Proc,
}

impl Pair {
    async fn start(app: SocketAddr, client_flags: &[&str], app_flags: &[&str]) -> Pair {
        let mesh = Mesh::start(yaml(), &[]);
        let app_proxy = mesh.proxy("app", Some(app), &[], app_flags);
        let client_proxy = mesh.proxy("client", None, &["app"], client_flags);
        mesh.wait_meshed(&client_proxy, "app", &app_proxy).await;
        Pair {
            mesh,
            app_proxy,
            client_proxy,
        }
    }

    fn entry(&self) -> SocketAddr {
        self.client_proxy.listener("upstream:app")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.entry())
    }

    /// The caller's view of the app proxy's endpoint: (TLS connections opened, multiplexed
    /// connections open now).
    async fn endpoint(&self) -> (u64, u64) {
        let inbound = self.app_proxy.listener("inbound").to_string();
        let dump = self.client_proxy.config_dump().await.expect("config dump");
        let ep = dump["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["addr"] == inbound.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {inbound} in {dump}"));
        (
            ep["connects"].as_u64().expect("connects"),
            ep["multiplexed_connections"]
                .as_u64()
                .expect("multiplexed_connections"),
        )
    }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn text(s: impl Into<String>) -> Response<AppBody> {
    Response::new(Full::new(Bytes::from(s.into())).boxed())
}

/// An HTTP/1.1 application: `/slow` answers after 300 ms, `/echo` streams the request body
/// back frame by frame as it arrives, `/down?N` sends N bytes, `/up` counts the bytes it
/// receives, `/hang` answers after 60 s, `/ws` takes a WebSocket upgrade and echoes the
/// bytes after it, anything else answers at once.
async fn app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|mut req: Request<Incoming>| async move {
                    if req.uri().path() == "/ws" {
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = upgrade.await else { return };
                            let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                        });
                        let mut resp = text("");
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert("connection", http::HeaderValue::from_static("upgrade"));
                        resp.headers_mut()
                            .insert("upgrade", http::HeaderValue::from_static("websocket"));
                        return Ok::<_, Infallible>(resp);
                    }
                    let path = req.uri().path().to_string();
                    let query = req.uri().query().unwrap_or("").to_string();
                    let resp = match path.as_str() {
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            text("slow ok")
                        }
                        "/hang" => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            text("late")
                        }
                        "/echo" => {
                            let frames = req.into_body().into_data_stream().map(|chunk| {
                                Ok::<_, Infallible>(Frame::data(chunk.unwrap_or_default()))
                            });
                            Response::new(BodyExt::boxed(StreamBody::new(frames)))
                        }
                        "/down" => {
                            let n: usize = query.parse().unwrap_or(0);
                            let chunk = Bytes::from(vec![b'd'; 64 << 10]);
                            let frames = futures_util::stream::iter(
                                (0..n.div_ceil(chunk.len())).map(move |i| {
                                    let len = chunk.len().min(n - i * chunk.len());
                                    Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
                                }),
                            );
                            Response::new(BodyExt::boxed(StreamBody::new(frames)))
                        }
                        "/up" => {
                            let mut body = req.into_body();
                            let mut total = 0usize;
                            while let Some(Ok(frame)) = body.frame().await {
                                total += frame.data_ref().map_or(0, Bytes::len);
                            }
                            text(format!("{total}"))
                        }
                        _ => text("ok"),
                    };
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Reads from `stream` into `seen` until `want` is somewhere in `seen`, for at most 10 s.
async fn read_until(stream: &mut TcpStream, seen: &mut Vec<u8>, want: &[u8]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 16 << 10];
    while !seen.windows(want.len()).any(|w| w == want) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {:?} within 10 s; got {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(seen)
                )
            })
            .expect("read");
        assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(want));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_http1_requests_share_one_connection_per_endpoint() {
    let pair = Pair::start(app().await, &[], &[]).await;
    // 40 concurrent requests on 40 client connections, each held 300 ms by the app: without
    // multiplexing that is up to 40 TLS connections between the proxies.
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let url = pair.url("/slow");
            tokio::spawn(async move { http(Method::GET, &url, None, &[]).await })
        })
        .collect();
    for call in calls {
        let resp = call.await.expect("task").expect("answer");
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
        assert_eq!(resp.body, "slow ok");
    }
    let (connects, multiplexed) = pair.endpoint().await;
    assert_eq!(
        (connects, multiplexed),
        (1, 1),
        "one mutual-TLS connection carried every request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_both_ways_through_the_shared_connection() {
    let pair = Pair::start(app().await, &[], &[]).await;
    let mut stream = TcpStream::connect(pair.entry()).await.expect("connect");
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nping-1\r\n")
        .await
        .expect("write");
    let mut seen = Vec::new();
    // Each piece comes back before the next is sent: nothing waits for the whole body.
    read_until(&mut stream, &mut seen, b"ping-1").await;
    for i in 2..=5 {
        let piece = format!("ping-{i}");
        stream
            .write_all(format!("6\r\n{piece}\r\n").as_bytes())
            .await
            .expect("write");
        read_until(&mut stream, &mut seen, piece.as_bytes()).await;
    }
    stream.write_all(b"0\r\n\r\n").await.expect("end");
    read_until(&mut stream, &mut seen, b"0\r\n\r\n").await;
    let head = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(
        pair.endpoint().await.1,
        1,
        "it went over the multiplexed connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_upload_and_a_stalled_large_download_do_not_hold_back_small_requests() {
    let pair = Pair::start(app().await, &[], &[]).await;
    // A download the client does not read yet: its stream stops at its window, the others go on.
    let mut download = TcpStream::connect(pair.entry()).await.expect("connect");
    download
        .write_all(format!("GET /down?{BIG} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // An upload sent as fast as the mesh takes it.
    let mut upload = TcpStream::connect(pair.entry()).await.expect("connect");
    let uploading = tokio::spawn(async move {
        upload
            .write_all(
                format!("POST /up HTTP/1.1\r\nHost: app\r\nContent-Length: {BIG}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("head");
        let chunk = vec![b'u'; 256 << 10];
        for _ in 0..BIG / chunk.len() {
            upload.write_all(&chunk).await.expect("body");
        }
        let mut seen = Vec::new();
        read_until(&mut upload, &mut seen, format!("\r\n\r\n{BIG}").as_bytes()).await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..30 {
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            http(Method::GET, &pair.url(&format!("/small/{i}")), None, &[]),
        )
        .await
        .unwrap_or_else(|_| panic!("small request {i} was held back by the large transfers"))
        .expect("answer");
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.body, "ok");
    }
    tokio::time::timeout(Duration::from_secs(60), uploading)
        .await
        .expect("the upload finishes")
        .expect("upload task");
    // Now the download is read to its end, every byte.
    let mut got = Vec::with_capacity(BIG + 4096);
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = download.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"0\r\n\r\n") {
                break;
            }
        }
    })
    .await
    .expect("the download finishes");
    let responses = parse_responses(&got, &["GET"]);
    assert_eq!(responses.len(), 1, "one answer");
    assert_eq!(responses[0].body.len(), BIG, "the whole download arrived");
    assert!(responses[0].body.iter().all(|&b| b == b'd'));
    assert_eq!(pair.endpoint().await, (1, 1), "all of it on one connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_shared_connection_is_a_502_and_the_mesh_recovers() {
    let app = app().await;
    let mut pair = Pair::start(app, &[], &[]).await;
    let hanging = {
        let url = pair.url("/hang");
        tokio::spawn(async move { http(Method::GET, &url, None, &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pair.endpoint().await.1, 1);
    // The peer proxy dies with the request on its connection.
    pair.app_proxy.signal("KILL");
    let resp = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("the request ends at once, not at its timeout")
        .expect("task")
        .expect("an answer from the proxy");
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{}", resp.body);
    assert_eq!(resp.header("x-sidemesh-error"), Some("upstream-failure"));
    assert!(resp.body.contains("multiplexed"), "{}", resp.body);
    // A replacement proxy joins: the caller connects to it and requests flow again.
    pair.app_proxy = pair.mesh.proxy("app", Some(app), &[], &[]);
    pair.mesh
        .wait_meshed(&pair.client_proxy, "app", &pair.app_proxy)
        .await;
    let url = pair.url("/after");
    let resp = sidemesh_tests::eventually(
        "a request served after the replacement joined",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                let resp = http(Method::GET, &url, None, &[]).await.ok()?;
                (resp.status == StatusCode::OK).then_some(resp)
            }
        },
    )
    .await;
    assert_eq!(resp.body, "ok");
    assert_eq!(pair.endpoint().await.1, 1, "multiplexed to the new proxy");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_keeps_a_connection_of_its_own() {
    let pair = Pair::start(app().await, &[], &[]).await;
    let resp = http(Method::GET, &pair.url("/before"), None, &[])
        .await
        .expect("answer");
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
    assert_eq!(
        pair.endpoint().await,
        (1, 1),
        "the shared connection is open"
    );

    let mut ws = TcpStream::connect(pair.entry()).await.expect("connect");
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let mut seen = Vec::new();
    read_until(&mut ws, &mut seen, b"\r\n\r\n").await;
    let head_end = seen
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head")
        + 4;
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // Bytes after the 101 go both ways on the upgraded connection.
    let mut after = seen.split_off(head_end);
    for i in 1..=3 {
        let piece = format!("frame-{i}");
        ws.write_all(piece.as_bytes()).await.expect("write");
        read_until(&mut ws, &mut after, piece.as_bytes()).await;
    }
    // The upgrade opened a TLS connection of its own; ordinary requests stay on the shared one.
    assert_eq!(
        pair.endpoint().await,
        (2, 1),
        "the upgrade went on its own connection, not as a stream"
    );
    let resp = http(Method::GET, &pair.url("/beside"), None, &[])
        .await
        .expect("answer");
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
    assert_eq!(pair.endpoint().await, (2, 1));
    ws.write_all(b"frame-4").await.expect("write");
    read_until(&mut ws, &mut after, b"frame-4").await;
    assert_eq!(
        String::from_utf8_lossy(&after),
        "frame-1frame-2frame-3frame-4",
        "the upgraded bytes came back once each, in order"
    );
}

/// The requests of the interop check, and what the app and client must see.
fn interop_cases() -> Vec<Vec<u8>> {
    vec![
        b"GET /q?filter={\"a\":\"<b>\"} HTTP/1.1\r\nHost: app\r\n\r\n".to_vec(),
        b"POST /upload HTTP/1.1\r\nHost: app\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n".to_vec(),
        b"GET /old HTTP/1.0\r\n\r\n".to_vec(),
        b"GET /respond/early-hints HTTP/1.1\r\nHost: app\r\n\r\n".to_vec(),
        b"GET /respond/cookies HTTP/1.1\r\nHost: app\r\n\r\n".to_vec(),
        b"GET /respond/reason HTTP/1.1\r\nHost: app\r\n\r\n".to_vec(),
    ]
}

async fn same_as_direct(app: &RecordingApp, pair: &Pair) {
    for request in interop_cases() {
        let direct = exchange(app.addr, &request, QUIET).await;
        let direct_seen = app.take();
        let meshed = exchange(pair.entry(), &request, QUIET).await;
        let meshed_seen = app.take();
        let strip = |conns: Vec<Vec<u8>>| -> Vec<wire::Message> {
            conns
                .iter()
                .flat_map(|c| parse_requests(c).0)
                .map(|m| m.without(wire::REQUEST_DIFFERENCES))
                .collect()
        };
        assert_eq!(
            strip(meshed_seen),
            strip(direct_seen),
            "the app saw {}",
            String::from_utf8_lossy(&request)
        );
        let method = if request.starts_with(b"POST") {
            "POST"
        } else {
            "GET"
        };
        let answers = |bytes: &[u8]| -> Vec<wire::Message> {
            parse_responses(bytes, &[method])
                .into_iter()
                .map(|mut m| {
                    if let Some(rest) = m.start.strip_prefix("HTTP/1.0 ") {
                        m.start = format!("HTTP/1.1 {rest}");
                    }
                    m.without(wire::RESPONSE_DIFFERENCES)
                })
                .collect()
        };
        assert_eq!(
            answers(&meshed),
            answers(&direct),
            "the client got for {}",
            String::from_utf8_lossy(&request)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_without_multiplexing_interoperates_both_ways() {
    let app = RecordingApp::start().await;
    // Both new: multiplexed, and the application cannot tell.
    let both = Pair::start(app.addr, &[], &[]).await;
    same_as_direct(&app, &both).await;
    assert_eq!(both.endpoint().await.1, 1, "new to new is multiplexed");
    drop(both);
    // A new caller and a receiving proxy as before (it does not offer `sidemesh-h2`).
    let old_server = Pair::start(app.addr, &[], &["--http1-multiplex", "false"]).await;
    same_as_direct(&app, &old_server).await;
    assert_eq!(
        old_server.endpoint().await.1,
        0,
        "the new caller fell back to HTTP/1.1"
    );
    drop(old_server);
    // A caller as before and a new receiving proxy.
    let old_client = Pair::start(app.addr, &["--http1-multiplex", "false"], &[]).await;
    same_as_direct(&app, &old_client).await;
    assert_eq!(old_client.endpoint().await.1, 0);
}
