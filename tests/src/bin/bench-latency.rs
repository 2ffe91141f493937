//! bench-latency: latency at a fixed request rate, for `bench/run.sh`.
//!
//! Open loop: request i is due at `start + i / rate` and its latency is measured from that
//! moment, not from when it was actually sent, so a stall shows up in the tail instead of
//! quietly lowering the rate (no coordinated omission). Prints one JSON line.
//!
//! The load runs on a current-thread runtime plus one scheduling thread: pin the process
//! to one core (`taskset -c 0`), as `bench/run.py` does, and the scheduler spins briefly.
//!
//! `bench-latency --url http://127.0.0.1:8080/ --rate 1000 --duration 10s [--connections 16] [--h2]`
//! `bench-latency --url http://127.0.0.1:8081/pkg.Service/Method --grpc-body req.bin ...`: gRPC
//! unary calls over HTTP/2 (the body is a length-prefixed message); success is `grpc-status: 0`.

use std::time::{Duration, Instant};

/// Spin this long before each due time; the kernel's default timer slack is 50 us.
const SPIN: Duration = Duration::from_micros(60);

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

struct Args {
    url: String,
    rate: f64,
    duration: Duration,
    connections: usize,
    h2: bool,
    /// A gRPC request (framed message) to POST instead of a GET.
    grpc_body: Option<Bytes>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        url: String::new(),
        rate: 1000.0,
        duration: Duration::from_secs(10),
        connections: 16,
        h2: false,
        grpc_body: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--rate" => args.rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--duration" => {
                args.duration = value()?
                    .parse::<sidemesh_config::units::Duration>()
                    .map_err(|e| format!("--duration: {e}"))?
                    .get()
            }
            "--connections" => {
                args.connections = value()?
                    .parse()
                    .map_err(|e| format!("--connections: {e}"))?
            }
            "--h2" => args.h2 = true,
            "--grpc-body" => {
                let path = value()?;
                let body = std::fs::read(&path).map_err(|e| format!("--grpc-body {path}: {e}"))?;
                args.grpc_body = Some(Bytes::from(body));
                args.h2 = true;
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.url.is_empty() {
        return Err("--url is required".into());
    }
    Ok(args)
}

/// One call: a GET, or a gRPC unary call whose status is read from the trailers (or from the
/// headers of a trailers-only answer). True when it succeeded.
async fn call(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    grpc_body: Option<&Bytes>,
) -> bool {
    let request = match grpc_body {
        None => client.get(uri.clone()),
        Some(body) => {
            let Ok(req) = http::Request::post(uri.clone())
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(body.clone()))
            else {
                return false;
            };
            client.request(req)
        }
    };
    let Ok(resp) = request.await else {
        return false;
    };
    if !resp.status().is_success() {
        return false;
    }
    let header_status = resp.headers().get("grpc-status").cloned();
    let Ok(collected) = resp.into_body().collect().await else {
        return false;
    };
    if grpc_body.is_none() {
        return true;
    }
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(header_status);
    status.is_some_and(|s| s == "0")
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-latency: {e}");
            std::process::exit(2);
        }
    };
    // Without TCP_NODELAY, small HTTP/2 frames meet Nagle's algorithm and delayed ACKs, and a
    // direct call to a server that does not set it either waits tens of milliseconds.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.connections)
        .http2_only(args.h2)
        .build(connector);
    let uri: http::Uri = match args.url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("bench-latency: invalid --url: {e}");
            std::process::exit(2);
        }
    };
    // Warm the pool so connection set-up is not measured.
    for _ in 0..args.connections {
        call(&client, &uri, args.grpc_body.as_ref()).await;
    }
    let total = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
    // Tokio's timer has millisecond resolution; a thread sleeping precisely (and spinning for
    // the last 60 us, the kernel's default timer slack) releases each request on time.
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let start = Instant::now() + Duration::from_millis(10);
    let rate = args.rate;
    std::thread::spawn(move || {
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now + SPIN {
                std::thread::sleep(due - now - SPIN);
            }
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            if due_tx.send(due).is_err() {
                return;
            }
        }
    });
    while let Some(due) = due_rx.recv().await {
        let (client, uri, tx) = (client.clone(), uri.clone(), tx.clone());
        let body = args.grpc_body.clone();
        tokio::spawn(async move {
            let ok = call(&client, &uri, body.as_ref()).await;
            let _ = tx.send(ok.then(|| due.elapsed().as_micros() as u64));
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0u64;
    while let Some(result) = rx.recv().await {
        match result {
            Some(us) => latencies.push(us),
            None => errors += 1,
        }
    }
    latencies.sort_unstable();
    let achieved = total as f64 / start.elapsed().as_secs_f64().max(1e-9);
    println!(
        "{}",
        serde_json::json!({
            "sent": total,
            "ok": latencies.len(),
            "errors": errors,
            "rate": args.rate,
            "achieved_rate": (achieved * 10.0).round() / 10.0,
            "p50_us": percentile(&latencies, 0.50),
            "p99_us": percentile(&latencies, 0.99),
            "p999_us": percentile(&latencies, 0.999),
            "max_us": latencies.last().copied().unwrap_or(0),
        })
    );
}
