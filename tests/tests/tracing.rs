//! Proxy spans at a real OpenTelemetry collector (`rotel`): one trace across the proxies and
//! the demo services with the right parent/child links, attempt spans for retries, events for
//! rate limits, and a collector that is down costing requests nothing.

use std::time::Duration;

use http::{Method, StatusCode};
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, Rotel, SeenSpan, eventually, http, skip};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const ORDER: &str = r#"{"user_id": 2, "items": [{"sku": "book-42", "quantity": 1}]}"#;

fn collector() -> Option<Rotel> {
    let rotel = Rotel::start();
    if rotel.is_none() {
        skip("rotel (pip install rotel) is not installed: cannot check exported spans");
    }
    rotel
}

fn demo_yaml(otlp: &str) -> String {
    format!(
        "apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  mtls: strict
  tracing: {{otlpEndpoint: \"{otlp}\", sampling: 1.0}}
services:
  - name: user-service
    namespace: demo
    ports: [{{port: 8081}}]
  - name: order-service
    namespace: demo
    ports: [{{port: 8082}}]
  - name: loadgen
    namespace: demo
routes:
  - name: user-lookup
    service: user-service
    matches: [{{path: {{exact: /demo.users.v1.UserService/GetUser}}}}]
    retry: {{attempts: 2, retryOn: [unavailable, 5xx], nonIdempotent: true}}
  - name: orders
    service: order-service
    matches: [{{path: {{prefix: /orders}}}}]
"
    )
}

/// The spans of the trace once `n` have arrived.
async fn trace(rotel: &Rotel, trace_id: &str, n: usize) -> Vec<SeenSpan> {
    let what = format!("{n} spans of trace {trace_id} at the collector");
    eventually(&what, Duration::from_secs(15), || async {
        let spans: Vec<SeenSpan> = rotel
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        (spans.len() >= n).then_some(spans)
    })
    .await
}

fn find<'a>(spans: &'a [SeenSpan], what: &str, pred: impl Fn(&SeenSpan) -> bool) -> &'a SeenSpan {
    let found: Vec<&SeenSpan> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} in {spans:#?}");
    found[0]
}

fn proxy_span<'a>(spans: &'a [SeenSpan], service: &str, direction: &str) -> &'a SeenSpan {
    find(
        spans,
        &format!("{direction} span of {service}'s proxy"),
        |s| s.service == service && s.attribute("sidemesh.direction") == Some(direction),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_across_every_hop() {
    let Some(rotel) = collector() else { return };
    let otlp = rotel.grpc_url();
    let mesh = Mesh::start(&demo_yaml(&otlp), &[]);
    let users_app = Proc::start(
        "user-service",
        &["--listen", "127.0.0.1:0", "--otlp-endpoint", &otlp],
    );
    let user_proxy = mesh.proxy("user-service", Some(users_app.addr), &[], &[]);
    // order-service calls user-service through its proxy's upstream listener: the order
    // proxy is started first (no app yet), then order-service pointing at it.
    let orders_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let order_proxy = mesh.proxy("order-service", Some(orders_port), &["user-service"], &[]);
    let to_users = order_proxy.listener("upstream:user-service");
    let _orders_app = Proc::start(
        "order-service",
        &[
            "--listen",
            &orders_port.to_string(),
            "--user-service",
            &format!("http://{to_users}"),
            "--otlp-endpoint",
            &otlp,
        ],
    );
    let loadgen_proxy = mesh.proxy("loadgen", None, &["order-service"], &[]);
    mesh.wait_meshed(&order_proxy, "user-service", &user_proxy)
        .await;
    mesh.wait_meshed(&loadgen_proxy, "order-service", &order_proxy)
        .await;

    let to_orders = loadgen_proxy.listener("upstream:order-service");
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let resp = http(
        Method::POST,
        &format!("http://{to_orders}/orders"),
        Some(ORDER),
        &[("traceparent", &traceparent)],
    )
    .await
    .expect("POST /orders");
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.body);

    // loadgen's proxy (client), order's proxy (server), order-service (server + its gRPC
    // client), order's proxy (client + attempt), user's proxy (server), user-service (server).
    let spans = trace(&rotel, TRACE_ID, 8).await;
    let loadgen_out = proxy_span(&spans, "loadgen", "outbound");
    let order_in = proxy_span(&spans, "order-service", "inbound");
    let order_out = proxy_span(&spans, "order-service", "outbound");
    let user_in = proxy_span(&spans, "user-service", "inbound");
    let attempt = find(&spans, "attempt span", |s| s.name == "attempt 1");
    let order_app = find(&spans, "order-service's server span", |s| {
        s.service == "order-service"
            && s.kind == "SPAN_KIND_SERVER"
            && s.attribute("sidemesh.direction").is_none()
    });
    let user_app = find(&spans, "user-service's server span", |s| {
        s.service == "user-service"
            && s.kind == "SPAN_KIND_SERVER"
            && s.attribute("sidemesh.direction").is_none()
    });

    // Parent links across five processes.
    assert_eq!(
        loadgen_out.parent_id, CALLER_SPAN,
        "continues the caller's trace"
    );
    assert_eq!(order_in.parent_id, loadgen_out.span_id);
    assert_eq!(order_app.parent_id, order_in.span_id);
    let order_grpc_client = find(&spans, "order-service's gRPC client span", |s| {
        s.service == "order-service"
            && s.kind == "SPAN_KIND_CLIENT"
            && s.attribute("sidemesh.direction").is_none()
            && s.attribute("sidemesh.attempt").is_none()
    });
    assert_eq!(order_out.parent_id, order_grpc_client.span_id);
    assert_eq!(attempt.parent_id, order_out.span_id);
    assert_eq!(user_in.parent_id, attempt.span_id);
    assert_eq!(user_app.parent_id, user_in.span_id);

    // Names and attributes.
    assert_eq!(loadgen_out.name, "POST /orders/*");
    assert_eq!(loadgen_out.kind, "SPAN_KIND_CLIENT");
    assert_eq!(loadgen_out.attribute("http.route"), Some("/orders/*"));
    assert_eq!(loadgen_out.attribute("sidemesh.route"), Some("orders"));
    assert_eq!(
        loadgen_out.attribute("sidemesh.upstream.endpoint"),
        Some(order_proxy.listener("inbound").to_string().as_str())
    );
    assert_eq!(order_in.kind, "SPAN_KIND_SERVER");
    assert_eq!(order_in.attribute("http.request.method"), Some("POST"));
    assert_eq!(order_in.attribute("url.path"), Some("/orders"));
    assert_eq!(order_in.attribute("http.response.status_code"), Some("201"));
    assert_eq!(
        order_in.attribute("sidemesh.peer.identity"),
        Some("spiffe://cluster.local/ns/demo/sa/loadgen")
    );
    assert!(order_in.attribute("network.peer.address").is_some());
    let resource = |key: &str| {
        order_in
            .resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(resource("service.name"), Some("order-service"));
    assert_eq!(resource("service.namespace"), Some("demo"));
    assert_eq!(
        resource("k8s.pod.name"),
        Some("order-service"),
        "the proxy id"
    );
    assert!(resource("host.name").is_some());
    assert_eq!(order_out.name, "POST /demo.users.v1.UserService/GetUser");
    assert_eq!(attempt.attribute("sidemesh.attempt"), Some("1"));
    assert_eq!(
        user_in.attribute("sidemesh.peer.identity"),
        Some("spiffe://cluster.local/ns/demo/sa/order-service")
    );
}

fn echo_yaml(otlp: &str) -> String {
    format!(
        "apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  tracing: {{otlpEndpoint: \"{otlp}\", sampling: 1.0}}
services:
  - name: payments
    namespace: demo
    ports: [{{port: 80}}]
  - name: loadgen
    namespace: demo
routes:
  - name: flaky
    service: payments
    matches: [{{path: {{prefix: /status}}}}]
    retry: {{attempts: 3, retryOn: [5xx], backoff: {{base: 1ms, max: 2ms}}}}
  - name: scarce
    service: payments
    matches: [{{path: {{prefix: /scarce}}}}]
    rateLimit: {{rate: 1/m, burst: 1}}
  - name: crowded
    service: payments
    matches: [{{path: {{prefix: /slow}}}}]
    adaptiveConcurrency: {{initialLimit: 1, minLimit: 1, maxLimit: 1}}
"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_show_attempt_spans_and_rate_limits_show_an_event() {
    let Some(rotel) = collector() else { return };
    let mesh = Mesh::start(&echo_yaml(&rotel.grpc_url()), &[]);
    let app = EchoServer::start("payments").await;
    let payments = mesh.proxy("payments", Some(app.addr), &[], &[]);
    let caller = mesh.proxy("loadgen", None, &["payments"], &[]);
    mesh.wait_meshed(&caller, "payments", &payments).await;
    let to_payments = caller.listener("upstream:payments");

    let retried = "5bf92f3577b34da6a3ce929d0e0e4737";
    let resp = http(
        Method::GET,
        &format!("http://{to_payments}/status/503"),
        None,
        &[("traceparent", &format!("00-{retried}-{CALLER_SPAN}-01"))],
    )
    .await
    .expect("request");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    // The client span, three attempts, three server spans at the payments proxy.
    let spans = trace(&rotel, retried, 7).await;
    let client = proxy_span(&spans, "loadgen", "outbound");
    assert_eq!(client.status, "STATUS_CODE_ERROR", "a 5xx is an error");
    let mut attempts: Vec<&SeenSpan> = spans
        .iter()
        .filter(|s| s.name.starts_with("attempt "))
        .collect();
    attempts.sort_by_key(|s| s.name.clone());
    let names: Vec<&str> = attempts.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["attempt 1", "attempt 2", "attempt 3"]);
    for a in &attempts {
        assert_eq!(
            a.parent_id, client.span_id,
            "each attempt is a child of the call"
        );
        assert_eq!(a.attribute("http.response.status_code"), Some("503"));
        let served: Vec<&SeenSpan> = spans.iter().filter(|s| s.parent_id == a.span_id).collect();
        assert_eq!(
            served.len(),
            1,
            "the server side of {} is its child",
            a.name
        );
    }

    // Rate limited: the second call in a minute never leaves the caller's proxy.
    let limited = "6bf92f3577b34da6a3ce929d0e0e4738";
    for (i, trace_id) in ["7bf92f3577b34da6a3ce929d0e0e4739", limited]
        .iter()
        .enumerate()
    {
        let resp = http(
            Method::GET,
            &format!("http://{to_payments}/scarce"),
            None,
            &[("traceparent", &format!("00-{trace_id}-{CALLER_SPAN}-01"))],
        )
        .await
        .expect("request");
        let expected = if i == 0 {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(resp.status, expected);
    }
    let spans = trace(&rotel, limited, 1).await;
    let client = proxy_span(&spans, "loadgen", "outbound");
    assert_eq!(client.attribute("http.response.status_code"), Some("429"));
    assert!(
        client.events.iter().any(|e| e == "rate-limited"),
        "the rate-limited event is on the span: {client:#?}\n{}",
        rotel.output()
    );

    // Shed: with one request in flight on a route limited to one, the next is refused at
    // once and its span says why.
    let before = app.hits();
    let held = {
        let url = format!("http://{to_payments}/slow/1500");
        tokio::spawn(async move { http(Method::GET, &url, None, &[]).await })
    };
    eventually(
        "the slow request at the app",
        Duration::from_secs(5),
        || async { (app.hits() > before).then_some(()) },
    )
    .await;
    let shed = "8bf92f3577b34da6a3ce929d0e0e473a";
    let resp = http(
        Method::GET,
        &format!("http://{to_payments}/slow/1"),
        None,
        &[("traceparent", &format!("00-{shed}-{CALLER_SPAN}-01"))],
    )
    .await
    .expect("request");
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.body
    );
    assert_eq!(resp.header("x-sidemesh-error"), Some("overloaded"));
    let spans = trace(&rotel, shed, 1).await;
    let client = proxy_span(&spans, "loadgen", "outbound");
    assert!(
        client.events.iter().any(|e| e == "overloaded"),
        "the overloaded event is on the span: {client:#?}"
    );
    assert_eq!(
        held.await.expect("join").expect("held request").status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_down_costs_requests_nothing() {
    // Nothing listens here: every export fails.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mesh = Mesh::start(&echo_yaml(&format!("http://{down}")), &[]);
    let app = EchoServer::start("payments").await;
    let payments = mesh.proxy("payments", Some(app.addr), &[], &[]);
    let caller = mesh.proxy("loadgen", None, &["payments"], &[]);
    mesh.wait_meshed(&caller, "payments", &payments).await;
    let to_payments = caller.listener("upstream:payments");
    for _ in 0..200 {
        let resp = http(Method::GET, &format!("http://{to_payments}/"), None, &[])
            .await
            .expect("request");
        assert_eq!(resp.status, StatusCode::OK);
    }
    let admin = caller.listener("admin");
    let dropped = eventually("dropped spans counted", Duration::from_secs(15), || async {
        let m = http(Method::GET, &format!("http://{admin}/metrics"), None, &[])
            .await
            .ok()?
            .body;
        let n: f64 = m
            .lines()
            .find(|l| l.starts_with("sidemesh_spans_dropped_total{reason=\"export-failed\"}"))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        (n >= 200.0).then_some(n)
    })
    .await;
    assert!(dropped >= 200.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_export_b3_and_a_pushed_sampling_ratio() {
    let Some(rotel) = collector() else { return };
    // OTLP over HTTP/protobuf, and no new trace sampled at first.
    let yaml = |sampling: &str| {
        echo_yaml(&rotel.http_url()).replace(
            "sampling: 1.0}",
            &format!("sampling: {sampling}, protocol: http-protobuf}}"),
        )
    };
    let mesh = Mesh::start(&yaml("0.0"), &[]);
    let app = EchoServer::start("payments").await;
    let payments = mesh.proxy("payments", Some(app.addr), &[], &[]);
    let caller = mesh.proxy("loadgen", None, &["payments"], &[]);
    mesh.wait_meshed(&caller, "payments", &payments).await;
    let to_payments = caller.listener("upstream:payments");
    let get = |headers: Vec<(&'static str, String)>| {
        let url = format!("http://{to_payments}/headers");
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http(Method::GET, &url, None, &headers)
                .await
                .expect("request")
        }
    };

    // A B3 caller's sampled trace is continued (the ratio is only for new traces), and the
    // app receives W3C context naming the proxy's span.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let resp = get(vec![("b3", format!("{b3_trace}-e457b5a2e4d86bd1-1"))]).await;
    assert_eq!(resp.status, StatusCode::OK);
    let seen_by_app = resp.json()["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(seen_by_app.contains(b3_trace), "{seen_by_app}");
    let spans = trace(&rotel, b3_trace, 2).await;
    let client = proxy_span(&spans, "loadgen", "outbound");
    assert_eq!(
        client.parent_id, "e457b5a2e4d86bd1",
        "continues the B3 caller's span"
    );

    // Without context, sampling 0.0 keeps nothing new...
    let before = rotel.spans().len();
    for _ in 0..20 {
        assert_eq!(get(vec![]).await.status, StatusCode::OK);
    }
    // ...and after a pushed change to 1.0, every new trace is kept.
    let config = mesh.path("config/mesh.yaml");
    let tmp = mesh.path("config/.mesh.yaml.tmp");
    std::fs::write(&tmp, yaml("1.0")).expect("write");
    std::fs::rename(&tmp, &config).expect("rename");
    eventually(
        "the new sampling ratio applied",
        Duration::from_secs(10),
        || async {
            let dump = caller.config_dump().await?;
            let dump = serde_json::to_string_pretty(&dump).ok()?;
            dump.contains("\"sampling\": 1.0").then_some(())
        },
    )
    .await;
    let sampled = "9bf92f3577b34da6a3ce929d0e0e4730";
    // An unsampled parent is still honoured after the change.
    let unsampled = "abf92f3577b34da6a3ce929d0e0e4731";
    let resp = get(vec![(
        "traceparent",
        format!("00-{unsampled}-{CALLER_SPAN}-00"),
    )])
    .await;
    assert!(
        resp.json()["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.contains(unsampled) && t.ends_with("-00")),
        "the decision not to sample is passed on: {}",
        resp.body
    );
    for _ in 0..5 {
        get(vec![]).await;
    }
    get(vec![(
        "traceparent",
        format!("00-{sampled}-{CALLER_SPAN}-01"),
    )])
    .await;
    trace(&rotel, sampled, 2).await;
    let new_traces: std::collections::HashSet<String> = rotel.spans()[before..]
        .iter()
        .filter(|s| s.service == "loadgen" && s.parent_id.is_empty())
        .map(|s| s.trace_id.clone())
        .collect();
    assert_eq!(
        new_traces.len(),
        5,
        "the 20 requests at 0.0 made no trace, the 5 at 1.0 made one each"
    );
    assert!(
        rotel.spans().iter().all(|s| s.trace_id != unsampled),
        "an unsampled parent's trace is never exported"
    );
}
