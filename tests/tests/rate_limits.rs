//! Rate limits through the real proxy: 429 with Retry-After and RateLimit headers, keys that
//! isolate callers, buckets that survive a reload. (Accuracy over time is checked with a
//! paused clock in `proxy/src/ratelimit.rs`.)

use http::{Method, StatusCode};
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{TestProxy, http};

fn mesh(echo: std::net::SocketAddr, inbound: &str, routes: &str) -> String {
    format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: echo\n    ports: [{{port: 80}}]\n    endpoints: [\"{echo}\"]\n{inbound}routes:\n{routes}"
    )
}

const LIMITED_ROUTE: &str = "  - name: limited\n    service: echo\n    matches: [{path: {prefix: /limited}}]\n    rateLimit: {rate: 5/s, burst: 3}\n  - name: free\n    service: echo\n";

#[tokio::test]
async fn a_route_limit_answers_429_with_retry_after_and_ratelimit_headers() {
    let echo = EchoServer::start("echo").await;
    let proxy = TestProxy::start(
        &mesh(echo.addr, "", LIMITED_ROUTE),
        "client",
        &["echo"],
        |_| {},
    )
    .await;
    let url = proxy.url("echo", "/limited");
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = http(Method::GET, &url, None, &[]).await.expect("GET");
        statuses.push(r.status);
        if i == 0 {
            // The bucket that is enforced: 3 at once, refilled within a second.
            assert_eq!(r.headers["ratelimit-policy"], "\"limited\";q=3;w=1");
            assert_eq!(r.headers["ratelimit"], "\"limited\";r=2;t=1");
        }
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers["retry-after"], "1");
            assert_eq!(r.headers["x-sidemesh-error"], "rate-limited");
            assert_eq!(r.headers["ratelimit"], "\"limited\";r=0;t=1");
            assert!(
                r.body.contains("rate limit `limited` (5/s) exceeded"),
                "{}",
                r.body
            );
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "a burst of 3"
    );
    assert_eq!(
        echo.hits(),
        3,
        "the limited request never reached the service"
    );
    let free = http(Method::GET, &proxy.url("echo", "/free"), None, &[])
        .await
        .expect("GET");
    assert_eq!(free.status, StatusCode::OK, "another route is not limited");
    assert!(free.headers.get("ratelimit").is_none());

    // A reload that keeps the limit keeps its buckets: no fresh burst for everybody.
    proxy
        .rewrite(&mesh(
            echo.addr,
            "",
            &format!("{LIMITED_ROUTE}    timeout: 5s\n"),
        ))
        .await;
    let after = http(Method::GET, &url, None, &[]).await.expect("GET");
    assert_eq!(
        after.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the reload did not refill the bucket"
    );

    let metrics = http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    assert!(metrics.contains("sidemesh_rate_limited_total{direction=\"outbound\",service=\"echo\",route=\"limited\"} 2"), "{metrics}");
    assert!(metrics.contains("sidemesh_requests_total{direction=\"outbound\",service=\"echo\",route=\"limited\",status_class=\"4xx\"} 2"), "{metrics}");
}

#[tokio::test]
async fn an_inbound_limit_keyed_by_header_isolates_clients() {
    let app = EchoServer::start("app").await;
    let inbound = "    inbound:\n      rateLimit: {rate: 1/min, burst: 2, key: {header: x-client}, overrides: [{key: vip, rate: 100/s, burst: 100}]}\n";
    let proxy = TestProxy::start(
        &mesh(app.addr, inbound, "  - name: r\n    service: echo\n"),
        "echo",
        &[],
        |args| args.app = Some(app.addr),
    )
    .await;
    let url = format!("http://{}/", proxy.addrs.inbound.expect("inbound"));
    let status = |client: &'static str| {
        let url = url.clone();
        async move {
            http(Method::GET, &url, None, &[("x-client", client)])
                .await
                .expect("GET")
                .status
        }
    };
    assert_eq!(status("a").await, StatusCode::OK);
    assert_eq!(status("a").await, StatusCode::OK);
    assert_eq!(
        status("a").await,
        StatusCode::TOO_MANY_REQUESTS,
        "client a spent its burst"
    );
    assert_eq!(
        status("b").await,
        StatusCode::OK,
        "client b has its own bucket"
    );
    for _ in 0..20 {
        assert_eq!(
            status("vip").await,
            StatusCode::OK,
            "the override's larger bucket"
        );
    }
    let metrics = http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    assert!(metrics.contains("sidemesh_rate_limited_total{direction=\"inbound\",service=\"echo\",route=\"inbound\"} 1"), "{metrics}");
}
