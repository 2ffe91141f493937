//! Mutual TLS with the real binaries: the control plane's CA issues certificates, proxies talk
//! TLS 1.3 to each other, and foreign clients (`openssl s_client`) with no, foreign, expired or
//! impostor certificates are refused. Authorization, trust bundles with two roots, and
//! certificate rotation under steady traffic.

use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use rcgen::{Issuer, KeyPair};
use sidemesh_tests::Proc;
use sidemesh_tests::http;
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::pki::{SClient, TestCa};
use sidemesh_tests::servers::EchoServer;

const ORDER_ID: &str = "spiffe://cluster.local/ns/demo/sa/order-service";

fn yaml(extra_services: &str) -> String {
    format!(
        "apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  trustDomain: cluster.local
  mtls: strict
services:
  - name: user-service
    namespace: demo
    ports: [{{port: 8081}}]
    inbound:
      authorization:
        allow: [{ORDER_ID}]
  - name: order-service
    namespace: demo
    ports: [{{port: 8082}}]
  - name: stranger
    namespace: demo
  - name: payments
    namespace: demo
    ports: [{{port: 8083}}]
{extra_services}"
    )
}

async fn call(proxy: &Proc, service: &str, path: &str) -> sidemesh_tests::Response {
    let addr = proxy.listener(&format!("upstream:{service}"));
    http(Method::GET, &format!("http://{addr}{path}"), None, &[])
        .await
        .expect("request through the caller's proxy")
}

async fn metrics(proxy: &Proc) -> String {
    let admin = proxy.listener("admin");
    http(Method::GET, &format!("http://{admin}/metrics"), None, &[])
        .await
        .expect("metrics")
        .body
}

/// The value of the first metric line that starts with `prefix`, or 0.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

const REQUEST: &[u8] = b"GET /headers HTTP/1.1\r\nhost: user-service\r\nconnection: close\r\n\r\n";

/// One request from `openssl s_client` to `addr`, waiting until the proxy ends the connection.
fn s_client(addr: std::net::SocketAddr, cert: Option<(&Path, &Path)>, alpn: &str) -> SClient {
    sidemesh_tests::pki::s_client(addr, cert, alpn, &[], REQUEST)
}

/// The proxy refused the handshake with `alert`, and nothing was answered.
fn assert_alert(seen: &SClient, alert: &str, why: &str) {
    assert!(
        seen.closed_by_server,
        "{why}: the proxy must end the connection:\n{}",
        seen.text()
    );
    assert_eq!(
        seen.alert().as_deref(),
        Some(alert),
        "{why}:\n{}",
        seen.text()
    );
    assert!(
        !seen.stdout.contains("HTTP/1.1"),
        "{why}: nothing answered:\n{}",
        seen.text()
    );
}

/// The handshake succeeded, then the proxy closed the connection without answering.
fn assert_closed_unanswered(seen: &SClient, why: &str) {
    assert!(
        seen.closed_by_server,
        "{why}: the proxy must close the connection:\n{}",
        seen.text()
    );
    assert_eq!(
        seen.alert(),
        None,
        "{why}: no handshake alert:\n{}",
        seen.text()
    );
    assert!(
        seen.stdout.is_empty(),
        "{why}: no bytes come back:\n{}",
        seen.text()
    );
}

/// The control plane's own generated CA, read back from its data folder (as an operator
/// with access to it could).
fn generated_ca(mesh: &Mesh) -> TestCa {
    let pem = std::fs::read_to_string(mesh.path("cp/ca/ca.crt")).expect("ca.crt");
    let key =
        KeyPair::from_pem(&std::fs::read_to_string(mesh.path("cp/ca/ca.key")).expect("ca.key"))
            .expect("key");
    TestCa {
        issuer: Issuer::from_ca_cert_pem(&pem, key).expect("parse ca"),
        pem,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_talk_mutual_tls_and_plaintext_is_refused_in_strict_mode() {
    let mesh = Mesh::start(&yaml(""), &[]);
    let users = EchoServer::start("users").await;
    let user_proxy = mesh.proxy("user-service", Some(users.addr), &[], &[]);
    let order_proxy = mesh.proxy("order-service", None, &["user-service"], &[]);
    mesh.wait_meshed(&order_proxy, "user-service", &user_proxy)
        .await;

    let resp = call(&order_proxy, "user-service", "/headers").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);
    let seen = resp.json();
    assert_eq!(
        seen["headers"]["x-sidemesh-client-id"], ORDER_ID,
        "the app learns the caller's identity: {seen}"
    );
    let m = metrics(&user_proxy).await;
    assert!(
        metric(
            &m,
            "sidemesh_connections_total{direction=\"inbound\",protocol=\"http1\",tls=\"mtls\"}"
        ) >= 1.0,
        "the inbound connection was mutual TLS:\n{m}"
    );
    assert!(
        m.contains(&format!(
            "sidemesh_inbound_requests_by_client_total{{client_id=\"{ORDER_ID}\"}}"
        )),
        "{m}"
    );

    // The identity header cannot be forged from outside: a caller's own value is replaced.
    let addr = order_proxy.listener("upstream:user-service");
    let forged = http(
        Method::GET,
        &format!("http://{addr}/headers"),
        None,
        &[(
            "x-sidemesh-client-id",
            "spiffe://cluster.local/ns/demo/sa/admin",
        )],
    )
    .await
    .expect("request");
    assert_eq!(forged.json()["headers"]["x-sidemesh-client-id"], ORDER_ID);

    // Plaintext straight to the inbound port: refused, and an HTTP/1 client is told why.
    let inbound = user_proxy.listener("inbound");
    let refused = http(Method::GET, &format!("http://{inbound}/headers"), None, &[])
        .await
        .expect("an answer");
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.header("x-sidemesh-error"), Some("mtls-required"));
    assert_eq!(users.hits(), 2, "the refused request never reached the app");
    let m = metrics(&user_proxy).await;
    assert!(
        metric(
            &m,
            "sidemesh_refused_connections_total{reason=\"plaintext\"}"
        ) >= 1.0,
        "{m}"
    );

    // The proxies' certificates and expiry are visible; the key is not.
    let dump = user_proxy.config_dump().await.expect("dump");
    let identity = &dump["identity"];
    assert_eq!(
        identity["identity"],
        "spiffe://cluster.local/ns/demo/sa/user-service"
    );
    assert!(
        identity["not_after_unix"].as_u64().unwrap_or(0) > 0,
        "{identity}"
    );
    assert!(
        !dump.to_string().contains("PRIVATE KEY"),
        "no key in the dump"
    );
    assert!(
        metric(&m, "sidemesh_identity_cert_expiry_timestamp_seconds") > 1.7e9,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_tls_clients_without_a_valid_certificate_are_refused() {
    let mesh = Mesh::start(&yaml(""), &[]);
    let users = EchoServer::start("users").await;
    let user_proxy = mesh.proxy("user-service", Some(users.addr), &[], &[]);
    let inbound = user_proxy.listener("inbound");
    let dir = mesh.path("certs");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let ca = generated_ca(&mesh);

    // The control: a certificate from the mesh CA for an allowed identity is accepted, so the
    // refusals below are about the certificates.
    let good = ca.leaf(&dir, "good", ORDER_ID, -60, 3600);
    let seen = s_client(inbound, Some((&good.0, &good.1)), "http/1.1,sidemesh");
    assert!(
        seen.stdout.contains("HTTP/1.1 200"),
        "a valid mesh certificate is accepted:\n{}",
        seen.text()
    );
    assert!(
        seen.stdout.contains(ORDER_ID),
        "the app saw the identity:\n{}",
        seen.text()
    );
    assert!(seen.closed_by_server, "`connection: close` is honoured");
    assert_eq!(users.hits(), 1);

    let seen = s_client(inbound, None, "http/1.1,sidemesh");
    assert_alert(&seen, "certificate required", "no client certificate");
    // An ordinary TLS client (no mesh ALPN) is cut off before the handshake completes.
    let seen = s_client(inbound, None, "");
    assert_closed_unanswered(&seen, "an ordinary TLS client in strict mode");
    assert!(seen.stderr.contains("unexpected eof"), "{}", seen.text());

    // A meshed workload the policy does not allow gets no further with opaque bytes (which
    // skip the HTTP handler) than with HTTP; and raw bytes never reach an HTTP port.
    let stranger = ca.leaf(
        &dir,
        "stranger",
        "spiffe://cluster.local/ns/demo/sa/stranger",
        -60,
        3600,
    );
    let seen = s_client(inbound, Some((&stranger.0, &stranger.1)), "sidemesh");
    assert_closed_unanswered(&seen, "a denied identity cannot tunnel opaque bytes");
    let seen = s_client(inbound, Some((&good.0, &good.1)), "sidemesh");
    assert_closed_unanswered(
        &seen,
        "opaque bytes are not spliced to an HTTP port, even for an allowed peer",
    );
    let seen = s_client(
        inbound,
        Some((&stranger.0, &stranger.1)),
        "http/1.1,sidemesh",
    );
    assert!(
        seen.stdout.starts_with("HTTP/1.1 403")
            && seen.stdout.contains("x-sidemesh-error: forbidden"),
        "a denied identity gets the proxy's 403 over HTTP:\n{}",
        seen.text()
    );

    let other = TestCa::root("some other CA");
    let foreign = other.leaf(&dir, "foreign", ORDER_ID, -60, 3600);
    let seen = s_client(inbound, Some((&foreign.0, &foreign.1)), "http/1.1,sidemesh");
    assert_alert(&seen, "unknown ca", "a certificate from another CA");

    let expired = ca.leaf(&dir, "expired", ORDER_ID, -7200, -3600);
    let seen = s_client(inbound, Some((&expired.0, &expired.1)), "http/1.1,sidemesh");
    assert_alert(&seen, "certificate expired", "an expired certificate");

    let m = metrics(&user_proxy).await;
    assert!(
        metric(
            &m,
            "sidemesh_refused_connections_total{reason=\"tls-handshake\"}"
        ) >= 3.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "sidemesh_refused_connections_total{reason=\"not-mesh-tls\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "sidemesh_refused_connections_total{reason=\"forbidden\"}"
        ) >= 2.0,
        "{m}"
    );
    assert_eq!(users.hits(), 1, "only the valid client reached the app");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_presenting_the_wrong_spiffe_id_is_refused_by_the_caller() {
    let mesh = Mesh::start(&yaml(""), &[]);
    let app = EchoServer::start("impostor").await;
    // Registers as `payments` but runs as another service account: its certificate is real
    // (the CA signed it) but names the wrong workload.
    let impostor = mesh.proxy(
        "payments",
        Some(app.addr),
        &[],
        &["--service-account", "impostor"],
    );
    let order_proxy = mesh.proxy("order-service", None, &["payments"], &[]);
    mesh.wait_meshed(&order_proxy, "payments", &impostor).await;

    let resp = call(&order_proxy, "payments", "/").await;
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{}", resp.body);
    assert_eq!(
        resp.header("x-sidemesh-error"),
        Some("upstream-tls-failure")
    );
    assert!(
        resp.body
            .contains("spiffe://cluster.local/ns/demo/sa/impostor")
            && resp
                .body
                .contains("expected spiffe://cluster.local/ns/demo/sa/payments"),
        "the error names both identities: {}",
        resp.body
    );
    assert_eq!(app.hits(), 0, "nothing reached the impostor's app");
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_allows_order_service_and_forbids_other_workloads() {
    let mesh = Mesh::start(&yaml(""), &[]);
    let users = EchoServer::start("users").await;
    let user_proxy = mesh.proxy("user-service", Some(users.addr), &[], &[]);
    let order_proxy = mesh.proxy("order-service", None, &["user-service"], &[]);
    let stranger = mesh.proxy("stranger", None, &["user-service"], &[]);
    mesh.wait_meshed(&order_proxy, "user-service", &user_proxy)
        .await;
    mesh.wait_meshed(&stranger, "user-service", &user_proxy)
        .await;

    let ok = call(&order_proxy, "user-service", "/").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);

    let denied = call(&stranger, "user-service", "/").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "{}", denied.body);
    assert_eq!(denied.header("x-sidemesh-error"), Some("forbidden"));
    assert_eq!(denied.header("server"), Some("sidemesh"));
    assert!(
        denied.body.contains(
            "spiffe://cluster.local/ns/demo/sa/stranger is not allowed to call user-service.demo"
        ),
        "the 403 says who was refused: {}",
        denied.body
    );
    assert_eq!(users.hits(), 1, "the denied request never reached the app");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trust_bundle_with_two_roots_is_accepted_during_a_root_rotation() {
    // The old root, the new root, and an intermediate of the new root that signs workloads.
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (TestCa::root("old root"), TestCa::root("new root"));
    let signing = TestCa::intermediate("new intermediate", &new);
    let ca_dir = dir.path().join("mounted-ca");
    std::fs::create_dir_all(&ca_dir).expect("mkdir");
    std::fs::write(ca_dir.join("ca.crt"), &signing.pem).expect("ca.crt");
    std::fs::write(ca_dir.join("ca.key"), signing.key_pem()).expect("ca.key");
    std::fs::write(ca_dir.join("roots.crt"), format!("{}{}", old.pem, new.pem)).expect("roots");
    std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
    std::fs::write(dir.path().join("config/mesh.yaml"), yaml("")).expect("yaml");
    let mesh = Mesh::start_in(dir, &["--ca-dir", ca_dir.to_str().expect("utf-8")]);

    // Proxies certified by the new intermediate talk to each other...
    let users = EchoServer::start("users").await;
    let user_proxy = mesh.proxy("user-service", Some(users.addr), &[], &[]);
    let order_proxy = mesh.proxy("order-service", None, &["user-service"], &[]);
    mesh.wait_meshed(&order_proxy, "user-service", &user_proxy)
        .await;
    let resp = call(&order_proxy, "user-service", "/headers").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.body);

    // ...and a workload still holding a certificate from the old root is accepted too,
    let certs = mesh.path("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let inbound = user_proxy.listener("inbound");
    let from_old = old.leaf(&certs, "old", ORDER_ID, -60, 3600);
    let seen = s_client(
        inbound,
        Some((&from_old.0, &from_old.1)),
        "http/1.1,sidemesh",
    );
    assert!(
        seen.stdout.contains("HTTP/1.1 200"),
        "a certificate from the old root is trusted during the rotation:\n{}",
        seen.text()
    );
    // while a root outside the bundle is not.
    let outsider = TestCa::root("outsider").leaf(&certs, "outsider", ORDER_ID, -60, 3600);
    let seen = s_client(
        inbound,
        Some((&outsider.0, &outsider.1)),
        "http/1.1,sidemesh",
    );
    assert_alert(&seen, "unknown ca", "a root outside the bundle");
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_under_steady_traffic_without_a_failed_request() {
    let mesh = Mesh::start(&yaml(""), &["--cert-lifetime", "10s"]);
    let users = EchoServer::start("users").await;
    let user_proxy = mesh.proxy("user-service", Some(users.addr), &[], &[]);
    // No pooled upstream connections: every request makes a new mTLS handshake, so each
    // renewed certificate is used and checked.
    let order_proxy = mesh.proxy(
        "order-service",
        None,
        &["user-service"],
        &["--max-idle-per-endpoint", "0"],
    );
    mesh.wait_meshed(&order_proxy, "user-service", &user_proxy)
        .await;

    let started = SystemTime::now();
    let (mut sent, mut failed) = (0u32, Vec::new());
    while started.elapsed().unwrap_or_default() < Duration::from_secs(60) {
        let resp = call(&order_proxy, "user-service", "/").await;
        sent += 1;
        if resp.status != StatusCode::OK {
            failed.push(format!("{} {}", resp.status, resp.body));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(sent > 500, "steady traffic: {sent} requests");
    for proxy in [&user_proxy, &order_proxy] {
        let m = metrics(proxy).await;
        let renewed = metric(&m, "sidemesh_identity_renewals_total{result=\"renewed\"}");
        assert!(
            renewed >= 5.0,
            "at least 5 renewals in 60 s with a 10 s lifetime, got {renewed}:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn permissive_mode_accepts_both_and_metrics_tell_them_apart() {
    let mesh = Mesh::start(&yaml("").replace("mtls: strict", "mtls: permissive"), &[]);
    let app = EchoServer::start("payments").await;
    let payments = mesh.proxy("payments", Some(app.addr), &[], &[]);
    let order_proxy = mesh.proxy("order-service", None, &["payments"], &[]);
    mesh.wait_meshed(&order_proxy, "payments", &payments).await;

    let meshed = call(&order_proxy, "payments", "/headers").await;
    assert_eq!(meshed.status, StatusCode::OK, "{}", meshed.body);
    assert_eq!(meshed.json()["headers"]["x-sidemesh-client-id"], ORDER_ID);

    // A workload outside the mesh, in plaintext: accepted, and without an identity.
    let inbound = payments.listener("inbound");
    let plain = http(
        Method::GET,
        &format!("http://{inbound}/headers"),
        None,
        &[(
            "x-sidemesh-client-id",
            "spiffe://cluster.local/ns/demo/sa/forged",
        )],
    )
    .await
    .expect("request");
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.body);
    assert!(
        plain.json()["headers"]
            .get("x-sidemesh-client-id")
            .is_none(),
        "a plaintext caller has no identity, and a forged one is removed: {}",
        plain.body
    );

    // A request after an empty line is HTTP (RFC 9112 section 2.2), served by the HTTP
    // handler like any other: the forged identity is removed there too.
    let mut raw = tokio::net::TcpStream::connect(inbound)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut raw,
        b"\r\nGET /headers HTTP/1.1\r\nhost: x\r\nx-sidemesh-client-id: spiffe://cluster.local/ns/demo/sa/order-service\r\n\r\n",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.contains("order-service"),
        "a smuggled identity header never reaches the app: {answer}"
    );

    let m = metrics(&payments).await;
    assert!(
        metric(
            &m,
            "sidemesh_connections_total{direction=\"inbound\",protocol=\"http1\",tls=\"mtls\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "sidemesh_connections_total{direction=\"inbound\",protocol=\"http1\",tls=\"plaintext\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        m.contains("sidemesh_inbound_requests_by_client_total{client_id=\"unauthenticated\"} 2"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelet_probes_reach_the_app_through_the_admin_port_in_strict_mode() {
    let mesh = Mesh::start(&yaml(""), &[]);
    let users = EchoServer::start("users").await;
    let port = users.addr.port();
    let probes = format!(
        r#"{{"/app-health/users/readyz": {{"port": {port}, "path": "/status/200"}}, "/app-health/users/livez": {{"port": {port}, "path": "/status/503"}}}}"#
    );
    let user_proxy = mesh.proxy(
        "user-service",
        Some(users.addr),
        &[],
        &["--app-probes", &probes],
    );
    // The kubelet's plaintext probe to the app's port would be refused in strict mode...
    let inbound = user_proxy.listener("inbound");
    let direct = http(
        Method::GET,
        &format!("http://{inbound}/status/200"),
        None,
        &[],
    )
    .await
    .expect("answer");
    assert_eq!(direct.status, StatusCode::FORBIDDEN);
    // ...so inject points it at the admin port, which asks the app over loopback.
    let admin = user_proxy.listener("admin");
    let get = |path: &'static str| {
        let url = format!("http://{admin}{path}");
        async move { http(Method::GET, &url, None, &[]).await.expect("probe") }
    };
    assert_eq!(get("/app-health/users/readyz").await.status, StatusCode::OK);
    assert_eq!(
        get("/app-health/users/livez").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the app's own answer is passed on"
    );
    assert_eq!(
        get("/app-health/other/readyz").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(users.hits(), 2, "the two configured probes reached the app");
}
