//! Balancing under uneven endpoints (`bench/run.sh --only balancing`, or `cargo bench -p
//! sidemesh-tests --bench balancing`): least-request against peak EWMA (and round robin for
//! reference), through the real proxy (`app::build`, in-process, port 0) in front of three
//! endpoints of which one answers five times slower. Closed loops of 2, 8 and 32 clients;
//! rounds interleave the policies; medians over rounds. Writes the `balancing` section of
//! BENCHMARKS.md.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sidemesh_tests::TestProxy;
use tokio::net::TcpListener;

const ROUNDS: usize = 3;
const LENGTH: Duration = Duration::from_secs(4);
const FAST: Duration = Duration::from_millis(5);
const SLOW: Duration = Duration::from_millis(25);
const POLICIES: [&str; 3] = ["leastRequest", "peakEwma", "roundRobin"];
const CLIENTS: [usize; 3] = [2, 8, 32];

/// An endpoint that answers after `delay`, counting its requests.
async fn endpoint(delay: Duration) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let hits = counted.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let hits = hits.clone();
                    async move {
                        hits.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

struct Measured {
    rps: f64,
    mean: Duration,
    p99: Duration,
    slow_share: f64,
}

async fn measure(
    policy: &str,
    clients: usize,
    endpoints: &[(SocketAddr, Arc<AtomicU64>)],
) -> Measured {
    let list: Vec<String> = endpoints.iter().map(|(a, _)| format!("\"{a}\"")).collect();
    let yaml = format!(
        "apiVersion: sidemesh.io/v1\nkind: Mesh\nservices:\n  - name: client\n    ports: [{{port: 1}}]\n  - name: app\n    ports: [{{port: 80}}]\n    endpoints: [{}]\n    loadBalancer: {{policy: {policy}}}\n",
        list.join(", ")
    );
    let proxy = TestProxy::start(&yaml, "client", &["app"], |_| {}).await;
    let url = proxy.url("app", "/");
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // Warm the pools and the estimates.
    for _ in 0..30 {
        let resp = client.get(url.parse().expect("url")).await.expect("warm");
        resp.into_body().collect().await.expect("body");
    }
    let before: Vec<u64> = endpoints
        .iter()
        .map(|(_, h)| h.load(Ordering::Relaxed))
        .collect();
    let until = Instant::now() + LENGTH;
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (client, url) = (client.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let resp = client.get(url.parse().expect("url")).await.expect("GET");
                resp.into_body().collect().await.expect("body");
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("join"));
    }
    let counts: Vec<u64> = endpoints
        .iter()
        .zip(&before)
        .map(|((_, h), b)| h.load(Ordering::Relaxed) - b)
        .collect();
    all.sort();
    let total: Duration = all.iter().sum();
    Measured {
        rps: all.len() as f64 / LENGTH.as_secs_f64(),
        mean: total / all.len().max(1) as u32,
        p99: all[(all.len() * 99 / 100).min(all.len() - 1)],
        slow_share: counts[2] as f64 / counts.iter().sum::<u64>().max(1) as f64,
    }
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}-{hi:.2}")
}

fn replace_section(path: &Path, name: &str, body: &str) {
    let (start, end) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{start}\n{}\n{end}", body.trim());
    let text = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(path, text).expect("write BENCHMARKS.md");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let endpoints = vec![
        endpoint(FAST).await,
        endpoint(FAST).await,
        endpoint(SLOW).await,
    ];
    // results[clients][policy] = one Measured per round
    let mut results: Vec<Vec<Vec<Measured>>> = CLIENTS
        .iter()
        .map(|_| POLICIES.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..ROUNDS {
        for (ci, &clients) in CLIENTS.iter().enumerate() {
            for (pi, policy) in POLICIES.iter().enumerate() {
                let m = measure(policy, clients, &endpoints).await;
                println!(
                    "round {round} clients {clients} {policy}: {:.0} req/s, mean {:?}, p99 {:?}, slow endpoint {:.1} %",
                    m.rps,
                    m.mean,
                    m.p99,
                    m.slow_share * 100.0
                );
                results[ci][pi].push(m);
            }
        }
    }
    let mut out = String::new();
    out.push_str("## Balancing under uneven endpoints\n\n");
    out.push_str(&format!(
        "Produced by `bench/run.sh --only balancing` on {}: the proxy in front of three endpoints, \
         two answering in {} ms and one in {} ms; closed loops of {:?} clients for {} s; {ROUNDS} \
         rounds interleaving the policies; medians over rounds, the spread of the per-round \
         ratio to least-request in brackets. The ideal share of the slow endpoint is small \
         but not zero (it is a third of the capacity at a fifth of the speed).\n\n",
        date(),
        FAST.as_millis(),
        SLOW.as_millis(),
        CLIENTS,
        LENGTH.as_secs()
    ));
    out.push_str(
        "| clients | policy | req/s | mean latency | p99 | slow endpoint's share | mean vs leastRequest |\n",
    );
    out.push_str("|---:|---|---:|---:|---:|---:|---:|\n");
    for (ci, &clients) in CLIENTS.iter().enumerate() {
        let base: Vec<f64> = results[ci][0]
            .iter()
            .map(|m| m.mean.as_secs_f64())
            .collect();
        for (pi, policy) in POLICIES.iter().enumerate() {
            let runs = &results[ci][pi];
            let ratios: Vec<f64> = runs
                .iter()
                .zip(&base)
                .map(|(m, b)| m.mean.as_secs_f64() / b)
                .collect();
            out.push_str(&format!(
                "| {clients} | {policy} | {:.0} | {:.1} ms | {:.1} ms | {:.1} % | {:.2}x ({}) |\n",
                median(runs.iter().map(|m| m.rps).collect()),
                median(runs.iter().map(|m| m.mean.as_secs_f64()).collect()) * 1000.0,
                median(runs.iter().map(|m| m.p99.as_secs_f64()).collect()) * 1000.0,
                median(runs.iter().map(|m| m.slow_share).collect()) * 100.0,
                median(ratios.clone()),
                spread(&ratios)
            ));
        }
    }
    println!("{out}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    replace_section(&path, "balancing", &out);
    println!("wrote the balancing section of {}", path.display());
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
