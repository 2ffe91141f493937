//! Kubernetes credentials: proxies present projected service-account tokens, and the control
//! plane checks them with the TokenReview API — here a local API server that answers with the
//! recorded TokenReview responses in `tests/fixtures`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, eventually, http};
use tokio::net::TcpListener;

const CP_TOKEN: &str = "control-plane-own-token";
const ORDER_TOKEN: &str = "projected-token-of-order-service";
const AUTHENTICATED: &str = include_str!("../fixtures/tokenreview-authenticated.json");
const EXPIRED: &str = include_str!("../fixtures/tokenreview-expired.json");
const SLICES: &str = include_str!("../fixtures/k8s/endpointslices.json");

/// What `GET .../endpointslices` answers (swapped by a test to change the endpoints).
static SLICES_NOW: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// What the fake API server was asked: (authorization header, request body).
type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

async fn api_server() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move { Ok::<_, Infallible>(answer(req, &log).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Like the API server: 401 without the caller's own valid token, then the recorded review for
/// the token in question.
async fn answer(req: Request<Incoming>, seen: &Seen) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/apis/discovery.k8s.io/v1/endpointslices"
    {
        let authorized = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == format!("Bearer {CP_TOKEN}").as_bytes());
        let body = SLICES_NOW
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| SLICES.to_string());
        let status = if authorized {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        return Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("response");
    }
    let path_ok = req.method() == Method::POST
        && req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews";
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body: serde_json::Value = body
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((auth.clone(), body.clone()));
    let respond = |status: StatusCode, text: &str| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text.to_string())))
            .expect("response")
    };
    if !path_ok {
        return respond(StatusCode::NOT_FOUND, "{}");
    }
    if auth != format!("Bearer {CP_TOKEN}") {
        return respond(StatusCode::UNAUTHORIZED, r#"{"kind":"Status","code":401}"#);
    }
    if body["spec"]["token"] == ORDER_TOKEN {
        respond(StatusCode::CREATED, AUTHENTICATED)
    } else {
        respond(StatusCode::CREATED, EXPIRED)
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_string_lossy().into_owned()
}

/// A proxy for order-service; returns once it logs `until` (all its listeners are up then).
fn proxy(
    mesh: &Mesh,
    service_account: &str,
    token_file: &str,
    app: SocketAddr,
    until: &str,
) -> Proc {
    let (cp, bundle) = (&mesh.cp, mesh.trust_bundle());
    let bundle = bundle.to_str().expect("utf-8");
    Proc::start_until(
        "sidemesh-proxy",
        &[
            "--control-plane",
            &format!("https://{}", cp.listener("grpc")),
            "--trust-bundle",
            bundle,
            "--service",
            "order-service.demo",
            "--service-account",
            service_account,
            "--service-account-token-file",
            token_file,
            "--app",
            &app.to_string(),
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        until,
    )
}

const WAITING: &str = "waiting for a workload certificate from the control plane";

#[tokio::test(flavor = "multi_thread")]
async fn service_account_tokens_are_checked_with_the_tokenreview_api() {
    let (api, seen) = api_server().await;
    // Files the test hands to processes (tokens); the control plane's own are in `mesh`.
    let dir = tempfile::tempdir().expect("tempdir");
    let cp_token = write(dir.path(), "cp-token", CP_TOKEN);
    let api_url = format!("http://{api}");
    let mesh = Mesh::start(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: order-service\n    namespace: demo\n    ports: [{port: 8082}]\n",
        &[
            "--kubernetes-api",
            &api_url,
            "--kubernetes-token-file",
            &cp_token,
        ],
    );
    let cp = &mesh.cp;
    let app = EchoServer::start("orders").await;

    // The token the API server vouches for, asking for its own service account: certified.
    let good = write(dir.path(), "order-token", ORDER_TOKEN);
    let order = proxy(&mesh, "order-service", &good, app.addr, "ready");
    let dump = eventually(
        "order-service's proxy certified",
        Duration::from_secs(10),
        || async {
            let d = order.config_dump().await?;
            d["identity"]["identity"].is_string().then_some(d)
        },
    )
    .await;
    assert_eq!(
        dump["identity"]["identity"],
        "spiffe://cluster.local/ns/demo/sa/order-service"
    );
    assert_eq!(dump["identity"]["source"], "service-account token");
    let (auth, body) = seen.lock().expect("lock")[0].clone();
    assert_eq!(
        auth,
        format!("Bearer {CP_TOKEN}"),
        "the control plane authenticates with its own token"
    );
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["spec"]["token"], ORDER_TOKEN);
    assert_eq!(body["spec"]["audiences"][0], "sidemesh");

    // The same token cannot buy another service account's identity.
    let thief = proxy(&mesh, "user-service", &good, app.addr, WAITING);
    // An expired token is refused with the API server's reason.
    let expired = write(dir.path(), "expired-token", "an-expired-token");
    let stale = proxy(&mesh, "order-service", &expired, app.addr, WAITING);
    eventually(
        "both refusals logged by the proxies",
        Duration::from_secs(10),
        || async {
            let thief_logs = thief.logs().join("\n");
            let stale_logs = stale.logs().join("\n");
            (thief_logs.contains("the token belongs to demo/order-service, not demo/user-service")
                && stale_logs.contains("service account token has expired"))
            .then_some(())
        },
    )
    .await;
    for refused in [&thief, &stale] {
        let admin = refused.listener("admin");
        let ready = http(Method::GET, &format!("http://{admin}/ready"), None, &[])
            .await
            .expect("ready");
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            ready.body.contains("no workload certificate"),
            "{}",
            ready.body
        );
    }
    let cp_admin = cp.listener("admin");
    let metrics = http(
        Method::GET,
        &format!("http://{cp_admin}/metrics"),
        None,
        &[],
    )
    .await
    .expect("metrics")
    .body;
    assert!(
        metrics.contains("sidemesh_cp_certificates_issued_total 1")
            && !metrics.contains("sidemesh_cp_certificates_refused_total 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_come_from_endpointslices() {
    let (api, _) = api_server().await;
    // Files the test hands to processes (tokens); the control plane's own are in `mesh`.
    let dir = tempfile::tempdir().expect("tempdir");
    let cp_token = write(dir.path(), "cp-token", CP_TOKEN);
    let api_url = format!("http://{api}");
    let mesh = Mesh::start(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: order-service\n    namespace: demo\n    ports: [{port: 8082}]\n  - name: user-service\n    namespace: demo\n    ports: [{port: 8081}]\n",
        &[
            "--kubernetes-api",
            &api_url,
            "--kubernetes-token-file",
            &cp_token,
            "--discovery-interval",
            "200ms",
        ],
    );
    let cp = &mesh.cp;
    let app = EchoServer::start("orders").await;
    let token = write(dir.path(), "order-token", ORDER_TOKEN);
    let bundle = mesh.trust_bundle();
    let bundle = bundle.to_str().expect("utf-8");
    let order = Proc::start_until(
        "sidemesh-proxy",
        &[
            "--control-plane",
            &format!("https://{}", cp.listener("grpc")),
            "--trust-bundle",
            bundle,
            "--service",
            "order-service.demo",
            "--service-account-token-file",
            &token,
            "--app",
            &app.addr.to_string(),
            "--upstream",
            "user-service=127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        "ready",
    );
    let admin = order.listener("admin");
    let endpoints = |want: &'static [&'static str]| {
        let url = format!("http://{admin}/config_dump");
        async move {
            eventually(
                &format!("user-service's endpoints are {want:?}"),
                Duration::from_secs(10),
                || async {
                    let dump = http(Method::GET, &url, None, &[]).await.ok()?.json();
                    let services = dump["config"]["mesh"]["services"].as_array()?.clone();
                    let users = services.iter().find(|s| s["id"] == "user-service.demo")?;
                    let found: Vec<String> = users["endpoints"]
                        .as_array()?
                        .iter()
                        .filter_map(|e| e.as_str().map(String::from))
                        .collect();
                    (found == want).then_some(())
                },
            )
            .await;
        }
    };
    // Ready pods only: the terminating one is left out.
    endpoints(&["10.244.1.7:8081", "10.244.2.9:8081"]).await;
    // A pod goes away: the next listing pushes the change.
    let fewer = SLICES.replace(
        r#"{"addresses": ["10.244.2.9"], "conditions": {"ready": true"#,
        r#"{"addresses": ["10.244.2.9"], "conditions": {"ready": false"#,
    );
    assert_ne!(fewer, SLICES, "the fixture changed");
    *SLICES_NOW.lock().unwrap_or_else(|p| p.into_inner()) = Some(fewer);
    endpoints(&["10.244.1.7:8081"]).await;
}
