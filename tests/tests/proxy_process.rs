//! The real `sidemesh-proxy` binary: start-up errors and graceful shutdown on SIGTERM.

use std::process::Command;
use std::time::Duration;

use http::{Method, StatusCode};
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, bin, http};

fn config(echo: std::net::SocketAddr) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: echo\n    ports: [{{port: 80}}]\n    endpoints: [\"{echo}\"]\n"
    );
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write");
    dir
}

fn start(dir: &tempfile::TempDir) -> Proc {
    let path = dir.path().join("mesh.yaml");
    let path = path.to_str().expect("utf-8 path");
    Proc::start_until(
        "sidemesh-proxy",
        &[
            "--config",
            path,
            "--service",
            "client",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            "echo=127.0.0.1:0",
        ],
        "ready",
    )
}

#[tokio::test]
async fn requests_in_flight_at_sigterm_complete() {
    let echo = EchoServer::start("echo").await;
    let dir = config(echo.addr);
    let mut proxy = start(&dir);
    let upstream = proxy.listener("upstream:echo");
    let admin = proxy.listener("admin");

    let slow = tokio::spawn(async move {
        http(
            Method::GET,
            &format!("http://{upstream}/slow/800"),
            None,
            &[],
        )
        .await
    });
    // Wait until the request is at the echo server, then ask the proxy to stop.
    sidemesh_tests::eventually(
        "the slow request to reach the server",
        Duration::from_secs(5),
        || std::future::ready((echo.hits() > 0).then_some(())),
    )
    .await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = http(Method::GET, &format!("http://{admin}/ready"), None, &[]).await;
    assert!(
        ready.is_err() || ready.is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE),
        "a draining proxy is not ready"
    );

    let resp = slow
        .await
        .expect("join")
        .expect("the request in flight completes");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body, "slow 800ms");
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status {status}");
    let logs = proxy.logs().join("\n");
    assert!(logs.contains("drained"), "{logs}");
    assert!(
        tokio::net::TcpStream::connect(upstream).await.is_err(),
        "the listener is closed after shutdown"
    );
}

/// Starts the proxy for `client` with `config`, expects exit code 1, returns its stderr.
fn refused_start(config: &std::path::Path) -> String {
    let out = Command::new(bin("sidemesh-proxy"))
        .args([
            "--config",
            config.to_str().expect("path"),
            "--service",
            "client",
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_config_stops_start_up_with_its_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{port: 0}]\n").expect("write");
    let stderr = refused_start(&path);
    assert!(
        stderr.contains(
            "mesh.yaml:5:20: services[0].ports[0].port: must be between 1 and 65535, got 0"
        ),
        "{stderr}"
    );

    std::fs::write(&path, "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: other\n    ports: [{port: 80}]\n").expect("write");
    let stderr = refused_start(&path);
    assert!(stderr.contains("service `client` is not in the mesh config; `--service` must name one of: other.default"), "{stderr}");
}
