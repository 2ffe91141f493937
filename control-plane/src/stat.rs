//! `sidemesh stat`: a table per service, like `linkerd viz stat`, from every proxy's `/metrics`
//! via the control plane: its `/stat` reads all the proxies it knows at once (each sends its
//! admin address in its Hello) and passes on the table's metric families, so `sidemesh stat`
//! needs to reach the control plane only (a port-forward on Kubernetes). Two readings a window
//! apart give the rates.
//!
//! A service's row is its inbound side: the requests its proxies accepted, their success rate
//! (not 5xx) and latency to response headers. Retries and rate-limited requests are counted
//! against the service that was called, whichever proxy made or refused them: a caller's
//! outbound limit refuses requests before they reach the service. `SHED/s` counts the
//! requests an adaptive concurrency limit shed or a circuit breaker refused (503s the proxy
//! answered at once to spare an overloaded service), against the service that was
//! spared. Denied requests are refused
//! by the service's authorization policy. `MTLS` is the share of inbound requests that came
//! over mutual TLS.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use serde::{Deserialize, Serialize};

use crate::admin::{ProxyRow, Status};

/// One line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the Prometheus (or OpenMetrics) text exposition; comments and malformed lines are
/// skipped, since a table is still useful without them.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches([',', ' ']);
            if let Some(after) = body.strip_prefix('}') {
                break after;
            }
            let (key, after) = body.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_string(), value));
            body = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Cumulative counters of one service, as read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub requests: f64,
    pub failures: f64,
    /// Latency histogram: (upper bound in seconds, cumulative count).
    pub buckets: Vec<(f64, f64)>,
    pub retries: f64,
    pub rate_limited: f64,
    /// Shed by an adaptive concurrency limit or a circuit breaker's threshold (503).
    pub shed: f64,
    pub denied: f64,
    pub mtls_requests: f64,
    pub plaintext_requests: f64,
}

impl Counters {
    /// The increase since `earlier`; a counter that went down means the proxy restarted, and
    /// everything it counted since is the increase.
    fn since(&self, earlier: &Counters) -> Counters {
        let d = |now: f64, before: f64| if now >= before { now - before } else { now };
        let restarted = self.requests < earlier.requests;
        let buckets = self
            .buckets
            .iter()
            .map(|&(le, n)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, n)| *n);
                (le, if restarted { n } else { d(n, before) })
            })
            .collect();
        Counters {
            requests: d(self.requests, earlier.requests),
            failures: if restarted {
                self.failures
            } else {
                d(self.failures, earlier.failures)
            },
            buckets,
            retries: d(self.retries, earlier.retries),
            rate_limited: d(self.rate_limited, earlier.rate_limited),
            shed: d(self.shed, earlier.shed),
            denied: d(self.denied, earlier.denied),
            mtls_requests: d(self.mtls_requests, earlier.mtls_requests),
            plaintext_requests: d(self.plaintext_requests, earlier.plaintext_requests),
        }
    }

    fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.retries += other.retries;
        self.rate_limited += other.rate_limited;
        self.shed += other.shed;
        self.denied += other.denied;
        self.mtls_requests += other.mtls_requests;
        self.plaintext_requests += other.plaintext_requests;
        for &(le, n) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, total)) => *total += n,
                None => self.buckets.push((le, n)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// The `q` quantile of the latency histogram, interpolated inside its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without requests.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.buckets.last().map(|(_, n)| *n)?;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= rank {
                if le.is_infinite() {
                    // Beyond the last bound: all that can be said is "at least".
                    return Duration::try_from_secs_f64(lower.0).ok();
                }
                let share = if n > lower.1 {
                    (rank - lower.1) / (n - lower.1)
                } else {
                    1.0
                };
                return Duration::try_from_secs_f64(lower.0 + (le - lower.0) * share).ok();
            }
            lower = (le, n);
        }
        None
    }
}

/// Sorts one proxy's samples into the counters of the services they concern. `local` is the
/// proxy's own service (its inbound side); labels name the called service otherwise.
pub fn attribute(samples: &[Sample], local: &str, into: &mut BTreeMap<String, Counters>) {
    let inbound = |s: &Sample| s.label("direction") == Some("inbound");
    for s in samples {
        match s.name.as_str() {
            "sidemesh_requests_total" if inbound(s) => {
                let c = into.entry(local.to_string()).or_default();
                c.requests += s.value;
                if s.label("status_class") == Some("5xx") {
                    c.failures += s.value;
                }
            }
            // Failed gRPC calls are answered 200 with an error grpc-status: failures too.
            "sidemesh_grpc_errors_total" if inbound(s) => {
                into.entry(local.to_string()).or_default().failures += s.value;
            }
            "sidemesh_request_duration_seconds_bucket" if inbound(s) => {
                let Some(le) = s.label("le").and_then(|v| match v {
                    "+Inf" => Some(f64::INFINITY),
                    v => v.parse::<f64>().ok(),
                }) else {
                    continue;
                };
                let c = into.entry(local.to_string()).or_default();
                c.add(&Counters {
                    buckets: vec![(le, s.value)],
                    ..Counters::default()
                });
            }
            "sidemesh_retries_total" | "sidemesh_rate_limited_total" => {
                let Some(service) = s.label("service") else {
                    continue;
                };
                let c = into.entry(service.to_string()).or_default();
                if s.name == "sidemesh_retries_total" {
                    c.retries += s.value;
                } else {
                    c.rate_limited += s.value;
                }
            }
            "sidemesh_adaptive_concurrency_shed_total"
            | "sidemesh_circuit_breaker_overflow_total" => {
                let Some(service) = s.label("service") else {
                    continue;
                };
                into.entry(service.to_string()).or_default().shed += s.value;
            }
            "sidemesh_denied_requests_total" => {
                into.entry(local.to_string()).or_default().denied += s.value;
            }
            "sidemesh_inbound_requests_by_client_total" => {
                let c = into.entry(local.to_string()).or_default();
                if s.label("client_id") == Some("unauthenticated") {
                    c.plaintext_requests += s.value;
                } else {
                    c.mtls_requests += s.value;
                }
            }
            _ => {}
        }
    }
}

/// One reading of the whole mesh.
#[derive(Debug)]
pub struct Reading {
    pub at: Instant,
    pub config_version: Option<u64>,
    /// The proxies the control plane knows, and whether their metrics could be read.
    pub proxies: Vec<(ProxyRow, bool)>,
    /// Per proxy id: its counters by service.
    pub by_proxy: BTreeMap<String, BTreeMap<String, Counters>>,
}

/// The metric families the table is made of; the control plane passes only these on.
const FAMILIES: [&str; 9] = [
    "sidemesh_requests_total",
    "sidemesh_adaptive_concurrency_shed_total",
    "sidemesh_circuit_breaker_overflow_total",
    "sidemesh_grpc_errors_total",
    "sidemesh_request_duration_seconds_bucket",
    "sidemesh_retries_total",
    "sidemesh_rate_limited_total",
    "sidemesh_denied_requests_total",
    "sidemesh_inbound_requests_by_client_total",
];

/// A proxy and what its `/metrics` said (the table's families only), or `None` when it could
/// not be read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyMetrics {
    pub proxy: ProxyRow,
    pub metrics: Option<String>,
}

/// The control plane's `/stat`: every proxy it knows, read at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatResponse {
    pub config_version: Option<u64>,
    pub proxies: Vec<ProxyMetrics>,
}

fn http_client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// GET `url`, the whole answer within `limit`.
async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
    limit: Duration,
) -> anyhow::Result<Bytes> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid address `{url}`: {e}"))?;
    let fetch = async {
        let resp = client.get(uri).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "{url} answered {}",
            resp.status()
        );
        Ok(resp.into_body().collect().await?.to_bytes())
    };
    tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("{url} did not answer within {limit:?}"))?
}

/// How long the control plane waits for one proxy's metrics.
const PROXY_LIMIT: Duration = Duration::from_millis(1500);
/// How long `sidemesh stat` waits for the control plane (which waits for the proxies).
const CONTROL_PLANE_LIMIT: Duration = Duration::from_secs(5);
/// Proxies read at once by the control plane.
const CONCURRENT_READS: usize = 64;

/// The control plane's side of `/stat`: reads every connected proxy's `/metrics` at once over
/// the pod network (which `sidemesh stat`, outside the cluster, may not reach).
#[derive(Debug, Clone)]
pub struct Collector {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Collector {
    fn default() -> Self {
        Self {
            client: http_client(),
        }
    }
}

impl Collector {
    pub async fn collect(&self, status: Status) -> StatResponse {
        use futures_util::StreamExt;
        // Owned jobs, so the futures borrow nothing (the admin server runs them in a task).
        let jobs: Vec<_> = status
            .proxies
            .iter()
            .map(|p| {
                let admin = p.admin.clone().filter(|_| p.connected);
                (self.client.clone(), admin)
            })
            .collect();
        // Many at once, each with its own limit, so a slow proxy costs its own row only.
        let scraped: Vec<Option<String>> = futures_util::stream::iter(jobs)
            .map(|(client, admin)| async move {
                let url = format!("http://{}/metrics", admin?);
                let text = get(&client, &url, PROXY_LIMIT).await.ok()?;
                let text = String::from_utf8_lossy(&text);
                let kept: String = text
                    .lines()
                    .filter(|l| FAMILIES.iter().any(|f| l.starts_with(f)))
                    .flat_map(|l| [l, "\n"])
                    .collect();
                Some(kept)
            })
            .buffered(CONCURRENT_READS)
            .collect()
            .await;
        StatResponse {
            config_version: status.config.map(|c| c.version),
            proxies: status
                .proxies
                .into_iter()
                .zip(scraped)
                .map(|(proxy, metrics)| ProxyMetrics { proxy, metrics })
                .collect(),
        }
    }
}

/// `sidemesh stat`'s side: one reading from the control plane's `/stat`.
#[derive(Debug, Clone)]
pub struct Scraper {
    control_plane: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Scraper {
    pub fn new(control_plane: &str) -> Self {
        Self {
            control_plane: control_plane.trim_end_matches('/').to_string(),
            client: http_client(),
        }
    }

    pub async fn read(&self) -> anyhow::Result<Reading> {
        let url = format!("{}/stat", self.control_plane);
        let body = get(&self.client, &url, CONTROL_PLANE_LIMIT)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read traffic from the control plane at {}: {e:#}",
                    self.control_plane
                )
            })?;
        let at = Instant::now();
        let stat: StatResponse = serde_json::from_slice(&body)
            .map_err(|e| anyhow::anyhow!("{url} is not a Sidemesh control plane's: {e}"))?;
        let mut by_proxy = BTreeMap::new();
        let mut proxies = Vec::new();
        for ProxyMetrics { proxy, metrics } in stat.proxies {
            if let Some(text) = &metrics {
                let mut counters = BTreeMap::new();
                attribute(&parse(text), &proxy.service, &mut counters);
                by_proxy.insert(proxy.id.clone(), counters);
            }
            proxies.push((proxy, metrics.is_some()));
        }
        Ok(Reading {
            at,
            config_version: stat.config_version,
            proxies,
            by_proxy,
        })
    }
}

/// One service's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub service: String,
    pub namespace: String,
    /// Proxies whose metrics were read, of those connected to the control plane.
    pub proxies_read: usize,
    pub proxies: usize,
    /// Inbound requests per second.
    pub rps: f64,
    /// Share of inbound requests not answered 5xx; `None` without requests.
    pub success: Option<f64>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub retries_per_sec: f64,
    pub rate_limited_per_sec: f64,
    /// Shed (adaptive concurrency) or refused at a circuit breaker, per second.
    pub shed_per_sec: f64,
    pub denied_per_sec: f64,
    /// Share of inbound requests over mutual TLS; `None` without requests.
    pub mtls: Option<f64>,
}

/// The table between two readings.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub window: Duration,
    pub config_version: Option<u64>,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn between(before: &Reading, after: &Reading) -> Table {
        let window = after.at.saturating_duration_since(before.at);
        let secs = window.as_secs_f64().max(1e-3);
        let mut totals: BTreeMap<String, Counters> = BTreeMap::new();
        for (id, services) in &after.by_proxy {
            // A proxy not read at the start of the window (new, or unreachable then) has no
            // baseline: its lifetime totals would show as one window's burst, so it sits this
            // window out.
            let Some(earlier) = before.by_proxy.get(id) else {
                continue;
            };
            for (service, now) in services {
                let delta = match earlier.get(service) {
                    Some(then) => now.since(then),
                    None => now.clone(),
                };
                totals.entry(service.clone()).or_default().add(&delta);
            }
        }
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for (proxy, read) in &after.proxies {
            let row = rows.entry(proxy.service.clone()).or_insert_with(|| Row {
                service: proxy.service.clone(),
                namespace: proxy.namespace.clone(),
                proxies_read: 0,
                proxies: 0,
                rps: 0.0,
                success: None,
                p50: None,
                p99: None,
                retries_per_sec: 0.0,
                rate_limited_per_sec: 0.0,
                shed_per_sec: 0.0,
                denied_per_sec: 0.0,
                mtls: None,
            });
            // Proxies gone but still in their disconnect grace are not counted.
            if proxy.connected {
                row.proxies += 1;
                row.proxies_read += usize::from(*read);
            }
        }
        for (service, c) in totals {
            let Some(row) = rows.get_mut(&service) else {
                continue;
            };
            row.rps = c.requests / secs;
            row.success = (c.requests > 0.0).then(|| 1.0 - c.failures / c.requests);
            row.p50 = c.quantile(0.5);
            row.p99 = c.quantile(0.99);
            row.retries_per_sec = c.retries / secs;
            row.rate_limited_per_sec = c.rate_limited / secs;
            row.shed_per_sec = c.shed / secs;
            row.denied_per_sec = c.denied / secs;
            let by_client = c.mtls_requests + c.plaintext_requests;
            row.mtls = (by_client > 0.0).then(|| c.mtls_requests / by_client);
        }
        Table {
            window,
            config_version: after.config_version,
            rows: rows.into_values().collect(),
        }
    }

    /// The column names, in order; each row renders to as many cells.
    pub const HEADER: [&'static str; 12] = [
        "SERVICE",
        "NAMESPACE",
        "MESHED",
        "RPS",
        "SUCCESS",
        "P50",
        "P99",
        "RETRY/s",
        "LIMITED/s",
        "SHED/s",
        "DENIED/s",
        "MTLS",
    ];

    fn cells(row: &Row) -> [String; 12] {
        let dash = || "-".to_string();
        let rate = |v: f64| format!("{v:.1}");
        let share = |v: Option<f64>| v.map_or_else(dash, |s| format!("{:.1}%", s * 100.0));
        [
            row.service.clone(),
            row.namespace.clone(),
            format!("{}/{}", row.proxies_read, row.proxies),
            rate(row.rps),
            share(row.success),
            row.p50.map_or_else(dash, latency),
            row.p99.map_or_else(dash, latency),
            rate(row.retries_per_sec),
            rate(row.rate_limited_per_sec),
            rate(row.shed_per_sec),
            rate(row.denied_per_sec),
            share(row.mtls),
        ]
    }

    /// The table as aligned text, one line per service under a header.
    pub fn render(&self) -> String {
        let header = Self::HEADER.map(str::to_string);
        let lines: Vec<[String; 12]> = std::iter::once(header)
            .chain(self.rows.iter().map(Self::cells))
            .collect();
        let mut widths = [0; 12];
        for line in &lines {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in &lines {
            let mut text = String::new();
            for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                let _ = write!(text, "{cell:<w$}");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }

    /// The line above the table: the window and the config version in force.
    pub fn caption(&self) -> String {
        let version = self
            .config_version
            .map_or_else(|| "none yet".to_string(), |v| v.to_string());
        format!(
            "last {:.1}s, config version {version}",
            self.window.as_secs_f64()
        )
    }
}

/// A latency the way people read them: `0.42ms`, `12ms`, `1.5s`.
fn latency(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

/// Prints a table every `window`, redrawn in place on a terminal, until `stop` resolves.
pub async fn watch(
    scraper: &Scraper,
    window: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    tokio::pin!(stop);
    // The first reading is the baseline: until it works, say why and try again.
    let mut before = loop {
        match scraper.read().await {
            Ok(reading) => break reading,
            Err(e) => eprintln!("warning: {e:#}"),
        }
        tokio::select! {
            () = tokio::time::sleep(window) => {}
            () = &mut stop => return Ok(()),
        }
    };
    let mut drawn = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(window) => {}
            () = &mut stop => return Ok(()),
        }
        let after = match scraper.read().await {
            Ok(reading) => reading,
            Err(e) => {
                eprintln!("warning: {e:#}");
                continue;
            }
        };
        let table = Table::between(&before, &after);
        let text = format!("{}\n{}", table.caption(), table.render());
        let mut stdout = std::io::stdout().lock();
        if terminal && drawn > 0 {
            // Back over the previous table and clear to the end of the screen.
            write!(stdout, "\x1b[{drawn}A\x1b[J")?;
        }
        if terminal {
            write!(stdout, "{text}")?;
            drawn = text.lines().count();
        } else {
            writeln!(stdout, "{text}")?;
        }
        stdout.flush()?;
        before = after;
    }
}

/// `sidemesh stat`: one table over `window`, or a live one with `watch`.
pub async fn run(control_plane: &str, window: Duration, watch_live: bool) -> anyhow::Result<()> {
    let scraper = Scraper::new(control_plane);
    if watch_live {
        return watch(&scraper, window, sidemesh_demo::server::shutdown_signal()).await;
    }
    let before = scraper.read().await?;
    anyhow::ensure!(
        !before.proxies.is_empty(),
        "no proxy is connected to the control plane at {control_plane}"
    );
    tokio::time::sleep(window).await;
    let table = Table::between(&before, &scraper.read().await?);
    print!("{}\n{}", table.caption(), table.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP sidemesh_requests Requests
# TYPE sidemesh_requests counter
sidemesh_requests_total{direction="inbound",service="user-service",route="user-lookup",status_class="2xx"} 90
sidemesh_requests_total{direction="inbound",service="user-service",route="user-lookup",status_class="5xx"} 10
sidemesh_requests_total{direction="outbound",service="other",route="default",status_class="2xx"} 7
sidemesh_request_duration_seconds_bucket{le="0.001",direction="inbound",service="user-service",route="user-lookup"} 50
sidemesh_request_duration_seconds_bucket{le="0.002",direction="inbound",service="user-service",route="user-lookup"} 98
sidemesh_request_duration_seconds_bucket{le="+Inf",direction="inbound",service="user-service",route="user-lookup"} 100
sidemesh_rate_limited_total{direction="outbound",service="other",route="r"} 4
sidemesh_denied_requests_total 3
sidemesh_adaptive_concurrency_shed_total{direction="inbound",service="user-service",route="inbound"} 6
sidemesh_circuit_breaker_overflow_total{service="other",threshold="maxRequests"} 2
sidemesh_inbound_requests_by_client_total{client_id="spiffe://td/ns/demo/sa/a \"q\""} 95
sidemesh_inbound_requests_by_client_total{client_id="unauthenticated"} 5
# EOF
"#;

    #[test]
    fn parses_labels_with_escapes_and_infinity() {
        let samples = parse(METRICS);
        assert_eq!(samples.len(), 12);
        let client = &samples[10];
        assert_eq!(
            client.label("client_id"),
            Some("spiffe://td/ns/demo/sa/a \"q\"")
        );
        assert_eq!(samples[5].label("le"), Some("+Inf"));
        assert_eq!(samples[7].labels, Vec::new());
        assert_eq!(samples[7].value, 3.0);
    }

    #[test]
    fn attributes_inbound_to_the_local_service_and_limits_to_the_called_one() {
        let mut by_service = BTreeMap::new();
        attribute(&parse(METRICS), "user-service", &mut by_service);
        let users = &by_service["user-service"];
        assert_eq!((users.requests, users.failures), (100.0, 10.0));
        assert_eq!((users.denied, users.mtls_requests), (3.0, 95.0));
        assert_eq!(users.buckets.len(), 3);
        let other = &by_service["other"];
        assert_eq!((other.requests, other.rate_limited), (0.0, 4.0));
        assert_eq!((users.shed, other.shed), (6.0, 2.0));
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let c = Counters {
            buckets: vec![(0.001, 50.0), (0.002, 98.0), (f64::INFINITY, 100.0)],
            ..Counters::default()
        };
        assert_eq!(c.quantile(0.5), Some(Duration::from_millis(1)));
        let p75 = c.quantile(0.75).expect("a p75").as_secs_f64();
        assert!((p75 - 0.0015208).abs() < 1e-6, "{p75}");
        // Past the last finite bound, the bound is what can be said.
        assert_eq!(c.quantile(0.995), Some(Duration::from_millis(2)));
        assert_eq!(Counters::default().quantile(0.5), None);
    }

    fn reading(at: Instant, proxies: &[(&str, &str, Option<&str>)]) -> Reading {
        let mut by_proxy = BTreeMap::new();
        let mut rows = Vec::new();
        for (id, service, metrics) in proxies {
            if let Some(text) = metrics {
                let mut counters = BTreeMap::new();
                attribute(&parse(text), service, &mut counters);
                by_proxy.insert(id.to_string(), counters);
            }
            let row = ProxyRow {
                id: id.to_string(),
                service: service.to_string(),
                namespace: "demo".into(),
                address: None,
                admin: Some("127.0.0.1:1".into()),
                ready: true,
                connected: true,
                connected_for_secs: 1,
                applied_version: 1,
                synced: true,
                last_nack: None,
            };
            rows.push((row, metrics.is_some()));
        }
        Reading {
            at,
            config_version: Some(2),
            proxies: rows,
            by_proxy,
        }
    }

    #[test]
    fn a_window_gives_rates_per_service_and_skips_proxies_without_a_baseline() {
        let inbound = |ok: u32, failed: u32| {
            format!(
                "sidemesh_requests_total{{direction=\"inbound\",service=\"users\",route=\"r\",status_class=\"2xx\"}} {ok}\n\
                 sidemesh_requests_total{{direction=\"inbound\",service=\"users\",route=\"r\",status_class=\"5xx\"}} {failed}\n"
            )
        };
        let caller = |retries: u32| {
            format!(
                "sidemesh_retries_total{{direction=\"outbound\",service=\"users\",route=\"r\"}} {retries}\n"
            )
        };
        let t0 = Instant::now();
        let (users0, users1) = (inbound(100, 0), inbound(290, 10));
        let (orders0, orders1) = (caller(5), caller(25));
        let late = inbound(5000, 0);
        let before = reading(
            t0,
            &[
                ("users-1", "users", Some(&users0)),
                ("orders-1", "orders", Some(&orders0)),
                ("users-2", "users", None),
            ],
        );
        let after = reading(
            t0 + Duration::from_secs(2),
            &[
                ("users-1", "users", Some(&users1)),
                ("orders-1", "orders", Some(&orders1)),
                ("users-2", "users", Some(&late)),
            ],
        );
        let table = Table::between(&before, &after);
        let users = table
            .rows
            .iter()
            .find(|r| r.service == "users")
            .expect("a users row");
        // users-2 had no reading at the window's start: its 5000 are not a 2-second burst.
        assert_eq!(users.rps, 100.0);
        assert_eq!(users.success, Some(0.95));
        assert_eq!(users.retries_per_sec, 10.0);
        assert_eq!((users.proxies_read, users.proxies), (2, 2));
        let orders = table
            .rows
            .iter()
            .find(|r| r.service == "orders")
            .expect("an orders row");
        assert_eq!((orders.rps, orders.success), (0.0, None));
    }

    #[test]
    fn a_restarted_proxy_counts_from_zero() {
        let before = Counters {
            requests: 100.0,
            failures: 5.0,
            ..Counters::default()
        };
        let after = Counters {
            requests: 7.0,
            failures: 1.0,
            ..Counters::default()
        };
        let d = after.since(&before);
        assert_eq!((d.requests, d.failures), (7.0, 1.0));
    }

    #[test]
    fn renders_aligned_columns_with_dashes_for_idle_services() {
        let row = |service: &str, rps: f64| Row {
            service: service.into(),
            namespace: "demo".into(),
            proxies_read: 1,
            proxies: 1,
            rps,
            success: (rps > 0.0).then_some(0.995),
            p50: (rps > 0.0).then_some(Duration::from_micros(420)),
            p99: (rps > 0.0).then_some(Duration::from_millis(25)),
            retries_per_sec: 0.0,
            rate_limited_per_sec: 1.5,
            shed_per_sec: 0.0,
            denied_per_sec: 0.0,
            mtls: (rps > 0.0).then_some(1.0),
        };
        let table = Table {
            window: Duration::from_secs(2),
            config_version: Some(3),
            rows: vec![row("loadgen", 0.0), row("user-service", 20.0)],
        };
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("SERVICE       NAMESPACE  MESHED  RPS"),
            "{text}"
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "user-service",
                "demo",
                "1/1",
                "20.0",
                "99.5%",
                "0.42ms",
                "25ms",
                "0.0",
                "1.5",
                "0.0",
                "0.0",
                "100.0%"
            ]
        );
        assert_eq!(lines[1].split_whitespace().nth(4), Some("-"));
        assert_eq!(table.caption(), "last 2.0s, config version 3");
    }
}
