//! Transparent interception: iptables REDIRECTs an application's outgoing connections to the
//! proxy, which reads the original destination (SO_ORIGINAL_DST). Runs in a network namespace
//! of its own; needs root (CI runs as root) and skips with a printed reason otherwise.

use sidemesh_tests::netns::{Netns, cannot_run, run};
use sidemesh_tests::{Proc, bin, skip};

const PROXY_UID: &str = "2102";
const ADDR: &str = "10.99.0.1";

#[test]
fn redirected_connections_are_routed_or_passed_through_to_their_original_destination() {
    if let Some(why) = cannot_run(&["ip", "iptables", "setpriv", "curl"]) {
        skip(&format!("transparent interception test: {why}"));
        return;
    }
    let ns = Netns::create(&format!("sm-transparent-{}", std::process::id()));
    // A non-loopback address for the services (on `lo`: no dummy or veth device needed).
    ns.exec(&["ip", "addr", "add", &format!("{ADDR}/32"), "dev", "lo"]);
    let mut netns = ns.wrapper();

    // Two real servers in the namespace: the mesh's user-service, and a server the mesh does
    // not know (the original destination of pass-through traffic).
    let _users = Proc::start_wrapped(
        "user-service",
        &netns,
        &["--listen", &format!("{ADDR}:8081")],
        "listening",
    );
    let _outside = Proc::start_wrapped(
        "order-service",
        &netns,
        &["--listen", &format!("{ADDR}:9090")],
        "listening",
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: user-service\n    ports: [{{port: 8081}}]\n    endpoints: [\"{ADDR}:8081\"]\n"
        ),
    )
    .expect("write config");
    // World-readable so the proxy's own uid can read it.
    run(&["chmod", "-R", "a+rX", dir.path().to_str().expect("path")]);

    // The proxy runs as its own uid so its connections are not redirected back to itself.
    netns.extend_from_slice(&[
        "setpriv",
        "--reuid",
        PROXY_UID,
        "--regid",
        PROXY_UID,
        "--clear-groups",
    ]);
    let _proxy = Proc::start_wrapped(
        "sidemesh-proxy",
        &netns,
        &[
            "--config",
            config.to_str().expect("path"),
            "--service",
            "client",
            "--mode",
            "transparent",
            "--outbound",
            "0.0.0.0:15001",
            "--inbound",
            "127.0.0.1:15006",
            "--admin",
            "127.0.0.1:15020",
        ],
        "ready",
    );
    // The rules the Kubernetes init container installs, by the same command.
    let proxy_bin = bin("sidemesh-proxy");
    let proxy_bin = proxy_bin.to_str().expect("path");
    let dry_run = ns.exec(&[proxy_bin, "init", "--dry-run"]);
    assert!(
        dry_run.contains("-A SIDEMESH_OUTPUT -m owner --uid-owner 2102 -j RETURN"),
        "{dry_run}"
    );
    assert!(
        !ns.exec(&["iptables", "-t", "nat", "-S"])
            .contains("SIDEMESH"),
        "--dry-run changes nothing"
    );
    ns.exec(&[proxy_bin, "init"]);
    let installed = ns.exec(&["iptables", "-t", "nat", "-S"]);
    ns.exec(&[proxy_bin, "init"]);
    assert_eq!(
        ns.exec(&["iptables", "-t", "nat", "-S"]),
        installed,
        "running init twice equals running it once"
    );
    assert_eq!(
        installed
            .matches("-A OUTPUT -p tcp -j SIDEMESH_OUTPUT")
            .count(),
        1,
        "{installed}"
    );

    // Not a mesh host: passed through to the original destination, order-service on :9090.
    let passthrough = ns.exec(&[
        "curl",
        "-s",
        "-m",
        "5",
        &format!("http://{ADDR}:9090/orders"),
    ]);
    assert_eq!(
        passthrough.trim(),
        "[]",
        "order-service's empty order list, reached through the proxy"
    );

    // A mesh host: routed by the proxy to user-service, whatever address the client dialled.
    let routed = ns.exec(&[
        "curl",
        "-s",
        "-m",
        "5",
        "-H",
        "Host: user-service",
        &format!("http://{ADDR}:9090/users/1"),
    ]);
    assert!(
        routed.contains("Ada Lovelace"),
        "the request went to user-service: {routed}"
    );

    let metrics = ns.exec(&["curl", "-s", "-m", "5", "http://127.0.0.1:15020/metrics"]);
    assert!(
        metrics.contains("sidemesh_requests_total{direction=\"outbound\",service=\"user-service\",route=\"default\",status_class=\"2xx\"} 1"),
        "the routed request is counted:\n{metrics}"
    );
    let counters = ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-L",
        "SIDEMESH_OUTPUT_REDIRECT",
        "-v",
        "-n",
        "-x",
    ]);
    let redirected: u64 = counters
        .lines()
        .find(|l| l.contains("redir ports"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        redirected >= 2,
        "iptables counted {redirected} redirected connections:\n{counters}"
    );

    // --cleanup removes exactly what init added.
    ns.exec(&[proxy_bin, "init", "--cleanup"]);
    let left = ns.exec(&["iptables", "-t", "nat", "-S"]);
    assert!(!left.contains("SIDEMESH"), "{left}");
}
