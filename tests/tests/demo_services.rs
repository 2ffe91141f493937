//! The demo services on their own (no mesh): the real binaries on port 0, spoken to over
//! real HTTP/1.1 and gRPC.

use std::time::Duration;

use http::{Method, StatusCode};
use sidemesh_demo::proto::user_service_client::UserServiceClient;
use sidemesh_demo::proto::user_service_server::{UserService, UserServiceServer};
use sidemesh_demo::proto::{GetUserRequest, ListUsersRequest, User};
use sidemesh_tests::{Proc, Rotel, eventually, http, skip};
use tokio::sync::mpsc;

const ORDER: &str = r#"{"user_id": 2, "items": [{"sku": "book-42", "quantity": 2}]}"#;

fn user_service(extra: &[&str]) -> Proc {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proc::start("user-service", &args)
}

fn order_service(user_service_url: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--user-service",
        user_service_url,
    ];
    args.extend_from_slice(extra);
    Proc::start("order-service", &args)
}

#[tokio::test]
async fn an_order_embeds_the_user_fetched_over_grpc() {
    let users = user_service(&[]);
    let orders = order_service(&users.url(""), &[]);

    let created = http(Method::POST, &orders.url("/orders"), Some(ORDER), &[])
        .await
        .expect("POST /orders");
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let order = created.json();
    let user = http(Method::GET, &users.url("/users/2"), None, &[])
        .await
        .expect("GET /users/2")
        .json();
    assert_eq!(
        order["user"], user,
        "the order embeds user-service's own record"
    );
    assert_eq!(order["user"]["name"], "Grace Hopper");
    assert_eq!(order["items"][0]["sku"], "book-42");

    let id = order["id"].as_u64().expect("numeric id");
    let fetched = http(
        Method::GET,
        &orders.url(&format!("/orders/{id}")),
        None,
        &[],
    )
    .await
    .expect("GET order");
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.json(), order);
    let all = http(Method::GET, &orders.url("/orders"), None, &[])
        .await
        .expect("GET /orders")
        .json();
    assert_eq!(all.as_array().map(Vec::len), Some(1));

    let missing = http(Method::GET, &orders.url("/orders/999"), None, &[])
        .await
        .expect("GET missing");
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"], "no order 999");
}

#[tokio::test]
async fn an_unknown_user_is_422_and_a_bad_body_is_400() {
    let users = user_service(&[]);
    let orders = order_service(&users.url(""), &[]);

    let unknown = r#"{"user_id": 42, "items": [{"sku": "a", "quantity": 1}]}"#;
    let resp = http(Method::POST, &orders.url("/orders"), Some(unknown), &[])
        .await
        .expect("POST");
    assert_eq!(
        resp.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        resp.body
    );
    assert_eq!(resp.json()["error"], "unknown user 42");

    for (body, why) in [
        ("{not json", "Failed to parse the request body as JSON"),
        (
            r#"{"user_id": 1, "items": []}"#,
            "an order needs at least one item",
        ),
        (
            r#"{"user_id": 1, "items": [{"sku": "a", "quantity": 0}]}"#,
            "a `quantity` of 1 or more",
        ),
        (
            r#"{"user_id": 1, "items": [], "coupon": "x"}"#,
            "unknown field `coupon`",
        ),
    ] {
        let resp = http(Method::POST, &orders.url("/orders"), Some(body), &[])
            .await
            .expect("POST");
        assert_eq!(
            resp.status,
            StatusCode::BAD_REQUEST,
            "{body} -> {}",
            resp.body
        );
        let error = resp.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains(why),
            "{body}: `{error}` should mention `{why}`"
        );
    }
}

#[tokio::test]
async fn user_service_down_or_unavailable_is_503() {
    let mut users = user_service(&[]);
    let orders = order_service(&users.url(""), &[]);
    let ok = http(Method::POST, &orders.url("/orders"), Some(ORDER), &[])
        .await
        .expect("POST");
    assert_eq!(ok.status, StatusCode::CREATED);

    users.signal("KILL");
    users.wait_exit(Duration::from_secs(5));
    let down = http(Method::POST, &orders.url("/orders"), Some(ORDER), &[])
        .await
        .expect("POST");
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        down.body
    );
    let error = down.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.starts_with("user-service unavailable"), "{error}");

    // A user-service that answers gRPC UNAVAILABLE (here: all injected) is also a 503.
    let failing = user_service(&["--fail-rate", "1.0"]);
    let orders = order_service(&failing.url(""), &[]);
    let resp = http(Method::POST, &orders.url("/orders"), Some(ORDER), &[])
        .await
        .expect("POST");
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        resp.body
    );
    assert_eq!(
        resp.json()["error"],
        "user-service unavailable: injected failure (--fail-rate)"
    );
    let health = http(Method::GET, &failing.url("/healthz"), None, &[])
        .await
        .expect("healthz");
    assert_eq!(health.status, StatusCode::OK, "faults never touch /healthz");
}

/// `--fail-rate 0.5` over 1000 requests: the 503 share is within 0.05 of 0.5. For a fair coin,
/// 0.05 is 3.2 standard deviations (sqrt(0.25 / 1000) = 0.0158); the seed makes the run
/// reproducible, the tolerance keeps the test honest about what the flag promises.
#[tokio::test]
async fn fail_rate_half_fails_half_the_requests() {
    let users = user_service(&[
        "--fail-rate",
        "0.5",
        "--seed",
        "20261121",
        "--retry-after",
        "1",
    ]);
    let url = users.url("/users/1");
    let (mut ok, mut unavailable) = (0u32, 0u32);
    for _ in 0..1000 {
        let resp = http(Method::GET, &url, None, &[]).await.expect("GET");
        match resp.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(
                    resp.headers.get("retry-after").map(|v| v.as_bytes()),
                    Some(&b"1"[..])
                );
                unavailable += 1;
            }
            other => panic!("unexpected {other}: {}", resp.body),
        }
    }
    assert_eq!(ok + unavailable, 1000);
    let share = f64::from(unavailable) / 1000.0;
    assert!(
        (share - 0.5).abs() <= 0.05,
        "503 share {share} is not within 0.05 of 0.5"
    );
}

#[tokio::test]
async fn grpc_unary_and_server_streaming() {
    let users = user_service(&[]);
    let mut client = UserServiceClient::connect(users.url(""))
        .await
        .expect("connect");
    let ada = client
        .get_user(GetUserRequest { id: 1 })
        .await
        .expect("GetUser")
        .into_inner();
    assert_eq!(ada.name, "Ada Lovelace");
    let missing = client
        .get_user(GetUserRequest { id: 77 })
        .await
        .expect_err("no user 77");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert_eq!(missing.message(), "no user 77");

    let mut stream = client
        .list_users(ListUsersRequest {})
        .await
        .expect("ListUsers")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(user) = stream.message().await.expect("stream item") {
        ids.push(user.id);
    }
    assert_eq!(ids, [1, 2, 3]);
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish() {
    let mut users = user_service(&["--latency", "700ms"]);
    let url = users.url("/users/3");
    let in_flight = tokio::spawn(async move { http(Method::GET, &url, None, &[]).await });
    // The request is in the service (sleeping its injected latency) before the signal.
    tokio::time::sleep(Duration::from_millis(200)).await;
    users.signal("TERM");
    let resp = in_flight
        .await
        .expect("join")
        .expect("the request in flight completes");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.json()["name"], "Alan Turing");
    let status = users.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    assert!(users.logs().iter().any(|l| l.contains("shutting down")));
}

/// A user-service stand-in that records the `traceparent` of each call, so the test sees
/// exactly what order-service sent on the wire.
struct Recorder(mpsc::UnboundedSender<Option<String>>);

#[tonic::async_trait]
impl UserService for Recorder {
    async fn get_user(
        &self,
        req: tonic::Request<GetUserRequest>,
    ) -> Result<tonic::Response<User>, tonic::Status> {
        let tp = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let _ = self.0.send(tp);
        Ok(tonic::Response::new(User {
            id: req.get_ref().id,
            name: "Traced".into(),
            email: "t@example.com".into(),
        }))
    }

    type ListUsersStream = tokio_stream::Empty<Result<User, tonic::Status>>;

    async fn list_users(
        &self,
        _: tonic::Request<ListUsersRequest>,
    ) -> Result<tonic::Response<Self::ListUsersStream>, tonic::Status> {
        Ok(tonic::Response::new(tokio_stream::empty()))
    }
}

#[tokio::test]
async fn order_service_passes_the_w3c_trace_context_on() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(UserServiceServer::new(Recorder(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let orders = order_service(&format!("http://{addr}"), &[]);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let resp = http(
        Method::POST,
        &orders.url("/orders"),
        Some(ORDER),
        &[("traceparent", &traceparent)],
    )
    .await
    .expect("POST");
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.body);
    let sent = rx
        .recv()
        .await
        .expect("one call")
        .expect("order-service sent a traceparent");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!(parts[1], trace_id, "same trace");
    assert_ne!(
        parts[2], caller_span,
        "order-service's own span is the parent of the call"
    );
    assert_eq!(parts[3], "01", "sampled flag kept");

    // Without an incoming context a new trace is started and still passed on.
    http(Method::POST, &orders.url("/orders"), Some(ORDER), &[])
        .await
        .expect("POST");
    let sent = rx.recv().await.expect("second call").expect("traceparent");
    assert!(!sent.contains(trace_id), "{sent}");
}

#[tokio::test]
async fn both_services_export_linked_spans_to_a_real_collector() {
    let Some(collector) = Rotel::start() else {
        skip("rotel (pip install rotel) is not installed: cannot check exported spans");
        return;
    };
    let otlp = collector.grpc_url();
    let users = user_service(&["--otlp-endpoint", &otlp]);
    let orders = order_service(&users.url(""), &["--otlp-endpoint", &otlp]);
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let traceparent = format!("00-{trace_id}-10f067aa0ba902b7-01");
    let resp = http(
        Method::POST,
        &orders.url("/orders"),
        Some(ORDER),
        &[("traceparent", &traceparent)],
    )
    .await
    .expect("POST");
    assert_eq!(resp.status, StatusCode::CREATED);

    // The batch processor exports within its schedule delay (5 s by default).
    let spans = eventually(
        "three spans of the trace at the collector",
        Duration::from_secs(15),
        || {
            let spans: Vec<_> = collector
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            std::future::ready((spans.len() >= 3).then_some(spans))
        },
    )
    .await;
    let find = |service: &str, kind: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} span from {service} in {spans:#?}"))
    };
    let order_server = find("order-service", "SPAN_KIND_SERVER");
    let order_client = find("order-service", "SPAN_KIND_CLIENT");
    let user_server = find("user-service", "SPAN_KIND_SERVER");
    assert_eq!(order_server.name, "POST /orders");
    assert_eq!(
        order_server.parent_id, "10f067aa0ba902b7",
        "continues the caller's trace"
    );
    assert_eq!(
        order_server.attribute("http.response.status_code"),
        Some("201")
    );
    assert_eq!(order_client.parent_id, order_server.span_id);
    assert_eq!(order_client.name, "demo.users.v1.UserService/GetUser");
    assert_eq!(
        user_server.parent_id, order_client.span_id,
        "linked across processes"
    );
    assert_eq!(user_server.name, "demo.users.v1.UserService/GetUser");
}
