//! The fault table (`bench/run.sh --only faults`, or `cargo bench -p sidemesh-tests --bench
//! faults`): steady load through the demo mesh while one fault happens, for each fault in
//! turn, each on a fresh mesh; writes `RELIABILITY.md`.
//!
//! The mesh: the control plane; two replicas of user-service, each its app behind its proxy;
//! order-service behind its proxy, looking users up through it over gRPC (the demo's
//! `user-lookup` route: retries, per-try timeout); a client proxy in front of order-service.
//! The load: 100 `POST /orders` a second, open loop, through the client proxy, so every order
//! crosses four proxies and three mutual-TLS hops. The faults hit user-service's first
//! replica. As root, that replica is a pod (a network namespace on a veth link), so loss,
//! latency and a partition can be put on its link with `tc netem`; without root those rows
//! say why they did not run. Bounded: about six minutes.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sidemesh_tests::netns::{Netns, cannot_run, run};
use sidemesh_tests::{Proc, eventually, http};

const RATE: u32 = 100;
const ORDER: &str = r#"{"user_id": 2, "items": [{"sku": "book-42", "quantity": 1}]}"#;
const HOST_IP: &str = "10.204.0.1";
const POD_IP: &str = "10.204.0.2";

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn mesh_yaml() -> String {
    "apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  trustDomain: cluster.local
  mtls: strict
services:
  - name: user-service
    namespace: demo
    ports: [{port: 8081}]
    inbound:
      authorization:
        allow: [spiffe://cluster.local/ns/demo/sa/order-service]
  - name: order-service
    namespace: demo
    ports: [{port: 8082}]
  - name: loadgen
    namespace: demo
routes:
  - name: user-lookup
    service: user-service.demo
    matches:
      - path: { exact: /demo.users.v1.UserService/GetUser }
    timeout: 2s
    retry:
      attempts: 3
      retryOn: [unavailable, 5xx, connect-failure, reset]
      perTryTimeout: 500ms
      backoff: { base: 25ms, max: 250ms }
      budget: { ratio: 0.2, minPerSecond: 10, window: 10s }
      nonIdempotent: true
  - name: orders
    service: order-service.demo
    matches:
      - path: { prefix: /orders }
    timeout: 5s
"
    .to_string()
}

/// User-service's first replica: on the host, or in a pod of its own.
struct Pod {
    ns: Netns,
    host_veth: String,
}

impl Pod {
    fn create(id: u32) -> Pod {
        let ns = Netns::create(&format!("smflt{id}"));
        let host_veth = format!("smf{id}");
        let _ = Command::new("ip")
            .args(["link", "delete", &host_veth])
            .status();
        run(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
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
        ns.exec(&["ip", "addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        Pod { ns, host_veth }
    }

    /// Whether this kernel has `tc netem` (sch_netem); without it, loss is made with
    /// iptables' `statistic` match and latency cannot be added.
    fn has_netem(&self) -> bool {
        let mut cmd = self.ns.wrapper();
        cmd.extend([
            "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ]);
        let ok = Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            self.ns.exec(&["tc", "qdisc", "del", "dev", "lo", "root"]);
        }
        ok
    }

    /// `tc netem` on both ends of the link (`None`: removed).
    fn netem(&self, spec: Option<&[&str]>) {
        for (prefix, dev) in [
            (vec![], self.host_veth.as_str()),
            (self.ns.wrapper(), "eth0"),
        ] {
            let mut cmd: Vec<&str> = prefix.clone();
            match spec {
                Some(spec) => {
                    cmd.extend(["tc", "qdisc", "replace", "dev", dev, "root", "netem"]);
                    cmd.extend_from_slice(spec);
                }
                None => cmd.extend(["tc", "qdisc", "del", "dev", dev, "root"]),
            }
            run(&cmd);
        }
    }

    /// Drops each packet on the pod's link, both ways, with `probability` (1: every packet,
    /// a partition), with iptables in the pod (which has no other rules); `None` lifts it.
    fn drop_packets(&self, probability: Option<&str>) {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let Some(p) = probability else {
                self.ns.exec(&["iptables", "-F", chain]);
                continue;
            };
            let mut cmd = vec!["iptables", "-I", chain, dir, "eth0"];
            if p != "1" {
                cmd.extend(["-m", "statistic", "--mode", "random", "--probability", p]);
            }
            cmd.extend(["-j", "DROP"]);
            self.ns.exec(&cmd);
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_veth])
            .status();
    }
}

/// The whole mesh, with what a fault needs to restart its parts on the same addresses.
struct DemoMesh {
    dir: tempfile::TempDir,
    cp_args: Vec<String>,
    cp: Option<Proc>,
    cp_url: String,
    user_app_args: Vec<String>,
    user_app: Option<Proc>,
    user_proxy_args: Vec<String>,
    user_proxy: Option<Proc>,
    pod: Option<Pod>,
    _others: Vec<Proc>,
    entry: SocketAddr,
    order_proxy_admin: SocketAddr,
}

impl DemoMesh {
    fn start(pod: Option<Pod>, cert_lifetime: &str) -> DemoMesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
        std::fs::write(dir.path().join("config/mesh.yaml"), mesh_yaml()).expect("yaml");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let cp_port = port();
        // In a pod the proxy reaches the control plane over its link.
        let cp_listen = if pod.is_some() {
            format!("0.0.0.0:{cp_port}")
        } else {
            format!("127.0.0.1:{cp_port}")
        };
        let cp_args: Vec<String> = vec![
            "--config".into(),
            s(&dir.path().join("config")),
            "--data-dir".into(),
            s(&dir.path().join("cp")),
            "--listen".into(),
            cp_listen,
            "--admin".into(),
            format!("127.0.0.1:{}", port()),
            "--cert-lifetime".into(),
            cert_lifetime.into(),
        ];
        let cp = start("sidemesh-control-plane", &[], &cp_args, "ready");
        let cp_url = format!("https://127.0.0.1:{cp_port}");
        let mut mesh = DemoMesh {
            dir,
            cp_args,
            cp: Some(cp),
            cp_url,
            user_app_args: Vec::new(),
            user_app: None,
            user_proxy_args: Vec::new(),
            user_proxy: None,
            pod,
            _others: Vec::new(),
            entry: SocketAddr::from(([127, 0, 0, 1], 0)),
            order_proxy_admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };

        // User-service's first replica: the one the faults hit.
        let (app_listen, inbound, advertise, cp_url) = match &mesh.pod {
            Some(_) => (
                "127.0.0.1:8081".to_string(),
                "0.0.0.0:15006".to_string(),
                Some(format!("{POD_IP}:15006")),
                format!("https://{HOST_IP}:{cp_port}"),
            ),
            None => (
                format!("127.0.0.1:{}", port()),
                format!("127.0.0.1:{}", port()),
                None,
                mesh.cp_url.clone(),
            ),
        };
        mesh.user_app_args = vec!["--listen".into(), app_listen.clone()];
        mesh.user_app = Some(start(
            "user-service",
            &mesh.wrapper(),
            &mesh.user_app_args,
            "listening",
        ));
        let mut args = mesh.proxy_args(&cp_url, "user-service", "user-1");
        args.extend([
            "--app".into(),
            app_listen,
            "--inbound".into(),
            inbound,
            "--admin".into(),
            "127.0.0.1:0".into(),
        ]);
        if let Some(advertise) = advertise {
            args.extend([
                "--advertise".into(),
                advertise,
                "--control-plane-server-name".into(),
                "localhost".into(),
            ]);
        }
        mesh.user_proxy_args = args;
        mesh.user_proxy = Some(start(
            "sidemesh-proxy",
            &mesh.wrapper(),
            &mesh.user_proxy_args,
            "ready",
        ));

        // The second replica, on the host.
        let app2 = start(
            "user-service",
            &[],
            &strings(&["--listen", "127.0.0.1:0"]),
            "listening",
        );
        let mut args = mesh.proxy_args(&mesh.cp_url, "user-service", "user-2");
        args.extend(strings(&[
            "--app",
            &app2.addr.to_string(),
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ]));
        let proxy2 = start("sidemesh-proxy", &[], &args, "ready");

        // Order-service calls user-service through its proxy's upstream listener.
        let lookup = format!("127.0.0.1:{}", port());
        let order_port = port();
        let mut args = mesh.proxy_args(&mesh.cp_url, "order-service", "order-1");
        args.extend(strings(&[
            "--app",
            &format!("127.0.0.1:{order_port}"),
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &format!("user-service={lookup}"),
        ]));
        let order_proxy = start("sidemesh-proxy", &[], &args, "ready");
        let order_app = start(
            "order-service",
            &[],
            &strings(&[
                "--listen",
                &format!("127.0.0.1:{order_port}"),
                "--user-service",
                &format!("http://{lookup}"),
            ]),
            "listening",
        );
        let mut args = mesh.proxy_args(&mesh.cp_url, "loadgen", "loadgen-1");
        args.extend(strings(&[
            "--upstream",
            "order-service=127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ]));
        let client = start("sidemesh-proxy", &[], &args, "ready");
        mesh.entry = client.listener("upstream:order-service");
        mesh.order_proxy_admin = order_proxy.listener("admin");
        mesh._others = vec![app2, proxy2, order_proxy, order_app, client];
        mesh
    }

    fn wrapper(&self) -> Vec<String> {
        self.pod
            .as_ref()
            .map(|p| p.ns.wrapper().into_iter().map(String::from).collect())
            .unwrap_or_default()
    }

    fn proxy_args(&self, cp_url: &str, service: &str, id: &str) -> Vec<String> {
        let data = self.dir.path().join("cp");
        strings(&[
            "--control-plane",
            cp_url,
            "--service",
            &format!("{service}.demo"),
            "--proxy-id",
            id,
            "--join-token-file",
            &data.join("join-token").to_string_lossy(),
            "--trust-bundle",
            &data.join("trust-bundle.pem").to_string_lossy(),
            "--outbound",
            "127.0.0.1:0",
        ])
    }

    fn restart_cp(&mut self) {
        self.cp = Some(start("sidemesh-control-plane", &[], &self.cp_args, "ready"));
    }

    fn restart_user_proxy(&mut self) {
        self.user_proxy = Some(start(
            "sidemesh-proxy",
            &self.wrapper(),
            &self.user_proxy_args,
            "ready",
        ));
    }

    fn restart_user_app(&mut self) {
        self.user_app = Some(start(
            "user-service",
            &self.wrapper(),
            &self.user_app_args,
            "listening",
        ));
    }

    /// Until the order proxy balances over both user-service replicas and orders go through.
    async fn wait_ready(&self) {
        let dump = format!("http://{}/config_dump", self.order_proxy_admin);
        eventually(
            "order-service's proxy to see both user-service replicas",
            Duration::from_secs(20),
            || async {
                let d = http(Method::GET, &dump, None, &[]).await.ok()?.json();
                let b = d["config"]["balancers"]
                    .as_array()?
                    .iter()
                    .find(|b| b["service"] == "user-service.demo")?
                    .clone();
                (b["endpoints"].as_array()?.len() == 2).then_some(())
            },
        )
        .await;
        let url = format!("http://{}/orders", self.entry);
        eventually(
            "an order through the mesh",
            Duration::from_secs(20),
            || async {
                let r = http(Method::POST, &url, Some(ORDER), &[]).await.ok()?;
                (r.status == StatusCode::CREATED).then_some(())
            },
        )
        .await;
    }

    /// Rewrites the routing YAML (a harmless change to a route order-service's proxy uses:
    /// the user lookup's timeout).
    fn push(&self, n: u32) {
        let yaml = mesh_yaml().replace("timeout: 2s", &format!("timeout: {}ms", 2000 + n));
        let tmp = self.dir.path().join("config/.mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("config/mesh.yaml")).expect("rename");
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn start(name: &str, wrapper: &[String], args: &[String], ready: &str) -> Proc {
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start_wrapped(name, &wrapper, &args, ready)
}

fn kill(proc: &mut Option<Proc>, signal: &str) {
    if let Some(mut p) = proc.take() {
        p.signal(signal);
        p.wait_exit(Duration::from_secs(15));
    }
}

/// One request's fate.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    at: Duration,
    latency: Duration,
    ok: bool,
    /// What a failed request got: its status and error marker, or the client's error.
    failure: Option<&'static str>,
}

/// Failure descriptions live for the run (there are few).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Open-loop load until `stop` is set: `RATE` orders a second.
async fn load(entry: SocketAddr, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<Outcome> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let start = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / f64::from(RATE));
    let mut tasks = Vec::new();
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep_until((start + gap * i).into()).await;
        i += 1;
        let client = client.clone();
        let at = start.elapsed();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("http://{entry}/orders"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(ORDER.as_bytes())))
                .expect("request");
            let failure =
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let marker = resp
                            .headers()
                            .get("x-sidemesh-error")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = resp.into_body().collect().await;
                        match (status, body) {
                            (StatusCode::CREATED, Ok(_)) => None,
                            (_, Ok(body)) => Some(leak(format!(
                                "{status} {} {}",
                                marker.unwrap_or_default(),
                                String::from_utf8_lossy(&body.to_bytes()).trim()
                            ))),
                            (_, Err(e)) => Some(leak(format!("{status}, body cut: {e}"))),
                        }
                    }
                    Ok(Err(e)) => Some(leak(format!("client error: {e}"))),
                    Err(_) => Some("no answer within 10 s"),
                };
            Outcome {
                at,
                latency: sent.elapsed(),
                ok: failure.is_none(),
                failure,
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("join"));
    }
    all
}

/// A fault: what it does to the mesh while the load runs.
#[derive(Clone, Copy)]
enum Fault {
    ControlPlaneKill,
    ServerProxyKill,
    AppDown,
    ProxyStall,
    ConfigPushes,
    CertRotation,
    Drain,
    LossAndLatency,
    Partition,
}

impl Fault {
    const ALL: [Fault; 9] = [
        Fault::ControlPlaneKill,
        Fault::ServerProxyKill,
        Fault::AppDown,
        Fault::ProxyStall,
        Fault::ConfigPushes,
        Fault::CertRotation,
        Fault::Drain,
        Fault::LossAndLatency,
        Fault::Partition,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::ControlPlaneKill => "control plane killed (-9), restarted after 3 s",
            Fault::ServerProxyKill => "server proxy killed (-9), restarted after 3 s",
            Fault::AppDown => "app down 5 s (killed, then started again)",
            Fault::ProxyStall => "server proxy stalled 1.5 s (SIGSTOP, SIGCONT)",
            Fault::ConfigPushes => "20 config pushes, 250 ms apart",
            Fault::CertRotation => "certificates rotated every ~10 s, for 60 s",
            Fault::Drain => "server proxy drained (SIGTERM), restarted after 3 s",
            Fault::LossAndLatency => "5 % loss and 50 ms each way on the pod's link, 10 s",
            Fault::Partition => "a 5 s partition: every packet on the pod's link dropped",
        }
    }

    fn needs_pod(self) -> bool {
        matches!(self, Fault::LossAndLatency | Fault::Partition)
    }

    /// Whether the fault removes a copy of the app (its replica cannot answer for a time).
    fn removes_a_replica(self) -> bool {
        !matches!(
            self,
            Fault::ControlPlaneKill | Fault::ConfigPushes | Fault::CertRotation
        )
    }

    /// Does the fault; returns when it is over (the mesh is whole again).
    async fn inject(self, mesh: &mut DemoMesh) {
        let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
        match self {
            Fault::ControlPlaneKill => {
                kill(&mut mesh.cp, "KILL");
                sleep(3000).await;
                mesh.restart_cp();
            }
            Fault::ServerProxyKill => {
                kill(&mut mesh.user_proxy, "KILL");
                sleep(3000).await;
                mesh.restart_user_proxy();
            }
            Fault::AppDown => {
                kill(&mut mesh.user_app, "KILL");
                sleep(5000).await;
                mesh.restart_user_app();
            }
            Fault::ProxyStall => {
                let proxy = mesh.user_proxy.as_ref().expect("user proxy");
                proxy.signal("STOP");
                sleep(1500).await;
                proxy.signal("CONT");
            }
            Fault::ConfigPushes => {
                for n in 1..=20 {
                    mesh.push(n);
                    sleep(250).await;
                }
            }
            Fault::CertRotation => sleep(60_000).await,
            Fault::Drain => {
                kill(&mut mesh.user_proxy, "TERM");
                sleep(3000).await;
                mesh.restart_user_proxy();
            }
            Fault::LossAndLatency => {
                let pod = mesh.pod.as_ref().expect("pod");
                if pod.has_netem() {
                    pod.netem(Some(&["delay", "50ms", "loss", "5%"]));
                    sleep(10_000).await;
                    pod.netem(None);
                } else {
                    pod.drop_packets(Some("0.05"));
                    sleep(10_000).await;
                    pod.drop_packets(None);
                }
            }
            Fault::Partition => {
                let pod = mesh.pod.as_ref().expect("pod");
                pod.drop_packets(Some("1"));
                sleep(5000).await;
                pod.drop_packets(None);
            }
        }
    }
}

struct Row {
    fault: Fault,
    skipped: Option<String>,
    sent: usize,
    failed: usize,
    baseline_p99: Duration,
    worst: Duration,
    /// From the fault's start until the last failed or slow answer.
    disturbed: Option<Duration>,
    renewals: Option<u64>,
    /// Config versions the order proxy moved through during the fault.
    versions: Option<u64>,
    /// What the failed requests got, with how many got it.
    failures: Vec<(&'static str, usize)>,
    /// How the fault was made, when not as named.
    how: Option<String>,
}

fn p(latencies: &mut [Duration], q: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort();
    latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
}

async fn config_version(mesh: &DemoMesh) -> Option<u64> {
    let url = format!("http://{}/config_dump", mesh.order_proxy_admin);
    http(Method::GET, &url, None, &[]).await.ok()?.json()["config"]["version"].as_u64()
}

async fn renewals(mesh: &DemoMesh) -> Option<u64> {
    let url = format!("http://{}/metrics", mesh.order_proxy_admin);
    let m = http(Method::GET, &url, None, &[]).await.ok()?.body;
    m.lines()
        .find(|l| l.starts_with("sidemesh_identity_renewals_total{result=\"renewed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

async fn run_fault(fault: Fault, pod: Option<Pod>) -> Row {
    let lifetime = match fault {
        Fault::CertRotation => "14s",
        _ => "24h",
    };
    let how = match (&pod, fault) {
        (Some(pod), Fault::LossAndLatency) if !pod.has_netem() => Some(
            "this kernel has no `tc netem` (sch_netem): 5 % loss made with iptables' \
             `statistic` match in the pod, no latency added"
                .to_string(),
        ),
        _ => None,
    };
    let mut mesh = DemoMesh::start(pod, lifetime);
    mesh.wait_ready().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn(load(mesh.entry, stop.clone()));
    // Five seconds of steady load set the baseline.
    let warm = Duration::from_secs(5);
    tokio::time::sleep(warm).await;
    let renewed_before = renewals(&mesh).await;
    let version_before = config_version(&mesh).await;
    fault.inject(&mut mesh).await;
    let renewed = match (renewed_before, renewals(&mesh).await) {
        (Some(a), Some(b)) if matches!(fault, Fault::CertRotation) => Some(b - a),
        _ => None,
    };
    // Ten more seconds to see it settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let versions = match (version_before, config_version(&mesh).await) {
        (Some(a), Some(b)) if matches!(fault, Fault::ConfigPushes) => Some(b - a),
        _ => None,
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes = traffic.await.expect("load");

    // The first second is the client's own warm-up (new connections).
    let mut baseline: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.at >= Duration::from_secs(1) && o.at < warm)
        .map(|o| o.latency)
        .collect();
    let baseline_p99 = p(&mut baseline, 0.99);
    let slow = baseline_p99 * 3 + Duration::from_millis(20);
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.at >= warm).collect();
    let disturbed = after
        .iter()
        .filter(|o| !o.ok || o.latency > slow)
        .map(|o| o.at + o.latency)
        .max()
        .map(|end| end.saturating_sub(warm));
    Row {
        fault,
        skipped: None,
        sent: outcomes.len(),
        failed: outcomes.iter().filter(|o| !o.ok).count(),
        baseline_p99,
        worst: after.iter().map(|o| o.latency).max().unwrap_or_default(),
        disturbed,
        renewals: renewed,
        versions,
        failures: {
            let mut by: Vec<(&'static str, usize)> = Vec::new();
            for f in outcomes.iter().filter_map(|o| o.failure) {
                match by.iter_mut().find(|(d, _)| *d == f) {
                    Some((_, n)) => *n += 1,
                    None => by.push((f, 1)),
                }
            }
            by
        },
        how,
    }
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn report(rows: &[Row], pods: bool) -> String {
    let mut out = String::new();
    out.push_str("# Reliability: the fault table\n\n");
    out.push_str(&format!(
        "Produced by `bench/run.sh --only faults` on {} ({} build, {} cores). Each row is a fresh \
         mesh: the control plane, two replicas of user-service (app and proxy each), order-service \
         behind its proxy, and a client proxy; {RATE} `POST /orders` a second, open loop, through the \
         client proxy, every order crossing four proxies and three mutual-TLS hops (the order's user \
         is looked up over gRPC on the demo's `user-lookup` route: 3 attempts, 500 ms per try). Five \
         seconds of steady load, then the fault (on user-service's first replica{}), then ten seconds \
         more.\n\n",
        date(),
        profile(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if pods {
            ", a pod of its own: a network namespace on a veth link"
        } else {
            ""
        }
    ));
    out.push_str(
        "- **failed**: requests not answered `201 Created` (within 10 s).\n\
         - **disturbed for**: from the fault's start until the end of the last request that failed \
         or took more than three times the steady p99 (+20 ms); `-` when none did.\n\
         - **goal**: zero failed requests; a fault that takes a replica away may slow requests \
         (retries, per-try timeouts) but the other replica answers them.\n\n",
    );
    out.push_str("| fault | sent | failed | steady p99 | slowest | disturbed for | goal met |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        if let Some(why) = &r.skipped {
            out.push_str(&format!(
                "| {} | - | - | - | - | - | not run: {why} |\n",
                r.fault.name()
            ));
            continue;
        }
        let mut name = r.fault.name().to_string();
        if let Some(n) = r.renewals {
            name.push_str(&format!(" ({n} renewals by order-service's proxy)"));
        }
        if let Some(n) = r.versions {
            name.push_str(&format!(
                " ({n} new versions applied by order-service's proxy)"
            ));
        }
        if let Some(how) = &r.how {
            name.push_str(&format!(" ({how})"));
        }
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            r.sent,
            r.failed,
            ms(r.baseline_p99),
            ms(r.worst),
            r.disturbed.map_or("-".into(), ms),
            if r.failed == 0 { "yes" } else { "**no**" }
        ));
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.failures.is_empty()).collect();
    if !failed.is_empty() {
        out.push_str("\nWhat the failed requests got:\n\n");
        for r in failed {
            for (what, n) in &r.failures {
                out.push_str(&format!("- {}: {n} x `{what}`\n", r.fault.name()));
            }
        }
    }
    out.push_str(
        "\nWhat a retry cannot save: a request whose response head has already been passed on \
         to the caller (retries happen only before that, as in Envoy and Linkerd). When the \
         link goes dark between a response's head and its end (a partition, or an app killed \
         mid-answer), order-service waits for the rest until its own 5 s deadline; the row shows \
         how often that happened in this run. A draining proxy stops accepting at once; callers \
         that meet its refusal retry on the other replica (a retry avoids the endpoint it just \
         failed on).\n",
    );
    let removes: Vec<&str> = rows
        .iter()
        .filter(|r| r.fault.removes_a_replica())
        .map(|r| r.fault.name())
        .collect();
    out.push_str(&format!(
        "\nFaults that take a replica away for a time: {}. None removes the only copy of the app: \
         user-service's second replica serves throughout, so the goal is zero failures for every \
         row.\n",
        removes.join("; ")
    ));
    out
}

/// The build profile this program (and the binaries it starts) was built with.
fn profile() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?.parent()?;
            Some(dir.file_name()?.to_string_lossy().into_owned())
        })
        .map(|p| if p == "debug" { "debug".into() } else { p })
        .unwrap_or_else(|| "unknown".into())
}

fn date() -> String {
    Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn output_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../RELIABILITY.md")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let only: Option<String> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .filter(|a| a != "--bench");
    let no_pods = cannot_run(&["ip", "tc"]);
    let mut rows = Vec::new();
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        if only.as_deref().is_some_and(|f| !fault.name().contains(f)) {
            continue;
        }
        if fault.needs_pod() {
            if let Some(why) = &no_pods {
                println!("{}: not run: {why}", fault.name());
                rows.push(Row {
                    fault,
                    skipped: Some(why.clone()),
                    sent: 0,
                    failed: 0,
                    baseline_p99: Duration::ZERO,
                    worst: Duration::ZERO,
                    disturbed: None,
                    renewals: None,
                    versions: None,
                    failures: Vec::new(),
                    how: None,
                });
                continue;
            }
        }
        let pod = no_pods
            .is_none()
            .then(|| Pod::create(std::process::id() % 10_000 * 10 + i as u32));
        println!("{} ...", fault.name());
        let row = run_fault(fault, pod).await;
        for (what, n) in &row.failures {
            println!("  {n} x {what}");
        }
        println!(
            "  sent {}, failed {}, steady p99 {}, slowest {}, disturbed for {}",
            row.sent,
            row.failed,
            ms(row.baseline_p99),
            ms(row.worst),
            row.disturbed.map_or("-".into(), ms)
        );
        rows.push(row);
    }
    let text = report(&rows, no_pods.is_none());
    if only.is_none() {
        std::fs::write(output_path(), &text).expect("write RELIABILITY.md");
        println!("wrote {}", output_path().display());
    } else {
        println!("{text}");
    }
}
