//! Overload protection, through the real proxy (`app::build`, port 0) and real sockets:
//! circuit-breaker thresholds answer a marked 503 at once instead of queueing, and an adaptive
//! concurrency limit keeps an overloaded app's goodput near its capacity with bounded latency,
//! where without it latency grows for as long as the overload lasts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{TestProxy, eventually, http};
use tokio::net::{TcpListener, TcpStream};

fn mesh(app: SocketAddr, service_extra: &str, routes: &str) -> String {
    let mut yaml = format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: app\n    ports: [{{port: 80}}]\n    endpoints: [\"{app}\"]\n"
    );
    for line in service_extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    if !routes.is_empty() {
        yaml.push_str("routes:\n");
        yaml.push_str(routes);
    }
    yaml
}

async fn metrics(proxy: &TestProxy) -> String {
    http(Method::GET, &proxy.admin("/metrics"), None, &[])
        .await
        .expect("metrics")
        .body
}

fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Starts `n` slow requests through the proxy and waits until the app holds all of them.
async fn hold(
    proxy: &TestProxy,
    app: &EchoServer,
    n: u64,
    ms: u64,
) -> Vec<tokio::task::JoinHandle<(StatusCode, Duration)>> {
    let before = app.hits();
    let mut held = Vec::new();
    for _ in 0..n {
        let url = proxy.url("app", &format!("/slow/{ms}"));
        held.push(tokio::spawn(async move {
            let started = Instant::now();
            let resp = http(Method::GET, &url, None, &[]).await.expect("GET");
            (resp.status, started.elapsed())
        }));
    }
    eventually(
        "the app to hold the slow requests",
        Duration::from_secs(5),
        || async { (app.hits() >= before + n).then_some(()) },
    )
    .await;
    held
}

/// A request refused at a threshold: at once, 503, marked, naming the threshold.
async fn assert_overflow(proxy: &TestProxy, threshold: &str) {
    let started = Instant::now();
    let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
        .await
        .expect("GET");
    let took = started.elapsed();
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.body
    );
    assert_eq!(resp.header("x-sidemesh-error"), Some("overflow"));
    assert!(resp.body.contains(threshold), "{}", resp.body);
    assert!(
        took < Duration::from_millis(300),
        "refused at once, not queued: {took:?}"
    );
}

#[tokio::test]
async fn requests_beyond_max_requests_are_a_marked_503_at_once() {
    let app = EchoServer::start("app").await;
    let proxy = TestProxy::start(
        &mesh(app.addr, "circuitBreaker: {maxRequests: 2}", ""),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let held = hold(&proxy, &app, 2, 800).await;
    let dump = http(Method::GET, &proxy.admin("/config_dump"), None, &[])
        .await
        .expect("config_dump")
        .json();
    let breaker = dump["config"]["balancers"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["service"] == "app.default"))
        .map(|b| b["circuit_breaker"].clone())
        .expect("app's balancer");
    assert_eq!(breaker["requests"], 2, "{breaker}");
    assert_overflow(&proxy, "maxRequests (2)").await;
    for h in held {
        let (status, _) = h.await.expect("join");
        assert_eq!(
            status,
            StatusCode::OK,
            "the requests under the threshold are served"
        );
    }
    // Their slots are given back with their answers.
    let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(resp.status, StatusCode::OK);
    let m = metrics(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "sidemesh_circuit_breaker_overflow_total{service=\"app\",threshold=\"maxRequests\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn at_max_connections_requests_wait_as_pending_up_to_max_pending_requests() {
    let app = EchoServer::start("app").await;
    let proxy = TestProxy::start(
        &mesh(
            app.addr,
            "circuitBreaker: {maxConnections: 1, maxPendingRequests: 1}",
            "",
        ),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    // One request holds the only connection; the next waits for it.
    let first = hold(&proxy, &app, 1, 700).await;
    let url = proxy.url("app", "/slow/10");
    let pending = tokio::spawn(async move {
        let started = Instant::now();
        let resp = http(Method::GET, &url, None, &[]).await.expect("GET");
        (resp.status, started.elapsed())
    });
    eventually(
        "the second request to be pending",
        Duration::from_secs(5),
        || async {
            let dump = http(Method::GET, &proxy.admin("/config_dump"), None, &[])
                .await
                .ok()?
                .json();
            let app = dump["config"]["balancers"]
                .as_array()?
                .iter()
                .find(|b| b["service"] == "app.default")?
                .clone();
            (app["circuit_breaker"]["pending"] == 1).then_some(())
        },
    )
    .await;
    // A third has no room to wait.
    assert_overflow(&proxy, "maxPendingRequests (1)").await;

    for h in first {
        assert_eq!(h.await.expect("join").0, StatusCode::OK);
    }
    let (status, waited) = pending.await.expect("join");
    assert_eq!(status, StatusCode::OK, "the pending request is served");
    assert!(
        waited >= Duration::from_millis(300),
        "it waited for the connection: {waited:?}"
    );
    assert_eq!(
        app.connections(),
        1,
        "never more than one connection to the endpoint"
    );
    let m = metrics(&proxy).await;
    assert_eq!(
        metric(
            &m,
            "sidemesh_circuit_breaker_overflow_total{service=\"app\",threshold=\"maxPendingRequests\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn at_max_connections_without_room_to_wait_a_request_is_refused_at_once() {
    let app = EchoServer::start("app").await;
    let proxy = TestProxy::start(
        &mesh(app.addr, "circuitBreaker: {maxConnections: 1}", ""),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let held = hold(&proxy, &app, 1, 600).await;
    assert_overflow(&proxy, "maxConnections (1)").await;
    for h in held {
        assert_eq!(h.await.expect("join").0, StatusCode::OK);
    }
    // The connection is back in the pool: the next request reuses it.
    let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(app.connections(), 1);
}

/// An app that serves `workers` requests at a time, each taking `service_time`; the rest
/// queue inside it, so its latency grows with its concurrency.
async fn limited_app(workers: usize, service_time: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let permits = Arc::new(tokio::sync::Semaphore::new(workers));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let permits = permits.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let permits = permits.clone();
                    async move {
                        let _worker = permits.acquire().await.expect("semaphore");
                        tokio::time::sleep(service_time).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn h2_client(addr: SocketAddr) -> H2 {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// One request's fate: when it was sent (from the start of the run), its status (`None`:
/// no answer within the run), and how long it took (or had waited when the run ended).
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Duration,
    status: Option<StatusCode>,
    overloaded: bool,
    latency: Duration,
}

/// Offered load, open loop: `phases` of (requests per second, length), each request on its
/// own HTTP/2 stream to `addr`; requests still unanswered `grace` after the last phase count
/// with the time they had waited.
async fn offer(addr: SocketAddr, phases: &[(u32, Duration)], grace: Duration) -> Vec<Sent> {
    let client = h2_client(addr).await;
    let start = Instant::now();
    let total: Duration = phases.iter().map(|(_, d)| *d).sum();
    let end = start + total + grace;
    let mut tasks = Vec::new();
    let mut phase_start = start;
    for &(rps, length) in phases {
        let gap = Duration::from_secs_f64(1.0 / f64::from(rps));
        let count = (length.as_secs_f64() * f64::from(rps)) as u32;
        for i in 0..count {
            tokio::time::sleep_until((phase_start + gap * i).into()).await;
            let mut client = client.clone();
            let at = start.elapsed();
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let req = Request::get(format!("http://{addr}/"))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let answer = tokio::time::timeout_at(end.into(), async {
                    client.ready().await.ok()?;
                    let resp = client.send_request(req).await.ok()?;
                    let overloaded = resp
                        .headers()
                        .get("x-sidemesh-error")
                        .is_some_and(|v| v == "overloaded");
                    let status = resp.status();
                    resp.into_body().collect().await.ok()?;
                    Some((status, overloaded))
                })
                .await
                .ok()
                .flatten();
                Sent {
                    at,
                    status: answer.map(|(s, _)| s),
                    overloaded: answer.is_some_and(|(_, o)| o),
                    latency: sent.elapsed(),
                }
            }));
        }
        phase_start += length;
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("join"));
    }
    all
}

/// The app's capacity in requests per second, measured with a closed loop of `concurrency`
/// clients straight to it.
async fn capacity(addr: SocketAddr, concurrency: usize, length: Duration) -> f64 {
    let client = h2_client(addr).await;
    let until = Instant::now() + length;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0u32;
            while Instant::now() < until {
                client.ready().await.expect("ready");
                let req = Request::get(format!("http://{addr}/"))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let resp = client.send_request(req).await.expect("send");
                resp.into_body().collect().await.expect("body");
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.expect("join");
    }
    f64::from(total) / length.as_secs_f64()
}

fn quantile(mut latencies: Vec<Duration>, q: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort();
    let at = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[at]
}

struct Run {
    goodput: f64,
    p99_ok: Duration,
    /// Median latency of the requests sent in the overload's first and last second.
    early: Duration,
    late: Duration,
    shed: usize,
    other: usize,
}

const WARM: Duration = Duration::from_secs(2);
const OVERLOAD: Duration = Duration::from_secs(5);

/// Half the capacity for `WARM`, then three times it for `OVERLOAD`, through a proxy in
/// front of the app.
async fn overload_run(app: SocketAddr, capacity: f64, inbound: &str) -> Run {
    let proxy = TestProxy::start(
        &format!(
            "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: app\n    ports: [{{port: 80}}]\n{inbound}"
        ),
        "app",
        &[],
        |args| args.app = Some(app),
    )
    .await;
    let inbound_addr = proxy.addrs.inbound.expect("inbound listener");
    let half = (capacity / 2.0) as u32;
    let triple = (capacity * 3.0) as u32;
    let sent = offer(
        inbound_addr,
        &[(half, WARM), (triple, OVERLOAD)],
        Duration::from_secs(3),
    )
    .await;
    // Goodput over the overload after its first second (the limit's time to adjust).
    let from = WARM + Duration::from_secs(1);
    let to = WARM + OVERLOAD;
    let in_window = |s: &&Sent| s.at >= from && s.at < to;
    let ok: Vec<&Sent> = sent
        .iter()
        .filter(in_window)
        .filter(|s| s.status == Some(StatusCode::OK))
        .collect();
    let goodput = ok.len() as f64 / (to - from).as_secs_f64();
    let overload: Vec<&Sent> = sent.iter().filter(|s| s.at >= WARM).collect();
    let p99_ok = quantile(
        overload
            .iter()
            .filter(|s| s.status != Some(StatusCode::SERVICE_UNAVAILABLE))
            .map(|s| s.latency)
            .collect(),
        0.99,
    );
    let median_sent_between = |a: Duration, b: Duration| {
        quantile(
            overload
                .iter()
                .filter(|s| s.at >= a && s.at < b && !s.overloaded)
                .map(|s| s.latency)
                .collect(),
            0.5,
        )
    };
    let early = median_sent_between(WARM, WARM + Duration::from_secs(1));
    let late = median_sent_between(to - Duration::from_secs(1), to);
    let shed = sent.iter().filter(|s| s.overloaded).count();
    let other = sent
        .iter()
        .filter(|s| s.status.is_some() && s.status != Some(StatusCode::OK) && !s.overloaded)
        .count();
    if !inbound.is_empty() {
        let m = metrics(&proxy).await;
        assert!(
            metric(
                &m,
                "sidemesh_adaptive_concurrency_shed_total{direction=\"inbound\",service=\"app\",route=\"inbound\"}"
            ) as usize
                == shed,
            "every shed request is counted: {shed}\n{m}"
        );
        let limit = metric(
            &m,
            "sidemesh_adaptive_concurrency_limit{direction=\"inbound\",service=\"app\",route=\"inbound\"}",
        );
        let dump = http(Method::GET, &proxy.admin("/config_dump"), None, &[])
            .await
            .expect("config_dump")
            .json();
        let state = &dump["config"]["adaptive_concurrency"][0];
        assert_eq!(state["scope"], "service `app` (inbound)", "{dump}");
        assert_eq!(state["limit"].as_f64(), Some(limit), "{state}");
        println!("adaptive limit after the run: {limit}; {state}");
    }
    Run {
        goodput,
        p99_ok,
        early,
        late,
        shed,
        other,
    }
}

#[tokio::test]
async fn an_adaptive_limit_holds_goodput_and_latency_under_three_times_the_capacity() {
    let app = limited_app(4, Duration::from_millis(20)).await;
    let capacity = capacity(app, 8, Duration::from_secs(2)).await;
    println!("app capacity: {capacity:.0} req/s");
    assert!(
        capacity > 100.0,
        "the app serves about 200 req/s: {capacity}"
    );

    let without = overload_run(app, capacity, "").await;
    println!(
        "without a limit: goodput {:.0}/s, p99 {:?}, median early {:?} late {:?}",
        without.goodput, without.p99_ok, without.early, without.late
    );
    let with = overload_run(
        app,
        capacity,
        "    inbound:\n      adaptiveConcurrency: {}\n",
    )
    .await;
    println!(
        "with adaptiveConcurrency: goodput {:.0}/s ({:.0}% of capacity), p99 {:?}, median early {:?} late {:?}, shed {}",
        with.goodput,
        with.goodput / capacity * 100.0,
        with.p99_ok,
        with.early,
        with.late,
        with.shed
    );

    assert!(
        with.goodput >= 0.9 * capacity,
        "goodput {:.0}/s is at least 90% of the capacity {capacity:.0}/s",
        with.goodput
    );
    assert!(
        with.p99_ok < Duration::from_millis(500),
        "p99 stays bounded: {:?}",
        with.p99_ok
    );
    assert!(with.shed > 0, "the excess was shed");
    assert_eq!(with.other, 0, "nothing failed but the shed requests");
    assert_eq!(without.shed, 0);
    assert!(
        without.late > without.early * 3 && without.late > Duration::from_secs(1),
        "without a limit latency grows with the overload: {:?} -> {:?}",
        without.early,
        without.late
    );
    assert!(
        without.p99_ok > with.p99_ok * 4,
        "p99 without {:?} vs with {:?}",
        without.p99_ok,
        with.p99_ok
    );
}
