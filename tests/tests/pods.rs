//! Two pods simulated as network namespaces, joined by veth links through a bridge, each with
//! the iptables rules of `sidemesh-proxy init`, its demo service and its proxy (uid 2102),
//! names resolved through `/etc/netns/<ns>/hosts`: order-service's plain
//! `http://user-service:8081` call is intercepted, crosses the wire as mutual TLS (captured
//! with tcpdump), and the request and its spans complete. Needs root; skips otherwise.

use std::net::IpAddr;
use std::time::Duration;

use sidemesh_tests::netns::{Capture, Netns, cannot_run, run};
use sidemesh_tests::{Proc, Rotel, bin, eventually, skip};

const HOST_IP: &str = "10.203.0.253";
const USER_IP: &str = "10.203.0.1";
const ORDER_IP: &str = "10.203.0.2";

/// `/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over `/etc/hosts`.
struct Hosts(std::path::PathBuf);

impl Hosts {
    fn write(ns: &str) -> Hosts {
        let dir = std::path::PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns");
        std::fs::write(
            dir.join("hosts"),
            format!("127.0.0.1 localhost\n{USER_IP} user-service user-service.demo\n{ORDER_IP} order-service order-service.demo\n"),
        )
        .expect("write hosts");
        Hosts(dir)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pod: its namespace on the bridge, its hosts file.
struct Pod {
    ns: Netns,
    _hosts: Hosts,
}

fn pod(name: &str, net: &Netns, veth: &str, ip: &str) -> Pod {
    let ns = Netns::create(name);
    run(&[
        "ip", "-n", &net.0, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
        name,
    ]);
    run(&[
        "ip", "-n", &net.0, "link", "set", veth, "master", "br0", "up",
    ]);
    ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    Pod {
        _hosts: Hosts::write(name),
        ns,
    }
}

fn counter(ns: &Netns, chain: &str) -> u64 {
    ns.exec(&["iptables", "-t", "nat", "-L", chain, "-v", "-n", "-x"])
        .lines()
        .find(|l| l.contains("redir ports"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_talk_mutual_tls_through_intercepted_plain_calls() {
    if let Some(why) = cannot_run(&["ip", "iptables", "setpriv", "curl", "tcpdump"]) {
        skip(&format!("pods-as-namespaces test: {why}"));
        return;
    }
    let id = std::process::id() % 100_000;
    // The "node": a bridge in a namespace of its own, and a link from the host to it (the
    // control plane and the collector run on the host).
    let net = Netns::create(&format!("smnet{id}"));
    net.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    net.exec(&["ip", "link", "set", "br0", "up"]);
    let host_veth = format!("smh{id}");
    let _ = std::process::Command::new("ip")
        .args(["link", "delete", &host_veth])
        .status();
    run(&[
        "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", "vh", "netns", &net.0,
    ]);
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        &host_veth,
    ]);
    run(&["ip", "link", "set", &host_veth, "up"]);
    net.exec(&["ip", "link", "set", "vh", "master", "br0", "up"]);
    struct HostLink(String);
    impl Drop for HostLink {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "delete", &self.0])
                .status();
        }
    }
    let _host_link = HostLink(host_veth);
    let users = pod(&format!("smusr{id}"), &net, "vu", USER_IP);
    let orders = pod(&format!("smord{id}"), &net, "vo", ORDER_IP);

    let Some(rotel) = Rotel::start_on(HOST_IP.parse::<IpAddr>().expect("ip")) else {
        skip("rotel (pip install rotel) is not installed: cannot check spans");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
    std::fs::write(
        dir.path().join("config/mesh.yaml"),
        format!(
            "apiVersion: sidemesh.io/v1\nkind: Mesh\nmesh:\n  mtls: strict\n  tracing: {{otlpEndpoint: \"{}\"}}\nservices:\n  - name: user-service\n    namespace: demo\n    ports: [{{port: 8081}}]\n    inbound:\n      authorization:\n        allow: [spiffe://cluster.local/ns/demo/sa/order-service]\n  - name: order-service\n    namespace: demo\n    ports: [{{port: 8082}}]\n",
            rotel.grpc_url()
        ),
    )
    .expect("config");
    let data = dir.path().join("cp");
    let cp = Proc::start_until(
        "sidemesh-control-plane",
        &[
            "--config",
            dir.path().join("config").to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen",
            &format!("{HOST_IP}:0"),
            "--admin",
            "127.0.0.1:0",
        ],
        "ready",
    );
    let cp_url = format!("https://{}", cp.listener("grpc"));
    let bundle = data.join("trust-bundle.pem");
    let bundle = bundle.to_str().expect("utf-8");
    // The proxies run as uid 2102: they must read the join token.
    run(&["chmod", "-R", "a+rX", dir.path().to_str().expect("path")]);
    let token = data.join("join-token");
    let token = token.to_str().expect("utf-8");
    let proxy_bin = bin("sidemesh-proxy");
    let proxy_bin = proxy_bin.to_str().expect("path");

    let start_pod = |p: &Pod, service: &str, ip: &str, port: u16, app: Vec<String>| {
        p.ns.exec(&[proxy_bin, "init"]);
        let app_args: Vec<&str> = app.iter().map(String::as_str).collect();
        let app = Proc::start_wrapped(service, &p.ns.wrapper(), &app_args, "listening");
        let mut wrapper = p.ns.wrapper();
        wrapper.extend_from_slice(&[
            "setpriv",
            "--reuid",
            "2102",
            "--regid",
            "2102",
            "--clear-groups",
        ]);
        let advertise = format!("{ip}:{port}");
        let proxy = Proc::start_wrapped(
            "sidemesh-proxy",
            &wrapper,
            &[
                "--control-plane",
                &cp_url,
                // The control plane's certificate names loopback, not the bridge address.
                "--control-plane-server-name",
                "localhost",
                "--trust-bundle",
                bundle,
                "--join-token-file",
                token,
                "--service",
                &format!("{service}.demo"),
                "--proxy-id",
                service,
                "--mode",
                "transparent",
                "--outbound",
                "0.0.0.0:15001",
                "--inbound",
                "0.0.0.0:15006",
                "--admin",
                "0.0.0.0:15020",
                "--advertise",
                &advertise,
            ],
            "ready",
        );
        (app, proxy)
    };
    let otlp = rotel.grpc_url();
    let (_user_app, _user_proxy) = start_pod(
        &users,
        "user-service",
        USER_IP,
        8081,
        vec![
            "--listen".into(),
            "0.0.0.0:8081".into(),
            "--otlp-endpoint".into(),
            otlp.clone(),
        ],
    );
    let (_order_app, _order_proxy) = start_pod(
        &orders,
        "order-service",
        ORDER_IP,
        8082,
        vec![
            "--listen".into(),
            "0.0.0.0:8082".into(),
            "--user-service".into(),
            "http://user-service:8081".into(),
            "--otlp-endpoint".into(),
            otlp,
        ],
    );
    // Order's proxy knows user-service's pod as a meshed endpoint.
    eventually(
        "order's proxy has user-service's pod as a meshed endpoint",
        Duration::from_secs(15),
        || async {
            let dump = orders.ns.exec(&[
                "curl",
                "-s",
                "-m",
                "2",
                "http://127.0.0.1:15020/config_dump",
            ]);
            dump.contains(&format!("\"addr\": \"{USER_IP}:8081\""))
                .then_some(())
        },
    )
    .await;

    // Capture what crosses user-service's link while the order is placed.
    let pcap = dir.path().join("wire.pcap");
    let capture = Capture::start(&net.0, "vu", "tcp port 8081", &pcap);
    let traceparent = "00-3bf92f3577b34da6a3ce929d0e0e4735-00f067aa0ba902b7-01";
    let created = orders.ns.exec(&[
        "curl",
        "-s",
        "-m",
        "10",
        "-H",
        "content-type: application/json",
        "-H",
        &format!("traceparent: {traceparent}"),
        "-d",
        r#"{"user_id": 2, "items": [{"sku": "book-42", "quantity": 1}]}"#,
        "http://127.0.0.1:8082/orders",
    ]);
    let wire = capture.finish(USER_IP.parse().expect("ip"));
    assert!(
        created.contains("Grace Hopper"),
        "the order embeds the user fetched from the other pod: {created}"
    );

    // The wire carried TLS (a ClientHello record), and none of the request in clear.
    let has = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    assert!(
        has(&[0x16, 0x03, 0x01]),
        "a TLS handshake crossed the link ({} bytes captured)",
        wire.len()
    );
    assert!(
        !has(b"GetUser") && !has(b"demo.users.v1"),
        "no plaintext gRPC on the wire"
    );

    // iptables redirected the call out of order's pod and into user-service's.
    assert!(counter(&orders.ns, "SIDEMESH_OUTPUT_REDIRECT") >= 1);
    assert!(counter(&users.ns, "SIDEMESH_INBOUND_REDIRECT") >= 1);
    let metrics = users
        .ns
        .exec(&["curl", "-s", "-m", "2", "http://127.0.0.1:15020/metrics"]);
    assert!(
        metrics.contains("sidemesh_inbound_requests_by_client_total{client_id=\"spiffe://cluster.local/ns/demo/sa/order-service\"}"),
        "user-service's proxy saw order-service's identity:\n{metrics}"
    );

    // And the trace arrived, across both pods.
    let spans = eventually(
        "the trace's proxy spans at the collector",
        Duration::from_secs(15),
        || async {
            let spans: Vec<_> = rotel
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == "3bf92f3577b34da6a3ce929d0e0e4735")
                .collect();
            let user_in = spans.iter().any(|s| {
                s.service == "user-service" && s.attribute("sidemesh.direction") == Some("inbound")
            });
            let order_out = spans.iter().any(|s| {
                s.service == "order-service"
                    && s.attribute("sidemesh.direction") == Some("outbound")
            });
            // The demo services' own spans too: their exports leave the pods through the proxies'
            // pass-through (the collector is not a mesh service).
            let user_app = spans.iter().any(|s| {
                s.service == "user-service" && s.attribute("sidemesh.direction").is_none()
            });
            (user_in && order_out && user_app).then_some(spans)
        },
    )
    .await;
    assert!(spans.len() >= 3, "{spans:#?}");
    let user_in = spans
        .iter()
        .find(|s| {
            s.service == "user-service" && s.attribute("sidemesh.direction") == Some("inbound")
        })
        .expect("user-service's inbound span");
    assert_eq!(
        user_in.attribute("sidemesh.peer.identity"),
        Some("spiffe://cluster.local/ns/demo/sa/order-service")
    );
}
