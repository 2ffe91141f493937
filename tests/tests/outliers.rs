//! A mesh that never makes an outage worse: outlier detection counts only an endpoint's own
//! failures, never ejects a service's last endpoints (maxEjectionPercent, panic threshold),
//! ejects by success rate; random and weighted round-robin spread as configured; a client's
//! faults, an app restart and a stalled proxy delay requests instead of failing them.
//!
//! The first tests run the real proxy in-process (`app::build`, port 0) in front of echo
//! servers; the last ones run the real binaries as a mesh (control plane, a client proxy and
//! the app's proxy, mutual TLS between them).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, TestProxy, eventually, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A mesh with the proxy's own `client` service and `app` with `endpoints` (YAML flow list
/// items) and `extra` service lines, plus `routes` appended verbatim.
fn mesh(endpoints: &[String], extra: &str, routes: &str) -> String {
    let mut yaml = format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: app\n    ports: [{{port: 80}}]\n    endpoints: [{}]\n",
        endpoints.join(", ")
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    if !routes.trim().is_empty() {
        yaml.push_str("routes:\n");
        yaml.push_str(routes);
    }
    yaml
}

fn quoted(servers: &[EchoServer]) -> Vec<String> {
    servers.iter().map(|s| format!("\"{}\"", s.addr)).collect()
}

async fn servers(n: usize) -> Vec<EchoServer> {
    let mut all = Vec::new();
    for i in 0..n {
        all.push(EchoServer::start(&format!("app-{i}")).await);
    }
    all
}

/// The app's 5xx count against its endpoints on this route (they do not unless a route says).
const FAILURES_COUNT: &str = "  - name: all\n    service: app\n    failureStatuses: [5xx]\n";

async fn metrics(admin: String) -> String {
    http(Method::GET, &admin, None, &[])
        .await
        .expect("metrics")
        .body
}

/// The value of the metric line that starts with `series` (0 when absent).
fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn ejections(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("sidemesh_endpoint_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn balancer(dump_url: String) -> serde_json::Value {
    let dump = http(Method::GET, &dump_url, None, &[])
        .await
        .expect("config_dump")
        .json();
    dump["config"]["balancers"]
        .as_array()
        .expect("balancers")
        .iter()
        .find(|b| b["service"] == "app.default")
        .cloned()
        .unwrap_or_else(|| panic!("no balancer for app in {dump}"))
}

#[tokio::test]
async fn a_one_endpoint_service_failing_ten_times_in_a_row_keeps_its_traffic() {
    let app = EchoServer::start("only").await;
    app.set_healthy(false);
    // Default outlier detection: five failures in a row would eject, but not the only endpoint.
    let proxy = TestProxy::start(
        &mesh(&quoted(std::slice::from_ref(&app)), "", FAILURES_COUNT),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    for i in 0..10 {
        let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
        assert_eq!(
            resp.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "request {i} reaches the app and gets its own answer, not the proxy's 503: {:?}",
            resp.headers.get("x-sidemesh-error")
        );
        assert!(resp.headers.get("x-sidemesh-error").is_none());
    }
    assert_eq!(app.hits(), 10, "every request reached the only endpoint");
    app.set_healthy(true);
    let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "the healed app answers at once"
    );

    let m = metrics(proxy.admin("/metrics")).await;
    assert_eq!(ejections(&m), 0.0, "nothing was ejected:\n{m}");
    assert!(
        metric(
            &m,
            "sidemesh_ejections_spared_total{service=\"app.default\",reason=\"consecutive-failures\"}"
        ) >= 1.0,
        "the spared ejection is counted:\n{m}"
    );
    let b = balancer(proxy.admin("/config_dump")).await;
    assert_eq!(b["panic"], false, "{b}");
    assert!(b["endpoints"][0].get("ejected_for").is_none(), "{b}");
}

#[tokio::test]
async fn six_of_ten_failing_eject_at_most_the_configured_share_and_engage_panic() {
    let all = servers(10).await;
    for s in &all[..6] {
        s.set_healthy(false);
    }
    // At most half ejected; below 60 % healthy the balancer uses every endpoint.
    let outlier = "outlierDetection: {consecutiveFailures: 2, maxEjectionPercent: 50, panicThreshold: 60, trialInterval: 30s, baseEjection: 30s}\nloadBalancer: {policy: roundRobin}";
    let proxy = TestProxy::start(
        &mesh(&quoted(&all), outlier, FAILURES_COUNT),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    for _ in 0..100 {
        http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
    }
    let m = metrics(proxy.admin("/metrics")).await;
    assert_eq!(ejections(&m), 5.0, "five of ten ejected, no more:\n{m}");
    assert!(
        metric(
            &m,
            "sidemesh_ejections_spared_total{service=\"app.default\",reason=\"consecutive-failures\"}"
        ) >= 1.0,
        "the sixth failing endpoint was spared:\n{m}"
    );
    assert_eq!(
        metric(&m, "sidemesh_balancer_panic{service=\"app.default\"}"),
        1.0,
        "{m}"
    );
    let b = balancer(proxy.admin("/config_dump")).await;
    assert_eq!(b["panic"], true, "{b}");
    assert_eq!(b["healthy"], 5, "{b}");
    let ejected = b["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e["ejected_for"] == "consecutive-failures")
        .count();
    assert_eq!(ejected, 5, "{b}");

    // In panic every endpoint takes traffic, ejected or not.
    let before: Vec<u64> = all.iter().map(EchoServer::hits).collect();
    for _ in 0..50 {
        http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
    }
    for (s, before) in all.iter().zip(before) {
        assert!(
            s.hits() > before,
            "{} got no traffic in panic ({} hits before and after)",
            s.id,
            before
        );
    }
}

#[tokio::test]
async fn success_rate_ejects_the_endpoint_failing_30_percent_while_others_fail_1() {
    let all = servers(6).await;
    all[0].set_failure_permille(300);
    for s in &all[1..] {
        s.set_failure_permille(10);
    }
    let outlier = "outlierDetection: {interval: 1s, baseEjection: 30s, successRate: {minimumHosts: 5, requestVolume: 50}}\nloadBalancer: {policy: roundRobin}";
    let proxy = TestProxy::start(
        &mesh(&quoted(&all), outlier, FAILURES_COUNT),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let bad = all[0].addr;
    let series = format!(
        "sidemesh_endpoint_ejections_total{{service=\"app.default\",endpoint=\"{bad}\",reason=\"success-rate\"}}"
    );
    eventually(
        "the endpoint failing 30 % to be ejected by success rate",
        Duration::from_secs(15),
        || async {
            for _ in 0..50 {
                http(Method::GET, &proxy.url("app", "/"), None, &[])
                    .await
                    .expect("GET");
            }
            let m = metrics(proxy.admin("/metrics")).await;
            (metric(&m, &series) >= 1.0).then_some(())
        },
    )
    .await;
    let m = metrics(proxy.admin("/metrics")).await;
    assert_eq!(ejections(&m), 1.0, "only the bad endpoint is ejected:\n{m}");

    let before: Vec<u64> = all.iter().map(EchoServer::hits).collect();
    for _ in 0..200 {
        http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
    }
    assert_eq!(
        all[0].hits(),
        before[0],
        "the ejected endpoint gets no traffic"
    );
    for (s, before) in all[1..].iter().zip(&before[1..]) {
        assert!(s.hits() >= before + 30, "{} takes its share", s.id);
    }
    let b = balancer(proxy.admin("/config_dump")).await;
    let ejected: Vec<&serde_json::Value> = b["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e.get("ejected_for").is_some())
        .collect();
    assert_eq!(ejected.len(), 1, "{b}");
    assert_eq!(ejected[0]["addr"], bad.to_string());
    assert_eq!(ejected[0]["ejected_for"], "success-rate");
}

/// Sends `n` requests and returns each server's share in percent.
async fn shares(proxy: &TestProxy, servers: &[EchoServer], n: u64) -> Vec<f64> {
    let before: Vec<u64> = servers.iter().map(EchoServer::hits).collect();
    for _ in 0..n {
        let resp = http(Method::GET, &proxy.url("app", "/"), None, &[])
            .await
            .expect("GET");
        assert_eq!(resp.status, StatusCode::OK);
    }
    servers
        .iter()
        .zip(before)
        .map(|(s, b)| (s.hits() - b) as f64 * 100.0 / n as f64)
        .collect()
}

#[tokio::test]
async fn random_and_weighted_round_robin_spread_within_three_points_over_5000_requests() {
    let four = servers(4).await;
    let proxy = TestProxy::start(
        &mesh(&quoted(&four), "loadBalancer: {policy: random}", ""),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let got = shares(&proxy, &four, 5000).await;
    for (s, share) in four.iter().zip(&got) {
        assert!(
            (share - 25.0).abs() <= 3.0,
            "random: {} took {share:.1} % (target 25 %): {got:?}",
            s.id
        );
    }
    proxy.stop().await;

    let three = servers(3).await;
    let weights = [1, 2, 7];
    let endpoints: Vec<String> = three
        .iter()
        .zip(weights)
        .map(|(s, w)| format!("{{address: \"{}\", weight: {w}}}", s.addr))
        .collect();
    let proxy = TestProxy::start(
        &mesh(&endpoints, "loadBalancer: {policy: weightedRoundRobin}", ""),
        "client",
        &["app"],
        |_| {},
    )
    .await;
    let got = shares(&proxy, &three, 5000).await;
    for ((s, share), w) in three.iter().zip(&got).zip(weights) {
        let target = f64::from(w) * 10.0;
        assert!(
            (share - target).abs() <= 3.0,
            "weightedRoundRobin: {} took {share:.1} % (target {target} %): {got:?}",
            s.id
        );
    }
    let b = balancer(proxy.admin("/config_dump")).await;
    let shown: Vec<u64> = b["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["weight"].as_u64().expect("weight"))
        .collect();
    assert_eq!(shown, vec![1, 2, 7], "weights in /config_dump: {b}");
}

// --- the real binaries as a mesh ---------------------------------------------------------

fn mesh_yaml(outlier: &str) -> String {
    format!(
        "apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  trustDomain: cluster.local
  mtls: strict
services:
  - name: app
    namespace: demo
    ports: [{{port: 8081}}]
    outlierDetection: {outlier}
  - name: client
    namespace: demo
    ports: [{{port: 8082}}]
routes:
  - name: all
    service: app.demo
    timeout: 10s
"
    )
}

struct Pair {
    mesh: Mesh,
    app_proxy: Proc,
    client_proxy: Proc,
}

impl Pair {
    async fn start(app: SocketAddr, outlier: &str) -> Pair {
        let mesh = Mesh::start(&mesh_yaml(outlier), &[]);
        let app_proxy = mesh.proxy("app", Some(app), &[], &[]);
        let client_proxy = mesh.proxy("client", None, &["app"], &[]);
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

    fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.client_proxy.listener("admin"))
    }

    async fn version(proxy: &Proc) -> u64 {
        proxy.config_dump().await.expect("config_dump")["config"]["version"]
            .as_u64()
            .expect("version")
    }

    /// Rewrites the mesh's routing YAML and waits until both proxies run the new version.
    async fn push(&self, yaml: &str) {
        let before = (
            Self::version(&self.client_proxy).await,
            Self::version(&self.app_proxy).await,
        );
        let tmp = self.mesh.path("config/.mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.mesh.path("config/mesh.yaml")).expect("rename");
        eventually(
            "both proxies to get the pushed config",
            Duration::from_secs(10),
            || async {
                let now = (
                    Self::version(&self.client_proxy).await,
                    Self::version(&self.app_proxy).await,
                );
                (now.0 > before.0 && now.1 > before.1).then_some(())
            },
        )
        .await;
    }
}

/// A request on its own connection, written raw; returns what came back before the proxy
/// closed (or within a second).
async fn raw(addr: SocketAddr, bytes: &[u8], then_drop: bool) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    if then_drop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_faulty_client_gets_no_endpoint_ejected_and_other_callers_keep_their_answers() {
    let app = EchoServer::start("app").await;
    // The strictest settings: two failures in a row would eject the only endpoint, and
    // nothing would keep it; every fault below wrongly counted would show.
    let pair = Pair::start(
        app.addr,
        "{consecutiveFailures: 2, maxEjectionPercent: 100, panicThreshold: 0, trialInterval: 30s, baseEjection: 30s}",
    )
    .await;
    let entry = pair.entry();
    let other_caller = || async {
        let resp = http(Method::GET, &pair.url("/"), None, &[])
            .await
            .expect("GET");
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "another caller was refused: {:?} {}",
            resp.headers.get("x-sidemesh-error"),
            resp.body
        );
    };

    for _ in 0..20 {
        // An upload announced at 1 MB, cut off after 4 KiB.
        let mut req =
            b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        req.extend(std::iter::repeat_n(b'x', 4096));
        raw(entry, &req, true).await;
        other_caller().await;
    }
    for _ in 0..5 {
        // A chunked upload whose chunk size is not hex.
        let answer = raw(
            entry,
            b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n",
            false,
        )
        .await;
        assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
        other_caller().await;
    }
    for _ in 0..5 {
        let answer = raw(
            entry,
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            false,
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 "),
            "CONNECT gets an answer: {answer}"
        );
        other_caller().await;
    }
    for _ in 0..5 {
        // A request the client gives up on while the app is still working on it.
        raw(entry, b"GET /slow/2000 HTTP/1.1\r\nHost: app\r\n\r\n", true).await;
        other_caller().await;
    }
    for _ in 0..10 {
        // A URL on which the app answers 500: on this route 5xx do not count (no failureStatuses).
        let resp = http(Method::GET, &pair.url("/status/500"), None, &[])
            .await
            .expect("GET");
        assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(resp.headers.get("x-sidemesh-error").is_none());
        other_caller().await;
    }

    let m = metrics(pair.metrics_url()).await;
    assert_eq!(ejections(&m), 0.0, "no endpoint was ejected:\n{m}");
    let dump = pair.client_proxy.config_dump().await.expect("config_dump");
    let b = dump["config"]["balancers"]
        .as_array()
        .expect("balancers")
        .iter()
        .find(|b| b["service"] == "app.demo")
        .cloned()
        .expect("app's balancer");
    assert!(
        b["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .all(|e| e.get("ejected_for").is_none()),
        "{b}"
    );
}

#[tokio::test]
async fn an_app_down_for_5s_serves_again_within_a_second_of_coming_back() {
    let app = EchoServer::start("app").await;
    let pair = Pair::start(app.addr, "{}").await;
    let ok = http(Method::GET, &pair.url("/"), None, &[])
        .await
        .expect("GET");
    assert_eq!(ok.status, StatusCode::OK);

    app.stop();
    let down = Instant::now();
    let mut failed = 0;
    while down.elapsed() < Duration::from_secs(5) {
        let resp = http(Method::GET, &pair.url("/"), None, &[])
            .await
            .expect("GET");
        if resp.status != StatusCode::OK {
            failed += 1;
            assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{}", resp.body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failed > 0, "the app was down, so requests failed");

    let app = EchoServer::start_on("app", app.addr).await;
    let back = Instant::now();
    loop {
        let resp = http(Method::GET, &pair.url("/"), None, &[])
            .await
            .expect("GET");
        if resp.status == StatusCode::OK {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(1),
            "still {} {:?} {:?} after the app came back",
            resp.status,
            resp.headers.get("x-sidemesh-error"),
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    assert!(app.hits() >= 1);
    eprintln!("served again {took:?} after the app came back ({failed} failed while down)");
    // And it stays back: the endpoint is not serving out an ejection.
    for _ in 0..20 {
        let resp = http(Method::GET, &pair.url("/"), None, &[])
            .await
            .expect("GET");
        assert_eq!(resp.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_server_proxy_stopped_for_1_5s_under_200_rps_delays_requests_and_fails_none() {
    let app = EchoServer::start("app").await;
    let pair = Pair::start(app.addr, "{}").await;
    for _ in 0..20 {
        let resp = http(Method::GET, &pair.url("/"), None, &[])
            .await
            .expect("warm-up GET");
        assert_eq!(resp.status, StatusCode::OK);
    }

    // Open loop: a request every 5 ms for 5 s whatever happens to the earlier ones.
    let url = pair.url("/");
    let start = Instant::now();
    let mut sent = Vec::new();
    let stopper = {
        let pid = pair.app_proxy.pid().to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let stop = Instant::now();
            kill("STOP", &pid);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            kill("CONT", &pid);
            stop.elapsed()
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while start.elapsed() < Duration::from_secs(5) {
        tick.tick().await;
        let url = url.clone();
        sent.push(tokio::spawn(async move {
            let t = Instant::now();
            let resp = http(Method::GET, &url, None, &[]).await;
            (resp, t.elapsed())
        }));
    }
    let stalled = stopper.await.expect("stopper");
    assert!(stalled >= Duration::from_millis(1500));
    let mut outcomes: HashMap<String, u64> = HashMap::new();
    let mut delayed = 0;
    for r in sent.drain(..) {
        let (resp, took) = r.await.expect("request task");
        let key = match resp {
            Ok(r) if r.status == StatusCode::OK => "200".to_string(),
            Ok(r) => format!(
                "{} {}",
                r.status,
                r.header("x-sidemesh-error").unwrap_or("(app)")
            ),
            Err(e) => format!("client error: {e}"),
        };
        *outcomes.entry(key).or_default() += 1;
        if took > Duration::from_secs(1) {
            delayed += 1;
        }
    }
    let total: u64 = outcomes.values().sum();
    eprintln!("{total} requests: {outcomes:?}, {delayed} delayed over 1 s");
    assert!(total >= 900, "the load was about 200 req/s: {total}");
    assert_eq!(
        outcomes.get("200").copied().unwrap_or(0),
        total,
        "every request within its timeout is answered: {outcomes:?}"
    );
    assert!(delayed > 10, "the stall delayed requests: {delayed}");

    let m = metrics(pair.metrics_url()).await;
    assert_eq!(
        ejections(&m),
        0.0,
        "the only endpoint was not ejected:\n{m}"
    );
    // The control-plane streams survived the stall: a push reaches both proxies.
    pair.push(&mesh_yaml("{}").replace("timeout: 10s", "timeout: 9s"))
        .await;
}

fn kill(signal: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}
