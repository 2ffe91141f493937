//! What crosses the network between proxies and the control plane: a proxy in a network
//! namespace (a pod) reaches the control plane over a veth, and tcpdump on that link shows
//! that neither the join token, nor a service-account token, nor the config pushed (names
//! from the routing YAML) crosses in clear; the same capture of an `--insecure-plaintext`
//! run shows all of them, so the capture would have seen them. Needs root; skips otherwise.

use std::time::Duration;

use sidemesh_tests::kube_api::KubeApi;
use sidemesh_tests::netns::{Capture, Netns, cannot_run, run};
use sidemesh_tests::{Proc, eventually, skip};

const CP_TOKEN: &str = "the-control-planes-own-token";
/// A service-account token the API server vouches for (it would be a JWT in a cluster).
const SA_TOKEN: &str = "sa-token-7c1f0b3a9e2d4c58b6a1f0e9d8c7b6a5";
/// Names from the routing YAML that only the pushed config (and the Hello) carries.
const SERVICE_MARKER: &str = "wiremarker-payments";
const ROUTE_MARKER: &str = "wiremarker-route-3f9a";

fn yaml() -> String {
    format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: {SERVICE_MARKER}\n    namespace: demo\n    ports: [{{port: 8081}}]\nroutes:\n  - name: {ROUTE_MARKER}\n    service: {SERVICE_MARKER}\n    matches: [{{path: {{prefix: /}}}}]\n    timeout: 2s\n"
    )
}

/// A pod on a veth from the host: (namespace, host address, pod address).
fn pod(id: u32) -> (Netns, String, String) {
    let ns = Netns::create(&format!("smwire{id}"));
    let host_if = format!("smw{id}");
    let _ = std::process::Command::new("ip")
        .args(["link", "delete", &host_if])
        .status();
    run(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
    ]);
    let (host, pod) = ("10.204.0.1".to_string(), "10.204.0.2".to_string());
    run(&["ip", "addr", "add", &format!("{host}/24"), "dev", &host_if]);
    run(&["ip", "link", "set", &host_if, "up"]);
    ns.exec(&["ip", "addr", "add", &format!("{pod}/24"), "dev", "eth0"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    (ns, host, pod)
}

struct Captured {
    wire: Vec<u8>,
    join_token: String,
}

impl Captured {
    fn has(&self, needle: &str) -> bool {
        self.wire
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }
}

/// Runs the control plane on the host and two proxies in the pod (one with the join token, one
/// with a service-account token), captures their link until both are certified and hold the
/// config, and returns what crossed it.
async fn exchange(plaintext: bool) -> Captured {
    let id = std::process::id() % 100_000 + u32::from(plaintext);
    let (ns, host, pod_ip) = pod(id);
    let api = KubeApi::start(CP_TOKEN).await;
    api.review(
        SA_TOKEN,
        serde_json::json!({"authenticated": true, "audiences": ["sidemesh"],
            "user": {"username": format!("system:serviceaccount:demo:{SERVICE_MARKER}")}}),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
    std::fs::write(dir.path().join("config/mesh.yaml"), yaml()).expect("write");
    let cp_token = dir.path().join("cp-token");
    std::fs::write(&cp_token, CP_TOKEN).expect("write");
    let sa_token = dir.path().join("sa-token");
    std::fs::write(&sa_token, SA_TOKEN).expect("write");
    let data = dir.path().join("cp");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let mut cp_args = vec![
        "--config".to_string(),
        path(&dir.path().join("config")),
        "--data-dir".into(),
        path(&data),
        "--listen".into(),
        format!("{host}:0"),
        "--admin".into(),
        "127.0.0.1:0".into(),
        "--kubernetes-api".into(),
        api.url(),
        "--kubernetes-token-file".into(),
        path(&cp_token),
    ];
    if plaintext {
        cp_args.push("--insecure-plaintext".into());
    }
    let cp_args: Vec<&str> = cp_args.iter().map(String::as_str).collect();
    let cp = Proc::start_until("sidemesh-control-plane", &cp_args, "ready");
    let grpc = cp.listener("grpc");
    let join_token = std::fs::read_to_string(data.join("join-token")).expect("join token");

    let pcap = dir.path().join("cp.pcap");
    let capture = Capture::start(&ns.0, "eth0", &format!("tcp port {}", grpc.port()), &pcap);
    let url = format!("{}://{grpc}", if plaintext { "http" } else { "https" });
    let bundle = path(&data.join("trust-bundle.pem"));
    let start = |credential: [&str; 2], account: &str| {
        let mut args = vec![
            "--control-plane",
            &url,
            credential[0],
            credential[1],
            "--service",
            SERVICE_MARKER,
            "--namespace",
            "demo",
            "--service-account",
            account,
            "--app",
            "127.0.0.1:8081",
            "--advertise",
            "10.204.0.2:8081",
            "--inbound",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ];
        if plaintext {
            args.push("--insecure-plaintext");
        } else {
            args.extend([
                "--trust-bundle",
                &bundle,
                "--control-plane-server-name",
                "localhost",
            ]);
        }
        Proc::start_wrapped("sidemesh-proxy", &ns.wrapper(), &args, "ready")
    };
    let token_file = path(&data.join("join-token"));
    let by_token = start(["--join-token-file", &token_file], "by-token");
    let sa_file = path(&sa_token);
    let by_account = start(["--service-account-token-file", &sa_file], SERVICE_MARKER);
    for proxy in [&by_token, &by_account] {
        eventually(
            "the proxy holds the pushed config",
            Duration::from_secs(10),
            || async {
                proxy
                    .logs()
                    .iter()
                    .any(|l| l.contains("pushed config applied"))
                    .then_some(())
            },
        )
        .await;
    }
    let wire = capture.finish(pod_ip.parse().expect("ip"));
    drop((by_token, by_account, cp));
    let _ = std::process::Command::new("ip")
        .args(["link", "delete", &format!("smw{id}")])
        .status();
    Captured {
        wire,
        join_token: join_token.trim().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_key_or_config_crosses_the_network_in_clear() {
    if let Some(why) = cannot_run(&["ip", "tcpdump"]) {
        skip(&format!("control-plane wire test: {why}"));
        return;
    }
    let tls = exchange(false).await;
    assert!(
        tls.wire.windows(3).any(|w| w == [0x16, 0x03, 0x01]),
        "a TLS handshake crossed the link ({} bytes captured)",
        tls.wire.len()
    );
    let secrets = [
        SA_TOKEN,
        &tls.join_token,
        SERVICE_MARKER,
        ROUTE_MARKER,
        "PRIVATE KEY",
    ];
    for secret in secrets {
        assert!(!tls.has(secret), "`{secret}` crossed the link in clear");
    }

    // The control: with plaintext on both sides the same capture shows the credentials and
    // the config, so the absence above is the encryption's doing.
    let clear = exchange(true).await;
    for secret in [SA_TOKEN, &clear.join_token, SERVICE_MARKER, ROUTE_MARKER] {
        assert!(clear.has(secret), "the plaintext capture shows `{secret}`");
    }
    assert!(
        !clear.has("PRIVATE KEY"),
        "the workload's key never leaves the proxy"
    );
}
