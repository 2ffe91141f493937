//! Retries through the real proxy against real failing servers.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, TestProxy, http};

fn mesh(endpoint: std::net::SocketAddr, route: &str) -> String {
    format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: app\n    ports: [{{port: 80}}]\n    endpoints: [\"{endpoint}\"]\n    outlierDetection: {{consecutiveFailures: 1000}}\nroutes:\n  - name: r\n    service: app\n{route}"
    )
}

async fn metric(proxy: &TestProxy, line_prefix: &str) -> u64 {
    let metrics = http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    metrics
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// user-service failing 30 % of requests (seeded), 3 attempts: a request fails only when all
/// three do, 0.3^3 = 2.7 % of the time, against 30 % without retries.
#[tokio::test]
async fn a_30_percent_failing_upstream_is_seen_at_near_zero_with_3_attempts() {
    let users = Proc::start(
        "user-service",
        &[
            "--listen",
            "127.0.0.1:0",
            "--fail-rate",
            "0.3",
            "--seed",
            "7",
        ],
    );
    let route = "    retry: {attempts: 3, retryOn: [5xx], backoff: {base: 1ms, max: 5ms}, budget: {ratio: 1.0}}\n";
    let proxy = TestProxy::start(&mesh(users.addr, route), "client", &["app"], |_| {}).await;
    let url = proxy.url("app", "/users/1");
    let mut failed = 0;
    for _ in 0..500 {
        if http(Method::GET, &url, None, &[])
            .await
            .expect("GET")
            .status
            != StatusCode::OK
        {
            failed += 1;
        }
    }
    let share = f64::from(failed) / 500.0;
    assert!(
        share <= 0.05,
        "{share} of requests failed with 3 attempts (expected about 0.027)"
    );
    let retries = metric(
        &proxy,
        "sidemesh_retries_total{direction=\"outbound\",service=\"app\",route=\"r\"}",
    )
    .await;
    assert!(
        (100..=300).contains(&retries),
        "{retries} retries for about 150 first failures"
    );
}

#[tokio::test]
async fn a_down_upstream_gets_no_more_retries_than_the_budget_allows() {
    let bad = EchoServer::start("bad").await;
    bad.set_healthy(false);
    // Budget over 10 s: 1 retry a second (10) plus 10 % of requests (20 of 200) = 30.
    let route = "    retry: {attempts: 3, retryOn: [5xx], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.1, minPerSecond: 1, window: 10s}}\n";
    let proxy = TestProxy::start(&mesh(bad.addr, route), "client", &["app"], |_| {}).await;
    let url = proxy.url("app", "/");
    for _ in 0..200 {
        assert_eq!(
            http(Method::GET, &url, None, &[])
                .await
                .expect("GET")
                .status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let retries = bad.hits() - 200;
    assert_eq!(
        retries,
        30,
        "upstream saw {} requests for 200 calls",
        bad.hits()
    );
    assert_eq!(
        metric(
            &proxy,
            "sidemesh_retries_total{direction=\"outbound\",service=\"app\",route=\"r\"}"
        )
        .await,
        30
    );
    // Every call that wanted a retry the budget had no room for is counted: at least the 170
    // calls that got none, at most all 200 (a call granted one retry may be refused a second).
    let exhausted = metric(
        &proxy,
        "sidemesh_retry_budget_exhausted_total{direction=\"outbound\",service=\"app\",route=\"r\"}",
    )
    .await;
    assert!((170..=200).contains(&exhausted), "{exhausted}");
}

#[tokio::test]
async fn post_and_large_bodies_are_not_retried_unless_allowed() {
    let bad = EchoServer::start("bad").await;
    bad.set_healthy(false);
    let base = "    retry: {attempts: 3, retryOn: [5xx], backoff: {base: 1ms, max: 2ms}, bufferLimit: 1KiB";
    let proxy = TestProxy::start(
        &mesh(bad.addr, &format!("{base}}}\n")),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let url = proxy.url("app", "/");
    http(Method::POST, &url, Some("{}"), &[])
        .await
        .expect("POST");
    assert_eq!(bad.hits(), 1, "POST is not idempotent: sent once");
    http(Method::GET, &url, None, &[]).await.expect("GET");
    assert_eq!(bad.hits(), 4, "GET: three attempts");

    proxy
        .rewrite(&mesh(bad.addr, &format!("{base}, nonIdempotent: true}}\n")))
        .await;
    let small = format!("\"{}\"", "x".repeat(500));
    http(Method::POST, &url, Some(&small), &[])
        .await
        .expect("POST");
    assert_eq!(bad.hits(), 7, "POST allowed: three attempts");
    let large = format!("\"{}\"", "x".repeat(4000));
    http(Method::PUT, &url, Some(&large), &[])
        .await
        .expect("PUT");
    assert_eq!(
        bad.hits(),
        8,
        "a body over the 1 KiB buffer limit is sent once"
    );
}

#[tokio::test]
async fn a_per_try_timeout_fires_and_the_next_attempt_succeeds() {
    let echo = EchoServer::start("echo").await;
    let route = "    timeout: 3s\n    retry: {attempts: 2, perTryTimeout: 200ms, backoff: {base: 1ms, max: 2ms}}\n";
    let proxy = TestProxy::start(&mesh(echo.addr, route), "client", &["app"], |_| {}).await;
    let started = Instant::now();
    let resp = http(
        Method::GET,
        &proxy.url("app", "/slow-first/2000"),
        None,
        &[],
    )
    .await
    .expect("GET");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body, "attempt 2", "the second attempt answered");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "did not wait for the slow first attempt: {:?}",
        started.elapsed()
    );
    let seen = http(Method::GET, &proxy.url("app", "/headers"), None, &[])
        .await
        .expect("GET")
        .json();
    assert_eq!(
        seen["headers"]["x-sidemesh-attempt"], "1",
        "attempts are numbered upstream"
    );
}

#[tokio::test]
async fn retry_after_from_the_upstream_is_respected() {
    let users = Proc::start(
        "user-service",
        &[
            "--listen",
            "127.0.0.1:0",
            "--fail-rate",
            "1.0",
            "--retry-after",
            "1",
        ],
    );
    let route = "    timeout: 5s\n    retry: {attempts: 2, retryOn: [503], backoff: {base: 1ms, max: 2ms}}\n";
    let proxy = TestProxy::start(&mesh(users.addr, route), "client", &["app"], |_| {}).await;
    let started = Instant::now();
    let resp = http(Method::GET, &proxy.url("app", "/users/1"), None, &[])
        .await
        .expect("GET");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the upstream's Retry-After: {:?}",
        started.elapsed()
    );

    // A Retry-After longer than the route timeout is not waited for.
    let short = "    timeout: 800ms\n    retry: {attempts: 2, retryOn: [503], backoff: {base: 1ms, max: 2ms}}\n";
    proxy.rewrite(&mesh(users.addr, short)).await;
    let started = Instant::now();
    let resp = http(Method::GET, &proxy.url("app", "/users/1"), None, &[])
        .await
        .expect("GET");
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the upstream's own 503"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_grpc_timeout_header_shortens_the_route_timeout() {
    let echo = EchoServer::start("echo").await;
    let proxy = TestProxy::start(
        &mesh(echo.addr, "    timeout: 5s\n"),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let started = Instant::now();
    let resp = http(
        Method::GET,
        &proxy.url("app", "/slow/3000"),
        None,
        &[("grpc-timeout", "200m")],
    )
    .await
    .expect("GET");
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers["x-sidemesh-error"], "request-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the caller's 200 ms deadline applied: {:?}",
        started.elapsed()
    );
    // A longer grpc-timeout does not lengthen the route's.
    let ok = http(
        Method::GET,
        &proxy.url("app", "/slow/10"),
        None,
        &[("grpc-timeout", "1H")],
    )
    .await
    .expect("GET");
    assert_eq!(ok.status, StatusCode::OK);
}
