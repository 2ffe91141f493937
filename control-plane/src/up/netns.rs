//! `sidemesh up --netns`: the demo as pods. Each workload gets a network namespace on a bridge,
//! the iptables rules of `sidemesh-proxy init`, its app and its proxy as separate processes
//! (the proxy as uid 2102, as the init container expects), and names resolved through
//! `/etc/netns/<ns>/hosts`. The apps make plain calls to `http://user-service:8081`; the
//! proxies intercept them transparently and talk mutual TLS across the bridge.
//!
//! The control plane and the span collector run in this process, on the host's end of a link
//! to the bridge. Everything created is removed at exit: processes, namespaces, the link and
//! the hosts files.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::{Spans, UpArgs, config_path, control_plane_args};
use crate::summary;

/// The pods' subnet; the host's end of the link is `.254`.
const SUBNET: &str = "10.213.0";
/// The uid the proxies run as (what `sidemesh-proxy init` exempts from interception).
const PROXY_UID: &str = "2102";

struct PodSpec {
    /// Short name: the namespace is `sm-<name>`.
    name: &'static str,
    service: &'static str,
    ip: &'static str,
    /// The app's port (none for the client-only loadgen).
    port: Option<u16>,
}

const PODS: [PodSpec; 3] = [
    PodSpec {
        name: "users",
        service: "user-service",
        ip: "10.213.0.1",
        port: Some(8081),
    },
    PodSpec {
        name: "orders",
        service: "order-service",
        ip: "10.213.0.2",
        port: Some(8082),
    },
    PodSpec {
        name: "loadgen",
        service: "loadgen",
        ip: "10.213.0.3",
        port: None,
    },
];

const NODE_NS: &str = "sm-node";
const HOST_VETH: &str = "sm-host";

fn ns(pod: &PodSpec) -> String {
    format!("sm-{}", pod.name)
}

/// Runs a setup command; its stderr is the error.
fn sh(cmd: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `{}`: {e}", cmd[0]))?;
    anyhow::ensure!(
        out.status.success(),
        "`{}` failed: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn quiet(cmd: &[&str]) {
    let _ = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Why `--netns` cannot run here, if it cannot.
fn preflight(bin_dir: &Path) -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        == Some("0");
    anyhow::ensure!(
        root,
        "--netns needs root (network namespaces and iptables); run `sidemesh up` without it for the explicit-mode mesh"
    );
    for tool in ["ip", "iptables", "setpriv"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        anyhow::ensure!(
            found,
            "--netns needs `{tool}` (Debian: apt install iproute2 iptables util-linux)"
        );
    }
    for bin in ["sidemesh-proxy", "user-service", "order-service", "loadgen"] {
        anyhow::ensure!(
            bin_dir.join(bin).is_file(),
            "--netns runs each workload as its own process and needs `{bin}` next to `sidemesh` in {} (cargo build --workspace)",
            bin_dir.display()
        );
    }
    Ok(())
}

/// The namespaces, link and hosts files; removed on drop, whatever happened.
struct Network;

impl Network {
    fn create() -> anyhow::Result<Network> {
        // Leftovers of a run that was killed are removed first.
        Network::remove();
        let network = Network;
        sh(&["ip", "netns", "add", NODE_NS])?;
        sh(&["ip", "-n", NODE_NS, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", NODE_NS, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", NODE_NS, "link", "set", "br0", "up"])?;
        sh(&[
            "ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", "vhost", "netns",
            NODE_NS,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{SUBNET}.254/24"),
            "dev",
            HOST_VETH,
        ])?;
        sh(&["ip", "link", "set", HOST_VETH, "up"])?;
        sh(&[
            "ip", "-n", NODE_NS, "link", "set", "vhost", "master", "br0", "up",
        ])?;
        let hosts: String = PODS
            .iter()
            .map(|p| format!("{} {} {}.demo\n", p.ip, p.service, p.service))
            .collect();
        for (i, pod) in PODS.iter().enumerate() {
            let ns = ns(pod);
            let veth = format!("v{i}");
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "-n", NODE_NS, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            sh(&[
                "ip", "-n", NODE_NS, "link", "set", &veth, "master", "br0", "up",
            ])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", pod.ip),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            // `ip netns exec` mounts this over /etc/hosts inside the namespace.
            let dir = PathBuf::from(format!("/etc/netns/{ns}"));
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}"))?;
        }
        Ok(network)
    }

    fn remove() {
        for pod in &PODS {
            let ns = ns(pod);
            quiet(&["ip", "netns", "delete", &ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        quiet(&["ip", "link", "delete", HOST_VETH]);
        quiet(&["ip", "netns", "delete", NODE_NS]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        Network::remove();
    }
}

/// A workload process, its output in a log file; killed if dropped while running.
struct Process {
    name: String,
    child: Child,
}

impl Process {
    fn spawn(
        name: &str,
        pod: &PodSpec,
        as_proxy: bool,
        program: &Path,
        args: &[String],
        logs: &Path,
    ) -> anyhow::Result<Process> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new("ip");
        // --pdeathsig: if `sidemesh up` itself is killed (SIGKILL, a crash), its workloads get
        // SIGTERM instead of living on; the next start removes the namespaces.
        cmd.args(["netns", "exec", &ns(pod), "setpriv", "--pdeathsig", "TERM"]);
        if as_proxy {
            cmd.args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"]);
        }
        cmd.arg(program)
            .args(args)
            .env("NO_COLOR", "1")
            .env("POD_IP", pod.ip)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a terminal's Ctrl-C reaches `sidemesh up` alone, which
            // stops the workloads in order.
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        Ok(Process {
            name: name.to_string(),
            child,
        })
    }

    /// SIGTERM, then up to `grace` to exit, then SIGKILL.
    async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            quiet(&["kill", "-TERM", &pid.to_string()]);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop within {grace:?}; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

/// GET until 200 or the deadline.
async fn wait_ready(url: &str, what: &str, logs: &Path, timeout: Duration) -> anyhow::Result<()> {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let uri: http::Uri = url.parse()?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(1), client.get(uri.clone()))
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status().is_success()));
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} was not ready within {timeout:?} (logs in {})",
            logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything `--netns` runs, once it has started.
struct Started {
    processes: Vec<Process>,
    loadgen: Process,
    cp_task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    cp_grpc: SocketAddr,
    cp_admin: SocketAddr,
    stop_tx: watch::Sender<bool>,
    spans: Spans,
}

/// Starts the control plane, the span collector, then each pod: init rules, proxy, app, and
/// the load generator last.
async fn start(
    args: &UpArgs,
    bin_dir: &Path,
    scratch: &Path,
    config: &Path,
    logs: &Path,
) -> anyhow::Result<Started> {
    let host: IpAddr = format!("{SUBNET}.254").parse()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let spans = Spans::start(args, host).await?;
    let otlp = spans.endpoint.clone();

    let data_dir = scratch.join("control-plane");
    let cp = crate::server::build(control_plane_args(
        config.to_path_buf(),
        SocketAddr::new(host, 0),
        args.control_plane_admin,
        data_dir.clone(),
    ))
    .await?;
    let (cp_grpc, cp_admin) = (cp.grpc_addr, cp.admin_addr);
    let cp_task = tokio::spawn(cp.run(stopped(stop_rx)));
    // Let the proxies' uid through the scratch folder to the join token (it is not secret
    // from root, who runs all of this).
    let token = data_dir.join("join-token");
    for dir in [scratch, data_dir.as_path()] {
        sh(&["chmod", "a+rx", &dir.display().to_string()])?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !token.exists() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the control plane wrote no join token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sh(&["chmod", "a+r", &token.display().to_string()])?;
    let bundle = data_dir.join(crate::server::TRUST_BUNDLE_FILE);

    let mut processes = Vec::new();
    let proxy_bin = scratch.join("sidemesh-proxy");
    std::fs::copy(bin_dir.join("sidemesh-proxy"), &proxy_bin)
        .map_err(|e| anyhow::anyhow!("cannot copy sidemesh-proxy to {}: {e}", scratch.display()))?;
    sh(&["chmod", "a+rx", &proxy_bin.display().to_string()])?;
    let otlp_args = |otlp: &Option<String>| -> Vec<String> {
        otlp.iter()
            .flat_map(|o| ["--otlp-endpoint".to_string(), o.clone()])
            .collect()
    };
    for pod in &PODS {
        // The same rules the init container installs.
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns(pod),
            &proxy_bin.display().to_string(),
            "init",
        ])?;
        let mut proxy_args = vec![
            "--control-plane".to_string(),
            format!("https://{cp_grpc}"),
            // The control plane's certificate names loopback; the bridge address is not in it.
            "--control-plane-server-name".into(),
            "localhost".into(),
            "--trust-bundle".into(),
            bundle.display().to_string(),
            "--join-token-file".into(),
            token.display().to_string(),
            "--service".into(),
            format!("{}.demo", pod.service),
            "--proxy-id".into(),
            format!("{}-pod", pod.service),
            "--mode".into(),
            "transparent".into(),
            "--outbound".into(),
            "0.0.0.0:15001".into(),
            "--inbound".into(),
            "0.0.0.0:15006".into(),
            "--admin".into(),
            "0.0.0.0:15020".into(),
            "--drain".into(),
            "2s".into(),
            "--log-format".into(),
            "text".into(),
        ];
        if let Some(port) = pod.port {
            proxy_args.extend(["--advertise".into(), format!("{}:{port}", pod.ip)]);
        }
        proxy_args.extend(otlp_args(&otlp));
        processes.push(Process::spawn(
            &format!("{}-proxy", pod.service),
            pod,
            true,
            &proxy_bin,
            &proxy_args,
            logs,
        )?);
    }
    for pod in &PODS {
        wait_ready(
            &format!("http://{}:15020/ready", pod.ip),
            &format!("{}'s proxy", pod.service),
            logs,
            Duration::from_secs(20),
        )
        .await?;
    }
    let apps: [(&PodSpec, &str, Vec<String>); 2] = [
        (
            &PODS[0],
            "user-service",
            vec![
                "--listen".into(),
                "0.0.0.0:8081".into(),
                "--log-format".into(),
                "text".into(),
                "--fail-rate".into(),
                args.fail_rate.to_string(),
            ],
        ),
        (
            &PODS[1],
            "order-service",
            vec![
                "--listen".into(),
                "0.0.0.0:8082".into(),
                "--user-service".into(),
                "http://user-service:8081".into(),
                "--log-format".into(),
                "text".into(),
            ],
        ),
    ];
    for (pod, program, mut app_args) in apps {
        app_args.extend(otlp_args(&otlp));
        processes.push(Process::spawn(
            program,
            pod,
            false,
            &bin_dir.join(program),
            &app_args,
            logs,
        )?);
    }
    // Strict mTLS refuses plaintext from the host, so the apps' readiness is their log line.
    for program in ["user-service", "order-service"] {
        let log = logs.join(format!("{program}.log"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening")) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{program} did not start within 20s (see {})",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut load_args = vec![
        "--target".to_string(),
        "http://order-service:8082".into(),
        "--rate".into(),
        args.rate.to_string(),
        "--client-id".into(),
        "sidemesh-up".into(),
    ];
    if let Some(d) = args.duration {
        load_args.extend(["--duration".into(), format!("{}ms", d.as_millis())]);
    }
    load_args.extend(otlp_args(&otlp));
    let loadgen = Process::spawn(
        "loadgen",
        &PODS[2],
        false,
        &bin_dir.join("loadgen"),
        &load_args,
        logs,
    )?;

    Ok(Started {
        processes,
        loadgen,
        cp_task,
        cp_grpc,
        cp_admin,
        stop_tx,
        spans,
    })
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Signal handlers first: from here on Ctrl-C, SIGTERM or a closed terminal clean up.
    let signal = super::stop_signals()?;
    tokio::pin!(signal);
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    preflight(&bin_dir)?;
    let (config, config_name) = config_path(&args)?;
    let mesh = sidemesh_config::load(&config)?;
    let logs = args.state_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    // The control plane's data (CA, join token) and a copy of the proxy binary, readable by
    // the proxies' uid wherever `sidemesh` itself lives (say, under a 0700 home).
    let scratch = tempfile::tempdir()?;
    let network = Network::create()?;
    let started = tokio::select! {
        started = start(&args, &bin_dir, scratch.path(), &config, &logs) => started?,
        () = &mut signal => {
            // The half-started mesh is dropped: its processes are killed, and `network`
            // removes the namespaces on the way out.
            anyhow::bail!("interrupted while starting; what had started is stopped and removed");
        }
    };
    let Started {
        processes,
        mut loadgen,
        cp_task,
        cp_grpc,
        cp_admin,
        stop_tx,
        spans,
    } = started;

    println!(
        "Sidemesh up --netns: a network namespace per pod, transparent interception, mutual TLS"
    );
    println!(
        "  config         {config_name}: {}",
        summary::one_line(&mesh)
    );
    println!(
        "  control plane  grpc https://{cp_grpc} (TLS), admin http://{cp_admin}   (sidemesh status --control-plane http://{cp_admin})"
    );
    for pod in &PODS {
        let app = pod
            .port
            .map_or_else(|| "client only".to_string(), |p| format!("app :{p}"));
        println!(
            "  {:<14} pod {} ({}), {app}, proxy admin http://{}:15020/metrics",
            pod.service,
            ns(pod),
            pod.ip,
            pod.ip
        );
    }
    println!(
        "  path           loadgen calls http://order-service:8082, order-service calls http://user-service:8081; iptables hands both to the pod's proxy, and proxies talk mTLS across the bridge"
    );
    println!("  traces         {}", spans.describe());
    println!(
        "  logs           {}   (try: ip netns exec sm-orders curl -s http://user-service:8081/users/1)",
        logs.display()
    );
    println!(
        "  edits          change {} and the table follows; Ctrl-C stops everything",
        config.display()
    );
    println!();

    let scraper = crate::stat::Scraper::new(&format!("http://{cp_admin}"));
    let table = crate::stat::watch(&scraper, args.stats_interval, std::future::pending());
    let outcome = tokio::select! {
        exit = loadgen.child.wait() => match exit {
            Ok(status) if status.success() => {
                let log = std::fs::read_to_string(logs.join("loadgen.log")).unwrap_or_default();
                if let Some(total) = log.lines().rev().find(|l| l.starts_with("total:")) {
                    super::say(total);
                }
                Ok(())
            }
            Ok(status) => Err(anyhow::anyhow!("the load generator exited with {status} (see {})", logs.join("loadgen.log").display())),
            Err(e) => Err(e.into()),
        },
        shown = table => shown,
        () = &mut signal => Ok(()),
    };
    // Callers first, so nothing is cut off mid-request; then the apps, the proxies, the
    // control plane, and the collector last so the final spans are kept.
    loadgen.stop(Duration::from_secs(5)).await;
    for process in processes.into_iter().rev() {
        process.stop(Duration::from_secs(5)).await;
    }
    let _ = stop_tx.send(true);
    cp_task.await??;
    spans.finish().await;
    drop(network);
    super::say("stopped");
    outcome
}
