//! The proxy's data path with real servers behind it and real clients in front: HTTP/1.1,
//! HTTP/2, gRPC, WebSocket and raw TCP; routing, splits, balancing, ejection; bad input.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sidemesh_demo::proto::user_service_client::UserServiceClient;
use sidemesh_demo::proto::{GetUserRequest, ListUsersRequest};
use sidemesh_tests::servers::{EchoServer, grpc_trailers, tcp_echo, websocket_echo};
use sidemesh_tests::{TestProxy, eventually, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A mesh with a client service (the proxy's own) and `services`, each `(name, endpoints,
/// extra YAML lines)`, plus `routes` appended verbatim.
fn mesh(services: &[(&str, Vec<std::net::SocketAddr>, &str)], routes: &str) -> String {
    let mut yaml = String::from(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{port: 1}]\n",
    );
    for (name, endpoints, extra) in services {
        let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        yaml.push_str(&format!(
            "  - name: {name}\n    ports: [{{port: 80}}]\n    endpoints: [{}]\n",
            eps.join(", ")
        ));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    if !routes.trim().is_empty() {
        yaml.push_str("routes:\n");
        yaml.push_str(routes);
    }
    yaml
}

const TEN_MB: usize = 10 * 1024 * 1024;

#[tokio::test]
async fn http1_get_and_a_10mb_chunked_post_stream_both_ways() {
    let echo = EchoServer::start("echo").await;
    let proxy = TestProxy::start(
        &mesh(&[("echo", vec![echo.addr], "")], ""),
        "client",
        &["echo"],
        |_| {},
    )
    .await;

    let get = http(
        Method::GET,
        &proxy.url("echo", "/headers"),
        None,
        &[("x-trace", "1")],
    )
    .await
    .expect("GET");
    assert_eq!(get.status, StatusCode::OK);
    let seen = get.json();
    assert_eq!(
        seen["headers"]["host"],
        proxy.upstream("echo").to_string(),
        "Host preserved"
    );
    assert_eq!(seen["headers"]["x-trace"], "1");

    // 160 chunks of 64 KiB, sent as a chunked stream and echoed back as a stream.
    let chunk = Bytes::from((0..65_536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let frames =
        (0..TEN_MB / chunk.len()).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone())));
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let client: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(proxy.url("echo", "/echo"))
        .body(body)
        .expect("request");
    let resp = client.request(req).await.expect("POST through the proxy");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let (mut received, mut sum) = (0usize, 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            sum += data.iter().map(|b| u64::from(*b)).sum::<u64>();
            received += data.len();
        }
    }
    assert_eq!(received, TEN_MB, "all 10 MB came back");
    let expected: u64 = (0..65_536u64).map(|i| i % 251).sum::<u64>() * (TEN_MB as u64 / 65_536);
    assert_eq!(sum, expected, "bytes came back intact");
}

#[tokio::test]
async fn http2_requests_stay_http2_with_their_authority() {
    let echo = EchoServer::start("echo").await;
    let proxy = TestProxy::start(
        &mesh(&[("echo", vec![echo.addr], "")], ""),
        "client",
        &["echo"],
        |_| {},
    )
    .await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(proxy.url("echo", "/headers"))
        .body(Full::default())
        .expect("request");
    let resp = client.request(req).await.expect("h2 through the proxy");
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(seen["version"], "HTTP/2.0", "the upstream got HTTP/2");
    assert!(
        seen["uri"]
            .as_str()
            .unwrap_or_default()
            .contains(&proxy.upstream("echo").to_string()),
        ":authority preserved: {seen}"
    );
}

#[tokio::test]
async fn the_proxys_own_grpc_answers_carry_no_date_in_their_trailing_metadata() {
    let proxy = TestProxy::start(
        &mesh(&[("nowhere", vec![], "")], ""),
        "client",
        &["nowhere"],
        |_| {},
    )
    .await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::post(proxy.url("nowhere", "/users.UserService/Get"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::default())
        .expect("request");
    let resp = client.request(req).await.expect("h2 through the proxy");
    assert_eq!(resp.headers()["grpc-status"], "14", "{:?}", resp.headers());
    assert_eq!(resp.headers()["x-sidemesh-error"], "no-endpoints");
    assert!(
        !resp.headers().contains_key("date"),
        "a trailers-only answer's headers are its trailing metadata: {:?}",
        resp.headers()
    );
}

#[tokio::test]
async fn grpc_unary_streaming_and_trailers_pass_through() {
    let grpc = grpc_trailers().await;
    let proxy = TestProxy::start(
        &mesh(&[("users", vec![grpc], "")], ""),
        "client",
        &["users"],
        |_| {},
    )
    .await;
    let mut client = UserServiceClient::connect(proxy.url("users", ""))
        .await
        .expect("connect");

    let user = client
        .get_user(GetUserRequest { id: 7 })
        .await
        .expect("unary")
        .into_inner();
    assert_eq!(user.name, "user 7");
    let invalid = client
        .get_user(GetUserRequest { id: 0 })
        .await
        .expect_err("id 0");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert_eq!(invalid.message(), "id 0 is not a user");

    let mut stream = client
        .list_users(ListUsersRequest {})
        .await
        .expect("stream")
        .into_inner();
    let mut names = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(user)) => names.push(user.name),
            Ok(None) => panic!("stream ended without the DATA_LOSS status from the trailers"),
            Err(status) => break status,
        }
    };
    assert_eq!(names, ["one", "two"]);
    assert_eq!(
        status.code(),
        tonic::Code::DataLoss,
        "non-zero grpc-status from the trailers"
    );
    assert_eq!(status.message(), "stream cut short on purpose");
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let ws = websocket_echo().await;
    let proxy = TestProxy::start(
        &mesh(&[("ws", vec![ws], "")], ""),
        "client",
        &["ws"],
        |_| {},
    )
    .await;
    let url = format!("ws://{}/chat", proxy.upstream("ws"));
    let (mut socket, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for text in ["hello", "mesh", &"x".repeat(100_000)] {
        socket.send(text.into()).await.expect("send");
        let echoed = socket.next().await.expect("a reply").expect("frame");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
    socket.close(None).await.expect("close");
}

#[tokio::test]
async fn raw_tcp_is_forwarded_byte_for_byte_with_half_close() {
    let echo = tcp_echo().await;
    let proxy = TestProxy::start(
        &mesh(&[("raw", vec![echo], "")], "").replace(
            "port: 80}]\n    endpoints",
            "port: 80, protocol: tcp}]\n    endpoints",
        ),
        "client",
        &["raw"],
        |_| {},
    )
    .await;
    let mut conn = TcpStream::connect(proxy.upstream("raw"))
        .await
        .expect("connect");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    conn.write_all(&payload).await.expect("write");
    conn.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut back))
        .await
        .expect("echo finished")
        .expect("read");
    let trailer = b"\n200000 bytes\n";
    assert_eq!(back.len(), payload.len() + trailer.len());
    assert_eq!(
        &back[..payload.len()],
        &payload[..],
        "bytes unchanged, binary included"
    );
    assert_eq!(
        &back[payload.len()..],
        trailer,
        "the server saw our FIN and still answered"
    );
}

#[tokio::test]
async fn a_90_10_split_lands_within_3_points() {
    let stable = EchoServer::start("stable").await;
    let canary = EchoServer::start("canary").await;
    let routes = "  - name: split\n    service: app\n    backends:\n      - {service: app, weight: 90}\n      - {service: app-canary, weight: 10}\n";
    let yaml = mesh(
        &[
            ("app", vec![stable.addr], ""),
            ("app-canary", vec![canary.addr], ""),
        ],
        routes,
    );
    let proxy = TestProxy::start(&yaml, "client", &["app"], |_| {}).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..5000 {
        let resp = client
            .get(proxy.url("app", "/").parse().expect("uri"))
            .await
            .expect("GET");
        let id = resp.headers()["x-server-id"]
            .to_str()
            .expect("id")
            .to_string();
        resp.into_body().collect().await.expect("body");
        *counts.entry(id).or_default() += 1;
    }
    let canary_share = f64::from(counts.get("canary").copied().unwrap_or(0)) / 5000.0;
    assert!(
        (canary_share - 0.10).abs() <= 0.03,
        "canary got {canary_share} of requests: {counts:?}"
    );
    assert_eq!(counts.values().sum::<u32>(), 5000);
}

#[tokio::test]
async fn consistent_hashing_keeps_keys_and_moves_about_one_nth() {
    let servers = [
        EchoServer::start("a").await,
        EchoServer::start("b").await,
        EchoServer::start("c").await,
        EchoServer::start("d").await,
    ];
    let lb = "loadBalancer: {policy: consistentHash, header: x-user}";
    let three: Vec<_> = servers[..3].iter().map(|s| s.addr).collect();
    let proxy =
        TestProxy::start(&mesh(&[("app", three, lb)], ""), "client", &["app"], |_| {}).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let place = |key: String| {
        let client = client.clone();
        let uri: http::Uri = proxy.url("app", "/").parse().expect("uri");
        async move {
            let req = Request::get(uri)
                .header("x-user", key)
                .body(Full::default())
                .expect("req");
            let resp = client.request(req).await.expect("GET");
            resp.headers()["x-server-id"]
                .to_str()
                .expect("id")
                .to_string()
        }
    };
    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut before = Vec::new();
    for key in &keys {
        let first = place(key.clone()).await;
        for _ in 0..3 {
            assert_eq!(
                place(key.clone()).await,
                first,
                "{key} moved between requests"
            );
        }
        before.push(first);
    }
    let four: Vec<_> = servers.iter().map(|s| s.addr).collect();
    proxy.rewrite(&mesh(&[("app", four, lb)], "")).await;
    let mut moved = 0;
    for (key, old) in keys.iter().zip(&before) {
        let now = place(key.clone()).await;
        if &now != old {
            assert_eq!(
                now, "d",
                "{key} moved from {old} to {now}, not to the new endpoint"
            );
            moved += 1;
        }
    }
    let share = f64::from(moved) / keys.len() as f64;
    assert!(
        (0.12..=0.40).contains(&share),
        "{share} of keys moved when a 4th endpoint joined (ideal 0.25)"
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_then_readmitted_when_healthy() {
    let good = EchoServer::start("good").await;
    let bad = EchoServer::start("bad").await;
    bad.set_healthy(false);
    // Trials every 10 s: the endpoint stays out for this test unless it answers one.
    let outlier = "outlierDetection: {consecutiveFailures: 3, baseEjection: 1s, maxEjection: 10s, trialInterval: 10s}\nloadBalancer: {policy: roundRobin}";
    let routes = "  - name: all\n    service: app\n    failureStatuses: [5xx]\n";
    let proxy = TestProxy::start(
        &mesh(&[("app", vec![good.addr, bad.addr], outlier)], routes),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let mut failures = 0;
    for _ in 0..60 {
        let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
        if resp.status != StatusCode::OK {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "three failures in a row eject the endpoint; the rest go to the healthy one"
    );
    let metrics = http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    assert!(
        metrics.contains(&format!(
            "sidemesh_endpoint_ejections_total{{service=\"app.default\",endpoint=\"{}\",reason=\"consecutive-failures\"}} 1",
            bad.addr
        )),
        "{metrics}"
    );

    bad.set_healthy(true);
    let hits_before = bad.hits();
    eventually(
        "the healed endpoint to get traffic again",
        Duration::from_secs(5),
        || async {
            let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
                .await
                .expect("GET");
            assert_eq!(resp.status, StatusCode::OK);
            (bad.hits() > hits_before).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn every_endpoint_ejected_is_a_503_that_says_so() {
    let bad = EchoServer::start("bad").await;
    bad.set_healthy(false);
    // Only an operator who allows every endpoint out and turns panic off gets this answer.
    let outlier = "outlierDetection: {consecutiveFailures: 2, baseEjection: 30s, trialInterval: 30s, maxEjectionPercent: 100, panicThreshold: 0}";
    let routes = "  - name: all\n    service: app\n    failureStatuses: [5xx]\n";
    let proxy = TestProxy::start(
        &mesh(&[("app", vec![bad.addr], outlier)], routes),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    for _ in 0..2 {
        let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
        assert_eq!(
            resp.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the app's own 500 passes through"
        );
        assert!(
            resp.headers.get("x-sidemesh-error").is_none(),
            "an app error is not marked as the proxy's"
        );
    }
    let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers["server"], "sidemesh");
    assert_eq!(resp.headers["x-sidemesh-error"], "all-endpoints-ejected");
    assert_eq!(
        resp.body,
        "sidemesh: every endpoint of `app.default` is ejected after failures\n"
    );
}

#[tokio::test]
async fn unknown_services_timeouts_and_dead_endpoints_get_marked_answers() {
    let echo = EchoServer::start("echo").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let routes = "  - name: slow\n    service: echo\n    matches: [{path: {prefix: /slow}}]\n    timeout: 200ms\n";
    let yaml = mesh(
        &[("echo", vec![echo.addr], ""), ("dead", vec![dead], "")],
        routes,
    );
    let proxy = TestProxy::start(&yaml, "client", &["echo", "dead", "ghost"], |_| {}).await;

    let timeout = http(Method::GET, &proxy.url("echo", "/slow/2000"), None, &[])
        .await
        .expect("GET");
    assert_eq!(timeout.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(timeout.headers["x-sidemesh-error"], "request-timeout");
    let fast = http(Method::GET, &proxy.url("echo", "/slow/10"), None, &[])
        .await
        .expect("GET");
    assert_eq!(fast.status, StatusCode::OK);

    let refused = http(Method::GET, &proxy.url("dead", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        refused.headers["x-sidemesh-error"],
        "upstream-connect-failure"
    );
    assert!(
        refused.body.contains(&format!("cannot connect to {dead}")),
        "{}",
        refused.body
    );

    let ghost = http(Method::GET, &proxy.url("ghost", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(ghost.status, StatusCode::NOT_FOUND);
    assert_eq!(
        ghost.body,
        "sidemesh: no service `ghost` in the mesh config\n"
    );

    // The explicit outbound port routes by Host.
    let outbound = format!("http://{}/", proxy.addrs.outbound);
    let by_host = http(
        Method::GET,
        &outbound,
        None,
        &[("host", "echo.default.svc.cluster.local")],
    )
    .await
    .expect("GET");
    assert_eq!(by_host.body, "echo");
    let unknown = http(Method::GET, &outbound, None, &[("host", "nowhere:8080")])
        .await
        .expect("GET");
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers["x-sidemesh-error"], "unknown-service");
}

/// Sends raw bytes to `addr` and returns everything the proxy sent back before closing.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(bytes).await.expect("write");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut back))
        .await
        .expect("answer and close")
        .expect("read");
    String::from_utf8_lossy(&back).into_owned()
}

#[tokio::test]
async fn bad_input_gets_400_431_or_is_cut_off() {
    let echo = EchoServer::start("echo").await;
    let proxy = TestProxy::start(
        &mesh(&[("echo", vec![echo.addr], "")], ""),
        "client",
        &["echo"],
        |args| {
            args.timeouts.header = Duration::from_millis(300);
        },
    )
    .await;
    let addr = proxy.upstream("echo");

    let big = format!(
        "GET / HTTP/1.1\r\nhost: echo\r\nx-big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let resp = raw(addr, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
    assert!(
        resp.contains("x-sidemesh-error: headers-too-large"),
        "{resp}"
    );

    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let resp = raw(
        addr,
        format!("GET / HTTP/1.1\r\nhost: echo\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");

    let resp = raw(addr, b"GET /\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert!(resp.contains("server: sidemesh"), "{resp}");

    // A client that trickles its head is cut off after the header timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let started = std::time::Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        for _ in 0..20 {
            if slow.write_all(b"x-drip: 1\r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        slow.read_to_end(&mut back).await
    })
    .await;
    assert!(read.is_ok(), "the trickling client was never cut off");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "cut off after {elapsed:?}, header timeout is 300ms"
    );
    let text = String::from_utf8_lossy(&back);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");

    // The proxy still serves normal requests.
    let ok = http(Method::GET, &proxy.url("echo", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(ok.status, StatusCode::OK);
    let metrics = http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    for reason in ["headers-too-large", "malformed-request", "header-timeout"] {
        assert!(
            metrics.contains(&format!(
                "sidemesh_refused_connections_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn rewriting_the_yaml_20_times_under_load_fails_no_request() {
    let a = EchoServer::start("a").await;
    let b = EchoServer::start("b").await;
    let version = |i: usize| {
        let (first, second) = if i % 2 == 0 {
            (a.addr, b.addr)
        } else {
            (b.addr, a.addr)
        };
        let routes = format!(
            "  - name: r{i}\n    service: app\n    timeout: {}ms\n",
            1000 + i
        );
        mesh(&[("app", vec![first, second], "")], &routes)
    };
    let proxy = TestProxy::start(&version(0), "client", &["app"], |_| {}).await;
    let url = proxy.url("app", "/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (url, stop) = (url.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http(Method::GET, &url, None, &[]).await {
                    Ok(r) if r.status == StatusCode::OK => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    for i in 1..=20 {
        proxy.rewrite(&version(i)).await;
    }
    assert_eq!(proxy.version().await, 21);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (ok, failed) = task.await.expect("load task");
        assert!(
            failed.is_empty(),
            "failed requests during reloads: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 100, "only {total} requests ran during the reloads");

    // A broken rewrite is refused and the version in force keeps serving.
    let tmp = proxy.config_path().with_extension("tmp");
    std::fs::write(
        &tmp,
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nroutes: [{name: x}]\n",
    )
    .expect("write");
    std::fs::rename(&tmp, proxy.config_path()).expect("rename");
    // The refusal itself: the proxy counts the rewrite it read and refused...
    let metrics_url = proxy.admin("/metrics");
    sidemesh_tests::eventually(
        "the proxy to refuse the broken rewrite",
        Duration::from_secs(5),
        || async {
            let m = http(Method::GET, &metrics_url, None, &[]).await.ok()?.body;
            m.contains("sidemesh_config_reloads_total{result=\"refused\"} 1")
                .then_some(())
        },
    )
    .await;
    // ...and keeps the version in force.
    assert_eq!(
        proxy.version().await,
        21,
        "an invalid config is never applied"
    );
    let ok = http(Method::GET, &url, None, &[]).await.expect("GET");
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn admin_endpoints_report_readiness_metrics_and_config() {
    let echo = EchoServer::start("echo").await;
    let routes = "  - name: api\n    service: echo\n    matches: [{path: {prefix: /api}}]\n";
    let proxy = TestProxy::start(
        &mesh(&[("echo", vec![echo.addr], "")], routes),
        "client",
        &["echo"],
        |_| {},
    )
    .await;
    for _ in 0..3 {
        http(Method::GET, &proxy.url("echo", "/api/x"), None, &[])
            .await
            .expect("GET");
    }
    http(Method::GET, &proxy.url("echo", "/status/503"), None, &[])
        .await
        .expect("GET");
    assert_eq!(
        http(Method::GET, &proxy.admin("/live"), None, &[])
            .await
            .expect("live")
            .status,
        StatusCode::OK
    );
    assert_eq!(
        http(Method::GET, &proxy.admin("/ready"), None, &[])
            .await
            .expect("ready")
            .body,
        "ready\n"
    );
    let metrics = http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    for line in [
        "sidemesh_requests_total{direction=\"outbound\",service=\"echo\",route=\"api\",status_class=\"2xx\"} 3",
        "sidemesh_requests_total{direction=\"outbound\",service=\"echo\",route=\"default\",status_class=\"5xx\"} 1",
        "sidemesh_request_duration_seconds_count{direction=\"outbound\",service=\"echo\",route=\"api\"} 3",
        "sidemesh_config_version 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    let dump = http(Method::GET, &proxy.admin("/config_dump"), None, &[])
        .await
        .expect("dump")
        .json();
    assert_eq!(dump["config"]["version"], 1);
    assert_eq!(dump["config"]["mesh"]["routes"][0]["name"], "api");
    assert_eq!(dump["endpoints"][0]["addr"], echo.addr.to_string());
    assert_eq!(dump["proxy"]["service"], "client");
}

#[tokio::test]
async fn upstream_connections_are_reused_outbound_and_inbound() {
    let echo = EchoServer::start("echo").await;
    let yaml = mesh(&[("echo", vec![echo.addr], "")], "");
    // Outbound: the client-side proxy pools its connections to the service's endpoint.
    let outbound = TestProxy::start(&yaml, "client", &["echo"], |_| {}).await;
    for _ in 0..50 {
        let resp = http(Method::GET, &outbound.url("echo", "/"), None, &[])
            .await
            .expect("GET");
        assert_eq!(resp.status, StatusCode::OK);
    }
    assert_eq!(
        echo.connections(),
        1,
        "50 sequential requests share one pooled connection"
    );

    // Inbound: the server-side proxy pools its connections to the local application.
    let app = EchoServer::start("app").await;
    let inbound = TestProxy::start(&yaml, "echo", &[], |args| {
        args.app = Some(app.addr);
    })
    .await;
    let url = format!(
        "http://{}/",
        inbound.addrs.inbound.expect("inbound listener")
    );
    for _ in 0..50 {
        let resp = http(Method::GET, &url, None, &[]).await.expect("GET");
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.body, "app");
    }
    assert_eq!(
        app.connections(),
        1,
        "50 sequential inbound requests share one connection to the app"
    );
    let seen = http(
        Method::GET,
        &format!("http://{}/headers", inbound.addrs.inbound.expect("inbound")),
        None,
        &[],
    )
    .await
    .expect("GET")
    .json();
    assert_eq!(
        seen["headers"]["x-forwarded-for"], "127.0.0.1",
        "inbound adds the caller's address"
    );
}

/// An upstream that closes every keep-alive connection right after its answer (without
/// `Connection: close`), counting the connections it accepted.
async fn closing_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                }
                let body = format!("conn {n}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                // Let the proxy pool the connection, then close it under the next request.
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_request_without_a_body_goes_again_when_its_pooled_connection_was_closed() {
    let (upstream, accepted) = closing_upstream().await;
    let proxy = TestProxy::start(
        &mesh(&[("flaky", vec![upstream], "")], ""),
        "client",
        &["flaky"],
        |_| {},
    )
    .await;
    let first = http(Method::GET, &proxy.url("flaky", "/"), None, &[])
        .await
        .expect("first");
    assert_eq!(
        (first.status, first.body.as_str()),
        (StatusCode::OK, "conn 1")
    );
    // The upstream has closed the pooled connection; the proxy takes it (used less than a
    // second ago, so not probed), meets the close, and sends the request on a new one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = http(Method::GET, &proxy.url("flaky", "/again"), None, &[])
        .await
        .expect("second");
    assert_eq!(
        (second.status, second.body.as_str()),
        (StatusCode::OK, "conn 2"),
        "{:?}",
        second.header("x-sidemesh-error")
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}
