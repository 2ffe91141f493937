//! bench-control-plane: N simulated proxies (gRPC streams from one process) against the real
//! `sidemesh-control-plane`; the time from a YAML write to each proxy's ACK, and the control
//! plane's memory. Prints one JSON line per proxy count.
//!
//! `bench-control-plane --proxies 1000,10000 --changes 5`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sidemesh_api::v1::control_message::Kind as ControlKind;
use sidemesh_api::v1::discovery_client::DiscoveryClient;
use sidemesh_api::v1::proxy_message::Kind as ProxyKind;
use sidemesh_api::v1::{Ack, Hello, ProxyMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const STREAMS_PER_CONNECTION: usize = 100;

fn config(timeout_ms: u64) -> String {
    let mut yaml = String::from(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{port: 1}]\n",
    );
    for i in 0..20 {
        yaml.push_str(&format!("  - name: svc-{i}\n    ports: [{{port: 80}}]\n    endpoints: [\"10.0.{i}.1:80\", \"10.0.{i}.2:80\"]\n"));
    }
    yaml.push_str("routes:\n");
    for i in 0..20 {
        yaml.push_str(&format!("  - name: r-{i}\n    service: svc-{i}\n    timeout: {timeout_ms}ms\n    retry: {{attempts: 2}}\n"));
    }
    yaml
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() as f64) * q).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

/// One simulated proxy: says hello, ACKs every snapshot, and records when it applied the
/// config version it is asked about.
async fn simulated(
    channel: tonic::transport::Channel,
    id: usize,
    applied: Arc<Vec<AtomicU64>>,
    received_at: Arc<Vec<AtomicU64>>,
    epoch: Instant,
) {
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello {
        proxy_id: format!("sim-{id}"),
        service: "client".into(),
        namespace: "default".into(),
        ready: true,
        ..Default::default()
    };
    if tx
        .send(ProxyMessage {
            kind: Some(ProxyKind::Hello(hello)),
        })
        .await
        .is_err()
    {
        return;
    }
    let Ok(resp) = DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
    else {
        eprintln!("sim-{id}: stream refused");
        return;
    };
    let mut inbound = resp.into_inner();
    while let Ok(Some(msg)) = inbound.message().await {
        if let Some(ControlKind::Snapshot(s)) = msg.kind {
            received_at[id].store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
            applied[id].store(s.config_version, Ordering::Release);
            let ack = Ack {
                version: s.version,
                nonce: s.nonce,
            };
            if tx
                .send(ProxyMessage {
                    kind: Some(ProxyKind::Ack(ack)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

async fn run(n: usize, changes: usize) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("mesh.yaml"), config(1000))?;
    let (grpc, admin) = (free_port(), free_port());
    let exe = std::env::current_exe()?.with_file_name("sidemesh-control-plane");
    let mut cp = std::process::Command::new(exe)
        .args([
            "--config",
            config_dir.to_str().unwrap_or_default(),
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--data-dir",
            dir.path().join("cp").to_str().unwrap_or_default(),
        ])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = cp.id();
    let url = format!("https://127.0.0.1:{grpc}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_rss = rss_kib(pid, "VmRSS:");
    // The simulated proxies pin the mesh's trust bundle, as real ones do.
    let bundle = std::fs::read_to_string(dir.path().join("cp/trust-bundle.pem"))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(bundle))
        .domain_name("localhost");

    let applied: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let received_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let connect_started = Instant::now();
    for chunk_start in (0..n).step_by(STREAMS_PER_CONNECTION) {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
            .tls_config(tls.clone())?
            .connect()
            .await?;
        for id in chunk_start..(chunk_start + STREAMS_PER_CONNECTION).min(n) {
            tokio::spawn(simulated(
                channel.clone(),
                id,
                applied.clone(),
                received_at.clone(),
                epoch,
            ));
        }
    }
    let all_at = |version: u64| applied.iter().all(|a| a.load(Ordering::Acquire) >= version);
    let wait = |version: u64| {
        let all_at = &all_at;
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !all_at(version) {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "not every proxy reached config version {version}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    wait(1).await?;
    let connected_in = connect_started.elapsed();
    let connected_rss = rss_kib(pid, "VmRSS:");

    let (mut p50s, mut p99s, mut lasts) = (Vec::new(), Vec::new(), Vec::new());
    for change in 0..changes {
        let version = change as u64 + 2;
        let written = epoch.elapsed().as_micros() as u64;
        let tmp = dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, config(1000 + version))?;
        std::fs::rename(&tmp, config_dir.join("mesh.yaml"))?;
        wait(version).await?;
        let mut ms: Vec<f64> = received_at
            .iter()
            .map(|t| t.load(Ordering::Relaxed).saturating_sub(written) as f64 / 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        p50s.push(percentile(&ms, 0.5));
        p99s.push(percentile(&ms, 0.99));
        lasts.push(*ms.last().unwrap_or(&0.0));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let peak_rss = rss_kib(pid, "VmHWM:");
    let _ = cp.kill();
    let _ = cp.wait();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(serde_json::json!({
        "proxies": n,
        "changes": changes,
        "connect_all_ms": connected_in.as_millis(),
        "write_to_ack_p50_ms": median(&mut p50s),
        "write_to_ack_p99_ms": median(&mut p99s),
        "write_to_last_ack_ms": median(&mut lasts),
        "write_to_last_ack_max_ms": lasts.iter().copied().fold(0.0, f64::max),
        "cp_rss_idle_mib": idle_rss as f64 / 1024.0,
        "cp_rss_connected_mib": connected_rss as f64 / 1024.0,
        "cp_rss_peak_mib": peak_rss as f64 / 1024.0,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut counts = vec![1000usize, 10000];
    let mut changes = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--proxies" => {
                counts = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.parse().ok())
                    .collect()
            }
            "--changes" => changes = args.next().and_then(|s| s.parse().ok()).unwrap_or(5),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    for n in counts {
        println!("{}", run(n, changes).await?);
    }
    Ok(())
}
