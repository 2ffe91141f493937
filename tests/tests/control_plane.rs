//! The control plane with real proxies and real servers: pushes, ACKs, NACKs, refused
//! configs, an outage under load, and a proxy restarting while the control plane is down.

use std::time::Duration;

use http::{Method, StatusCode};
use sidemesh_tests::servers::EchoServer;
use sidemesh_tests::{Proc, bin, eventually, http};

struct Mesh {
    dir: tempfile::TempDir,
}

impl Mesh {
    fn new(yaml: &str) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
        let mesh = Mesh { dir };
        mesh.write(yaml);
        mesh
    }

    /// Replaces the config atomically, as a ConfigMap update does.
    fn write(&self, yaml: &str) {
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("config/mesh.yaml")).expect("rename");
    }

    fn config_dir(&self) -> String {
        self.dir
            .path()
            .join("config")
            .to_string_lossy()
            .into_owned()
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("cp").to_string_lossy().into_owned()
    }

    fn join_token(&self) -> String {
        self.dir
            .path()
            .join("cp/join-token")
            .to_string_lossy()
            .into_owned()
    }

    fn state_dir(&self, proxy: &str) -> String {
        self.dir
            .path()
            .join("state")
            .join(proxy)
            .to_string_lossy()
            .into_owned()
    }

    fn control_plane(&self, grpc: &str, admin: &str) -> Proc {
        Proc::start_until(
            "sidemesh-control-plane",
            &[
                "--config",
                &self.config_dir(),
                "--listen",
                grpc,
                "--admin",
                admin,
                "--poll",
                "50ms",
                "--debounce",
                "50ms",
                "--disconnect-grace",
                "2s",
                "--data-dir",
                &self.data_dir(),
            ],
            "ready",
        )
    }

    fn proxy(&self, cp: &str, id: &str, service: &str, extra: &[&str]) -> Proc {
        let state = self.state_dir(id);
        let token = self.join_token();
        let bundle = format!("{}/trust-bundle.pem", self.data_dir());
        let mut args = vec![
            "--control-plane",
            cp,
            "--service",
            service,
            "--proxy-id",
            id,
            "--state-dir",
            &state,
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--join-token-file",
            &token,
            "--trust-bundle",
            &bundle,
        ];
        args.extend_from_slice(extra);
        Proc::start_until("sidemesh-proxy", &args, "ready")
    }
}

fn yaml(echo_extra: &str, routes: &str, other: std::net::SocketAddr) -> String {
    format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: echo\n    ports: [{{port: 80}}]\n{echo_extra}  - name: other\n    ports: [{{port: 80}}]\n    endpoints: [\"{other}\"]\n{routes}"
    )
}

async fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    http(Method::GET, &format!("http://{admin}/status"), None, &[])
        .await
        .expect("status")
        .json()
}

/// Waits until `n` proxies are connected and have answered everything they were sent.
async fn synced(admin: std::net::SocketAddr, n: usize) -> serde_json::Value {
    eventually(
        &format!("{n} proxies connected and synced"),
        Duration::from_secs(10),
        || async {
            let s = status(admin).await;
            let proxies = s["proxies"].as_array().cloned().unwrap_or_default();
            let ok = proxies
                .iter()
                .filter(|p| p["connected"] == true && p["synced"] == true)
                .count()
                == n;
            ok.then_some(s)
        },
    )
    .await
}

async fn ready(proxy: &Proc) {
    let admin = proxy.listener("admin");
    eventually(
        &format!("{} to have a config", proxy.name),
        Duration::from_secs(10),
        || async {
            let r = http(Method::GET, &format!("http://{admin}/ready"), None, &[])
                .await
                .ok()?;
            (r.status == StatusCode::OK).then_some(())
        },
    )
    .await;
}

async fn bodies(url: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = http(Method::GET, url, None, &[]).await.expect("GET");
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        out.push(r.body);
    }
    out
}

#[tokio::test]
async fn changes_are_pushed_and_followed_and_broken_yaml_is_refused() {
    let (e1, e2, other) = (
        EchoServer::start("e1").await,
        EchoServer::start("e2").await,
        EchoServer::start("other").await,
    );
    let mesh = Mesh::new(&yaml("", "", other.addr));
    let cp = mesh.control_plane("127.0.0.1:0", "127.0.0.1:0");
    let (grpc, admin) = (
        format!("https://{}", cp.listener("grpc")),
        cp.listener("admin"),
    );

    let echo1 = mesh.proxy(
        &grpc,
        "echo-1",
        "echo",
        &["--inbound", "127.0.0.1:0", "--app", &e1.addr.to_string()],
    );
    let echo2 = mesh.proxy(
        &grpc,
        "echo-2",
        "echo",
        &["--inbound", "127.0.0.1:0", "--app", &e2.addr.to_string()],
    );
    let client = mesh.proxy(
        &grpc,
        "client-1",
        "client",
        &["--upstream", "echo=127.0.0.1:0"],
    );
    for p in [&echo1, &echo2, &client] {
        ready(p).await;
    }
    synced(admin, 3).await;
    let url = format!("http://{}/", client.listener("upstream:echo"));
    // Both echo proxies registered as endpoints: calls go through them to both apps.
    let seen = eventually(
        "traffic over both registered endpoints",
        Duration::from_secs(10),
        || async {
            let b = bodies(&url, 20).await;
            (b.iter().any(|x| x == "e1") && b.iter().any(|x| x == "e2")).then_some(b)
        },
    )
    .await;
    assert!(seen.iter().all(|b| b == "e1" || b == "e2"), "{seen:?}");

    // A new route: every proxy ACKs the new version and traffic follows it.
    let before = status(admin).await["config"]["version"]
        .as_u64()
        .expect("version");
    mesh.write(&yaml(
        "",
        "routes:\n  - name: to-other\n    service: echo\n    backends: [{service: other}]\n",
        other.addr,
    ));
    let s = eventually(
        "the new config version",
        Duration::from_secs(10),
        || async {
            let s = status(admin).await;
            (s["config"]["version"].as_u64() == Some(before + 1)).then_some(s)
        },
    )
    .await;
    assert!(s["config_error"].is_null());
    let s = synced(admin, 3).await;
    let revision = s["revision"].as_u64().expect("revision");
    for p in s["proxies"].as_array().expect("proxies") {
        assert_eq!(p["applied_version"].as_u64(), Some(revision), "{p}");
    }
    assert!(
        s["last_convergence"]["millis"]
            .as_f64()
            .is_some_and(|ms| ms < 1000.0),
        "converged in well under a second: {s}"
    );
    assert_eq!(bodies(&url, 10).await, vec!["other".to_string(); 10]);

    // A broken change is refused: nothing pushed, the error has its line and column.
    let broken = yaml(
        "",
        "routes:\n  - name: to-other\n    service: echo\n    backends: [{service: other}]\n    retry: {attempts: 0}\n",
        other.addr,
    );
    mesh.write(&broken);
    let s = eventually(
        "the refused config in status",
        Duration::from_secs(10),
        || async {
            let s = status(admin).await;
            (!s["config_error"].is_null()).then_some(s)
        },
    )
    .await;
    let errors = s["config_error"]["errors"].to_string();
    assert!(
        errors
            .contains("mesh.yaml:15:23: routes[0].retry.attempts: must be between 1 and 10, got 0"),
        "{errors}"
    );
    assert_eq!(
        s["config"]["version"].as_u64(),
        Some(before + 1),
        "the version in force stays"
    );
    assert_eq!(s["revision"].as_u64(), Some(revision), "nothing was pushed");
    assert_eq!(
        bodies(&url, 5).await,
        vec!["other".to_string(); 5],
        "traffic unaffected"
    );
    let cli = std::process::Command::new(bin("sidemesh"))
        .args(["status", "--control-plane", &format!("http://{admin}")])
        .output()
        .expect("sidemesh status");
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{table}");
    assert!(
        table.contains("REFUSED")
            && table.contains("routes[0].retry.attempts: must be between 1 and 10, got 0"),
        "{table}"
    );
    for id in ["client-1", "echo-1", "echo-2"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(id) && l.contains("synced")),
            "{id} in:\n{table}"
        );
    }

    // Fixed: pushed again, traffic back on the echo service.
    mesh.write(&yaml("", "", other.addr));
    eventually(
        "the fixed config in force",
        Duration::from_secs(10),
        || async {
            let s = status(admin).await;
            (s["config"]["version"].as_u64() == Some(before + 2) && s["config_error"].is_null())
                .then_some(())
        },
    )
    .await;
    synced(admin, 3).await;
    let back = bodies(&url, 10).await;
    assert!(back.iter().all(|b| b == "e1" || b == "e2"), "{back:?}");

    // A proxy that cannot apply its view NACKs, and status shows why.
    let _ghost = mesh.proxy(&grpc, "ghost-1", "ghost", &[]);
    let s = eventually(
        "the ghost proxy's NACK",
        Duration::from_secs(10),
        || async {
            let s = status(admin).await;
            let nack = s["proxies"]
                .as_array()?
                .iter()
                .find(|p| p["id"] == "ghost-1")?["last_nack"]["error"]
                .as_str()?
                .to_string();
            Some(nack)
        },
    )
    .await;
    assert!(
        s.contains("service `ghost` is not in the mesh config"),
        "{s}"
    );
    let metrics = http(Method::GET, &format!("http://{admin}/metrics"), None, &[])
        .await
        .expect("metrics")
        .body;
    assert!(metrics.contains("sidemesh_cp_nacks_total 1"), "{metrics}");
    assert!(
        metrics.contains("sidemesh_cp_config_errors_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sidemesh_cp_connected_proxies 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_control_plane_outage_fails_no_request_and_a_restarted_proxy_serves_from_disk() {
    let (e1, other) = (
        EchoServer::start("e1").await,
        EchoServer::start("other").await,
    );
    let mesh = Mesh::new(&yaml("", "", other.addr));
    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr");
    let mut cp = mesh.control_plane(&grpc_port.to_string(), &admin_port.to_string());
    let grpc = format!("https://{grpc_port}");
    let echo = mesh.proxy(
        &grpc,
        "echo-1",
        "echo",
        &["--inbound", "127.0.0.1:0", "--app", &e1.addr.to_string()],
    );
    let client = mesh.proxy(
        &grpc,
        "client-1",
        "client",
        &["--upstream", "echo=127.0.0.1:0"],
    );
    ready(&echo).await;
    ready(&client).await;
    synced(admin_port, 2).await;
    let url = format!("http://{}/", client.listener("upstream:echo"));
    eventually(
        "traffic through the echo proxy",
        Duration::from_secs(10),
        || async { (bodies(&url, 1).await == ["e1"]).then_some(()) },
    )
    .await;

    // Steady traffic while the control plane is killed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http(Method::GET, &url, None, &[]).await {
                    Ok(r) if r.status == StatusCode::OK && r.body == "e1" => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cp.signal("KILL");
    cp.wait_exit(Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The control plane comes back: every proxy reconnects and converges.
    let mut cp = mesh.control_plane(&grpc_port.to_string(), &admin_port.to_string());
    synced(admin_port, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.expect("load");
    assert!(
        failed.is_empty(),
        "requests failed during the outage: {failed:?}"
    );
    assert!(ok > 100, "only {ok} requests ran across the outage");

    // Down again; a proxy restarted now serves from its stored snapshot.
    cp.signal("KILL");
    cp.wait_exit(Duration::from_secs(5));
    drop(client);
    let restarted = mesh.proxy(
        &grpc,
        "client-1",
        "client",
        &["--upstream", "echo=127.0.0.1:0"],
    );
    ready(&restarted).await;
    let url = format!("http://{}/", restarted.listener("upstream:echo"));
    assert_eq!(
        bodies(&url, 3).await,
        ["e1", "e1", "e1"],
        "served from the stored snapshot"
    );
    let logs = restarted.logs().join("\n");
    assert!(logs.contains("serving the stored snapshot"), "{logs}");
}

/// The rate of `service`'s inbound limit in a proxy's pushed view.
async fn inbound_rate(proxy: &Proc, service: &str) -> Option<String> {
    let dump = proxy.config_dump().await?;
    dump["config"]["mesh"]["services"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == format!("{service}.default"))?["inbound"]["rate_limit"]["rate"]
        .as_str()
        .map(String::from)
}

#[tokio::test]
async fn a_global_limit_is_shared_among_the_live_proxies_of_a_service() {
    let app = EchoServer::start("app").await;
    let other = EchoServer::start("other").await;
    let limited = "    inbound:\n      rateLimit: {rate: 300/s, scope: global}\n";
    let mesh = Mesh::new(&yaml(limited, "", other.addr));
    let cp = mesh.control_plane("127.0.0.1:0", "127.0.0.1:0");
    let (grpc, admin) = (
        format!("https://{}", cp.listener("grpc")),
        cp.listener("admin"),
    );
    let app_addr = app.addr.to_string();
    let proxies: Vec<Proc> = (1..=3)
        .map(|i| {
            mesh.proxy(
                &grpc,
                &format!("echo-{i}"),
                "echo",
                &["--inbound", "127.0.0.1:0", "--app", &app_addr],
            )
        })
        .collect();
    synced(admin, 3).await;
    for p in &proxies {
        let rate = eventually(
            "each proxy to enforce a third",
            Duration::from_secs(10),
            || async { inbound_rate(p, "echo").await.filter(|r| r == "100/s") },
        )
        .await;
        assert_eq!(rate, "100/s");
    }
    // One proxy goes away: after the disconnect grace the other two get half each.
    let mut proxies = proxies;
    drop(proxies.pop());
    for p in &proxies {
        eventually(
            "each remaining proxy to enforce half",
            Duration::from_secs(10),
            || async { inbound_rate(p, "echo").await.filter(|r| r == "150/s") },
        )
        .await;
    }
}
