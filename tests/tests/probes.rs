//! The application probes `sidemesh inject` points at the proxy's admin port, made by the real
//! proxy against real servers: HTTP with the probe's headers, HTTPS with a certificate nobody
//! checks (as the kubelet does not), TCP, and gRPC health (`grpc.health.v1`, served by
//! tonic-health). And the proxy's own ending: `POST /shutdown` from inside the pod, and
//! SIGTERM with idle connections open, both exit at once with code 0 (a Job can complete).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sidemesh_tests::{Proc, http};
use tokio::net::TcpListener;

const MESH: &str =
    "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: app\n    ports: [{port: 8080}]\n";

/// Headers of the requests an HTTP(S) app received.
type Seen = Arc<Mutex<Vec<http::HeaderMap>>>;

/// An app answering 200 (`/fail`: 500), over TLS when `tls` (a self-signed certificate).
async fn app(tls: bool) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let acceptor = tls.then(|| {
        let cert = rcgen::generate_simple_self_signed(vec!["app.internal".into()]).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("config");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (log, acceptor) = (log.clone(), acceptor.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        log.lock().expect("lock").push(req.headers().clone());
                        let status = if req.uri().path() == "/fail" {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::OK
                        };
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A gRPC health service: "" SERVING, "db" NOT_SERVING.
async fn grpc_health() -> SocketAddr {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("db", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _keep = reporter;
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    addr
}

fn proxy(dir: &std::path::Path, probes: &str, extra: &[&str]) -> Proc {
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, MESH).expect("write");
    let mut args = vec![
        "--config",
        config.to_str().expect("utf-8"),
        "--service",
        "app",
        "--outbound",
        "127.0.0.1:0",
        "--app-probes",
        probes,
    ];
    if !extra.contains(&"--admin") {
        args.extend(["--admin", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Proc::start_until("sidemesh-proxy", &args, "ready")
}

#[tokio::test(flavor = "multi_thread")]
async fn http_https_tcp_and_grpc_probes_ask_the_app_as_the_kubelet_would() {
    let (plain, plain_seen) = app(false).await;
    let (tls, tls_seen) = app(true).await;
    let grpc = grpc_health().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let probes = serde_json::json!({
        "/app-health/web/readyz": {"port": plain.port(), "path": "/ready", "headers": [{"name": "X-Probe", "value": "kubelet"}]},
        "/app-health/web/livez": {"port": plain.port(), "path": "/fail"},
        "/app-health/tls/readyz": {"port": tls.port(), "path": "/", "kind": "https"},
        "/app-health/tcp/readyz": {"port": plain.port(), "kind": "tcp"},
        "/app-health/tcp/livez": {"port": closed.port(), "kind": "tcp"},
        "/app-health/rpc/readyz": {"port": grpc.port(), "kind": "grpc"},
        "/app-health/rpc/livez": {"port": grpc.port(), "kind": "grpc", "service": "db"},
        "/app-health/rpc/startupz": {"port": grpc.port(), "kind": "grpc", "service": "unknown"},
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let p = proxy(dir.path(), &probes.to_string(), &[]);
    let admin = p.listener("admin");
    let probe = |path: &str| {
        let url = format!("http://{admin}{path}");
        async move {
            let r = http(Method::GET, &url, None, &[]).await.expect("probe");
            (r.status, r.body)
        }
    };
    assert_eq!(probe("/app-health/web/readyz").await.0, StatusCode::OK);
    assert_eq!(
        plain_seen.lock().expect("lock")[0]["x-probe"],
        "kubelet",
        "the probe's headers are sent"
    );
    assert_eq!(
        probe("/app-health/web/livez").await.0,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the app's answer"
    );
    let (status, body) = probe("/app-health/tls/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(tls_seen.lock().expect("lock").len(), 1, "asked over TLS");
    assert_eq!(probe("/app-health/tcp/readyz").await.0, StatusCode::OK);
    let (status, body) = probe("/app-health/tcp/livez").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "nobody listens: {body}"
    );
    assert!(body.contains("refused"), "{body}");
    let (status, body) = probe("/app-health/rpc/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "application is SERVING\n")
    );
    let (status, body) = probe("/app-health/rpc/livez").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("NotServing"), "{body}");
    let (status, body) = probe("/app-health/rpc/startupz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("health check failed"), "{body}");
}

/// A non-loopback address of this machine, if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread")]
async fn post_shutdown_from_the_pod_stops_the_proxy_and_others_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = proxy(
        dir.path(),
        "{}",
        &["--admin", "0.0.0.0:0", "--drain", "30s"],
    );
    let port = p.listener("admin").port();
    let local = format!("http://127.0.0.1:{port}/shutdown");
    let get = http(Method::GET, &local, None, &[]).await.expect("answer");
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    match outside_address() {
        Some(ip) => {
            let from_outside = http(
                Method::POST,
                &format!("http://{ip}:{port}/shutdown"),
                None,
                &[],
            )
            .await
            .expect("answer");
            assert_eq!(
                from_outside.status,
                StatusCode::FORBIDDEN,
                "{}",
                from_outside.body
            );
        }
        None => {
            sidemesh_tests::skip("no non-loopback address to try /shutdown from outside the pod")
        }
    }
    let ok = http(Method::POST, &local, None, &[]).await.expect("answer");
    assert_eq!(ok.status, StatusCode::OK);
    // Nothing in flight: it does not wait out the 30 s drain.
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "a job's pod can complete");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_idle_connections_exits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (plain, _) = app(false).await;
    let mut p = proxy(
        dir.path(),
        "{}",
        &[
            "--drain",
            "30s",
            "--app",
            &plain.to_string(),
            "--inbound",
            "127.0.0.1:0",
        ],
    );
    // Idle keep-alive connections to the admin port (a scraper's) and to the inbound
    // listener (a client's) stay open.
    let admin = p.listener("admin");
    let inbound = p.listener("inbound");
    let mut idle = Vec::new();
    for addr in [admin, inbound] {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::get("/live")
            .header("host", "app")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("answer");
        assert!(resp.status().is_success(), "{}", resp.status());
        idle.push(sender);
    }
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}
