//! The proxies' API of the control plane is TLS: its certificate chains to the mesh's trust
//! bundle and names the control plane; proxies pin that bundle and refuse anything else
//! (another CA, an expired certificate, the wrong name, plaintext); plaintext needs an
//! explicit flag on both sides. A real TLS client (`openssl s_client`) checks the certificate
//! the way any client would.

use std::time::Duration;

use http::{Method, StatusCode};
use sidemesh_tests::mesh::Mesh;
use sidemesh_tests::pki::{TestCa, s_client};
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, bin, http};

const YAML: &str = "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: user-service\n    namespace: demo\n    ports: [{port: 8081}]\n";

/// A user-service proxy for `cp` with `bundle`, started as far as its listeners.
fn proxy(grpc: &str, token: &str, bundle: &str, app: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--control-plane",
        grpc,
        "--join-token-file",
        token,
        "--service",
        "user-service.demo",
        "--app",
        app,
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    if !bundle.is_empty() {
        args.extend(["--trust-bundle", bundle]);
    }
    args.extend_from_slice(extra);
    Proc::start_until(
        "sidemesh-proxy",
        &args,
        "waiting for a workload certificate from the control plane",
    )
}

async fn ready(proxy: &Proc) -> (StatusCode, String) {
    let admin = proxy.listener("admin");
    let r = http(Method::GET, &format!("http://{admin}/ready"), None, &[])
        .await
        .expect("ready");
    (r.status, r.body)
}

/// Waits until `proc` has logged a line containing every one of `parts`; returns the line.
async fn logged(proc: &Proc, parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = proc.logs();
        if let Some(line) = logs.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not log {parts:?} within 10s; its logs:\n{}",
            proc.name,
            logs.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn proxies_connected(mesh_admin: std::net::SocketAddr) -> usize {
    let status = http(
        Method::GET,
        &format!("http://{mesh_admin}/status"),
        None,
        &[],
    )
    .await
    .expect("status")
    .json();
    status["proxies"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxies_api_is_tls_and_only_the_mesh_bundle_is_trusted() {
    let mesh = Mesh::start(YAML, &[]);
    let app = EchoServer::start("users").await;
    let (grpc, token) = (mesh.grpc(), mesh.path("cp/join-token"));
    let token = token.to_str().expect("utf-8");
    let bundle = mesh.trust_bundle();
    let bundle = bundle.to_str().expect("utf-8");
    let addr = mesh.cp.listener("grpc");

    // Any TLS client can check the control plane's certificate against the bundle, for the
    // loopback name; the API speaks HTTP/2 (ALPN h2).
    let seen = s_client(
        addr,
        None,
        "h2",
        &[
            "-CAfile",
            bundle,
            "-verify_return_error",
            "-verify_hostname",
            "localhost",
        ],
        b"",
    );
    assert!(
        seen.stderr.contains("verify return:1") && !seen.stderr.contains("verify error"),
        "the certificate chains to the bundle and names localhost:\n{}",
        seen.text()
    );
    let seen = s_client(
        addr,
        None,
        "h2",
        &[
            "-CAfile",
            bundle,
            "-verify_return_error",
            "-verify_hostname",
            "evil.example",
        ],
        b"",
    );
    assert!(
        seen.stderr.contains("verify error") && seen.stderr.contains("hostname mismatch"),
        "a name the certificate does not carry fails verification:\n{}",
        seen.text()
    );

    // The control: the right bundle gets a certificate and the config.
    let good = proxy(&grpc, token, bundle, &app.addr.to_string(), &[]);
    logged(&good, &["ready"]).await;
    logged(&good, &["connected to the control plane", "\"tls\":true"]).await;

    // A bundle of another CA: the proxy refuses the control plane's certificate, sends it
    // an `unknown ca` alert, and never sends its credential.
    let dir = tempfile::tempdir().expect("tempdir");
    let foreign = dir.path().join("foreign.pem");
    std::fs::write(&foreign, TestCa::root("not the mesh").pem).expect("write");
    let refused = proxy(
        &grpc,
        token,
        foreign.to_str().expect("utf-8"),
        &app.addr.to_string(),
        &[],
    );
    logged(
        &refused,
        &[
            "cannot get a workload certificate",
            "invalid peer certificate",
            "UnknownIssuer",
        ],
    )
    .await;
    logged(&mesh.cp, &["TLS handshake failed", "UnknownCA"]).await;
    let (status, body) = ready(&refused).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("no workload certificate"), "{body}");
    let admin = mesh.cp.listener("admin");
    assert_eq!(
        proxies_connected(admin).await,
        1,
        "only the good proxy registered"
    );
    let metrics = http(Method::GET, &format!("http://{admin}/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    assert!(
        metrics.contains("sidemesh_cp_certificates_issued_total 1")
            && metrics.contains("sidemesh_cp_certificates_refused_total 0"),
        "the refused proxy's request never reached the CA:\n{metrics}"
    );

    // A proxy that speaks plaintext to the TLS port gets nowhere either.
    let plaintext_url = grpc.replace("https://", "http://");
    let plain = proxy(
        &plaintext_url,
        token,
        "",
        &app.addr.to_string(),
        &["--insecure-plaintext"],
    );
    logged(&plain, &["cannot get a workload certificate"]).await;
    logged(&mesh.cp, &["TLS handshake failed"]).await;
    assert_eq!(ready(&plain).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_is_refused_unless_asked_for_on_both_sides() {
    // Without the flag a proxy will not even start against an http:// control plane, and
    // says why.
    let out = std::process::Command::new(bin("sidemesh-proxy"))
        .args([
            "--control-plane",
            "http://127.0.0.1:15010",
            "--service",
            "user-service",
            "--join-token-file",
            "/nonexistent",
        ])
        .output()
        .expect("run sidemesh-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is plaintext") && stderr.contains("--insecure-plaintext"),
        "{stderr}"
    );
    // https:// needs a bundle.
    let out = std::process::Command::new(bin("sidemesh-proxy"))
        .args([
            "--control-plane",
            "https://127.0.0.1:15010",
            "--service",
            "user-service",
            "--join-token-file",
            "/nonexistent",
        ])
        .output()
        .expect("run sidemesh-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no trust bundle"), "{stderr}");

    // With the flag on both, it works, and both say loudly that it is plaintext.
    let mesh = Mesh::start(YAML, &["--insecure-plaintext"]);
    logged(&mesh.cp, &["WITHOUT TLS"]).await;
    let app = EchoServer::start("users").await;
    let url = format!("http://{}", mesh.cp.listener("grpc"));
    let token = mesh.path("cp/join-token");
    let p = proxy(
        &url,
        token.to_str().expect("utf-8"),
        "",
        &app.addr.to_string(),
        &["--insecure-plaintext"],
    );
    logged(&p, &["ready"]).await;
    logged(&p, &["PLAINTEXT connection to the control plane"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_or_misnamed_certificates_are_refused_and_a_rotated_one_is_used() {
    // The operator's own CA and serving certificate files (as cert-manager would keep them).
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::root("operator root");
    ca.write_ca_dir(&dir.path().join("ca"));
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, &ca.pem).expect("write");
    let (cert, key) = ca.server(
        dir.path(),
        "serving",
        &["localhost", "127.0.0.1"],
        -7200,
        -3600,
    );
    let mesh = Mesh::start(
        YAML,
        &[
            "--ca-dir",
            dir.path().join("ca").to_str().expect("utf-8"),
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ],
    );
    let app = EchoServer::start("users").await;
    let token = mesh.path("cp/join-token");
    let p = proxy(
        &mesh.grpc(),
        token.to_str().expect("utf-8"),
        bundle.to_str().expect("utf-8"),
        &app.addr.to_string(),
        &[],
    );
    logged(
        &p,
        &[
            "cannot get a workload certificate",
            "invalid peer certificate: certificate expired",
        ],
    )
    .await;
    logged(&mesh.cp, &["TLS handshake failed", "CertificateExpired"]).await;
    assert_eq!(ready(&p).await.0, StatusCode::SERVICE_UNAVAILABLE);

    // The files are replaced by a valid certificate for another name: still refused.
    let (next, next_key) = ca.server(dir.path(), "next", &["wrong.example"], -60, 3600);
    std::fs::rename(&next_key, &key).expect("rotate key");
    std::fs::rename(&next, &cert).expect("rotate cert");
    logged(
        &p,
        &["invalid peer certificate: certificate not valid for name"],
    )
    .await;
    assert_eq!(ready(&p).await.0, StatusCode::SERVICE_UNAVAILABLE);

    // And then by a valid one for the name: taken up without a restart, and the proxy gets in.
    let (good, good_key) = ca.server(dir.path(), "good", &["localhost", "127.0.0.1"], -60, 3600);
    std::fs::rename(&good_key, &key).expect("rotate key");
    std::fs::rename(&good, &cert).expect("rotate cert");
    logged(&mesh.cp, &["serving certificate renewed"]).await;
    logged(&p, &["ready"]).await;
    assert_eq!(ready(&p).await.0, StatusCode::OK);
}
